"""Tensor parallelism: ``--tp-size 2`` on CPU makes the same decisions as one rank.

Every TP rank runs its own barrier, collector and cache over the same requests; if any
decision differed (a round released by one rank's clock and not the other's, another master
agent, another recompute set) their KV pools and forwards would diverge. At recompute ratio
1.0 the outputs must equal the one-rank server's token for token, for a whole round and for a
round released by its timeout with an agent missing. Deviation selection exercises the
recompute-set choice, whose scores are summed over the ranks' heads.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import server_pool
from roundclient import round_bodies, run_round, stats

from sglang_tokendance.server import ServerProcess
from sglang_tokendance.trace import generative_agents

pytestmark = pytest.mark.server

COUNTERS = ("rounds", "rounds_timed_out", "late_arrivals", "masters_created")
COUNTERS += ("deviation_selections", "recompute_tokens")


def _run(url: str) -> tuple[list[list[int]], dict, dict]:
    """Outputs, counters (as differences: the one-rank server is shared) and the last stats."""
    server_pool.flush(url)  # no master of another module's rounds
    trace = generative_agents(agents=4, rounds=2, seed=13, private_words=25, shared_words=10)
    rounds = trace.rounds()
    before = stats(url)
    whole = run_round(url, round_bodies(rounds[1], "tp/r1", True, 4))
    partial = run_round(url, round_bodies(rounds[2], "tp/r2", True, 4)[:3])  # one never comes
    # planned at arrival, the three answered without waiting for the fourth: the round itself
    # closes when its timeout fires, which may be after they answered
    deadline = time.monotonic() + 30
    while (after := stats(url))["rounds"] - before["rounds"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    ids = [o["output_ids"] for o in whole + partial]
    return ids, server_pool.delta(after, before, *COUNTERS), after


def test_tp2_rounds_equal_tp1_token_for_token(
    tiny_llama: Path, request: pytest.FixtureRequest, tmp_path_factory, tmp_path: Path
) -> None:
    # the one-rank server is the round tests' (the same flags); --tp-size 2 sets the CPU bind
    one = server_pool.spec(tiny_llama, server_pool.TD_FULL)
    server_pool.launch(request, tmp_path_factory, one)
    flags = [*server_pool.TD_FULL, "--tp-size", "2"]
    with ServerProcess(tiny_llama, flags, log_path=tmp_path / "tp2.log") as two:
        ids1, c1, s1 = _run(server_pool.url(request, tmp_path_factory, one))
        ids2, c2, s2 = _run(two.url)
    assert s2["tp_size"] == 2 and s1["tp_size"] == 1
    assert ids2 == ids1
    for c, s in ((c1, s1), (c2, s2)):
        assert c["rounds"] == 2 and c["rounds_timed_out"] == 1 and c["late_arrivals"] == 0
        assert s["integrity"] == "ok"
    assert c2["masters_created"] == c1["masters_created"]
    assert c2["deviation_selections"] == c1["deviation_selections"] > 0
    assert c2["recompute_tokens"] == c1["recompute_tokens"]
