"""SegmentStore: lookup, collisions, mirrors, release, eviction, stats, integrity (real pool)."""

from __future__ import annotations

import pytest
import torch
from cache_fixtures import alloc, build_pools

from sglang_tokendance.cache import IntegrityError, SegmentStore, resolve
from sglang_tokendance.cache.nodes import token_hash


def _store(size: int = 64, **kwargs):
    pools = build_pools(size=size)
    return SegmentStore(pools.allocator.free, **kwargs), pools


def _census_ok(store: SegmentStore, pools) -> None:
    """Store slots + free list cover every slot exactly once (nothing else holds slots here)."""
    owned = [t for _, t in store.owned_chunks()]
    everything = torch.cat([pools.allocator.get_all_free_pages(), *owned])
    assert sorted(everything.tolist()) == list(range(1, pools.allocator.size + 1))
    store.check_integrity()


def test_insert_then_lookup_verifies_token_ids() -> None:
    store, pools = _store()
    slots = alloc(pools, 4)
    node, inserted = store.insert([5, 6, 7, 8], slots, torch.arange(10, 14))
    assert inserted
    assert node.master_slots.tolist() == slots.tolist()
    assert node.master_pos.dtype == torch.int32 and node.master_pos.tolist() == [10, 11, 12, 13]
    assert store.lookup([5, 6, 7, 8]) is node
    assert store.lookup(torch.tensor([5, 6, 7, 8])) is node
    assert store.lookup([5, 6, 7]) is None
    again = alloc(pools, 4)
    dup = store.insert((5, 6, 7, 8), again, torch.arange(4))
    assert dup == (node, False)
    pools.allocator.free(again)  # inserted=False: the caller still owns its slots
    assert pools.allocator.available_size() == 60
    _census_ok(store, pools)


def test_forced_hash_collision_does_not_alias() -> None:
    store, pools = _store(hash_fn=lambda ids: 42)
    a, _ = store.insert([1, 2, 3], alloc(pools, 3), torch.arange(3))
    b, inserted = store.insert([1, 2, 4], alloc(pools, 3), torch.arange(3))
    assert inserted and b is not a and a.content_hash == b.content_hash == 42
    assert store.lookup([1, 2, 3]) is a
    assert store.lookup([1, 2, 4]) is b
    assert store.lookup([9]) is None
    store.evict_node(a)
    assert store.lookup([1, 2, 4]) is b and store.lookup([1, 2, 3]) is None
    _census_ok(store, pools)


def test_mirror_resolve_gives_exact_slot_list() -> None:
    store, pools = _store()
    node, _ = store.insert([10, 11, 12, 13, 14, 15], alloc(pools, 6), torch.arange(6))
    assert node.master_slots.tolist() == [1, 2, 3, 4, 5, 6]
    mine = alloc(pools, 3)
    assert mine.tolist() == [7, 8, 9]
    mirror = store.attach_mirror("r1", "alice", node, [0, 2, 5], mine)
    assert resolve(mirror).tolist() == [7, 2, 8, 4, 5, 9]
    assert store.resolve("r1", "alice", node).tolist() == [7, 2, 8, 4, 5, 9]
    empty = store.attach_mirror("r1", "bob", node, [], [])
    assert resolve(empty).tolist() == [1, 2, 3, 4, 5, 6]
    assert node.master_slots.tolist() == [1, 2, 3, 4, 5, 6]  # resolve never writes the master
    with pytest.raises(KeyError):
        store.resolve("r2", "alice", node)
    _census_ok(store, pools)


def test_attach_replaces_mirror_and_frees_old_slots() -> None:
    store, pools = _store(size=16)
    node, _ = store.insert([1, 2, 3, 4], alloc(pools, 4), torch.arange(4))
    first = alloc(pools, 2)  # [5, 6]
    store.attach_mirror("r", "a", node, [1, 3], first)
    second = torch.tensor([6, int(alloc(pools, 1)[0])])  # reuses slot 6, new slot 7
    store.attach_mirror("r", "a", node, [0, 1], second)
    assert store.get_mirror("r", "a", node).slots.tolist() == [6, 7]
    assert pools.allocator.free_pages.tolist()[-1] == 5  # only the stale slot came back
    assert store.mirror_tokens == 2
    _census_ok(store, pools)


def test_release_frees_exactly_the_mirror_slots() -> None:
    store, pools = _store(size=32)
    node, _ = store.insert([1, 2, 3, 4, 5], alloc(pools, 5), torch.arange(5))
    slots = {}
    for rnd in ("r1", "r2"):
        for agent in ("a", "b"):
            slots[rnd, agent] = alloc(pools, 2)
            store.attach_mirror(rnd, agent, node, [1, 4], slots[rnd, agent])
    before = pools.allocator.free_pages.clone()
    assert store.release_mirrors(agent="a", round_id="r1") == 2
    assert pools.allocator.free_pages[len(before) :].tolist() == slots["r1", "a"].tolist()
    assert store.release_mirrors(round_id="r2") == 4
    assert store.get_mirror("r2", "a", node) is None and store.get_mirror("r1", "b", node)
    assert store.release_mirrors(agent="b") == 2
    assert store.release_mirrors() == 0
    assert node.evictable and store.evictable_tokens == 5 and store.protected_tokens == 0
    assert pools.allocator.available_size() == 32 - 5
    _census_ok(store, pools)


