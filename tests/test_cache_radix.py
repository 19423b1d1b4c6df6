"""TokenDanceRadixCache on SGLang's real pools: shared budget, LRU, release path, census."""

from __future__ import annotations

import pytest
import torch
from cache_fixtures import (
    alloc,
    build_pools,
    finish_request,
    rkey,
    start_request,
    td_cache,
    uncached,
)
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.registry import TreeCacheBuildContext

from sglang_tokendance.cache import IntegrityError
from sglang_tokendance.cache.radix import TokenDanceRadixCache, kv_bytes_per_token, make_tree_cache
from sglang_tokendance.positions import get_position_table


def _freed_tail(pools, n: int) -> list[int]:
    return pools.allocator.free_pages[-n:].tolist()


def _ctx(pools, **overrides) -> TreeCacheBuildContext:
    fields = dict(
        server_args=None,
        params=pools.params,
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hierarchical_cache=False,
        disable_radix_cache=False,
        tp_worker=None,
        model_config=None,
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    )
    fields.update(overrides)
    return TreeCacheBuildContext(**fields)


def test_eviction_is_lru_across_radix_leaves_and_masters() -> None:
    cache, pools = td_cache(32)
    cache.insert(InsertParams(key=rkey([1, 2, 3]), value=alloc(pools, 3)))  # slots 1-3
    m1 = cache.insert_segment([100, 101, 102, 103], alloc(pools, 4), torch.arange(4)).node  # 4-7
    cache.insert(InsertParams(key=rkey([7, 8]), value=alloc(pools, 2)))  # slots 8-9
    m2 = cache.insert_segment([200] * 5, alloc(pools, 5), torch.arange(5)).node  # 10-14
    assert (cache.evictable_size(), cache.protected_size()) == (14, 0)
    assert cache.lookup_segment([100, 101, 102, 103]) is m1  # m1 becomes most recent
    assert cache.match_prefix(MatchPrefixParams(key=rkey([1, 2]))).device_prefix_len == 2
    # LRU now: [7, 8] leaf, m2, m1, then the [1, 2 | 3] leaves (touched by the match).
    expected = [([8, 9], 2), ([10, 11, 12, 13, 14], 5), ([4, 5, 6, 7], 4), ([3], 1), ([1, 2], 2)]
    for slots, n in expected:
        assert cache.evict(EvictParams(num_tokens=1)).num_tokens_evicted == n
        assert _freed_tail(pools, n) == slots
    assert m1.evicted and m2.evicted and cache.store.evictions == 2
    assert (cache.evictable_size(), cache.protected_size(), pools.allocator.available_size()) == (
        0,
        0,
        32,
    )
    cache.check_integrity()


def test_pinned_and_mirrored_masters_are_not_evicted() -> None:
    cache, pools = td_cache(32)
    pinned = cache.insert_segment([1, 1, 1], alloc(pools, 3), torch.arange(3)).node
    mirrored = cache.insert_segment([2, 2, 2], alloc(pools, 3), torch.arange(3)).node
    loose = cache.insert_segment([3, 3], alloc(pools, 2), torch.arange(2)).node
    cache.insert(InsertParams(key=rkey([9, 9]), value=alloc(pools, 2)))
    cache.pin_segment(pinned)
    cache.attach_mirror("r1", "a", mirrored, [1], alloc(pools, 1))
    assert (cache.evictable_size(), cache.protected_size()) == (2 + 2, 3 + 3 + 1)
    assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 4
    assert loose.evicted and not pinned.evicted and not mirrored.evicted
    assert (cache.evictable_size(), cache.protected_size()) == (0, 7)
    cache.check_integrity()
    assert cache.release_mirrors(round_id="r1") == 1
    cache.unpin_segment(pinned)
    assert (cache.evictable_size(), cache.protected_size()) == (6, 0)
    assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 6
    assert pools.allocator.available_size() == 32
    cache.check_integrity()


def test_evicting_a_master_drops_its_mirrors() -> None:
    cache, pools = td_cache(32)
    node = cache.insert_segment([5, 6, 7, 8], alloc(pools, 4), torch.arange(4)).node
    cache.attach_mirror("r1", "a", node, [0, 3], alloc(pools, 2))
    cache.attach_mirror("r1", "b", node, [0, 3], alloc(pools, 2))
    assert cache.resolve_mirror("r1", "b", node).tolist() == [7, 2, 3, 8]
    assert cache.protected_size() == 8
    assert cache.evict_segment(node) == 8
    assert _freed_tail(pools, 8) == [1, 2, 3, 4, 5, 6, 7, 8]  # master, then mirrors
    assert cache.get_mirror("r1", "a", node) is None and cache.lookup_segment([5, 6, 7, 8]) is None
    assert (cache.evictable_size(), cache.protected_size()) == (0, 0)
    assert cache.stats()["evictions"] == 1
    cache.check_integrity()


