"""Which kernels run, on the real CPU server (tiny Llama): stock batches keep the user's backend,
laid-out batches take the Triton path (``--tokendance-attention triton``, Triton's interpreter)
or the torch path, and all of them give stock SGLang's greedy tokens where they must.

Four servers, started once: stock SGLang on ``--attention-backend triton`` (interpreter) and on
``torch_native``, and TokenDance at recompute ratio 1.0 on each of them (Triton path on the
triton one, torch path on the other). Prompts stay short: the interpreter runs ~0.5 s a token.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import server_pool
from roundclient import generate, round_bodies, run_round, stats

from sglang_tokendance.server import ServerProcess, start_all
from sglang_tokendance.trace import generative_agents

INTERP = {"TRITON_INTERPRET": "1"}
TD = ["--enable-tokendance", "--tokendance-recompute-ratio", "1.0"]
TRITON = ["--attention-backend", "triton"]
PLAIN = ["Alice went to the market and", "The weather in the valley was"]


@pytest.fixture(scope="module")
def servers(tiny_llama: Path, request, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("attention-paths")
    specs = {
        "stock_triton": (TRITON, INTERP),
        "td_triton": (TRITON + TD + ["--tokendance-attention", "triton"], INTERP),
        "td_torch": (TD + ["--tokendance-attention", "torch"], None),
    }
    stock = server_pool.spec(tiny_llama)  # stock SGLang, shared with the foundation tests
    server_pool.launch(request, tmp_path_factory, stock)
    started = {
        name: ServerProcess(tiny_llama, flags, log_path=tmp / f"{name}.log", env=env)
        for name, (flags, env) in specs.items()
    }
    start_all(started.values())  # together; stops all of them if one fails
    try:
        urls = {k: v.url for k, v in started.items()}
        urls["stock_torch"] = server_pool.url(request, tmp_path_factory, stock)
        yield urls
    finally:
        for srv in started.values():
            srv.stop()


def _plain(url: str, tokens: int = 6) -> list[list[int]]:
    out = []
    for text in PLAIN:
        body = {"text": text, "sampling_params": {"max_new_tokens": tokens, "temperature": 0}}
        r = generate(url, body)
        assert r.status_code == 200, r.text
        out.append(r.json()["output_ids"])
    return out


def _round(agents: int = 3, seed: int = 4) -> list:
    trace = generative_agents(agents=agents, rounds=1, seed=seed, private_words=12, shared_words=8)
    return trace.rounds()[1]


def test_hintless_requests_run_the_users_backend_with_identical_tokens(servers) -> None:
    before = {
        k: stats(servers[k])["attention"]["tagged_forwards"] for k in ("td_triton", "td_torch")
    }
    assert _plain(servers["td_triton"]) == _plain(servers["stock_triton"])
    assert _plain(servers["td_torch"]) == _plain(servers["stock_torch"])
    for k in ("td_triton", "td_torch"):
        att = stats(servers[k])["attention"]
        assert att["tagged_forwards"] == before[k]  # no hint, no layout: the stock path
        assert att["stock_forwards"] > 0
    assert stats(servers["td_triton"])["attention"]["kernels"] == "triton"
    assert stats(servers["td_torch"])["attention"]["kernels"] == "torch"


def test_triton_path_round_equals_torch_path_and_stock_at_ratio_one(servers) -> None:
    reqs = _round()
    got = {}
    for k in ("td_triton", "td_torch"):
        before = stats(servers[k])["attention"]["tagged_forwards"]
        got[k] = [o["output_ids"] for o in run_round(servers[k], round_bodies(reqs, k, True, 3))]
        s = stats(servers[k])
        assert s["attention"]["tagged_forwards"] > before  # laid-out rows took the tagged path
        assert s["integrity"] == "ok"
    stock = [
        o["output_ids"]
        for o in run_round(servers["stock_torch"], round_bodies(reqs, "s", False, 3))
    ]
    assert got["td_triton"] == got["td_torch"] == stock


def test_a_mixed_batch_keeps_plain_requests_and_the_round_correct(servers) -> None:
    """Plain requests sent while a round runs share its batches (the tagged path for all)."""
    url = servers["td_torch"]
    reqs = _round(agents=4, seed=9)
    alone = [o["output_ids"] for o in run_round(url, round_bodies(reqs, "mixA", True, 8))]
    want_plain = _plain(servers["stock_torch"], tokens=12)
    plain: list[list[int]] = []
    t = threading.Thread(target=lambda: plain.extend(_plain(url, tokens=12)))
    t.start()
    mixed = [o["output_ids"] for o in run_round(url, round_bodies(reqs, "mixB", True, 8))]
    t.join()
    assert mixed == alone
    assert plain == want_plain
    assert stats(url)["integrity"] == "ok"


# The triton path's refusal without CUDA or the interpreter is one of test_foundation's
# bad-option launches (they run at once).
