"""Recompute-set selection: which tokens of a reused shared segment every agent recomputes.

Selection is collective: one set per (round, segment), shared by all agents of the round.
Policies (``--tokendance-selection``):

- ``leading`` (EPIC-style): the first ``k = ceil(ratio * L)`` tokens. Their KV deviates most
  between contexts: they have the fewest tokens of their own segment to attend to.
- ``deviation`` (CacheBlend-style): the ``k`` tokens whose check-layer attention output
  deviates most between their full context and their segment alone, measured once, during
  the forward that computes the segment's master (:mod:`.attention.deviation`).
- ``both``: the first ``ceil(k / 2)`` tokens, then the highest-deviation ones of the rest.

Without deviation scores (a master made without a probe, e.g. a partial chunk or the author's
decode-time KV) the deviation policies fall back to ``leading``.
"""

from __future__ import annotations

import math

import torch

SELECTIONS: tuple[str, ...] = ("leading", "deviation", "both")


def budget(length: int, ratio: float) -> int:
    """How many tokens of a ``length``-token segment are recomputed at ``ratio``."""
    return min(length, math.ceil(ratio * length))


def select_recompute(
    length: int, ratio: float, selection: str, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Segment-local indices (sorted int64) recomputed for every agent of the round.

    Args:
        length: tokens in the segment (or the reused span of it).
        ratio: share recomputed, in [0, 1].
        selection: one of :data:`SELECTIONS`.
        scores: float ``[length]`` deviation per token (higher = recompute first), or None.

    Raises:
        ValueError: unknown ``selection`` or ``scores`` of the wrong length.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown recompute selection {selection!r}; expected {SELECTIONS}")
    k = budget(length, ratio)
    if selection == "leading" or scores is None or k == 0 or k == length:
        return torch.arange(k, dtype=torch.int64)
    if scores.numel() != length:
        raise ValueError(f"deviation scores have {scores.numel()} entries, segment {length}")
    s = torch.nan_to_num(scores.detach().float().cpu(), nan=0.0)
    lead = math.ceil(k / 2) if selection == "both" else 0
    s[:lead] = math.inf  # "both": the leading half is always in
    top = torch.topk(s, k).indices
    return torch.sort(top).values.to(torch.int64)
