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
from sglang_tokendance.cache.row_plan import RowLayout, SharedUse
from sglang_tokendance.cache.rows import index_runs
from sglang_tokendance.config import TokenDanceConfig


class MirrorJudgeLike(Protocol):
    """What the collector asks of the mirror judge (tensors stay on the model-runner side)."""

    def deviation(self, mirror_slots: torch.Tensor, master_slots: torch.Tensor) -> torch.Tensor:
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
        the master (drop, and threshold for the ones close to it)."""
        row = req.kv.req_pool_idx
        if row is None or lay.row_pos is None:
            return
        picks: list[tuple[SharedUse, torch.Tensor, torch.Tensor]] = []
        for use in lay.shared:
            if use.node is None or use.recompute is None or use.recompute.numel() == 0:
                continue
            # row entries whose true position is in this segment's recompute set
            idx = torch.nonzero(torch.isin(lay.row_pos, use.recompute + use.start)).flatten()
            if idx.numel() != use.recompute.numel():
                continue  # the last token was forced fresh etc.: keep it request-owned
            idx = idx[torch.argsort(lay.row_pos[idx])]
            picks.append((use, idx, use.recompute + use.node_offset))
        keeps = self._keep_masks(row, picks)
        for (use, idx, indices), keep in zip(picks, keeps, strict=True):
            drop = ~keep
            if bool(drop.any()):
                # the agent's later prompt tokens already attended to the corrected KV; from
                # now on its row reads the master's (rotated by the position difference)
                self.cache.repoint_row(
                    row, idx[drop], use.node, indices[drop], lay.round_id, record=not keep.any()
                )
            if bool(keep.any()):
                slots = self.cache.row_slots(row, idx[keep])
                self.cache.attach_mirror(
                    lay.round_id,
                    lay.agent,
                    use.node,
                    indices[keep],
                    slots,
                    req_pool_idx=row,
                    at=use.start,
                )
                self.cache.claim_row_ranges(row, index_runs(idx[keep]))

    def _keep_masks(
        self, row: int, picks: list[tuple[SharedUse, torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Which recomputed slots of each segment stay the agent's (``--tokendance-mirror``):
        all (keep), none (drop), or those whose K/V deviates from the master's by more than
        eps (threshold: one measurement over every segment of the row)."""
        sizes = [int(idx.numel()) for _, idx, _ in picks]
        mode = self.cfg.mirror
        if mode == "threshold" and self.cfg.recompute_ratio >= 1.0:
            mode = "keep"  # ratio 1.0 asks for full prefill's outputs: no fidelity trade-off
        if mode == "threshold" and self.judge is not None and sum(sizes):
            mine = self.cache.row_slots(row, torch.cat([idx for _, idx, _ in picks]))
            master = torch.cat([u.node.master_slots[i.to(torch.int64)] for u, _, i in picks])
            dev = self.judge.deviation(mine, master)
            self._count_deviation(dev)
            return list(torch.split(dev > self.cfg.mirror_eps, sizes))
        keep = mode == "keep" or (mode == "threshold" and self.judge is None)
        if keep:
            self.counters.mirror_slots_kept += sum(sizes)
        else:
            self.counters.mirror_slots_freed += sum(sizes)
        return [torch.full((n,), keep, dtype=torch.bool) for n in sizes]

    def _count_deviation(self, dev: torch.Tensor) -> None:
        c = self.counters
        counts = bin_counts(dev)
        if not c.mirror_dev_counts:
            c.mirror_dev_counts = [0] * len(counts)
        c.mirror_dev_counts = [a + b for a, b in zip(c.mirror_dev_counts, counts, strict=True)]
        kept = int((dev > self.cfg.mirror_eps).sum())
        c.mirror_slots_kept += kept
        c.mirror_slots_freed += int(dev.numel()) - kept
