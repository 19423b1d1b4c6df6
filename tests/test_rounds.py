"""The TokenDance round on the real CPU server (tiny Llama): exactness, sharing, robustness."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import server_pool
from roundclient import generate, round_bodies, run_round, run_trace, segments_of, stats
from test_replay_shared import ROUND_TIMEOUT_S, launch_shared_server, shared_server

from sglang_tokendance.hints import build_request
from sglang_tokendance.server import ServerProcess
from sglang_tokendance.trace import generative_agents

WORKLOAD = dict(agents=8, rounds=3, seed=3, private_words=60, shared_words=18, max_tokens=4)


def _server(model: Path, tmp: Path, name: str, flags: list[str]) -> ServerProcess:
    return ServerProcess(model, flags, log_path=tmp / f"{name}.log")


@pytest.fixture(scope="module")
def servers(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, request):
    """mode off and tokendance at ratio 1.0 (deviation selection, author masters; both shared
    with other modules), pic at 1.0, and the shared tokendance server (0.15, "both" selection,
    author masters, round timeout ROUND_TIMEOUT_S), all on one model."""
    tmp = tmp_path_factory.mktemp("round-servers")
    pooled = {
        "off": server_pool.spec(tiny_llama, server_pool.OFF),
        "td_full": server_pool.spec(tiny_llama, server_pool.TD_FULL),
    }
    server_pool.launch(request, tmp_path_factory, *pooled.values())
    launch_shared_server(request, tiny_llama, tmp_path_factory)
    pic_full = ["--enable-tokendance", "--tokendance-mode", "pic"]
    pic_full += ["--tokendance-recompute-ratio", "1.0"]
    release = ["--enable-tokendance", "--tokendance-master-start", "release"]
    release += ["--tokendance-round-timeout-ms", str(int(ROUND_TIMEOUT_S * 1000))]
    own = {"pic_full": _server(tiny_llama, tmp, "pic_full", pic_full).launch()}
    own["td_release"] = _server(tiny_llama, tmp, "td_release", release).launch()
    try:
        urls = {k: server_pool.url(request, tmp_path_factory, v) for k, v in pooled.items()}
        urls |= {k: srv.wait_ready().url for k, srv in own.items()}
        urls["td"] = shared_server(request, tiny_llama, tmp_path_factory)
        yield {k: SimpleNamespace(url=u) for k, u in urls.items()}
    finally:
        for srv in own.values():
            srv.stop()


def _ids(responses: list[list[dict]]) -> list[list[list[int]]]:
    return [[r["output_ids"] for r in rnd] for rnd in responses]


def test_full_recompute_equals_mode_off_token_for_token(servers) -> None:
    trace = generative_agents(**WORKLOAD)
    before = stats(servers["td_full"].url)
    off = _ids(run_trace(servers["off"].url, trace, hints=False, prefix="x"))
    td = _ids(run_trace(servers["td_full"].url, trace, hints=True, prefix="x"))
    pic = _ids(run_trace(servers["pic_full"].url, trace, hints=True, prefix="x"))
    assert td == off
    assert pic == off
    s = server_pool.delta(stats(servers["td_full"].url), before, "rounds", "requests")
    assert s == {"rounds": 3, "requests": 24}


def _computed(responses: list[dict]) -> int:
    """Prefill tokens computed, from SGLang's own per-request meta_info."""
    return sum(r["meta_info"]["prompt_tokens"] - r["meta_info"]["cached_tokens"] for r in responses)


