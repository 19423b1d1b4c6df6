"""The collector's round logic against a small fake of its cache interface (no server).

The fake (:class:`FakeCache`) implements :class:`~sglang_tokendance.cache.api.CollectorCache`
on the project's pure store and authored index; rows are plain numbers whose slots are
``1000 * row + index``. The server tests cover the same paths end to end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from sglang_tokendance.accounting import Counters
from sglang_tokendance.cache.authored import AuthoredIndex
from sglang_tokendance.cache.nodes import AllGatherNode
from sglang_tokendance.cache.store import SegmentStore
from sglang_tokendance.collector import Collector
from sglang_tokendance.config import TokenDanceConfig
from sglang_tokendance.hint_state import parse_request
from sglang_tokendance.hints import ACTION_TYPE
from sglang_tokendance.state import attach, state_of


@dataclass
class FakeCache:
    publish_outputs: bool = False
    store: SegmentStore = field(default_factory=lambda: SegmentStore(lambda slots: None))
    authored: AuthoredIndex = field(default_factory=AuthoredIndex)
    claims: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    pins: list[tuple[int, int | None]] = field(default_factory=list)
    mirrors: list[tuple[str, str, int, int, int | None]] = field(default_factory=list)
    # (row, row entries, master slots they now read, nodes pinned, nodes counted with no diff)
    repointed: list[tuple[int, list[int], list[int], list[int], list[int]]] = field(
        default_factory=list
    )

    def lookup_segment(self, token_ids: Sequence[int]) -> AllGatherNode | None:
        return self.store.lookup(token_ids)

    def insert_segment(self, token_ids, slots, slot_positions):  # noqa: ANN001, ANN201
        return self.store.insert(token_ids, slots, slot_positions)

    def find_authored(self, token_ids: Sequence[int]):  # noqa: ANN201
        return self.authored.find(token_ids)

    def attach_mirror(self, round_id, agent, node, indices, slots, *, req_pool_idx=None, at=0):  # noqa: ANN001, ANN201
        self.mirrors.append((round_id, agent, node.node_id, at, req_pool_idx))
        return self.store.attach_mirror(round_id, agent, node, indices, slots, at)

    def repoint_row(self, row, index, master_slots, nodes, round_id, *, no_diff=()):  # noqa: ANN001, ANN201
        ids = [n.node_id for n in nodes], [n.node_id for n in no_diff]
        self.repointed.append((row, index.tolist(), master_slots.tolist(), *ids))
        return int(index.numel())

    def claim_row_ranges(self, req_pool_idx: int, ranges: Iterable[tuple[int, int]]) -> None:
        self.claims.append((req_pool_idx, list(ranges)))

    def pin_segment(self, node: AllGatherNode, req_pool_idx: int | None = None) -> None:
        self.pins.append((node.node_id, req_pool_idx))

    def row_slots(self, req_pool_idx: int, index: torch.Tensor) -> torch.Tensor:
        return index.to(torch.int64) + 1000 * req_pool_idx


class Board:
    def pop(self, row: int | None) -> dict[str, Any]:
        return {}


# Token ids: each agent's private prefix is 3 tokens, then the shared segments, then 2 tokens.
SEGS = {"s1": list(range(100, 110)), "s2": list(range(200, 208))}


def make_req(agent: str, order: Sequence[str], row: int, round_id: str = "r1", size: int = 3):
    ids = [1, 2, 3 + row]
    segs = [{"type": "private", "start": 0, "end": 1, "tok_start": 0, "tok_end": 3}]
    for k, sid in enumerate(order):
        start = len(ids)
        ids += SEGS[sid]
        segs.append(
            {
                "type": "shared",
                "id": sid,
                "start": k + 1,
                "end": k + 2,
                "tok_start": start,
                "tok_end": len(ids),
            }
        )
    segs.append(
        {
            "type": "private",
            "start": len(order) + 1,
            "end": len(order) + 2,
            "tok_start": len(ids),
            "tok_end": len(ids) + 2,
        }
    )
    ids += [9, 9]
    payload = {"round": round_id, "round_size": size, "agent": agent, "segments": segs}
    envelope = {
        "actions": [{"action_type": ACTION_TYPE, "action_version": "1", "payload": payload}],
        "protocol_version": "1",
    }
    req = SimpleNamespace(
        rid=f"{agent}-{round_id}",
        kv_hints=envelope,
        origin_input_ids=ids,
        kv=SimpleNamespace(req_pool_idx=row, cache_protected_len=3),
    )
    return req


def collector(**cfg: Any) -> tuple[Collector, FakeCache]:
    cache = FakeCache()
    options = TokenDanceConfig(enabled=True, **{"selection": "leading", **cfg})
    return Collector(options, cache, Board(), Counters()), cache


def parsed(col: Collector, req: Any) -> Any:
    attach(req, parse_request(req))
    return req


def test_a_round_without_masters_runs_in_two_phases() -> None:
    col, cache = collector()
    a = parsed(col, make_req("a", ["s1", "s2"], 1))
    b = parsed(col, make_req("b", ["s2", "s1"], 2))
    c = parsed(col, make_req("c", ["s1"], 3))
    now = col.start_round("r1", [a, b, c], 0.0)
    assert now == [a]  # the first agent holds both segments: one master agent computes both
    assert state_of(a).role == "master" and state_of(a).insert_cap == 3
    assert [u.seg_id for u in state_of(a).master_uses] == ["s1", "s2"]
    assert state_of(b).role == "waiting" and b not in now
    released = col.on_prefill_done(a)  # a's rows become the masters, the others may run
    assert released == [b, c]
    assert col.counters.masters_created == 2 and "r1" not in col.rounds
    s1 = cache.lookup_segment(SEGS["s1"])
    assert s1.master_slots.tolist() == [1000 + 3 + i for i in range(10)]
    # collective recompute sets: one set per segment, the same tensor for every agent
    sets = {u.seg_id: u.recompute for r in (b, c) for u in state_of(r).layout.shared}
    b_s1 = next(u for u in state_of(b).layout.shared if u.seg_id == "s1")
    c_s1 = next(u for u in state_of(c).layout.shared if u.seg_id == "s1")
    assert b_s1.recompute is c_s1.recompute is sets["s1"]
    assert b_s1.recompute.tolist() == [0, 1]  # ceil(0.15 * 10) leading tokens
    assert all(state_of(r).role == "reuse" for r in (b, c))


def test_mirrors_are_made_per_occurrence_and_tied_to_the_row() -> None:
    col, cache = collector()
    a = parsed(col, make_req("a", ["s1"], 1))
    b = parsed(col, make_req("b", ["s1"], 2))
    col.start_round("r1", [a, b], 0.0)
    (ready,) = col.on_prefill_done(a)
    lay = state_of(ready).layout
    lay.row_pos = torch.tensor([0, 1, 2, *range(5, 13), 3, 4, 13, 14])  # s1[2:] reused
    col.on_prefill_done(ready)
    assert cache.mirrors == [("r1", "b", 0, 3, 2)]  # at = the segment's start, row 2
    assert (2, [(11, 13)]) in cache.claims


class Judge:
    """Deviation of slot ``s`` = the table's value for its row index (``s - 1000 * row``)."""

    def __init__(self, by_index: dict[int, float]) -> None:
        self.by_index = by_index
        self.asked: list[tuple[list[int], list[int]]] = []
        self.scales: list[str] = []

    def deviation(
        self, mirror_slots: torch.Tensor, master_slots: torch.Tensor, scale: str = "token"
    ) -> torch.Tensor:
        self.asked.append((mirror_slots.tolist(), master_slots.tolist()))
        self.scales.append(scale)
        return torch.tensor([self.by_index[int(s) % 1000] for s in mirror_slots])


