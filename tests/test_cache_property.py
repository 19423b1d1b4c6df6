"""Property tests on real pools: random life cycles stay sound; hint-less use is stock SGLang."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from cache_fixtures import alloc, finish_request, plain_cache, rkey, start_request, td_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams

from sglang_tokendance.cache.nodes import AllGatherNode
from sglang_tokendance.cache.radix import TokenDanceRadixCache

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
POOL = 48
SEGS = [tuple(range(100 + 10 * s, 100 + 10 * s + n)) for s, n in enumerate((2, 3, 4, 5))]
ROUNDS, AGENTS = ("r0", "r1"), ("a0", "a1", "a2")

seg = st.integers(0, len(SEGS) - 1)
key = st.lists(st.integers(1, 3), min_size=1, max_size=6)
request_op = st.tuples(st.just("request"), seg, key, st.integers(1, 3), st.booleans())
finish_op = st.tuples(st.just("finish"), st.integers(0, 2), st.booleans())
lifecycle_op = st.one_of(
    request_op,  # requests and finishes twice as likely: they drive the release path
    finish_op,
    st.tuples(st.just("segment"), seg),
    st.tuples(
        st.just("attach"), seg, st.sampled_from(ROUNDS), st.sampled_from(AGENTS), st.integers(0, 31)
    ),
    st.tuples(st.just("pin"), seg),
    st.tuples(st.just("unpin"), seg),
    st.tuples(
        st.just("release"), st.sampled_from((*AGENTS, None)), st.sampled_from((*ROUNDS, None))
    ),
    st.tuples(st.just("evict"), st.integers(1, 20)),
    st.tuples(st.just("evict_segment"), seg),
    st.tuples(st.just("radix"), key),
    request_op,
    finish_op,
)


@dataclass
class World:
    """A TokenDance cache and the collector-side bookkeeping a real collector would keep."""

    cache: TokenDanceRadixCache
    pools: object
    pins: list[AllGatherNode] = field(default_factory=list)
    running: list[Req] = field(default_factory=list)
    next_rid: int = 0

    def room(self, n: int) -> bool:
        """Make ``n`` slots available the way the scheduler does (evict the shortfall)."""
        short = n - self.pools.allocator.available_size()
        if short > 0:
            self.cache.evict(EvictParams(num_tokens=short))
        return self.pools.allocator.available_size() >= n

    def request_owned(self) -> list[torch.Tensor]:
        return [
            self.cache.row_owned_slots(
                r.kv.req_pool_idx, r.kv.cache_protected_len, r.kv.kv_allocated_len
            )
            for r in self.running
        ]

    def segment(self, s: int) -> AllGatherNode | None:
        """The master of segment ``s``, computed (fresh slots) if missing and there is room."""
        if not self.room(len(SEGS[s])):
            return self.cache.lookup_segment(SEGS[s])
        slots = alloc(self.pools, len(SEGS[s]))
        node, inserted = self.cache.insert_segment(SEGS[s], slots, torch.arange(len(slots)))
        if not inserted:
            self.pools.allocator.free(slots)  # an equal master exists: the slots stay ours
        return node

    def step(self, op: tuple) -> None:
        cache, pools = self.cache, self.pools
        kind = op[0]
        if kind == "segment":
            self.segment(op[1])
        elif kind == "attach" and (node := self.segment(op[1])):
            indices = [i for i in range(node.length) if op[4] >> i & 1]
            if self.room(len(indices)) and not node.evicted:
                cache.attach_mirror(op[2], op[3], node, indices, alloc(pools, len(indices)))
        elif kind == "pin" and (node := self.segment(op[1])):
            cache.pin_segment(node)
            self.pins.append(node)
        elif kind == "unpin":
            mine = [n for n in self.pins if n.token_ids == SEGS[op[1]]]
            if mine:
                cache.unpin_segment(mine[0])
                self.pins.remove(mine[0])
        elif kind == "release" and (op[1] or op[2] or not self.running):
            # Releasing everything would free running requests' mirror slots under them (a
            # collector bug that check_integrity reports as a claimed slot owned by nobody).
            cache.release_mirrors(agent=op[1], round_id=op[2])
        elif kind == "evict":
            cache.evict(EvictParams(num_tokens=op[1]))
        elif kind == "evict_segment" and (node := self.segment(op[1])):
            if node.pin_count:
                with pytest.raises(ValueError, match="pinned"):
                    cache.evict_segment(node)
            else:
                cache.evict_segment(node)
        elif kind == "radix" and self.room(len(op[1])):
            value = alloc(pools, len(op[1]))
            prefix = cache.insert(InsertParams(key=rkey(op[1]), value=value)).prefix_len
            pools.allocator.free(value[:prefix])  # the tree already held these (as _insert_cache)
        elif kind == "request":
            self.start_laid_out(op[1], op[2], op[3], op[4])
        elif kind == "finish" and self.running:
            req = self.running.pop(op[1] % len(self.running))
            finish_request(cache, req, checkpoint=not op[2])  # checkpoint=False: an abort

    def start_laid_out(self, s: int, prefix: list[int], suffix: int, diff: bool) -> None:
        """Row [prefix][whole master][suffix]; optionally the first suffix slot becomes a mirror."""
        node = self.segment(s) if len(self.running) < 3 else None
        if node is None:
            return
        self.cache.pin_segment(node)  # hold it while making room for the rest of the row
        room = self.room(len(prefix) + suffix)
        self.cache.unpin_segment(node)
        if not room:
            return
        seg_ids = SEGS[s]
        rid = f"q{self.next_rid}"
        self.next_rid += 1
        ids = [*prefix, *seg_ids, *([9] * suffix)]
        req = start_request(
            self.cache, self.pools, rid, ids, reuse=(len(prefix), node.master_slots)
        )
        row, at = req.kv.req_pool_idx, len(prefix) + node.length
        self.cache.pin_segment(node, row)
        self.cache.claim_row_ranges(row, [(len(prefix), at)])
        if diff:
            slot = self.pools.req_to_token_pool.req_to_token[row, at : at + 1]
            self.cache.attach_mirror("req", rid, node, [0], slot)
            self.cache.claim_row_ranges(row, [(at, at + 1)])
        self.running.append(req)


@settings(SETTINGS, max_examples=80)
@given(ops=st.lists(lifecycle_op, min_size=8, max_size=40))
def test_random_lifecycles_keep_integrity_and_return_every_slot(ops: list[tuple]) -> None:
    # A colliding hash (three buckets) so every lookup goes through bucket verification.
    cache, pools = td_cache(POOL, hash_fn=lambda ids: sum(ids) % 3)
    world = World(cache, pools)
    for op in ops:
        world.step(op)
        cache.check_integrity(world.request_owned())
    while world.running:
        finish_request(cache, world.running.pop())
    for node in world.pins:
        cache.unpin_segment(node)
    cache.release_mirrors()
    cache.evict(EvictParams(num_tokens=POOL))
    cache.check_integrity()
    assert pools.allocator.available_size() == POOL
    assert len(cache.store) == 0 and cache.total_size() == 0
    assert (cache.evictable_size(), cache.protected_size()) == (0, 0)


plain_op = st.one_of(
    st.tuples(st.just("insert"), key),
    st.tuples(st.just("match"), key),
    st.tuples(st.just("evict"), st.integers(1, 12)),
    st.tuples(st.just("request"), key),
)


def _apply(cache, pools, op: tuple) -> tuple:
    """One hint-less operation; returns everything observable about it."""
    kind, arg = op
    if kind == "match":
        return (cache.match_prefix(MatchPrefixParams(key=rkey(arg))).device_prefix_len,)
    if kind == "evict":
        return (cache.evict(EvictParams(num_tokens=arg)).num_tokens_evicted,)
    short = len(arg) - pools.allocator.available_size()
    evicted = cache.evict(EvictParams(num_tokens=short)).num_tokens_evicted if short > 0 else 0
    if pools.allocator.available_size() < len(arg):
        return (evicted, None)
    if kind == "insert":
        value = alloc(pools, len(arg))
        prefix = cache.insert(InsertParams(key=rkey(arg), value=value)).prefix_len
        pools.allocator.free(value[:prefix])
        return (evicted, prefix)
    req = start_request(cache, pools, "plain", arg)
    finish_request(cache, req)
    return (evicted, req.prefix_len)


@SETTINGS
@given(ops=st.lists(plain_op, min_size=8, max_size=40))
def test_hintless_use_matches_stock_radix_cache(ops: list[tuple]) -> None:
    stock, stock_pools = plain_cache(24)
    ours, our_pools = td_cache(24)
    for op in ops:
        assert _apply(ours, our_pools, op) == _apply(stock, stock_pools, op), op
        assert (ours.evictable_size(), ours.protected_size(), ours.total_size()) == (
            stock.evictable_size(),
            stock.protected_size(),
            stock.total_size(),
        )
        assert our_pools.allocator.free_pages.tolist() == stock_pools.allocator.free_pages.tolist()
    ours.check_integrity()
