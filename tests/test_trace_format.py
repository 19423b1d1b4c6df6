"""Trace format v1: records, lossless round trip, validation rules with line numbers, CLI."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_tokendance.trace import (
    Segment,
    Trace,
    TraceError,
    TraceHeader,
    TraceRequest,
    loads_trace,
    parse_trace_bytes,
    read_trace,
    round_stats,
    validate_trace,
    write_trace,
)

ROOT = Path(__file__).resolve().parents[1]
GA_TRACES = sorted((ROOT / "workloads").glob("ga_the_ville_*.jsonl"))

HEADER: dict[str, Any] = {
    "format": "tokendance-trace",
    "version": 1,
    "workload": "unit",
    "agents": ["alice", "bob"],
    "rounds": 2,
    "source": "test",
    "note": "extra header field",
}


TEXTS = {
    0: {"alice": "\nalice: hi", "bob": "\nbob: hé ☃"},
    1: {"alice": "\nalice: ok", "bob": "\nbob: ☃ ok"},
    2: {"alice": "\nalice: bye", "bob": "\nbob: bye"},
}


def _req(rnd: int, agent: str, order: list[str]) -> dict[str, Any]:
    shared = [
        {"type": "shared", "id": f"r{rnd - 1}/{a}", "source": a, "text": TEXTS[rnd - 1][a]}
        for a in order
    ]
    return {
        "round": rnd,
        "agent": agent,
        "segments": [
            {"type": "private", "text": f"You are {agent}. Round {rnd}:"},
            *shared,
            {"type": "private", "text": "\nReply:", "tag": "x"},
        ],
        "max_tokens": 16,
        "output": TEXTS[rnd][agent],
    }


def _records() -> list[Any]:
    """A valid trace as objects: header on line 1, then lines 2..5."""
    r1a = _req(1, "alice", ["alice", "bob"])
    r1a["arrival_s"] = 0.25
    r1a["meta"] = {"k": [1, 2.5, None]}
    return [
        dict(HEADER),
        r1a,
        _req(1, "bob", ["bob", "alice"]),
        _req(2, "alice", ["alice", "bob"]),
        _req(2, "bob", ["alice", "bob"]),
    ]


def _encode(records: list[Any]) -> bytes:
    return b"".join(r if isinstance(r, bytes) else orjson.dumps(r) + b"\n" for r in records)


def _write(tmp_path: Path, records: list[Any], name: str = "t.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(_encode(records))
    return path


def test_valid_trace_round_trips_byte_identically(tmp_path: Path) -> None:
    src = _write(tmp_path, _records())
    trace = read_trace(src)
    out = tmp_path / "out.jsonl"
    write_trace(out, trace)
    assert out.read_bytes() == src.read_bytes()
    assert trace.header.extra == {"note": "extra header field"}
    assert trace.requests[0].extra == {"meta": {"k": [1, 2.5, None]}}
    assert trace.requests[0].segments[3].extra == {"tag": "x"}
    assert trace.requests[0].arrival_s == 0.25
    assert trace.requests[1].arrival_s is None


@pytest.mark.parametrize("path", GA_TRACES, ids=lambda p: p.name)
def test_ga_workload_round_trips_byte_identically(path: Path, tmp_path: Path) -> None:
    out = tmp_path / path.name
    write_trace(out, read_trace(path))
    assert out.read_bytes() == path.read_bytes()


def test_read_trace_gives_records_rounds_and_prompt(tmp_path: Path) -> None:
    trace = read_trace(_write(tmp_path, _records()))
    assert trace.header.agents == ["alice", "bob"]
    assert trace.header.rounds == 2
    rounds = trace.rounds()
    assert list(rounds) == [1, 2]
    assert [(r.round, r.agent) for r in rounds[2]] == [(2, "alice"), (2, "bob")]
    req = rounds[1][1]
    assert req.segments[1] == Segment("shared", "\nbob: hé ☃", "r0/bob", "bob")
    assert Trace.prompt(req) == "You are bob. Round 1:\nbob: hé ☃\nalice: hi\nReply:"
    assert req.prompt() == Trace.prompt(req)
    assert [s.id for s in req.shared_segments()] == ["r0/bob", "r0/alice"]


def test_rounds_lists_every_round_even_without_requests() -> None:
    header = TraceHeader(workload="w", agents=["a"], rounds=3, source="s")
    req = TraceRequest(2, "a", [Segment("private", "x")], 4)
    assert Trace(header, [req]).rounds() == {1: [], 2: [req], 3: []}


def test_write_trace_refuses_an_invalid_trace(tmp_path: Path) -> None:
    header = TraceHeader(workload="w", agents=["a"], rounds=1, source="s")
    trace = Trace(header, [TraceRequest(1, "zed", [Segment("private", "x")], 4)])
    out = tmp_path / "bad.jsonl"
    with pytest.raises(TraceError) as exc:
        write_trace(out, trace)
    assert str(exc.value) == f"{out}:2: agent 'zed' is not in the header's agents"
    assert not out.exists()


def test_extra_field_that_clashes_with_a_known_field_is_refused() -> None:
    with pytest.raises(ValueError, match="clash"):
        Segment("private", "x", extra={"text": "y"}).to_dict()


def test_trace_error_formats_file_line_problem_and_pickles() -> None:
    err = TraceError("f.jsonl", 7, "bad thing")
    assert str(err) == "f.jsonl:7: bad thing"
    assert (err.file, err.line, err.message) == ("f.jsonl", 7, "bad thing")
    assert isinstance(err, ValueError)
    assert str(TraceError("f.jsonl", None, "gone")) == "f.jsonl: gone"
    assert str(pickle.loads(pickle.dumps(err))) == "f.jsonl:7: bad thing"


Mutation = Callable[[list[Any]], None]


def _set(line: int, *path: Any, value: Any) -> Mutation:
    def mutate(recs: list[Any]) -> None:
        obj = recs[line - 1]
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return mutate


def _del(line: int, *path: Any) -> Mutation:
    def mutate(recs: list[Any]) -> None:
        obj = recs[line - 1]
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return mutate


def _raw(line: int, data: bytes) -> Mutation:
    def mutate(recs: list[Any]) -> None:
        recs[line - 1] = data

    return mutate


def _insert(line: int, data: bytes) -> Mutation:
    def mutate(recs: list[Any]) -> None:
        recs.insert(line - 1, data)

    return mutate


# (id, mutation, line of the error, text the message contains)
VIOLATIONS: list[tuple[str, Mutation, int, str]] = [
    ("bad_json", _raw(3, b'{"round": 1,\n'), 3, "not valid JSON"),
    ("not_an_object", _raw(3, b"[1, 2]\n"), 3, "request must be a JSON object, got array"),
    ("empty_line", _insert(3, b"\n"), 3, "empty line"),
    ("header_missing", lambda r: r.pop(0), 1, "header missing: line 1 has no 'format' field"),
    ("header_not_object", _raw(1, b'"hello"\n'), 1, "header must be a JSON object, got string"),
    ("header_wrong_format", _set(1, "format", value="other"), 1, "header format is 'other'"),
    ("header_wrong_version", _set(1, "version", value=2), 1, "unsupported trace version 2"),
    ("header_field_missing", _del(1, "agents"), 1, "header field 'agents' is missing"),
    (
        "header_field_type",
        _set(1, "rounds", value="2"),
        1,
        "'rounds' must be an integer, got string",
    ),
    ("header_source_missing", _del(1, "source"), 1, "header field 'source' is missing"),
    ("header_agents_twice", _set(1, "agents", value=["alice", "bob", "alice"]), 1, "'alice' twice"),
    ("header_agents_empty", _set(1, "agents", value=[]), 1, "non-empty array of strings"),
    ("header_rounds_zero", _set(1, "rounds", value=0), 1, "'rounds' must be at least 1, got 0"),
    ("round_missing", _del(4, "round"), 4, "request field 'round' is missing"),
    ("round_not_int", _set(4, "round", value="2"), 4, "'round' must be an integer, got string"),
    ("round_bool", _set(4, "round", value=True), 4, "'round' must be an integer, got boolean"),
    ("round_above_range", _set(5, "round", value=3), 5, "round 3 out of range 1..2"),
    ("round_zero", _set(5, "round", value=0), 5, "round 0 out of range 1..2"),
    ("agent_missing", _del(3, "agent"), 3, "request field 'agent' is missing"),
    ("agent_not_string", _set(3, "agent", value=7), 3, "'agent' must be a string, got integer"),
    ("agent_not_in_header", _set(3, "agent", value="carol"), 3, "agent 'carol' is not in the"),
    (
        "agent_twice_in_round",
        _set(3, "agent", value="alice"),
        3,
        "'alice' appears twice in round 1",
    ),
    ("segments_missing", _del(2, "segments"), 2, "request field 'segments' is missing"),
    ("segments_not_list", _set(2, "segments", value={}), 2, "must be an array, got object"),
    ("segments_empty", _set(2, "segments", value=[]), 2, "'segments' must not be empty"),
    ("segment_not_object", _set(2, "segments", 0, value="x"), 2, "segment 1 must be a JSON object"),
    (
        "segment_type_missing",
        _del(2, "segments", 0, "type"),
        2,
        "segment 1 field 'type' is missing",
    ),
    (
        "segment_unknown_type",
        _set(2, "segments", 3, "type", value="public"),
        2,
        "segment 4: unknown type 'public'",
    ),  # fmt: skip
    (
        "segment_text_missing",
        _del(2, "segments", 0, "text"),
        2,
        "segment 1 field 'text' is missing",
    ),
    ("segment_text_type", _set(2, "segments", 0, "text", value=1), 2, "'text' must be a string"),
    ("shared_without_id", _del(2, "segments", 1, "id"), 2, "segment 2: shared segment has no 'id'"),
    ("shared_empty_id", _set(2, "segments", 1, "id", value=""), 2, "shared segment has no 'id'"),
    (
        "id_not_string",
        _set(2, "segments", 1, "id", value=3),
        2,
        "'id' must be a string, got integer",
    ),
    (
        "source_not_string",
        _set(2, "segments", 1, "source", value=None),
        2,
        "segment 2 field 'source' must be a string, got null",
    ),  # fmt: skip
    (
        "shared_text_differs",
        _set(3, "segments", 2, "text", value="\nalice: HI"),
        3,
        "segment 3: shared id 'r0/alice' has different text than on line 2 "
        "(round 1, lines 2 and 3)",
    ),
    (
        "shared_text_differs_same_line",
        _set(2, "segments", 2, "id", value="r0/alice"),
        2,
        "different text than earlier in this line",
    ),  # fmt: skip
    ("max_tokens_missing", _del(2, "max_tokens"), 2, "request field 'max_tokens' is missing"),
    ("max_tokens_zero", _set(2, "max_tokens", value=0), 2, "positive integer, got 0"),
    ("max_tokens_negative", _set(2, "max_tokens", value=-5), 2, "positive integer, got -5"),
    ("max_tokens_float", _set(2, "max_tokens", value=1.5), 2, "must be an integer, got number"),
    ("max_tokens_string", _set(2, "max_tokens", value="16"), 2, "must be an integer, got string"),
    ("output_null", _set(2, "output", value=None), 2, "'output' must be a string, got null"),
    ("output_number", _set(2, "output", value=5), 2, "'output' must be a string, got integer"),
    ("arrival_negative", _set(2, "arrival_s", value=-1.0), 2, "arrival_s must be a finite number"),
    ("arrival_string", _set(2, "arrival_s", value="1"), 2, "'arrival_s' must be a number"),
]


@pytest.mark.parametrize(("mutation", "line", "text"), [v[1:] for v in VIOLATIONS],
                         ids=[v[0] for v in VIOLATIONS])  # fmt: skip
def test_each_rule_violation_gives_its_own_error_with_line(
    tmp_path: Path, mutation: Mutation, line: int, text: str
) -> None:
    recs = copy.deepcopy(_records())
    mutation(recs)
    path = _write(tmp_path, recs)
    errors = validate_trace(path)
    assert [(e.file, e.line) for e in errors] == [(str(path), line)], errors
    assert text in errors[0].message
    with pytest.raises(TraceError) as exc:
        read_trace(path)
    assert exc.value.line == line


def test_valid_records_give_no_errors(tmp_path: Path) -> None:
    assert validate_trace(_write(tmp_path, _records())) == []


def test_shared_id_may_name_other_text_in_another_round(tmp_path: Path) -> None:
    recs = _records()
    recs[3]["segments"][1]["id"] = "r0/alice"  # round 2 reuses a round-1 id with other text
    recs[4]["segments"][1]["id"] = "r0/alice"
    assert validate_trace(_write(tmp_path, recs)) == []


def test_every_violation_is_collected_in_line_order(tmp_path: Path) -> None:
    recs = _records()
    recs[1]["max_tokens"] = 0
    recs[1]["segments"][0]["type"] = "weird"
    recs[2] = b"not json\n"
    recs[3]["agent"] = "carol"
    recs[4]["round"] = 9
    recs[4]["segments"][1]["id"] = None
    path = _write(tmp_path, recs)
    got = [(e.line, e.message.split(" (")[0].split(",")[0]) for e in validate_trace(path)]
    assert [line for line, _ in got] == [2, 2, 3, 4, 5, 5]
    assert "segment 1: unknown type 'weird'" in got[0][1] + got[1][1]
    with pytest.raises(TraceError) as exc:
        read_trace(path)
    assert exc.value.line == 2


def test_empty_and_unreadable_files_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert [str(e) for e in validate_trace(empty)] == [
        f"{empty}:1: empty file: expected a trace header"
    ]
    missing = tmp_path / "missing.jsonl"
    (err,) = validate_trace(missing)
    assert err.line is None and err.message.startswith("cannot read")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [(1, key) for key in ("format", "version", "workload", "agents", "rounds", "source")] + [
    (3, key) for key in ("round", "agent", "segments", "max_tokens", "output", "arrival_s")
]


@settings(max_examples=200, deadline=None)
@given(
    target=st.sampled_from(
        [
            *FIELDS,
            (3, "segments", 1, "type"),
            (3, "segments", 1, "id"),
            (3, "segments", 1, "text"),
            (3, "segments", 0),
        ]
    ),  # fmt: skip
    value=JSON_VALUES,
)
def test_validator_never_crashes_on_any_field_value(target: tuple[Any, ...], value: Any) -> None:
    recs = _records()
    _set(*target, value=value)(recs)
    result = parse_trace_bytes(_encode(recs), "f")
    assert all(isinstance(e, TraceError) and e.line in (1, 2, 3, 4, 5) for e in result.errors)
    if not result.errors:
        assert result.trace is not None
        assert loads_trace(result.trace.to_bytes()) == result.trace


@pytest.mark.parametrize("path", GA_TRACES, ids=lambda p: p.name)
def test_ga_workload_traces_validate_clean(path: Path) -> None:
    assert validate_trace(path) == []


def test_round_stats_match_the_ga_readme_table() -> None:
    stats = round_stats(read_trace(ROOT / "workloads" / "ga_the_ville_n8.jsonl"))
    assert [tuple(s) for s in stats] == [
        (1, 8, 29318, 10728, 18590, 1341),
        (2, 8, 30185, 10232, 19953, 1279),
        (3, 8, 31930, 10648, 21282, 1331),
        (4, 8, 32161, 9672, 22489, 1209),
    ]
    assert f"{stats[0].shared_share:.1%}" == "36.6%"


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sglang_tokendance.trace", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_validate_exits_zero_for_valid_traces(tmp_path: Path) -> None:
    good = _write(tmp_path, _records())
    res = _cli("validate", good, *GA_TRACES)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == f"{good}: ok (4 requests, 2 rounds, 2 agents)"
    assert f"{GA_TRACES[-1]}: ok (32 requests, 4 rounds, 8 agents)" in res.stdout.splitlines()


def test_cli_validate_exits_nonzero_with_one_line_per_violation(tmp_path: Path) -> None:
    recs = _records()
    recs[2]["agent"] = "carol"
    recs[4]["max_tokens"] = -1
    bad = _write(tmp_path, recs, "bad.jsonl")
    good = _write(tmp_path, _records(), "good.jsonl")
    res = _cli("validate", bad, good)
    assert res.returncode == 1
    assert res.stdout.splitlines() == [
        f"{bad}:3: agent 'carol' is not in the header's agents",
        f"{bad}:5: max_tokens must be a positive integer, got -1",
        f"{good}: ok (4 requests, 2 rounds, 2 agents)",
    ]


def test_cli_usage_errors_exit_two() -> None:
    assert _cli().returncode == 2
    assert _cli("validate").returncode == 2


def test_cli_stats_prints_a_row_per_round() -> None:
    res = _cli("stats", ROOT / "workloads" / "ga_the_ville_n8.jsonl")
    assert res.returncode == 0, res.stderr
    assert "| 1 | 8 | 29318 | 10728 | 18590 | 36.6% | 1341 |" in res.stdout.splitlines()
    assert "| 4 | 8 | 32161 | 9672 | 22489 | 30.1% | 1209 |" in res.stdout.splitlines()