def _threshold_round(
    eps: float, dev: dict[int, float], scale: str = "token"
) -> tuple[Collector, FakeCache, Judge]:
    cache, judge = FakeCache(), Judge(dev)
    cfg = TokenDanceConfig(
        enabled=True, selection="leading", mirror="threshold", mirror_eps=eps, mirror_scale=scale
    )
    col = Collector(cfg, cache, Board(), Counters(), judge)
    a = parsed(col, make_req("a", ["s1"], 1))
    b = parsed(col, make_req("b", ["s1"], 2))
    col.start_round("r1", [a, b], 0.0)
    (ready,) = col.on_prefill_done(a)
    state_of(ready).layout.row_pos = torch.tensor([0, 1, 2, *range(5, 13), 3, 4, 13, 14])
    col.on_prefill_done(ready)
    return col, cache, judge


def test_threshold_keeps_only_the_slots_that_deviate_from_the_master() -> None:
    # row 2's recomputed entries 11, 12 hold s1[0], s1[1]; master slots 1003, 1004 (row 1)
    col, cache, judge = _threshold_round(0.1, {11: 0.5, 12: 0.01})
    assert judge.asked == [([2011, 2012], [1003, 1004])]  # one measurement for the row
    assert judge.scales == ["token"]
    assert cache.repointed == [(2, [12], [1004], [0], [])]  # s1[1] reads the master again
    (mirror,) = cache.store.mirrors()
    assert mirror.indices.tolist() == [0] and mirror.slots.tolist() == [2011]
    assert (2, [(11, 12)]) in cache.claims
    c = col.counters
    assert (c.mirror_slots_kept, c.mirror_slots_freed, sum(c.mirror_dev_counts)) == (1, 1, 2)


