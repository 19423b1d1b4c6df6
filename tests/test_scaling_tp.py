"""Tensor parallelism: ``--tp-size 2`` on CPU makes the same decisions as one rank.

Every TP rank runs its own barrier, collector and cache over the same requests; if any
decision differed (a round released by one rank's clock and not the other's, another master
agent, another recompute set) their KV pools and forwards would diverge. At recompute ratio
1.0 the outputs must equal the one-rank server's token for token, for a whole round and for a
round released by its timeout with an agent missing. Deviation selection exercises the
recompute-set choice, whose scores are summed over the ranks' heads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from roundclient import round_bodies, run_round, stats

from sglang_tokendance.server import ServerProcess, start_all
from sglang_tokendance.trace import generative_agents

pytestmark = pytest.mark.server

FLAGS = ["--enable-tokendance", "--tokendance-recompute-ratio", "1.0"]
FLAGS += ["--tokendance-selection", "deviation", "--tokendance-round-timeout-ms", "1500"]


def _run(url: str) -> tuple[list[list[int]], dict]:
    trace = generative_agents(agents=4, rounds=2, seed=13, private_words=25, shared_words=10)
    rounds = trace.rounds()
    whole = run_round(url, round_bodies(rounds[1], "tp/r1", True, 4))
    partial = run_round(url, round_bodies(rounds[2], "tp/r2", True, 4)[:3])  # one never comes
    return [o["output_ids"] for o in whole + partial], stats(url)


def test_tp2_rounds_equal_tp1_token_for_token(tiny_llama: Path, tmp_path: Path) -> None:
    one = ServerProcess(tiny_llama, FLAGS, log_path=tmp_path / "tp1.log")
    # --tp-size 2 sets the CPU threads bind
    two = ServerProcess(tiny_llama, [*FLAGS, "--tp-size", "2"], log_path=tmp_path / "tp2.log")
    start_all([one, two])  # stops both if one fails
    try:
        ids1, s1 = _run(one.url)
        one.stop()
        ids2, s2 = _run(two.url)
    finally:
        one.stop()
        two.stop()
    assert s2["tp_size"] == 2 and s1["tp_size"] == 1
    assert ids2 == ids1
    for s in (s1, s2):
        assert s["rounds"] == 2 and s["rounds_timed_out"] == 1 and s["late_arrivals"] == 0
        assert s["integrity"] == "ok"
    assert s2["masters_created"] == s1["masters_created"]
    assert s2["deviation_selections"] == s1["deviation_selections"] > 0
    assert s2["recompute_tokens"] == s1["recompute_tokens"]
