"""A hypothesis state machine over the cache in a closed loop (real SGLang pools, no mocks).

Agents come and go (new names every round: agents that never return), finished requests
publish their outputs as authored masters, later prompts re-use those outputs wrapped in other
text ("<name> said: <output>"), one prompt may hold the same master twice, and eviction runs
whenever room is needed. After every step the full census must hold, and whenever nothing runs
nothing may be protected (``check_integrity(idle=True)``): a mirror never outlives its request.
"""

from __future__ import annotations

from array import array

import torch
from cache_fixtures import alloc, start_request, td_cache
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.common import release_kv_cache

from sglang_tokendance.state import RequestState, attach

POOL = 96
WRAPPER = [7, 8]  # "<name> said:" around a re-used output
MASTERS = [tuple(range(100 + 10 * s, 100 + 10 * s + n)) for s, n in enumerate((4, 5, 6))]


class ClosedLoop(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache, self.pools = td_cache(POOL)
        self.cache.publish_outputs = True  # master policy "author"
        self.running: list[Req] = []
        self.round = 0
        self.next_agent = 0
        self.next_rid = 0

    # ---- helpers -----------------------------------------------------------------------------
    def room(self, n: int) -> bool:
        short = n - self.pools.allocator.available_size()
        if short > 0:
            self.cache.evict(EvictParams(num_tokens=short))
        return self.pools.allocator.available_size() >= n

    def master(self, s: int):
        node = self.cache.lookup_segment(MASTERS[s])
        if node is None and self.room(len(MASTERS[s])):
            slots = alloc(self.pools, len(MASTERS[s]))
            node = self.cache.insert_segment(MASTERS[s], slots, torch.arange(len(slots))).node
        return node

    def request_owned(self) -> list[torch.Tensor]:
        return [
            self.cache.row_owned_slots(
                r.kv.req_pool_idx, r.kv.cache_protected_len, r.kv.kv_allocated_len
            )
            for r in self.running
        ]

    # ---- rules -------------------------------------------------------------------------------
    @rule()
    def next_round(self) -> None:
        self.round += 1

    @precondition(lambda self: len(self.running) < 3)
    @rule(
        returning=st.booleans(),
        wrapped=st.booleans(),
        seg=st.integers(0, len(MASTERS) - 1),
        twice=st.booleans(),
        drop=st.booleans(),
    )
    def start(self, returning: bool, wrapped: bool, seg: int, twice: bool, drop: bool) -> None:
        """An agent's request: private prefix, one re-used segment, two fresh suffix tokens."""
        if not returning or self.next_agent == 0:
            self.next_agent += 1  # a new agent: its predecessors never come back
        agent = f"a{self.next_agent}"
        if any(
            (r.tokendance.agent, r.tokendance.round_id) == (agent, f"r{self.round}")
            for r in self.running
        ):
            return  # one request per agent per round at a time (the scheduler refuses more)
        prefix = [1, 2, 3 + self.next_agent % 5]
        hit = None
        if wrapped and len(self.cache.authored):
            newest = [n for n in self.cache.authored._nodes if not n.evicted][-1]
            seg_ids = WRAPPER + list(newest.token_ids)
            hit = self.cache.find_authored(seg_ids)
            assert hit is not None, "an authored output must be found inside its wrapper"
            node, offset, at = hit.node, hit.node_offset, len(prefix) + hit.seg_offset
            length = hit.length
        else:
            node = self.master(seg)
            if node is None:
                return
            seg_ids, offset, at, length = list(node.token_ids), 0, len(prefix), node.length
        ids = prefix + seg_ids + [9, 9]
        self.cache.pin_segment(node)  # hold it while making room for the rest of the row
        ok = self.room(len(ids) - length)
        self.cache.unpin_segment(node)
        if not ok or node.evicted:
            return
        rid = f"q{self.next_rid}"
        self.next_rid += 1
        reused = node.master_slots[offset : offset + length]
        req = start_request(self.cache, self.pools, rid, ids, reuse=(at, reused))
        attach(req, RequestState(agent, f"r{self.round}", 3, insert_cap=len(prefix)))
        row, end = req.kv.req_pool_idx, at + length
        self.cache.pin_segment(node, row)
        self.cache.claim_row_ranges(row, [(at, end)])
        # the first suffix token is this agent's recomputed copy of the segment's first token;
        # with ``twice`` the prompt holds the segment a second time (two agents said the same)
        if drop:  # --tokendance-mirror drop: the recomputed slot goes, the row reads the master
            self.cache.repoint_row(
                row,
                torch.tensor([end]),
                node.master_slots[offset : offset + 1],
                [node],
                f"r{self.round}",
                no_diff=[node],
            )
            self.running.append(req)
            return
        for k in range(2 if twice else 1):
            slot = self.pools.req_to_token_pool.req_to_token[row, end + k : end + k + 1]
            self.cache.attach_mirror(
                f"r{self.round}", agent, node, [offset], slot, req_pool_idx=row, at=at + 17 * k
            )
            self.cache.claim_row_ranges(row, [(end + k, end + k + 1)])
        self.running.append(req)

    @precondition(lambda self: self.running)
    @rule(which=st.integers(0, 2), m=st.integers(0, 6), abort=st.booleans())
    def finish(self, which: int, m: int, abort: bool) -> None:
        """Decode ``m`` tokens (KV written for all but the last output token), then release;
        a finished request publishes its output as an authored master."""
        self._finish(self.running.pop(which % len(self.running)), m, abort)

    def _finish(self, req: Req, m: int, abort: bool) -> None:
        if m and self.room(m):
            row = req.kv.req_pool_idx
            n = req.kv.kv_allocated_len
            self.pools.req_to_token_pool.write((row, slice(n, n + m)), alloc(self.pools, m))
            req.kv.kv_committed_len = req.kv.kv_allocated_len = n + m
            base = 20 + 7 * int(req.rid[1:])
            req.output_ids = array("q", [base + j for j in range(m + 1)])
        req.finished_len = len(req.output_ids)
        req.finished_reason = FINISH_LENGTH(len(req.output_ids))
        req.fill_ids = array("q", [*req.origin_input_ids, *req.output_ids])
        release_kv_cache(req, self.cache, checkpoint=not abort)

    @rule(n=st.integers(1, 40))
    def evict(self, n: int) -> None:
        self.cache.evict(EvictParams(num_tokens=n))

    # ---- invariants --------------------------------------------------------------------------
    @invariant()
    def census(self) -> None:
        self.cache.check_integrity(self.request_owned(), idle=not self.running)

    def teardown(self) -> None:
        while self.running:
            self._finish(self.running.pop(), 0, False)
        self.cache.check_integrity(idle=True)
        self.cache.evict(EvictParams(num_tokens=POOL))
        self.cache.check_integrity(idle=True)
        assert self.pools.allocator.available_size() == POOL
        assert len(self.cache.store) == 0 and self.cache.total_size() == 0


ClosedLoop.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
test_closed_loop_cache_keeps_integrity_and_frees_every_mirror = ClosedLoop.TestCase
