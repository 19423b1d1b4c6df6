"""What a reuse agent keeps of the tokens it recomputed (``--tokendance-mirror``).

After the agent's prefill, per reused segment: ``keep`` makes the recomputed slots its mirror
(a sparse diff against the master, freed with the request); ``drop`` frees them and points the
row back at the master's slots (``repoint_row``); ``threshold`` does drop for the tokens whose
K/V stayed within eps of the master's, as measured by the mirror judge on the model-runner
side (:mod:`.attention.mirror_deviation`), and keep for the rest (the default; at recompute
ratio 1.0 it keeps everything, so full recompute stays exact). No per-token Python loops:
one judge call per request, masks per segment.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from sglang_tokendance.accounting import Counters
from sglang_tokendance.attention.mirror_deviation import bin_counts
from sglang_tokendance.cache.api import CollectorCache
from sglang_tokendance.cache.row_plan import RowLayout
from sglang_tokendance.cache.rows import index_runs
from sglang_tokendance.config import TokenDanceConfig


class MirrorJudgeLike(Protocol):
    """What the collector asks of the mirror judge (tensors stay on the model-runner side)."""

    def deviation(
        self, mirror_slots: torch.Tensor, master_slots: torch.Tensor, scale: str = "token"
    ) -> torch.Tensor:
        """Relative K/V deviation of each recomputed slot from its master slot."""
        ...


class MirrorPolicy:
    """Applies the server's mirror policy to a reuse agent's row (the collector's helper)."""

    def __init__(
        self,
        cfg: TokenDanceConfig,
        cache: CollectorCache,
        counters: Counters,
        judge: MirrorJudgeLike | None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.counters = counters
        self.judge = judge

    def attach(self, req: Any, lay: RowLayout) -> None:
        """After a reuse agent's prefill: its recomputed slots become mirrors, or go back to
        the master (drop, and threshold for the ones close to it).

        One pass over the whole row, not one per segment (an agent of an N-agent round reuses
        N segments): the recomputed entries of every segment are found through the inverse of
        ``row_pos``, judged in one call and repointed in one call::

            uses:      s1 (recompute 0,1)   s2 (recompute 0)
            true_pos:  [s1.start+0, s1.start+1, s2.start+0]     (segment order, ascending)
            idx:       inv[true_pos] -> their row entries (fresh region, ascending)
            seg_of:    [0, 0, 1]                                 (which use each entry is)
        """
        row = req.kv.req_pool_idx
        if row is None or lay.row_pos is None:
            return
        uses = [
            u
            for u in lay.shared
            if u.node is not None and u.recompute is not None and u.recompute.numel()
        ]
        if not uses:
            return
        sizes = [int(u.recompute.numel()) for u in uses]
        recompute = [u.recompute.to(torch.int64) for u in uses]
        inv = torch.empty_like(lay.row_pos)
        inv[lay.row_pos] = torch.arange(lay.row_pos.numel(), dtype=lay.row_pos.dtype)
        idx = inv[torch.cat([r + u.start for r, u in zip(recompute, uses, strict=True)])]
        indices = [r + u.node_offset for r, u in zip(recompute, uses, strict=True)]  # node-local
        master = torch.cat([u.node.master_slots[i] for u, i in zip(uses, indices, strict=True)])
        mine = self.cache.row_slots(row, idx)
        keep = self._keep_mask(mine, master.to(torch.int64))
        seg_of = torch.repeat_interleave(torch.arange(len(uses)), torch.tensor(sizes))
        kept = torch.bincount(seg_of[keep], minlength=len(uses)).tolist()
        drop = ~keep
        if bool(drop.any()):
            dropped = [k < n for k, n in zip(kept, sizes, strict=True)]
            # the agent's later prompt tokens already attended to the corrected KV; from now
            # on its row reads the master's (rotated by the position difference)
            self.cache.repoint_row(
                row,
                idx[drop],
                master[drop],
                [u.node for u, d in zip(uses, dropped, strict=True) if d],
                lay.round_id,
                no_diff=[u.node for u, k in zip(uses, kept, strict=True) if not k],
            )
        if not any(kept):
            return
        off = 0
        for use, ind, n, k in zip(uses, indices, sizes, kept, strict=True):
            if k:
                sel = keep[off : off + n]
                self.cache.attach_mirror(
                    lay.round_id,
                    lay.agent,
                    use.node,
                    ind[sel],
                    mine[off : off + n][sel],
                    req_pool_idx=row,
                    at=use.start,
                )
            off += n
        self.cache.claim_row_ranges(row, index_runs(torch.sort(idx[keep]).values))

    def _keep_mask(self, mine: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
        """Which recomputed slots stay the agent's (``--tokendance-mirror``): all (keep), none
        (drop), or those whose K/V deviates from the master's by more than eps (threshold: one
        measurement over every segment of the row)."""
        n = int(mine.numel())
        mode = self.cfg.mirror
        if mode == "threshold" and self.cfg.recompute_ratio >= 1.0:
            mode = "keep"  # ratio 1.0 asks for full prefill's outputs: no fidelity trade-off
        if mode == "threshold" and self.judge is not None and n:
            dev = self.judge.deviation(mine, master, self.cfg.mirror_scale)
            self._count_deviation(dev)
            return dev > self.cfg.mirror_eps
        keep = mode == "keep" or (mode == "threshold" and self.judge is None)
        if keep:
            self.counters.mirror_slots_kept += n
        else:
            self.counters.mirror_slots_freed += n
        return torch.full((n,), keep, dtype=torch.bool)

    def _count_deviation(self, dev: torch.Tensor) -> None:
        c = self.counters
        counts = bin_counts(dev)
        if not c.mirror_dev_counts:
            c.mirror_dev_counts = [0] * len(counts)
        c.mirror_dev_counts = [a + b for a, b in zip(c.mirror_dev_counts, counts, strict=True)]
        kept = int((dev > self.cfg.mirror_eps).sum())
        c.mirror_slots_kept += kept
        c.mirror_slots_freed += int(dev.numel()) - kept
