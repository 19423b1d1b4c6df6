"""Admitting laid-out rows: the tree cache's side of match, prefix indices, allocation, insert.

These functions implement, for a request carrying a :class:`~.layout.RowLayout`, the four
points where SGLang asks the tree cache about a request:

1. ``match_prefix``: radix-match the true-order private prefix (``c`` tokens), lay out the row
   (:func:`~.layout.plan_row`), rewrite the request's input ids in row order, pin the masters,
   and report ``c + m`` cached tokens of which only ``c`` are tree-owned.
2. ``prefix_device_indices``: ``[radix slots of c][master slots of m]``.
3. rows allocated (after ``prepare_for_extend``): record the row's true positions in the
   position table and claim ``row[c : c + m]`` as foreign (masters' slots, never freed by it).
4. final ``checkpoint``: insert the true-order private prefix ``true_ids[:p]`` into the radix
   tree, gathering its slots from the two places the row holds them::

       row:  [0 .. c-1][ m reused ][ c .. p-1 (fresh, first in the fresh region) ][ ... ]
       key:  true_ids[0 .. p-1]  ->  slots row[0:c] ++ row[c+m : c+m+(p-c)]

   so the next round's prefix match finds the whole private prefix.
"""

from __future__ import annotations

import logging
from array import array
from typing import Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.radix_cache import RadixKey

from sglang_tokendance.state import layout_of, state_of

from .row_plan import RowLayout, plan_row

logger = logging.getLogger(__name__)


def _unpin_match_pins(cache: Any, lay: RowLayout) -> None:
    for node in lay.reused_nodes:
        cache.store.unpin(node)
    lay.reused_nodes = []


def _forget_evicted_masters(lay: RowLayout) -> None:
    """A request planned against a master may wait in SGLang's queue (pool full) while that
    master, unpinned until admission, is evicted to make room. Its segment is then computed
    fresh in this agent's context, as a segment with no master (and becomes a master again
    when the prefill is done). pic rows are handled by their own plan (``_plan_blend``)."""
    if lay.blend:
        return
    for use in lay.shared:
        if use.node is not None and use.node.evicted:
            logger.debug(
                "master %d evicted while %s waited: recomputed", use.node.node_id, lay.agent
            )
            use.node, use.recompute, use.node_offset = None, None, 0


def match_laid_out(cache: Any, super_match: Any, params: MatchPrefixParams, lay: RowLayout) -> Any:
    """``match_prefix`` for a laid-out request (see module docstring, point 1)."""
    req = params.req
    key = RadixKey(
        array("q", lay.true_ids[: lay.prefix_len]),
        extra_key=params.key.extra_key,
        cache_salt=params.key.cache_salt,
    )
    res = super_match(MatchPrefixParams(key=key))
    c = min(res.device_prefix_len, lay.prefix_len)
    _unpin_match_pins(cache, lay)  # a re-match (request not admitted last time) re-plans
    _forget_evicted_masters(lay)
    plan = plan_row(lay, c)
    for node in plan.reused_nodes:  # before allocation can evict anything
        cache.store.pin(node)
    lay.cached_len = c
    state_of(req).insert_cap = c  # the private tail goes in at the end (insert_true_prefix)
    lay.row_pos = plan.row_pos
    lay.reused_slots = plan.reused_slots
    lay.reused_nodes = list(plan.reused_nodes)
    lay.blend_src = plan.blend_src
    row_ids = torch.tensor(lay.true_ids, dtype=torch.int64)[plan.row_pos].tolist()
    if list(req.origin_input_ids) != row_ids:
        old = req.origin_input_ids
        req.origin_input_ids = array(old.typecode, row_ids) if isinstance(old, array) else row_ids
        req.full_untruncated_fill_ids = array("q")  # forces a rebuild in row order
        req.refresh_fill_ids()
    m = int(plan.reused_slots.numel())
    return res._replace(device_prefix_len=c + m, cache_protected_len=c)


