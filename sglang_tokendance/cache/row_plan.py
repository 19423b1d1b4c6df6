"""Row layouts: how a TokenDance request's ``req_to_token`` row is arranged.

The collector attaches a :class:`RowLayout` to a request (its ``RequestState.layout``); the tree
cache turns it into a row when SGLang matches the request's prefix::

    true prompt:  [ private prefix (p) ][ shared S1 ][ private ][ shared S2 ][ suffix ]
    row:          [ cached c ][ reused: S1 kept, S2 kept (m) ][ fresh: everything else ]
                  '-- radix --''---- master slots, no copy ---''-- extend, in true order --'
    req_to_pos:   0 .. c-1     S1.start + kept, S2.start + kept   ascending true positions

``c`` is the radix hit on the true-order private prefix, known only at match time, so the row
order is computed then (:func:`plan_row`). Fresh tokens keep ascending true order, so the last
row entry is the last prompt token (its logits give the first output token) and decode appends
at position ``n``, ``n+1``, ... as for any request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .nodes import AllGatherNode


@dataclass(slots=True)
class SharedUse:
    """One shared segment inside one agent's prompt.

    Attributes:
        seg_id: the hint's id of the segment.
        start, end: token span in the true prompt.
        node: the master to reuse (None: no master yet, the segment is computed fresh).
        recompute: span-local token indices recomputed in this agent's context (sorted).
        node_offset: the span reuses ``node``'s tokens ``node_offset .. node_offset + (end -
            start)`` (nonzero when an author's output KV covers part of a wrapped segment).
    """

    seg_id: str
    start: int
    end: int
    node: AllGatherNode | None = None
    recompute: torch.Tensor | None = None
    node_offset: int = 0


@dataclass(slots=True)
class RowLayout:
    """What the collector decided for one request (see module docstring)."""

    round_id: str
    agent: str
    true_ids: list[int]
    prefix_len: int  # p: private tokens before the first shared segment
    shared: list[SharedUse] = field(default_factory=list)
    # Filled by plan_row at match time:
    cached_len: int = 0
    row_pos: torch.Tensor | None = None  # int64 [n]: true position of each row entry
    reused_slots: torch.Tensor | None = None  # int64 [m]: master slots at row[c : c + m]
    reused_nodes: list[AllGatherNode] = field(default_factory=list)
    # pic mode (CacheBlend): the row is in true order and every prompt token is an extend
    # token (SGLang allocates and admits the dense copy like any prefill); blend_src[t] is the
    # master slot whose KV seeds true position t (-1: none), filled by plan_row.
    blend: bool = False
    blend_src: torch.Tensor | None = None  # int64 [n]


class RowPlan(NamedTuple):
    """Result of :func:`plan_row`."""

    row_pos: torch.Tensor  # int64 [n]
    reused_slots: torch.Tensor  # int64 [m]
    reused_nodes: list[AllGatherNode]
    blend_src: torch.Tensor | None = None  # pic rows: master slot per true position, or -1


def plan_row(layout: RowLayout, cached_len: int) -> RowPlan:
    """Lay out the row for a radix hit of ``cached_len`` tokens on the private prefix.

    Reused entries are the master slots of each shared segment outside its recompute set. The
    last prompt token is never reused (its logits are needed), so it is always fresh. A pic
    (``blend``) layout reuses nothing in the row: it stays in true order, and the masters'
    slots go to ``blend_src`` (the dense copy's source, the last prompt token excepted).

    Raises:
        ValueError: if ``cached_len`` exceeds the private prefix.
    """
    n = len(layout.true_ids)
    if not 0 <= cached_len <= layout.prefix_len:
        raise ValueError(
            f"cached_len {cached_len} outside the private prefix 0..{layout.prefix_len}"
        )
    if layout.blend:
        return _plan_blend(layout, cached_len)
    reused_mask = torch.zeros(n, dtype=torch.bool)
    reused_pos: list[torch.Tensor] = []
    reused_slots: list[torch.Tensor] = []
    nodes: list[AllGatherNode] = []
    for use in layout.shared:
        if use.node is None:
            continue
        length = use.end - use.start
        assert use.node_offset + length <= len(use.node.token_ids), "span runs past its master"
        keep = torch.ones(length, dtype=torch.bool)
        if use.recompute is not None and use.recompute.numel():
            keep[use.recompute] = False
        if use.end == n:  # the last prompt token is always recomputed
            keep[length - 1] = False
        idx = torch.nonzero(keep).flatten()
        if idx.numel() == 0:
            continue
        reused_pos.append(idx + use.start)
        reused_slots.append(use.node.master_slots[idx + use.node_offset].to(torch.int64))
        reused_mask[idx + use.start] = True
        nodes.append(use.node)
    prefix = torch.arange(cached_len, dtype=torch.int64)
    fresh_mask = ~reused_mask
    fresh_mask[:cached_len] = False
    fresh = torch.nonzero(fresh_mask).flatten()
    row_pos = torch.cat([prefix, *reused_pos, fresh])
    slots = torch.cat(reused_slots) if reused_slots else torch.empty(0, dtype=torch.int64)
    assert row_pos.numel() == n
    return RowPlan(row_pos, slots, nodes)


def _plan_blend(layout: RowLayout, cached_len: int) -> RowPlan:
    """The true-order row of a pic request and its dense copy's sources::

    true prompt: [ private ][ shared S1 (master) ][ private ][ shared S2 (none) ][ ... ]
    blend_src:     -1 ...    S1.master_slots        -1 ...     -1 ...           -1 (last)
    """
    n = len(layout.true_ids)
    src = torch.full((n,), -1, dtype=torch.int64)
    nodes: list[AllGatherNode] = []
    for use in layout.shared:
        # a pic request may wait in SGLang's queue (or be retracted) after planning: a master
        # evicted meanwhile seeds nothing, its tokens are computed like a fresh segment's
        if use.node is None or use.node.evicted:
            continue
        length = use.end - use.start
        assert use.node_offset + length <= len(use.node.token_ids), "span runs past its master"
        off = use.node_offset
        src[use.start : use.end] = use.node.master_slots[off : off + length].to(torch.int64)
        nodes.append(use.node)
    src[n - 1] = -1  # the last prompt token is always computed (its logits are needed)
    src[:cached_len] = -1
    row_pos = torch.arange(n, dtype=torch.int64)
    return RowPlan(row_pos, torch.empty(0, dtype=torch.int64), nodes, src)