def test_one_master_per_segment_and_sparse_mirrors(servers) -> None:
    url = servers["td"].url
    before = stats(url)
    trace = generative_agents(agents=16, rounds=1, seed=5, private_words=40, shared_words=24)
    reqs = trace.rounds()[1]
    td_out = run_round(url, round_bodies(reqs, "share1", True, 2))
    s = stats(url)
    seg_lens: dict[str, int] = {}
    for r in reqs:
        for seg in r.segments:
            if seg.type == "shared":
                seg_lens[seg.id] = len(seg.text)
    assert len(seg_lens) == 16
    assert s["masters_created"] - before["masters_created"] == 16
    rnd = s["per_round"][-1]
    assert rnd["round"] == "share1" and rnd["agents"] == 16
    # 15 reuse agents keep ceil(0.15 * L) recomputed tokens of each of the 16 segments
    round_store = s["store_last_round"]
    assert round_store["mirrors"] == 15 * 16
    master_tokens = round_store["master_tokens"]
    expected_mirror = (
        sum(math.ceil(0.15 * node_len) for node_len in round_store["segment_lengths"]) * 15
    )
    assert round_store["mirror_tokens"] == expected_mirror
    assert master_tokens == sum(round_store["segment_lengths"])
    # prefill computed is far below mode off's (every prompt in full)
    off_out = run_round(servers["off"].url, round_bodies(reqs, "share1", False, 2))
    assert _computed(td_out) < 0.7 * _computed(off_out)
    assert rnd["prefill_tokens_computed"] == _computed(td_out)
    assert s["integrity"] == "ok"
    # the reuse agents decoded together over the round's masters: the shared decode path
    shared = "decode_steps_shared"
    assert s["attention"][shared] > before["attention"][shared]


def test_a_round_missing_an_agent_runs_without_waiting_for_it(servers) -> None:
    url = servers["td"].url
    trace = generative_agents(agents=3, rounds=1, seed=11, private_words=30, shared_words=10)
    bodies = round_bodies(trace.rounds()[1], "partial", True, 2)
    t0 = time.monotonic()
    out = run_round(url, bodies[:2])  # the third agent never comes
    waited = time.monotonic() - t0
    assert len(out) == 2 and all(len(o["output_ids"]) == 2 for o in out)
    # planned at arrival: the first computes the masters, the second waits only for it, and
    # neither is held for the missing agent (--tokendance-master-start release would hold
    # both until the round timeout)
    assert waited < ROUND_TIMEOUT_S - 1
    s = stats(url)
    assert s["held_requests"] == 0 and s["integrity"] == "ok"


def test_a_master_agent_starts_before_its_round_is_whole(servers) -> None:
    """Its segments have no master: the first agent runs at arrival (not held until the
    round's other agents arrive); they then reuse the masters it made."""
    url = servers["td"].url
    trace = generative_agents(agents=3, rounds=1, seed=15, private_words=30, shared_words=10)
    bodies = round_bodies(trace.rounds()[1], "early1", True, 2)
    before = stats(url)
    first = generate(url, bodies[0])  # alone: its round of 3 is not whole
    assert first.status_code == 200, first.text
    mid = stats(url)
    assert mid["early_master_agents"] - before["early_master_agents"] == 1
    assert mid["rounds"] == before["rounds"] and mid["held_requests"] == 0  # not released
    assert mid["masters_created"] > before["masters_created"]
    out = run_round(url, bodies[1:])
    assert all(len(o["output_ids"]) == 2 for o in out)
    s = stats(url)
    assert s["rounds"] - mid["rounds"] == 1  # released whole: no timeout, no late arrival
    assert (s["rounds_timed_out"], s["late_arrivals"]) == (
        mid["rounds_timed_out"],
        mid["late_arrivals"],
    )
    assert s["reused_master_tokens"] > mid["reused_master_tokens"]
    assert s["integrity"] == "ok"


def test_release_holds_a_round_missing_an_agent_until_the_timeout(servers) -> None:
    url = servers["td_release"].url
    trace = generative_agents(agents=3, rounds=1, seed=11, private_words=30, shared_words=10)
    bodies = round_bodies(trace.rounds()[1], "partial-r", True, 2)
    t0 = time.monotonic()
    out = run_round(url, bodies[:2])  # the third agent never comes
    waited = time.monotonic() - t0
    assert len(out) == 2 and all(len(o["output_ids"]) == 2 for o in out)
    assert waited >= ROUND_TIMEOUT_S - 0.1  # held until the round timeout
    s = stats(url)
    assert s["rounds_timed_out"] >= 1 and s["early_master_agents"] == 0
    assert s["integrity"] == "ok"