def test_check_integrity_reports_leaked_and_double_owned_slots() -> None:
    cache, pools = td_cache(16)
    lost = alloc(pools, 2)
    with pytest.raises(IntegrityError, match=r"2 leaked slot\(s\) owned by nobody: \[1, 2\]"):
        cache.check_integrity()
    cache.check_integrity(request_owned=[lost])
    value = alloc(pools, 3)  # slots 3-5
    cache.insert(InsertParams(key=rkey([1, 2, 3]), value=value))
    cache.insert_segment([9, 9], value[:2], [0, 1])  # wrongly reuses tree-owned slots 3, 4
    with pytest.raises(
        IntegrityError, match=r"slot 3 is owned 2 times: by radix node \d+, master 0"
    ):
        cache.check_integrity(request_owned=[lost])


def test_stats_in_tokens_and_bytes() -> None:
    cache, pools = td_cache(64)
    per_token = kv_bytes_per_token(pools.kv_pool)
    nodes = [cache.insert_segment([s] * 8, alloc(pools, 8), torch.arange(8)).node for s in (1, 2)]
    for agent in ("a", "b", "c"):
        for node in nodes:
            cache.attach_mirror("r1", agent, node, [0, 4], alloc(pools, 2))
    s = cache.stats(kv_bytes_per_token=per_token)
    assert (s["dense_equiv_tokens"], s["stored_tokens"], s["compression_ratio"]) == (
        48,
        28,
        48 / 28,
    )
    assert s["saved_bytes"] == (48 - 28) * per_token == 20 * 128
    assert cache.stats(round_id="r2")["mirrors"] == 0
    cache.check_integrity()


def test_kv_bytes_per_token_matches_the_real_buffers() -> None:
    pools = build_pools(size=16, layers=3, heads=2, head_dim=8, dtype=torch.bfloat16)
    kv = pools.kv_pool
    from_buffers = sum(b.numel() * b.element_size() for b in [*kv.k_buffer, *kv.v_buffer])
    assert kv_bytes_per_token(kv) == 3 * 2 * (8 + 8) * 2 == from_buffers // (16 + 1)
    with pytest.raises(ValueError, match="not an MHA KV pool"):
        kv_bytes_per_token(object())


def test_factory_refuses_page_size_other_than_one() -> None:
    pools = build_pools(size=16, page_size=4)
    with pytest.raises(ValueError, match=r"TokenDance requires --page-size 1 \(got 4\)"):
        make_tree_cache(_ctx(pools))
    with pytest.raises(ValueError, match="--page-size 1"):
        TokenDanceRadixCache(pools.params)


def test_factory_builds_cache_with_the_shared_position_table() -> None:
    pools = build_pools(size=16)
    cache = make_tree_cache(_ctx(pools))
    assert isinstance(cache, TokenDanceRadixCache)
    assert cache.positions is get_position_table(pools.req_to_token_pool)
    assert cache.positions.slot_pos.numel() == 17
    with pytest.raises(ValueError, match="hierarchical"):
        make_tree_cache(_ctx(pools, enable_hierarchical_cache=True))
    cache.check_integrity()


def test_release_keeps_master_slots_and_hands_fresh_slots_to_a_mirror() -> None:
    cache, pools = td_cache(64)
    node = cache.insert_segment([50, 51, 52, 53], alloc(pools, 4), torch.arange(10, 14)).node
    ids = [1, 2, 3, 50, 51, 52, 53, 7, 8, 9]
    # Row: [prefix 1 2 3][master slots of segment indices 0, 1, 3][recomputed index 2][suffix].
    req = start_request(cache, pools, "a", ids, reuse=(3, node.master_slots[[0, 1, 3]]))
    row = req.kv.req_pool_idx
    assert pools.req_to_token_pool.req_to_token[row, :10].tolist() == [
        5,
        6,
        7,
        1,
        2,
        4,
        8,
        9,
        10,
        11,
    ]
    cache.positions.set_layout(row, torch.tensor([0, 1, 2, 3, 4, 6, 5, 7, 8, 9]))
    cache.pin_segment(node, row)
    cache.claim_row_ranges(row, [(3, 6)])
    # After the extend the recomputed token's fresh slot (row 6) becomes agent a's diff.
    cache.attach_mirror("r1", "a", node, [2], pools.req_to_token_pool.req_to_token[row, 6:7])
    cache.claim_row_ranges(row, [(6, 7)])
    assert cache.resolve_mirror("r1", "a", node).tolist() == [1, 2, 8, 4]
    # SGLang's busy-time pool invariant holds: every slot counted once.
    alloc_ = pools.allocator
    assert (
        alloc_.available_size() + cache.evictable_size() + cache.protected_size() + uncached(req)
        == 64
    )
    cache.check_integrity([cache.row_owned_slots(row, 0, 10)])
    finish_request(cache, req)
    assert _freed_tail(pools, 3) == [9, 10, 11]  # only the private suffix was freed
    assert cache.match_prefix(MatchPrefixParams(key=rkey(ids))).device_prefix_len == 3
    assert node.pin_count == 0 and not cache.positions.has_layout(row) and not cache.row_claims()
    assert (alloc_.available_size(), cache.evictable_size(), cache.protected_size()) == (56, 3, 5)
    cache.check_integrity()
    assert cache.release_mirrors(agent="a") == 1
    assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 3 + 4
    assert alloc_.available_size() == 64
    cache.check_integrity()


