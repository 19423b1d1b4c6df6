"""Storage statistics and invariant checks of a :class:`~.store.SegmentStore`'s tables.

Kept apart from the store so the store's hot paths stay short; everything here is read-only.

Compression ratio (the paper's "KV per agent" saving), over the mirrors considered::

    dense_equiv_tokens = sum over mirrors of the segment length       (what per-agent copies cost)
    stored_tokens      = master tokens of the mirrored segments + mirror tokens
    compression_ratio  = dense_equiv_tokens / stored_tokens
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .nodes import AllGatherNode, HashFn, Mirror, MirrorKey, SegmentId, check_sorted_unique


def segment_stats(
    nodes: Iterable[AllGatherNode], mirrors: Iterable[Mirror]
) -> dict[str, float | int | None]:
    """Token totals of ``nodes`` (masters) and ``mirrors``; see the module docstring."""
    nodes = list(nodes)
    mirrors = list(mirrors)
    mirrored = {id(m.node): m.node for m in mirrors}
    dense = sum(m.node.length for m in mirrors)
    mirror_tokens = sum(m.num_slots for m in mirrors)
    stored = sum(n.length for n in mirrored.values()) + mirror_tokens
    return {
        "segments": len(nodes),
        "mirrors": len(mirrors),
        "master_tokens": sum(n.length for n in nodes),
        "mirror_tokens": mirror_tokens,
        "mirrored_master_tokens": stored - mirror_tokens,
        "dense_equiv_tokens": dense,
        "stored_tokens": stored,
        # None, not 0 or inf, when nothing is mirrored: there is no ratio to report.
        "compression_ratio": dense / stored if stored else None,
        "pinned_segments": sum(1 for n in nodes if n.pin_count),
    }


def _node_problems(node: AllGatherNode, hash_fn: HashFn) -> list[str]:
    out = []
    n = node.length
    ms, mp = node.master_slots, node.master_pos
    if ms.dtype != torch.int64 or ms.dim() != 1 or ms.numel() != n:
        out.append(f"{node!r}: master_slots must be int64 [{n}], got {ms.dtype} {tuple(ms.shape)}")
    if mp.dtype != torch.int32 or mp.dim() != 1 or mp.numel() != n:
        out.append(f"{node!r}: master_pos must be int32 [{n}], got {mp.dtype} {tuple(mp.shape)}")
    if node.content_hash != hash_fn(node.token_ids):
        out.append(f"{node!r}: content_hash does not match its token ids")
    if node.pin_count < 0:
        out.append(f"{node!r}: negative pin count {node.pin_count}")
    if node.evicted:
        out.append(f"{node!r}: evicted but still in the store")
    return out


def _mirror_problems(
    key: MirrorKey, m: Mirror, nodes: Mapping[SegmentId, AllGatherNode]
) -> list[str]:
    out = []
    if m.key != key:
        out.append(f"mirror table key {key} holds {m!r}")
    if nodes.get(key.node_id) is not m.node:
        out.append(f"mirror {key}: its node {m.node!r} is not the store's node {key.node_id}")
    elif m.node.mirrors.get(key) is not m:
        out.append(f"mirror {key}: missing from {m.node!r}.mirrors (reference count mismatch)")
    problem = check_sorted_unique(m.indices, m.node.length, f"mirror {key}")
    if problem:
        out.append(problem)
    if m.slots.dtype != torch.int64 or m.slots.dim() != 1 or m.slots.numel() != m.indices.numel():
        out.append(
            f"mirror {key}: slots must be int64 [{m.indices.numel()}], got "
            f"{m.slots.dtype} {tuple(m.slots.shape)}"
        )
    return out


def store_problems(
    hash_fn: HashFn,
    buckets: Mapping[int, list[AllGatherNode]],
    nodes: Mapping[SegmentId, AllGatherNode],
    mirrors: Mapping[MirrorKey, Mirror],
    evictable: set[AllGatherNode],
    totals: tuple[int, int, int],
) -> list[str]:
    """Every broken table invariant (slot double ownership is checked by the caller)."""
    out: list[str] = []
    bucketed = 0
    for h, bucket in buckets.items():
        bucketed += len(bucket)
        if not bucket:
            out.append(f"empty hash bucket {h:#x}")
        seen: set[tuple[int, ...]] = set()
        for node in bucket:
            if node.content_hash != h:
                out.append(f"{node!r} sits in bucket {h:#x} but hashes to {node.content_hash:#x}")
            if node.token_ids in seen:
                out.append(f"{node!r}: two nodes in bucket {h:#x} hold the same token ids")
            seen.add(node.token_ids)
            if nodes.get(node.node_id) is not node:
                out.append(f"{node!r} is in a bucket but not in the node table")
    if bucketed != len(nodes):
        out.append(f"{bucketed} nodes in hash buckets but {len(nodes)} in the node table")
    for node_id, node in nodes.items():
        if node.node_id != node_id:
            out.append(f"node table key {node_id} holds {node!r}")
        out += _node_problems(node, hash_fn)
        for key, m in node.mirrors.items():
            if mirrors.get(key) is not m:
                out.append(f"{node!r} refers to mirror {key}, absent from the mirror table")
    for key, m in mirrors.items():
        out += _mirror_problems(key, m, nodes)
    should = {id(n) for n in nodes.values() if n.evictable}
    if should != {id(n) for n in evictable}:
        out.append("the evictable set differs from the nodes that are unpinned and unmirrored")
    expect = (
        sum(n.length for n in nodes.values() if n.evictable),
        sum(n.length for n in nodes.values() if not n.evictable),
        sum(m.num_slots for m in mirrors.values()),
    )
    if tuple(totals) != expect:
        out.append(
            f"running totals (evictable, protected masters, mirrors) = {tuple(totals)}, "
            f"recomputed = {expect}"
        )
    return out