def test_hintless_requests_are_not_delayed_by_a_held_round(servers) -> None:
    url = servers["td_release"].url  # release: the round holds its agents until it is whole
    trace = generative_agents(agents=3, rounds=1, seed=12, private_words=30, shared_words=10)
    bodies = round_bodies(trace.rounds()[1], "held", True, 2)
    box: dict[str, requests.Response] = {}
    th = threading.Thread(target=lambda: box.setdefault("r", generate(url, bodies[0])))
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    plain = generate(url, {"text": "A plain prompt.", "sampling_params": {"max_new_tokens": 2}})
    assert plain.status_code == 200
    assert "r" not in box  # the hinted request is still held by its round
    assert time.monotonic() - t0 < ROUND_TIMEOUT_S - 1
    th.join(timeout=60)
    assert box["r"].status_code == 200


@pytest.mark.parametrize("held", [True, False], ids=["held", "early-master"])
def test_aborted_agent_leaves_no_leaked_slot(servers, held: bool) -> None:
    """The first agent is aborted while held at the barrier, or while it runs as an early
    master agent (its segments had no master: it started at arrival)."""
    url = servers["td"].url
    seed = 13 if held else 14
    trace = generative_agents(agents=2, rounds=1, seed=seed, private_words=30, shared_words=10)
    if held:
        run_round(url, round_bodies(trace.rounds()[1], f"abort-warm{seed}", True, 2))
    before = stats(url)
    bodies = round_bodies(trace.rounds()[1], f"abort{seed}", True, 64)
    bodies[0]["rid"] = f"abort-me-{seed}"
    box: dict[str, requests.Response] = {}
    th = threading.Thread(target=lambda: box.setdefault("r", generate(url, bodies[0])))
    th.start()
    time.sleep(0.3)
    requests.post(url + "/abort_request", json={"rid": f"abort-me-{seed}"}, timeout=30)
    th.join(timeout=60)
    assert not th.is_alive()
    run_round(url, [bodies[1]])  # the other agent still completes (late or timed out)
    s = stats(url)
    assert s["early_master_agents"] - before["early_master_agents"] == (0 if held else 1)
    assert s["integrity"] == "ok"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["segments"][1].update(type="public"), "unknown type 'public'"),
        (lambda p: p["segments"][0].update(end=10**6), "out of range"),
        (lambda p: p.update(round_size=0), "round_size"),
    ],
)
def test_malformed_hints_get_a_400_naming_the_problem(servers, mutate, message) -> None:
    url = servers["td"].url
    trace = generative_agents(agents=2, rounds=1, seed=14, private_words=20, shared_words=8)
    text, env = build_request(segments_of(trace.rounds()[1][0]), "bad", 2, "a")
    mutate(env["actions"][0]["payload"])
    r = generate(url, {"text": text, "kv_hints": env, "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 400 and message in r.text
    ok = generate(url, {"text": "still serving", "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200


def test_round_size_mismatch_is_refused(servers) -> None:
    url = servers["td"].url
    trace = generative_agents(agents=2, rounds=1, seed=15, private_words=20, shared_words=8)
    r0, r1 = trace.rounds()[1]
    t0, e0 = build_request(segments_of(r0), "mm", 2, r0.agent)
    t1, e1 = build_request(segments_of(r1), "mm", 5, r1.agent)
    box: dict[str, requests.Response] = {}
    th = threading.Thread(
        target=lambda: box.setdefault(
            "a",
            generate(url, {"text": t0, "kv_hints": e0, "sampling_params": {"max_new_tokens": 1}}),
        )
    )
    th.start()
    time.sleep(0.2)
    bad = generate(url, {"text": t1, "kv_hints": e1, "sampling_params": {"max_new_tokens": 1}})
    assert bad.status_code == 400 and "round_size 2" in bad.text
    th.join(timeout=60)
    assert box["a"].status_code == 200


def test_recompute_set_size_matches_ratio() -> None:
    from sglang_tokendance.selection import select_recompute

    assert select_recompute(40, 0.15, "leading").tolist() == list(range(math.ceil(6.0)))
    assert select_recompute(3, 1.0, "leading").tolist() == [0, 1, 2]
    assert select_recompute(5, 0.0, "leading").numel() == 0


def test_permuted_row_gives_the_same_tokens_as_full_prefill(servers) -> None:
    """Agents with the same private prefix before the shared segment: the reused master KV is
    exactly what each would compute, so outputs must equal full prefill although the reuse
    agent's row holds [master slots][fresh prefix, recompute set, suffix] out of true order."""
    prefix = "Notes of the town council, meeting 7731. Present: Ada, Bo, Cy. " * 3
    shared = "\nAda: the bridge repairs start on Monday and the market moves to the square."
    agents = {"ada": " Ada, answer Bo:", "bo": " Bo, answer Ada:"}
    bodies_td, bodies_off = [], []
    for agent, suffix in agents.items():
        segs = [("private", None, prefix), ("shared", "m/ada", shared), ("private", None, suffix)]
        text, env = build_request(segs, "perm1", 2, agent)
        sp = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
        bodies_td.append({"text": text, "kv_hints": env, "sampling_params": sp})
        bodies_off.append({"text": text, "sampling_params": sp})
    td = run_round(servers["td"].url, bodies_td)
    off = [generate(servers["off"].url, b).json() for b in bodies_off]
    assert [r["output_ids"] for r in td] == [r["output_ids"] for r in off]
    # the reuse agent really read master slots: cached tokens include reused ones
    reused = [r["meta_info"]["cached_tokens"] for r in td]
    assert max(reused) > 0


def _closed_loop(
    url: str, hints: bool, tag: str, between=None, late_after_s: float = 0.0, seed: int = 21
) -> list[list[dict]]:
    """Two rounds of 4 agents; round 2's shared segments wrap round 1's generated texts
    ("name: text\n"), in a different order per agent, as an All-Gather application does.
    With ``late_after_s``, round 2's first agent comes alone and the others that much later."""
    trace = generative_agents(agents=4, rounds=1, seed=seed, private_words=30, shared_words=12)
    reqs = trace.rounds()[1]
    r1 = run_round(url, round_bodies(reqs, f"{tag}r1", hints, 10))
    if between is not None:
        between()
    said = {r.agent: f"\n{r.agent}: {o['text']}\n" for r, o in zip(reqs, r1, strict=True)}
    bodies = []
    sp = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    for i, r in enumerate(reqs):
        order = [reqs[(i + j) % len(reqs)].agent for j in range(len(reqs))]
        segs = [("private", None, f"You are {r.agent}. Earlier today:")]
        segs += [("shared", f"{tag}/{a}", said[a]) for a in order]
        segs.append(("private", None, f" {r.agent} replies:"))
        text, env = build_request(segs, f"{tag}r2", len(reqs), r.agent)
        bodies.append({"text": text, "sampling_params": sp} | ({"kv_hints": env} if hints else {}))
    if not late_after_s:
        return [r1, run_round(url, bodies)]
    box: dict[str, list[dict]] = {}
    first = threading.Thread(target=lambda: box.setdefault("first", run_round(url, bodies[:1])))
    first.start()
    time.sleep(late_after_s)
    rest = run_round(url, bodies[1:])
    first.join(timeout=120)
    return [r1, box["first"] + rest]


def test_closed_loop_reuses_the_authors_output_kv_and_stays_exact_at_ratio_1(servers) -> None:
    off = _closed_loop(servers["off"].url, False, "cl")
    before = stats(servers["td_full"].url)
    td = _closed_loop(servers["td_full"].url, True, "cl")
    assert _ids(td) == _ids(off)
    s = stats(servers["td_full"].url)
    assert s["author_masters_used"] > before["author_masters_used"]
    assert s["integrity"] == "ok"


def test_author_masters_replace_fresh_masters_in_the_next_round(servers) -> None:
    url = servers["td"].url
    mid: dict = {}
    out = _closed_loop(url, True, "au", between=lambda: mid.update(stats(url)))
    s = stats(url)
    used = s["author_masters_used"] - mid["author_masters_used"]
    created = s["masters_created"] - mid["masters_created"]
    assert used >= 1
    # each of round 2's 4 segments got exactly one master: an author's output KV or a fresh one
    assert used + created == 4
    assert s["per_round"][-1]["round"] == "aur2"
    assert all(len(o["output_ids"]) == 6 for o in out[1])
    assert s["integrity"] == "ok"


def test_late_arrivals_of_a_timed_out_round_count_each_segment_once(servers) -> None:
    """td_full has the default 2 s round timeout: round 2 runs with its first agent alone, the
    other three arrive late and are planned one by one against the same masters."""
    url = servers["td_full"].url
    mid: dict = {}
    # a seed of its own: texts another test sent would already have masters on this server
    out = _closed_loop(url, True, "late", lambda: mid.update(stats(url)), 3.0, seed=22)
    s = stats(url)
    used = s["author_masters_used"] - mid["author_masters_used"]
    created = s["masters_created"] - mid["masters_created"]
    assert s["late_arrivals"] - mid["late_arrivals"] == 3
    assert used >= 1 and used + created == 4  # one master per segment, however late its users
    assert all(len(o["output_ids"]) == 6 for o in out[1])
    assert s["integrity"] == "ok"


def test_deviation_selection_scores_masters_once_and_picks_non_leading_tokens(servers) -> None:
    url = servers["td"].url
    before = stats(url)
    trace = generative_agents(agents=6, rounds=1, seed=8, private_words=30, shared_words=30)
    run_round(url, round_bodies(trace.rounds()[1], "dev1", True, 2))
    s = stats(url)
    # 6 segments, each scored by its master agent's forward, used for the 5 other agents
    assert s["deviation_selections"] - before["deviation_selections"] == 6
    assert s["nonleading_selections"] > before["nonleading_selections"]
    assert s["store_last_round"]["mirrors"] == 5 * 6
    assert s["integrity"] == "ok"
    # the round's peak, split by holder: the 6 masters stay pinned while their mirrors live
    rnd = s["last_round"]
    assert rnd["round"] == "dev1" and sum(rnd["kv_peak_parts"].values()) == rnd["kv_tokens_peak"]
    assert rnd["kv_peak_parts"]["masters"] > 0 and rnd["kv_peak_parts"]["rows"] > 0


def test_mode_off_runs_hinted_requests_stock_and_accounts_them_per_round(servers) -> None:
    url = servers["off"].url
    trace = generative_agents(agents=4, rounds=1, seed=21, private_words=30, shared_words=20)
    reqs = trace.rounds()[1]
    plain = run_round(url, round_bodies(reqs, "offacct", False, 4))
    hinted = run_round(url, round_bodies(reqs, "offacct", True, 4))
    assert [o["output_ids"] for o in hinted] == [o["output_ids"] for o in plain]
    s = stats(url)
    rnd = next(r for r in s["per_round"] if r["round"] == "offacct")
    assert rnd["agents"] == 4 and rnd["kv_tokens_peak"] > 0
    assert sum(rnd["kv_peak_parts"].values()) == rnd["kv_tokens_peak"]
    assert rnd["kv_peak_parts"]["masters"] == rnd["kv_peak_parts"]["mirrors"] == 0
    assert rnd["pool_saturated"] is False
    assert s["masters_created"] == 0 and s["rounds"] == 0  # no round was planned