def test_abort_frees_only_the_requests_own_slots() -> None:
    cache, pools = td_cache(32)
    node = cache.insert_segment([40, 41], alloc(pools, 2), torch.arange(2)).node  # slots 1, 2
    req = start_request(cache, pools, "x", [1, 40, 41, 3], reuse=(1, node.master_slots))
    cache.pin_segment(node, req.kv.req_pool_idx)
    cache.claim_row_ranges(req.kv.req_pool_idx, [(1, 3)])
    finish_request(cache, req, checkpoint=False)
    assert _freed_tail(pools, 2) == [3, 4]
    assert node.evictable and cache.total_size() == 0
    assert (pools.allocator.available_size(), cache.evictable_size()) == (30, 2)
    cache.check_integrity()


def test_checkpoint_inserts_only_the_true_order_prefix_of_a_layout() -> None:
    cache, pools = td_cache(32)
    req = start_request(cache, pools, "p", [1, 2, 3, 4, 5])
    cache.positions.set_layout(req.kv.req_pool_idx, torch.tensor([0, 1, 3, 2, 4]))
    finish_request(cache, req)
    assert cache.total_size() == 2
    assert cache.match_prefix(MatchPrefixParams(key=rkey([1, 2, 3, 4, 5]))).device_prefix_len == 2
    assert pools.allocator.available_size() == 30
    cache.check_integrity()


def test_reset_forgets_masters_and_layouts() -> None:
    cache, pools = td_cache(16)
    node = cache.insert_segment([1, 2], alloc(pools, 2), torch.arange(2)).node
    cache.attach_mirror("r", "a", node, [0], alloc(pools, 1))
    cache.positions.set_layout(1, torch.tensor([1, 0]))
    cache.reset()
    pools.allocator.clear()  # what Scheduler.flush_cache does next
    assert len(cache.store) == 0 and node.evicted and not cache.positions.has_layout(1)
    assert (cache.evictable_size(), cache.protected_size()) == (0, 0)
    cache.check_integrity()


def test_a_queued_row_whose_master_was_evicted_recomputes_that_segment() -> None:
    # A reuse agent planned against masters waits in SGLang's queue; meanwhile one master is
    # evicted to make room. Its match must re-plan that segment as fresh, never pin a dead node
    # (this crashed the scheduler at 128 agents on a 65,536-token pool).
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sglang_tokendance.cache.row_plan import RowLayout, SharedUse
    from sglang_tokendance.state import RequestState, attach

    cache, pools = td_cache(64)
    kept = cache.insert_segment([50, 51, 52, 53], alloc(pools, 4), torch.arange(3, 7)).node
    gone = cache.insert_segment([60, 61, 62, 63], alloc(pools, 4), torch.arange(7, 11)).node
    ids = [1, 2, 3, 50, 51, 52, 53, 60, 61, 62, 63, 9]
    uses = [SharedUse("s1", 3, 7, kept, torch.tensor([0])), SharedUse("s2", 7, 11, gone)]
    uses[1].recompute = torch.tensor([0])
    req = Req("q", "", array("q", ids), SamplingParams(max_new_tokens=1))
    attach(req, RequestState("b", "r1", 2, layout=RowLayout("r1", "b", ids, 3, uses)))
    assert cache.evict_segment(gone) == 4 and gone.evicted
    res = cache.match_prefix(MatchPrefixParams(key=rkey(ids), req=req))
    assert uses[1].node is None and uses[1].recompute is None  # computed fresh, no pin
    assert res.device_prefix_len == 3  # only s1's three kept master slots are reused
    # row: [s1's kept master slots][fresh, true order: prefix, s1[0], s2, suffix]
    assert list(req.origin_input_ids) == [51, 52, 53, 1, 2, 3, 50, 60, 61, 62, 63, 9]
    assert kept.pin_count == 1 and gone.pin_count == 0