def test_threshold_asks_the_judge_for_the_configured_scale() -> None:
    _, cache, judge = _threshold_round(0.1, {11: 0.5, 12: 0.01}, scale="layer")
    assert judge.scales == ["layer"] and len(list(cache.store.mirrors())) == 1


def test_threshold_at_the_extremes_is_keep_and_drop() -> None:
    _, keep, _ = _threshold_round(0.0, {11: 0.5, 12: 0.01})
    assert keep.repointed == [] and len(list(keep.store.mirrors())) == 1
    _, drop, _ = _threshold_round(1e9, {11: 0.5, 12: 0.01})
    assert drop.repointed == [(2, [11, 12], [1003, 1004], [0], [0])]  # a view, no diff
    assert list(drop.store.mirrors()) == []


def test_an_aborted_master_agent_releases_its_round() -> None:
    col, _ = collector()
    a = parsed(col, make_req("a", ["s1"], 1))
    b = parsed(col, make_req("b", ["s1"], 2))
    assert col.start_round("r1", [a, b], 0.0) == [a]
    assert col.on_abort("a-r1", abort_all=False) == ([b], [])
    assert state_of(b).layout.shared[0].node is None  # no master: b computes s1 itself
    assert col.rounds == {}


def test_a_late_arrival_is_planned_alone_against_the_masters() -> None:
    col, cache = collector()
    slots = torch.arange(500, 510)
    cache.insert_segment(SEGS["s1"], slots, torch.arange(3, 13))
    late = parsed(col, make_req("z", ["s1", "s2"], 4))
    col.plan_alone(late)
    uses = state_of(late).layout.shared
    assert uses[0].node is cache.lookup_segment(SEGS["s1"]) and uses[1].node is None
    assert state_of(late).role == "reuse"  # s2 is computed fresh in its row, then promoted
    alone = parsed(col, make_req("y", ["s2"], 5))
    col.plan_alone(alone)
    assert state_of(alone).role == "master"  # nothing to reuse: an ordinary full prefill


def test_an_authored_output_replaces_the_master_agent() -> None:
    col, cache = collector(master_policy="author")
    assert cache.publish_outputs is True
    out = SEGS["s1"][2:]  # an agent's output, wrapped in 2 tokens of text in this round
    node = cache.insert_segment(out, torch.arange(600, 608), torch.arange(40, 48)).node
    cache.authored.add(node)
    a = parsed(col, make_req("a", ["s1"], 1))
    b = parsed(col, make_req("b", ["s1"], 2))
    now = col.start_round("r1", [a, b], 0.0)
    assert now == [a, b]  # no phase A
    use = state_of(a).layout.shared[0]
    assert (use.node, use.start, use.end, use.node_offset) == (node, 5, 13, 0)
    assert col.counters.author_masters_used == 1


