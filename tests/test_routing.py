"""The routing key (hint ``group``), its default, the DP rank it pins, and the scale-out helpers
that need no server: CPU threads bind, the barrier's shared timeout, per-rank stats totals."""

from __future__ import annotations

import pytest

from sglang_tokendance.entry import RoundRegistry
from sglang_tokendance.hints import (
    HintError,
    build_request,
    find_action,
    parse_payload,
)
from sglang_tokendance.hints_text import build_separated, parse_separated
from sglang_tokendance.rounds import RoundBarrier
from sglang_tokendance.routing import (
    ROUTING_HEADER,
    default_group,
    group_of,
    routing_headers,
    stable_rank,
)
from sglang_tokendance.server_env import cpu_threads_bind, world_size
from sglang_tokendance.stats import combine
from sglang_tokendance.trace import loads_trace

SEGS = [("private", None, "You are Ann. "), ("shared", "r0/bob", "Bob: hi.")]


@pytest.mark.parametrize(
    ("round_id", "group"),
    [("sim-7/r3", "sim-7"), ("a/b/r2", "a/b"), ("x:4", "x"), ("t3", "t"), ("debate-12", "debate"),
     ("r2", "r"), ("12", "12"), ("solo", "solo")],
)  # fmt: skip
def test_default_group_strips_the_round_number(round_id: str, group: str) -> None:
    assert default_group(round_id) == group


def test_group_rides_in_the_hint_and_the_header() -> None:
    text, env = build_request(SEGS, "r1", 2, "ann", group="sim-a")
    hint = parse_payload(find_action(env), len(text))
    assert hint.group == "sim-a" and group_of(hint) == "sim-a"
    assert hint.to_payload()["group"] == "sim-a"
    assert routing_headers(env) == {ROUTING_HEADER: "sim-a"}
    _, plain = build_request(SEGS, "town/r4", 2, "ann")
    assert "group" not in find_action(plain)  # old clients' payloads are unchanged
    assert routing_headers(plain) == {ROUTING_HEADER: "town"}
    assert routing_headers(None) == {}


def test_separator_form_carries_the_group() -> None:
    text = build_separated(SEGS, "r1", 2, "ann", "<|td|>", group="g")
    clean, payload = parse_separated(text, "<|td|>")
    assert payload["group"] == "g" and parse_payload(payload, len(clean)).group == "g"


@pytest.mark.parametrize("bad", ["", 3, ["a"]])
def test_a_bad_group_is_refused_in_one_sentence(bad: object) -> None:
    text, env = build_request(SEGS, "r1", 2, "ann")
    payload = find_action(env) | {"group": bad}
    with pytest.raises(HintError, match="'group' must be a non-empty string"):
        parse_payload(payload, len(text))


def test_a_round_routes_as_one_group() -> None:
    reg = RoundRegistry()
    text, env = build_request(SEGS, "r1", 2, "ann", group="a")
    reg.check(parse_payload(find_action(env), len(text)), text)
    text2, env2 = build_request(SEGS, "r1", 2, "bob", group="b")
    with pytest.raises(HintError, match="has group 'a'"):
        reg.check(parse_payload(find_action(env2), len(text2)), text2)


def test_stable_rank_is_a_fixed_spread_hash() -> None:
    ranks = [stable_rank(f"sim-{k}", 4) for k in range(64)]
    assert all(0 <= r < 4 for r in ranks) and set(ranks) == {0, 1, 2, 3}
    assert ranks == [stable_rank(f"sim-{k}", 4) for k in range(64)]
    assert stable_rank("anything", 1) == 0


def test_cpu_threads_bind_splits_the_cores_per_rank() -> None:
    assert cpu_threads_bind(2, [0, 1]) == "0|1"
    assert cpu_threads_bind(2, list(range(8))) == "0-3|4-7"
    assert cpu_threads_bind(3, [0, 1]) == "0|1|0"
    assert world_size(["--dp-size", "2", "--tp", "2"]) == 4
    assert world_size(["--tp-size=2"]) == 2 and world_size([]) == 1


def test_shared_timeout_decision_overrides_the_local_clock() -> None:
    now = [0.0]
    barrier: RoundBarrier[str] = RoundBarrier(1.0, clock=lambda: now[0])
    barrier.add("r1", 3, "a", "req-a")
    now[0] = 5.0  # this rank's clock says r1 timed out, rank 0 did not say so
    assert barrier.expired() == ["r1"]
    assert barrier.poll([]) == [] and barrier.pending() == 1
    (rel,) = barrier.poll(["r1"])  # rank 0's decision
    assert rel.reason == "timeout" and rel.requests == ["req-a"]


def test_per_rank_stats_sum_to_a_total() -> None:
    def rank(i: int, rounds: int, stored: int, dense: int) -> dict:
        store = {"mirrors": 2, "mirror_tokens": 1, "stored_tokens": stored,
                 "dense_equiv_tokens": dense}  # fmt: skip
        return {"enabled": True, "dp_rank": i, "rounds": rounds, "integrity": "ok",
                "all_rounds_store": store, "per_round": [{"round": f"g{i}/r1"}]}  # fmt: skip

    body = combine([rank(1, 1, 10, 10), rank(0, 2, 10, 30)])  # any order
    assert body["dp_size"] == 2 and body["total"]["rounds"] == 3
    assert body["total"]["all_rounds_store"]["compression_ratio"] == 2.0
    assert [r["dp_rank"] for r in body["per_round"]] == [0, 1]
    assert body["integrity"] == "ok"


def test_old_traces_validate_and_a_group_round_trips() -> None:
    head = b'{"format":"tokendance-trace","version":1,"workload":"w","agents":["a"],"rounds":1,'
    req = b'\n{"round":1,"agent":"a","segments":[{"type":"private","text":"hi"}],"max_tokens":2}\n'
    old = loads_trace(head + b'"source":"s"}' + req)
    assert old.header.group is None
    new = loads_trace(head + b'"source":"s","group":"sim-1"}' + req)
    assert new.header.group == "sim-1"
    assert loads_trace(new.to_bytes()).header.group == "sim-1"
    with pytest.raises(ValueError, match="'group' must be a non-empty string"):
        loads_trace(head + b'"source":"s","group":""}' + req)
