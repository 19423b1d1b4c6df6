"""The trace replayer against the real CPU server (tiny Llama): CLI, report, closed loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_replay_shared import shared_server

from sglang_tokendance.replay import (
    ReplayOptions,
    SentRequest,
    build_report,
    closed_loop_segments,
    compare,
    new_output,
    percentiles,
    replay,
)
from sglang_tokendance.trace import Segment, TraceRequest, generate, read_trace, write_trace

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
AGENTS, ROUNDS = 4, 2
NUMBER = (int, float)
STAT = (int, float, type(None))
REPORT_TYPES: dict[str, Any] = {
    "mode": str,
    "trace": str,
    "workload": str,
    "agents": int,
    "rounds": int,
    "requests": int,
    "prompt_tokens": int,
    "prefill_tokens_computed": int,
    "prefill_token_layers": STAT,
    "kv_tokens_peak": STAT,
    "kv_bytes_per_agent": STAT,
    "dense_kv_bytes_per_agent": STAT,
    "round_latency_ms": dict,
    "ttft_ms": dict,
    "wall_s": NUMBER,
    "server": dict,
    "outputs": list,
}


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "ga.jsonl"
    trace = generate(
        "generative_agents",
        agents=AGENTS,
        rounds=ROUNDS,
        seed=0,
        private_words=120,
        shared_words=20,
        max_tokens=4,
    )
    write_trace(path, trace)
    return path


@pytest.fixture(scope="module")
def td_server(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    return shared_server(request, tiny_llama, tmp_path_factory)


def check_report(rep: dict[str, Any], mode: str, rounds: int = ROUNDS) -> None:
    for key, typ in REPORT_TYPES.items():
        assert key in rep, key
        assert isinstance(rep[key], typ), (key, rep[key])
    assert rep["mode"] == mode and rep["errors"] == []
    assert rep["agents"] == AGENTS and rep["rounds"] == rounds
    assert rep["requests"] == AGENTS * rounds == len(rep["outputs"])
    for key in ("round_latency_ms", "ttft_ms"):
        assert set(rep[key]) >= {"p50", "p90", "max"}
        assert all(isinstance(rep[key][p], NUMBER) for p in ("p50", "p90", "max"))
        assert 0 < rep[key]["p50"] <= rep[key]["p90"] <= rep[key]["max"]
    assert {(o["round"], o["agent"]) for o in rep["outputs"]} == {
        (r, a) for r in range(1, rounds + 1) for a in {o["agent"] for o in rep["outputs"]}
    }
    assert all(isinstance(o["text"], str) for o in rep["outputs"])
    assert rep["prompt_tokens"] > 0
    assert 0 <= rep["prefill_tokens_computed"] <= rep["prompt_tokens"]
    assert set(rep["server"]) >= {"model", "device", "flags"} and rep["server"]["device"] == "cpu"
    assert isinstance(rep["kv_bytes_per_token"], int)  # model config or server: both known here


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sglang_tokendance.replay", *args, "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_cli_embedded_server_mode_off(trace_path: Path, tmp_path: Path) -> None:
    report = tmp_path / "off.json"
    res = run_cli(str(trace_path), "--mode", "off", "--report", str(report))
    rep = json.loads(report.read_text())
    check_report(rep, "off")
    assert rep["server"]["flags"]["launch_args"][-2:] == ["--tokendance-mode", "off"]
    assert "prefill tokens computed" in res.stdout
    # a mode-off server gets the hints and only records rounds: KV per agent comes from its
    # last round's record, as for the other modes, and nothing was shared
    st = rep["server_stats"]
    assert rep["kv_source"]["kv_bytes_per_agent"] == "server"
    assert st["last_round"]["agents"] == AGENTS and st["masters_created"] == 0


def test_cli_url_mode_tokendance(td_server: str, trace_path: Path, tmp_path: Path) -> None:
    report = tmp_path / "td.json"
    args = ["--url", td_server, "--report", str(report), "--save-prompts", "--round-prefix", "ol-"]
    run_cli(str(trace_path), *args)
    rep = json.loads(report.read_text())
    check_report(rep, "tokendance")
    hints = [p["kv_hints"] for p in rep["prompts"]]
    payloads = [h["actions"][0]["payload"] for h in hints]
    assert [p["round"] for p in payloads] == ["ol-r1"] * AGENTS + ["ol-r2"] * AGENTS
    assert all(p["round_size"] == AGENTS for p in payloads)
    run_cli(
        str(trace_path),
        "--url",
        td_server,
        "--mode",
        "off",
        "--report",
        str(report),
        "--max-rounds",
        "1",
        "--concurrency",
        "2",
        "--save-prompts",
    )
    rep = json.loads(report.read_text())
    check_report(rep, "off", rounds=1)
    assert all(p["kv_hints"] is None for p in rep["prompts"])
    table = compare([rep, rep], ["a", "b"])
    assert "prefill tokens computed" in table and "1.00x" in table


def test_closed_loop_feeds_generated_outputs(td_server: str, trace_path: Path) -> None:
    trace = read_trace(trace_path)
    sent: list[SentRequest] = []
    opts = ReplayOptions(mode="tokendance", closed_loop=True, progress=False, round_prefix="cl-")
    result = replay(trace, td_server, opts, on_request=sent.append)
    assert len(sent) == AGENTS * ROUNDS
    assert [q.error for r in result.rounds for q in r.requests] == [None] * len(sent)
    r1 = {q.agent: q for q in result.rounds[0].requests}
    recorded = {r.agent: r.output for r in trace.requests if r.round == 1}
    for s in sent[AGENTS:]:
        assert s.round == 2
        payload = s.kv_hints["actions"][0]["payload"] if s.kv_hints else {}
        shared = [g for g in payload["segments"] if g["type"] == "shared"]
        assert len(shared) == AGENTS
        for g in shared:
            src = g["id"].split("/", 1)[1]
            want = new_output(recorded[src], r1[src].text)
            assert payload["round"] == "cl-r2"
            assert s.text[g["start"] : g["end"]] == want
            assert r1[src].text.strip() in s.text
            assert recorded[src] not in s.text  # the recorded output is gone
    report = build_report(result, opts, str(trace_path), "ga", AGENTS, include_prompts=True)
    assert report["closed_loop"] is True and len(report["prompts"]) == AGENTS * ROUNDS
    texts = [r1[s.agent].text for s in sent[:AGENTS]]
    assert [o["text"] for o in report["outputs"][:AGENTS]] == texts


def test_closed_loop_substitution_rules() -> None:
    rec = "\nBob Stone: I fixed the bike."
    assert new_output(rec, " Hello there ") == "\nBob Stone: Hello there"
    assert new_output("no header here", "gen") == "gen"
    req = TraceRequest(
        2,
        "alice",
        [
            Segment("private", "P"),
            Segment("shared", "<<" + rec + ">>", "r1/bob", "bob"),
            Segment("shared", "x", "r0/carl", "carl"),
            Segment("shared", "\nCarl: old", "r1/carl", "carl"),
        ],
        4,
    )
    out = closed_loop_segments(req, {"bob": " new "}, {"bob": rec, "carl": "\nCarl: old"})
    assert [s.text for s in out] == ["P", "<<\nBob Stone: new>>", "x", "\nCarl: old"]


def test_percentiles() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "max": None}
    assert percentiles([1.0, 2.0, 3.0, 4.0, 5.0]) == {"p50": 3.0, "p90": 4.6, "max": 5.0}


def test_report_fills_in_what_the_server_does_not_say() -> None:
    from sglang_tokendance.replay import ReplayResult, RequestRecord, RoundRecord

    reqs = [RequestRecord(1, a, "x", 100, 40, 4, 5.0, 9.0) for a in ("a", "b")]
    result = ReplayResult(
        [RoundRecord(1, 10.0, reqs)],
        0.5,
        {"kv_bytes_per_token": 8, "kv_tokens_peak": 300},
        {"device": "cpu"},
        [],
    )
    rep = build_report(result, ReplayOptions(mode="off"), "t.jsonl", "w", 2)
    assert rep["kv_bytes_per_agent"] == 300 * 8 / 2 and rep["dense_kv_bytes_per_agent"] == 104 * 8
    assert rep["kv_source"] == {
        "kv_bytes_per_token": "server",
        "kv_tokens_peak": "server",
        "kv_bytes_per_agent": "computed",
        "dense_kv_bytes_per_agent": "computed",
    }
    assert rep["prefill_tokens_computed"] == 120 and rep["ttft_ms"]["p50"] == 5.0
    bare = build_report(result._replace(stats=None), ReplayOptions(), "t.jsonl", "w", 2)
    assert bare["kv_bytes_per_token"] is None and bare["kv_bytes_per_agent"] is None
    assert bare["kv_tokens_peak"] is None and bare["dense_kv_bytes_per_agent"] is None