def test_an_agent_arriving_with_missing_segments_runs_at_once_as_their_master_agent() -> None:
    col, cache = collector()
    a = parsed(col, make_req("a", ["s1", "s2"], 1))
    b = parsed(col, make_req("b", ["s2", "s1"], 2))
    c = parsed(col, make_req("c", ["s1"], 3))
    assert col.admit(a) == [a]  # nobody provides s1, s2: a computes both, now
    assert state_of(a).role == "master"
    assert [u.seg_id for u in state_of(a).master_uses] == ["s1", "s2"]
    assert col.admit(b) == [] and col.admit(c) == []  # they wait for a, not for the round
    assert col.waiting() == 2 and state_of(b).role == "waiting"
    assert col.on_prefill_done(a) == [b, c]  # its masters exist: both run, round not whole
    assert all(u.node is not None for r in (b, c) for u in state_of(r).layout.shared)
    b_s1 = next(u for u in state_of(b).layout.shared if u.seg_id == "s1")
    assert b_s1.recompute is state_of(c).layout.shared[0].recompute  # collective
    assert col.counters.masters_created == 2 and col.counters.early_master_agents == 1
    assert col.start_round("r1", [], 0.0) == [] and col.rounds == {}  # the barrier's count
    assert col.counters.rounds == 1 and col.counters.barrier_wait_s == 0.0


def test_an_agent_whose_masters_exist_runs_at_arrival() -> None:
    col, cache = collector()
    cache.insert_segment(SEGS["s1"], torch.arange(500, 510), torch.arange(3, 13))
    a = parsed(col, make_req("a", ["s1"], 1))
    assert col.admit(a) == [a]
    assert state_of(a).role == "reuse"
    assert state_of(a).layout.shared[0].node is cache.lookup_segment(SEGS["s1"])


def test_a_later_arrival_with_a_new_segment_is_a_second_master_agent() -> None:
    col, _ = collector()
    a = parsed(col, make_req("a", ["s1"], 1))
    b = parsed(col, make_req("b", ["s1", "s2"], 2))
    c = parsed(col, make_req("c", ["s2", "s1"], 3))
    assert col.admit(a) == [a]
    assert col.admit(b) == [b]  # s2 is nobody's yet: b computes it (a full prefill)
    assert [u.seg_id for u in state_of(b).master_uses] == ["s2"]
    assert col.admit(c) == []  # c reads both: it waits for a and for b
    assert col.on_prefill_done(a) == []
    assert col.on_prefill_done(b) == [c]
    assert col.counters.masters_created == 2
    assert col.start_round("r1", [], 0.0) == [] and col.rounds == {}


def test_aborts_hand_back_waiting_agents_and_free_those_waiting_for_a_master() -> None:
    col, _ = collector()
    a = parsed(col, make_req("a", ["s1"], 1))
    b = parsed(col, make_req("b", ["s1"], 2))
    c = parsed(col, make_req("c", ["s1"], 3))
    assert [col.admit(r) for r in (a, b, c)] == [[a], [], []]
    assert col.on_abort("c-r1", abort_all=False) == ([], [c])  # for SGLang's abort path
    assert col.on_abort("a-r1", abort_all=False) == ([b], [])  # b computes s1 itself
    assert state_of(b).layout.shared[0].node is None
    assert col.rounds == {}
    d = parsed(col, make_req("d", ["s1"], 4))
    assert col.admit(d) == [d] and state_of(d).role == "master"  # s1 is nobody's again


def test_an_authored_output_is_found_once_per_segment_and_round() -> None:
    col, cache = collector(master_policy="author")
    node = cache.insert_segment(SEGS["s1"][2:], torch.arange(600, 608), torch.arange(40, 48))
    cache.authored.add(node.node)
    cache.insert_segment(SEGS["s2"], torch.arange(700, 708), torch.arange(3, 11))
    a = parsed(col, make_req("a", ["s1", "s2"], 1))
    b = parsed(col, make_req("b", ["s1"], 2))
    assert col.admit(a) == [a] and col.admit(b) == [b]  # no master agent
    for r in (a, b):
        use = state_of(r).layout.shared[0]
        assert (use.node, use.end - use.start) == (node.node, 8)
    assert col.counters.author_masters_used == 1 and col.counters.early_master_agents == 0