def test_pins_and_mirrors_protect_and_lru_order() -> None:
    store, pools = _store()
    a, _ = store.insert([1], alloc(pools, 1), [0])
    b, _ = store.insert([2, 2], alloc(pools, 2), [0, 1])
    c, _ = store.insert([3, 3, 3], alloc(pools, 3), [0, 1, 2])
    assert store.evictable_nodes() == [a, b, c]
    store.lookup([1])  # a becomes most recent
    assert store.evictable_nodes() == [b, c, a]
    store.pin(b)
    store.attach_mirror("r", "x", c, [0], alloc(pools, 1))
    assert store.evictable_nodes() == [a]
    assert (store.evictable_tokens, store.protected_tokens) == (1, 2 + 3 + 1)
    with pytest.raises(ValueError, match="pinned"):
        store.evict_node(b)
    store.unpin(b)
    with pytest.raises(ValueError, match="not pinned"):
        store.unpin(b)
    assert store.evict_node(c) == 4  # master + its mirror
    assert store.get_mirror("r", "x", c) is None and c.evicted
    with pytest.raises(ValueError, match="not a live node"):
        store.attach_mirror("r", "x", c, [0], [9])
    assert store.evictions == 1 and store.evicted_tokens == 3
    _census_ok(store, pools)


def test_stats_compression_and_round_view() -> None:
    store, pools = _store(size=128)
    nodes = [store.insert([s] * 10, alloc(pools, 10), torch.arange(10))[0] for s in range(3)]
    for agent in ("a", "b", "c", "d"):
        for node in nodes[:2]:
            store.attach_mirror("r1", agent, node, [0, 5], alloc(pools, 2))
    store.attach_mirror("r2", "a", nodes[2], [1], alloc(pools, 1))
    s = store.stats()
    assert (s["segments"], s["mirrors"], s["master_tokens"], s["mirror_tokens"]) == (3, 9, 30, 17)
    assert s["dense_equiv_tokens"] == 90 and s["stored_tokens"] == 30 + 17
    assert s["compression_ratio"] == pytest.approx(90 / 47)
    r1 = store.stats("r1")
    assert (r1["segments"], r1["mirrors"], r1["dense_equiv_tokens"], r1["stored_tokens"]) == (
        2,
        8,
        80,
        36,
    )
    assert r1["compression_ratio"] == pytest.approx(80 / 36)
    assert store.stats("nope")["compression_ratio"] is None
    _census_ok(store, pools)


def test_bad_input_is_rejected() -> None:
    store, pools = _store()
    node, _ = store.insert([1, 2, 3], alloc(pools, 3), [0, 1, 2])
    with pytest.raises(ValueError, match="3 tokens got 2 slots"):
        store.insert([4, 5, 6], torch.tensor([7, 8]), [0, 1, 2])
    with pytest.raises(ValueError, match="padding"):
        store.insert([4], torch.tensor([0]), [0])
    with pytest.raises(ValueError, match="at least one token"):
        store.insert([], torch.tensor([], dtype=torch.int64), [])
    with pytest.raises(ValueError, match="sorted and unique"):
        store.attach_mirror("r", "a", node, [2, 1], [9, 10])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        store.attach_mirror("r", "a", node, [3], [9])
    with pytest.raises(ValueError, match="2 mirror indices but 1 slots"):
        store.attach_mirror("r", "a", node, [0, 1], [9])
    _census_ok(store, pools)


def test_integrity_error_names_the_broken_invariant() -> None:
    store, pools = _store()
    node, _ = store.insert([1, 2, 3], alloc(pools, 3), [0, 1, 2])
    mirror = store.attach_mirror("r", "a", node, [0], alloc(pools, 1))
    mirror.slots[0] = node.master_slots[2]  # now slot 3 has two owners
    with pytest.raises(IntegrityError, match=r"slot 3 is owned 2 times: by master 0, mirror"):
        store.check_integrity()
    mirror.slots[0] = 4
    other, _ = store.insert([7], alloc(pools, 1), [0])
    other.pin_count = 1  # bypassing pin(): the evictable set and totals no longer match
    with pytest.raises(IntegrityError, match=r"evictable set differs(.|\n)*running totals"):
        store.check_integrity()
    other.pin_count = 0
    node.content_hash = token_hash((9,))
    with pytest.raises(IntegrityError, match="content_hash does not match"):
        store.check_integrity()
