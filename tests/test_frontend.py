"""The SGLang-frontend path (TokenDanceEndpoint, all_gather_round) and the trace recorder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_replay_shared import shared_server

from sglang_tokendance.replay import ReplayOptions, replay
from sglang_tokendance.trace import Segment, TraceError, read_trace, validate_trace
from sglang_tokendance.trace.recorder import TraceRecorder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def td_server(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    return shared_server(request, tiny_llama, tmp_path_factory)


@pytest.mark.server
def test_frontend_example_records_a_replayable_trace(td_server: str, tmp_path: Path) -> None:
    rec = tmp_path / "frontend.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "frontend_agents.py"),
        "--url",
        td_server,
        "--agents",
        "3",
        "--rounds",
        "2",
        "--max-tokens",
        "4",
        "--record",
        str(rec),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round 2:" in res.stdout and "6 hinted generations, 12 shared segments" in res.stdout
    assert validate_trace(rec) == []
    trace = read_trace(rec)
    assert len(trace.requests) == 6 and trace.header.rounds == 2
    out1 = {r.agent: r.output for r in trace.requests if r.round == 1}
    for req in (r for r in trace.requests if r.round == 2):
        shared = req.shared_segments()
        assert {s.source for s in shared} == set(out1) - {req.agent}  # the others' outputs
        assert all(s.text == out1[s.source] and s.id == f"r1/{s.source}" for s in shared)
    result = replay(trace, td_server, ReplayOptions(closed_loop=True, progress=False))
    assert all(q.error is None for r in result.rounds for q in r.requests)


@pytest.mark.server
def test_endpoint_attaches_hints(td_server: str) -> None:
    import sglang as sgl

    from sglang_tokendance.frontend import TokenDanceEndpoint, all_gather_round, begin_round

    @sgl.function
    def prog(s):  # noqa: ANN001, ANN202
        s += "Common prefix. "
        forks = s.fork(2)
        forks[0] += "I am A."
        forks[1] += "I am B, longer."
        all_gather_round(forks, {"a": "\nA: hi", "b": "\nB: yo"}, "r0", agents=["a", "b"])
        begin_round(forks, ["a", "b"], "unit-r1")
        for f in forks:
            f += "\nSay:" + sgl.gen("x", max_tokens=2, temperature=0)
        forks.join()

    endpoint = TokenDanceEndpoint(td_server)
    prog.run(backend=endpoint)
    assert len(endpoint.history) == 2
    for g in endpoint.history:
        assert g.round_id == "unit-r1" and g.round_size == 2 and g.max_tokens == 2
        types = [(t, i) for t, i, _, _ in g.segments]
        assert types == [
            ("private", None),
            ("shared", "r0/a"),
            ("shared", "r0/b"),
            ("private", None),
        ]
        assert [x for _, _, x, _ in g.segments][1:3] == ["\nA: hi", "\nB: yo"]
        assert g.meta_info["prompt_tokens"] > 0


def test_recorder_writes_a_valid_trace(tmp_path: Path) -> None:
    rec = TraceRecorder(workload="unit", source="test")
    for agent in ("a", "b"):
        rec.add(
            1,
            agent,
            [("private", None, f"I am {agent}."), ("shared", "r0/x", "\nX: hi")],
            4,
            f"\n{agent.upper()}: ok",
        )
    rec.add(
        2,
        "a",
        [
            Segment("private", "P"),
            {"type": "shared", "id": "r1/b", "text": "\nB: ok"},
            ("private", None, ""),
        ],
        4,
        "\nA: done",
    )
    path = tmp_path / "rec.jsonl"
    trace = rec.write(path)
    assert validate_trace(path) == []
    back = read_trace(path)
    assert back.header.agents == ["a", "b"] and back.header.rounds == 2
    assert len(back.requests) == 3 and len(back.requests[2].segments) == 2  # empty dropped
    assert back.requests[2].segments[1].source == "b"  # filled from the id
    assert back.to_bytes() == trace.to_bytes()
    bad = TraceRecorder(workload="unit", source="test")
    bad.add(1, "a", [("shared", "s", "one")], 4)
    bad.add(1, "b", [("shared", "s", "two")], 4)
    with pytest.raises(TraceError, match="different text"):
        bad.write(tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()
