"""pic = CacheBlend on the real CPU server (tiny Llama): exactness at ratio 1.0, selection per
request in its own context, a dense copy under pool pressure, stock batches untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import server_pool
from roundclient import generate, round_bodies, run_round, run_trace, stats

from sglang_tokendance.hints import build_request
from sglang_tokendance.models import build
from sglang_tokendance.server import ServerProcess, start_all
from sglang_tokendance.trace import generative_agents
from sglang_tokendance.watch import ENV as WATCH_ENV

WORKLOAD = dict(agents=6, rounds=3, seed=5, private_words=40, shared_words=18, max_tokens=4)
POOL = 2500  # small enough that 12 agents' dense prompts do not fit at once


@pytest.fixture(scope="module")
def servers(
    tiny_llama: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """mode off (shared); pic at ratio 1.0; pic at 0.15 on a small pool with the integrity
    watch; pic on the small Qwen2 model. All four start together."""
    tmp = tmp_path_factory.mktemp("pic-servers")
    # the tiny model has 2 layers: check layer 0 leaves one layer to run on the subset
    pic = ["--enable-tokendance", "--tokendance-mode", "pic", "--tokendance-check-layer", "0"]
    specs = {
        "full": ([*pic, "--tokendance-recompute-ratio", "1.0"], {}),
        "small": ([*pic, "--max-total-tokens", str(POOL)], {WATCH_ENV: "1"}),
        # 8 layers, the default check layer 1 (a layer-0 K does not depend on the context, so
        # the tiny model's check layer 0 cannot tell contexts apart); Qwen2's model class
        "qwen": (["--enable-tokendance", "--tokendance-mode", "pic"], {}),
    }
    off = server_pool.spec(tiny_llama, server_pool.OFF)  # shared with the round tests
    server_pool.launch(request, tmp_path_factory, off)
    started: dict[str, ServerProcess] = {}
    for name, (flags, env) in specs.items():
        model = build("small", "qwen2") if name == "qwen" else tiny_llama
        started[name] = ServerProcess(model, flags, log_path=tmp / f"{name}.log", env=env)
    start_all(started.values())  # stops all of them if one fails
    try:
        urls = {k: v.url for k, v in started.items()}
        urls["off"] = server_pool.url(request, tmp_path_factory, off)
        yield SimpleNamespace(**urls)
    finally:
        for srv in started.values():
            srv.stop()


def _ids(responses: list[list[dict]]) -> list[list[list[int]]]:
    return [[r["output_ids"] for r in rnd] for rnd in responses]


def test_pic_at_full_ratio_equals_mode_off_token_for_token(servers) -> None:
    trace = generative_agents(**WORKLOAD)
    off = _ids(run_trace(servers.off, trace, hints=False, prefix="eq"))
    pic = _ids(run_trace(servers.full, trace, hints=True, prefix="eq"))
    assert pic == off
    att = stats(servers.full)["attention"]
    # the blend loop ran and, at ratio 1.0, every reused token was recomputed
    assert att["blend_forwards"] > 0 and att["blend_reused"] > 0
    assert att["blend_recomputed"] == att["blend_reused"]


def test_pic_selects_per_request_in_its_own_context(servers) -> None:
    """Two agents reuse the same two masters in different orders (as all-gathers deliver them):
    each picks its own tokens. A collective set would give both the same segment offsets."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build("small", "qwen2")))
    s1 = ("shared", "s1", "the baker sings a song by the river in the morning light today ")
    s2 = ("shared", "s2", "the smith walks to the market garden in the evening rain again ")
    lens = {s[1]: len(tok(s[2], add_special_tokens=False)["input_ids"]) for s in (s1, s2)}
    go = ("private", None, "go")

    def body(agent: str, words: str, order: list[tuple[str, str, str]]) -> dict:
        text, env = build_request([("private", None, words), *order, go], "sel", 1, agent)
        return {"text": text, "kv_hints": env, "sampling_params": {"max_new_tokens": 1}}

    run_round(servers.qwen, [body("m", "baker baker baker baker. ", [s1, s2])])  # the masters
    orders = {"a": [s1, s2], "b": [s2, s1]}
    words = {"a": "river river river river. ", "b": "garden market river festival. "}
    resps = {ag: run_round(servers.qwen, [body(ag, words[ag], orders[ag])])[0] for ag in orders}
    picks = stats(servers.qwen)["attention"]["blend_picks"]

    def local(agent: str) -> set[tuple[str, int]]:
        """The agent's picks as (segment, offset in it); its private prefix is 14 tokens."""
        start, spans = 14, []
        for seg in orders[agent]:
            spans.append((seg[1], start, start + lens[seg[1]]))
            start += lens[seg[1]]
        mine = picks[resps[agent]["meta_info"]["id"]]
        return {(sid, p - a) for p in mine for sid, a, b in spans if a <= p < b}

    la, lb = local("a"), local("b")
    assert la and lb and len(la) == len(lb)
    assert la != lb


def test_pic_keeps_a_dense_copy_under_pool_pressure(servers) -> None:
    trace = generative_agents(
        agents=12, rounds=3, seed=9, private_words=60, shared_words=30, max_tokens=8
    )
    for rnd, reqs in trace.rounds().items():
        resps = run_round(servers.small, round_bodies(reqs, f"pp{rnd}", True, 8))
        assert len(resps) == len(reqs)
        assert all(len(r["output_ids"]) == 8 for r in resps)
    s = stats(servers.small, settle_s=30)
    assert s["integrity"] == "ok", s["integrity"]
    assert s["watch"]["checks"] > 0 and s["watch"]["failures"] == 0, s["watch"]["first"]
    assert s["attention"]["blend_forwards"] > 0
    assert s["reused_master_tokens"] > 0 and s["store"]["mirror_tokens"] == 0


def test_batches_without_pic_rows_never_enter_the_blend_loop(servers) -> None:
    before = stats(servers.small)["attention"]
    body = {"text": "plain text without hints " * 5, "sampling_params": {"max_new_tokens": 3}}
    assert generate(servers.small, body).status_code == 200
    after = stats(servers.small)["attention"]
    assert after["blend_forwards"] == before["blend_forwards"]
    assert after["stock_forwards"] > before["stock_forwards"]
    off = stats(servers.off)["attention"]
    assert off["blend_forwards"] == 0 and off["prefill_token_layers"] > 0
