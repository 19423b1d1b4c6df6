"""What a finished prefill leaves behind: masters handed to the cache, mirrors attached.

A master agent's row (true order) and a reuse agent's fully fresh segments become masters by
handing their row slots to the cache (claimed, never copied); a reuse agent's recomputed slots
go to the mirror policy; a pic request's fresh segments are stored as copies (LMCache keeps
chunks apart from requests, so a pic request never references master slots).
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_tokendance.accounting import Counters
from sglang_tokendance.cache.api import CollectorCache
from sglang_tokendance.cache.row_plan import RowLayout, SharedUse
from sglang_tokendance.cache.rows import index_runs
from sglang_tokendance.mirror_policy import MirrorPolicy
from sglang_tokendance.state import layout_of


class Promoter:
    """Turns a prefilled row into cache state (the collector's after-forward half)."""

    def __init__(
        self, cache: CollectorCache, counters: Counters, mirrors: MirrorPolicy, mode: str
    ) -> None:
        self.cache = cache
        self.counters = counters
        self.mirrors = mirrors
        self.mode = mode

    def reuse_done(self, req: Any, lay: RowLayout) -> None:
        """A reuse agent: count what it reused and recomputed, promote the segments it
        computed fresh (no master existed), and attach its mirrors (tokendance)."""
        if lay.reused_slots is not None:
            self.counters.reused_tokens += int(lay.reused_slots.numel())
        self.counters.recompute_tokens += sum(
            int(u.recompute.numel())
            for u in lay.shared
            if u.node is not None and u.recompute is not None
        )
        fresh = [u for u in lay.shared if u.node is None]
        if fresh:
            self.promote(req, fresh, lay.row_pos)
        if self.mode == "tokendance":
            self.mirrors.attach(req, lay)

    def blend_done(self, req: Any, lay: RowLayout) -> None:
        """pic: the dense copy is made; free its sources and store fresh segments as masters
        (copies: the request keeps its own slots, so it never references a master)."""
        self.cache.release_match_pins(req)
        row = req.kv.req_pool_idx
        if lay.blend_src is not None:
            self.counters.reused_tokens += int((lay.blend_src >= 0).sum())
        for use in lay.shared:
            if (use.node is not None and not use.node.evicted) or row is None:
                continue
            toks = tuple(lay.true_ids[use.start : use.end])
            if self.cache.lookup_segment(toks) is not None:
                continue  # another pic request stored it meanwhile
            own = self.cache.row_slots(row, torch.arange(use.start, use.end))
            copy = self.cache.copy_slots(own)
            if copy is None:
                continue  # no room: no master this time (the next request computes it again)
            pos = torch.arange(use.start, use.end, dtype=torch.int32)
            res = self.cache.insert_segment(toks, copy, pos)
            if res.inserted:
                self.counters.masters_created += 1

    def promote(
        self,
        req: Any,
        authored: list[SharedUse],
        row_pos: torch.Tensor | None,
        probes: dict[str, Any] | None = None,
    ) -> None:
        """Hand the row slots of ``authored`` segments to the cache as masters (no copy):
        ``row_pos`` None for a true-order row (a master agent), else the row's true positions
        (a reuse agent's fully fresh segments); ``probes`` attach deviation scores."""
        row = req.kv.req_pool_idx
        if row is None:
            return
        true_ids = layout_of(req).true_ids if row_pos is not None else req.origin_input_ids
        for use in authored:
            if row_pos is None:  # a true-order row
                if use.start < req.kv.cache_protected_len:
                    continue  # the tree owns part of it (never expected: the match is capped)
                idx = torch.arange(use.start, use.end)
            else:  # a fully fresh segment is one contiguous run of the fresh region
                idx = torch.nonzero((row_pos >= use.start) & (row_pos < use.end)).flatten()
                if idx.numel() != use.end - use.start or index_runs(idx) != [
                    (int(idx[0]), int(idx[-1]) + 1)
                ]:
                    continue
            toks = tuple(true_ids[use.start : use.end])
            slots = self.cache.row_slots(row, idx)
            pos = torch.arange(use.start, use.end, dtype=torch.int32)
            res = self.cache.insert_segment(toks, slots, pos)
            probe = (probes or {}).get(use.seg_id)
            if probe is not None and probe.complete and res.node.deviation is None:
                res.node.deviation = probe.scores
            if res.inserted:
                self.cache.claim_row_ranges(row, index_runs(idx))
                self.cache.pin_segment(res.node, row)
                self.counters.masters_created += 1