def prefix_indices_laid_out(cache: Any, req: Any, lay: RowLayout) -> torch.Tensor:
    """``[radix slots of the c cached tokens][master slots]`` (point 2)."""
    path = cache.path_device_indices(req.last_node)[: lay.cached_len].to(torch.int64)
    reused = lay.reused_slots if lay.reused_slots is not None else path.new_empty(0)
    out = torch.cat([path, reused.to(path.device)])
    assert out.numel() == req.prefix_len, (out.numel(), req.prefix_len)
    return out


def on_rows_allocated(cache: Any, reqs: list[Any]) -> None:
    """Record positions and claims once the requests' rows exist (point 3)."""
    if cache.positions is None:
        return
    for req in reqs:
        lay = layout_of(req)
        row = req.kv.req_pool_idx
        if lay is None or lay.row_pos is None or row is None:
            continue
        if cache.positions.has_layout(row):
            continue  # a later chunk of an already laid-out request
        cache.positions.set_layout(row, lay.row_pos)
        if lay.blend:
            # pic: nothing of the row is foreign; the match-time pins keep the dense copy's
            # sources alive until the prefill is done (release_match_pins).
            continue
        m = int(lay.reused_slots.numel())
        if m:
            cache.claim_row_ranges(row, [(lay.cached_len, lay.cached_len + m)])
        for node in lay.reused_nodes:  # hand the match-time pins to the row (net zero)
            cache.pin_segment(node, row)
            cache.unpin_segment(node)
        lay.reused_nodes = []


def copy_to_new_slots(cache: Any, src: torch.Tensor) -> torch.Tensor | None:
    """Fresh slots holding a copy of ``src``'s K/V (every layer) and slot positions, or None
    when the pool has no room (pic mode: a master is a copy, as LMCache stores its chunks
    apart from the requests that computed them; without room the master is simply not made).
    """
    alloc = cache.token_to_kv_pool_allocator
    n = int(src.numel())
    if n == 0 or alloc.available_size() < n:
        return None
    new = alloc.alloc(n)
    if new is None:
        return None
    kv = alloc.get_kvcache()
    dst, src_l = new.long(), src.to(new.device).long()
    for k_buf, v_buf in zip(kv.k_buffer, kv.v_buffer, strict=True):  # per layer, not per token
        k_buf[dst] = k_buf[src_l]
        v_buf[dst] = v_buf[src_l]
    if cache.positions is not None:
        cache.positions.slot_pos[dst] = cache.positions.slot_pos[src_l]
    return new.to(torch.int64)


def insert_true_prefix(cache: Any, req: Any, lay: RowLayout) -> None:
    """At the final checkpoint, cache the whole true-order private prefix (point 4)."""
    c, p = lay.cached_len, lay.prefix_len
    if lay.row_pos is None or p <= c or req.kv.req_pool_idx is None:
        return
    m = int(lay.reused_slots.numel())
    row = cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    tail = torch.arange(c + m, c + m + (p - c))
    assert torch.equal(lay.row_pos[tail], torch.arange(c, p)), "private tail not first in fresh"
    slots = torch.cat([row[:c], row[tail]]).to(torch.int64)
    key = RadixKey(array("q", lay.true_ids[:p]), extra_key=req.extra_key)
    res = cache.insert(InsertParams(key=key, value=slots))
    # Entries before res.prefix_len were already in the tree: ours stay the request's (freed
    # by SGLang's release as duplicates); the rest now belong to the tree.
    first_new = max(res.prefix_len, c)
    if first_new < p:
        cache.claim_row_ranges(req.kv.req_pool_idx, [(c + m + first_new - c, c + m + p - c)])


def release_unadmitted(cache: Any, req: Any) -> None:
    """Undo match-time pins of a request that never got a row (aborted while queued), or of a
    pic request whose prefill no longer reads its dense copy's sources."""
    lay = layout_of(req)
    if lay is not None and lay.reused_nodes:
        _unpin_match_pins(cache, lay)


__all__ = [
    "MatchResult",
    "copy_to_new_slots",
    "insert_true_prefix",
    "layout_of",
    "match_laid_out",
    "on_rows_allocated",
    "prefix_indices_laid_out",
    "release_unadmitted",
]
