"""Deviation probes: how much each shared-segment token depends on what came before it.

CacheBlend chooses the tokens to recompute by the deviation of their KV at an early "check
layer" between the reused and the in-context computation. TokenDance chooses once per segment
for all agents, so it measures, once, during the forward that computes the segment's master
(an ordinary full prefill of the master agent), at the check layer, for every token ``i`` of
the segment ``[a, b)``::

    o_full(i) = attention of i over every key at positions <= i      (what the master holds)
    o_seg(i)  = attention of i over keys at positions a .. i only    (the segment alone)
    deviation(i) = |o_full(i) - o_seg(i)| / |o_full(i)|               (per token, all heads)

A token whose check-layer output changes a lot when its context is taken away has KV (from the
next layer on) that depends on that context: in another agent's context it deviates most, so
it is recomputed first. The probe only reads the KV the forward has already written; the
forward's own outputs are untouched. ``o_full`` is the layer's own attention output (the
forward computed it anyway), so a probe costs one batched segment-only attention per row
(:func:`segment_deviation`); :func:`context_deviation` computes both sides, one segment at a
time, and is the reference the tests compare against.

The :class:`ProbeBoard` carries requests from the scheduler side (which knows rows and
segments) to the attention backend (which sees only the batch), and scores back. It hangs off
SGLang's ``ReqToTokenPool`` like the position table (one scheduler process per GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_tokendance.state import pool_state


@dataclass(slots=True)
class Probe:
    """One segment span ``[start, end)`` (true positions) of one row to score."""

    key: str
    start: int
    end: int
    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def __post_init__(self) -> None:
        if self.scores.numel() == 0:
            self.scores = torch.full((self.end - self.start,), float("nan"))

    @property
    def complete(self) -> bool:
        return not bool(torch.isnan(self.scores).any())


class ProbeBoard:
    """Probes by request row; the backend fills them at ``check_layer``."""

    def __init__(self) -> None:
        self.check_layer = 1
        self.rows: dict[int, dict[str, Probe]] = {}

    def add(self, row: int, key: str, start: int, end: int) -> None:
        """Ask for scores of ``[start, end)`` of ``row`` (idempotent per ``(row, key)``)."""
        if end <= start:
            raise ValueError(f"empty probe span [{start}, {end})")
        self.rows.setdefault(row, {}).setdefault(key, Probe(key, start, end))

    def pop(self, row: int | None) -> dict[str, Probe]:
        """The row's probes (filled or not), forgetting them."""
        if row is None:
            return {}
        return self.rows.pop(row, {})


def get_probe_board(req_to_token_pool: object) -> ProbeBoard:
    """The board on ``req_to_token_pool``'s ``PoolState`` (created on first use)."""
    st = pool_state(req_to_token_pool)
    if st.probes is None:
        st.probes = ProbeBoard()
    return st.probes


def context_deviation(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    seg_start: int,
    scaling: float | None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Relative deviation of each query's attention output without its context.

    Args:
        q: ``[n, H, D]`` queries (tokens of one segment).
        k, v: ``[S, Hkv, D]`` keys (rotated to their true positions) and values of the row.
        query_pos, key_pos: int64 true positions of queries and keys.
        seg_start: first position of the segment: keys before it are "context".
        scaling: softmax scale (None: SDPA's default).
        reduce: under tensor parallelism, a sum over the TP ranks (each holds some heads):
            squared norms add over heads, so every rank gets the score over all heads and
            picks the same recompute set.

    Returns:
        float32 ``[n]``: ``|o_full - o_seg| / |o_full|`` over all heads.
    """
    full = key_pos.view(1, -1) <= query_pos.view(-1, 1)
    seg = full & (key_pos.view(1, -1) >= seg_start)
    qh = q.movedim(0, 1).unsqueeze(0)
    kh = k.to(q.dtype).movedim(0, 1).unsqueeze(0)
    vh = v.to(q.dtype).movedim(0, 1).unsqueeze(0)
    gqa = q.shape[1] != k.shape[1]
    outs = [
        scaled_dot_product_attention(qh, kh, vh, attn_mask=m, scale=scaling, enable_gqa=gqa)
        for m in (full, seg)
    ]
    o_full, o_seg = (o.squeeze(0).movedim(1, 0).float().flatten(1) for o in outs)
    sq = torch.stack([(o_full - o_seg).square().sum(dim=1), o_full.square().sum(dim=1)])
    if reduce is not None:
        sq = reduce(sq)
    return sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-6)


def span_of(pos: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Index of the span ``bounds[s] = [start, end)`` holding each position, -1 for none
    (spans do not overlap)."""
    inside = (pos.view(-1, 1) >= bounds[:, 0]) & (pos.view(-1, 1) < bounds[:, 1])
    return torch.where(inside.any(1), inside.to(torch.int8).argmax(1), -1)


def segment_deviation(
    q: torch.Tensor,
    o_full: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    bounds: torch.Tensor,
    scaling: float | None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`context_deviation` for every segment of one row at once, with ``o_full`` taken
    from the forward itself (the layer's attention output already is each token's attention
    over every key at positions <= its own), so only the segment-only attention is computed:
    one batched attention over the segments, each padded to the longest::

        span s = [a, b):  Q[s, i] = query at position a + i     (zero where the row has none)
                          K[s, j] = key at position a + j       (every position of a span is
                          V[s, j] = value at position a + j      in the row's keys)
        o_seg[s, i] = attention of Q[s, i] over K[s, 0..i]     (causal within the segment)

    Args:
        q: ``[n, H, D]`` queries of the forward's tokens of this row; ``o_full`` ``[n, H, Dv]``
            the layer's attention output for them.
        k, v: ``[S, Hkv, D]`` the row's keys (rotated to their true positions) and values.
        query_pos, key_pos: int64 true positions of queries and keys.
        bounds: int64 ``[segments, 2]`` the spans ``[start, end)`` to score.
        scaling, reduce: as for :func:`context_deviation`.

    Returns:
        ``(scores, which)``: float32 scores of the queries inside a span, in query order, and
        the index of each such query (into ``q``).
    """
    qs, ks = span_of(query_pos, bounds), span_of(key_pos, bounds)
    which = torch.nonzero(qs >= 0).flatten()
    if which.numel() == 0:
        return torch.empty(0), which
    kin = torch.nonzero(ks >= 0).flatten()
    n_seg, width = bounds.shape[0], int((bounds[:, 1] - bounds[:, 0]).max())
    qi = (qs[which], query_pos[which] - bounds[qs[which], 0])
    ki = (ks[kin], key_pos[kin] - bounds[ks[kin], 0])
    qq = q.new_zeros(n_seg, width, *q.shape[1:])
    kk = q.new_zeros(n_seg, width, *k.shape[1:])
    vv = q.new_zeros(n_seg, width, *v.shape[1:])
    qq[qi], kk[ki], vv[ki] = q[which], k[kin].to(q.dtype), v[kin].to(q.dtype)
    j = torch.arange(width, device=q.device)
    present = torch.zeros(n_seg, width, dtype=torch.bool, device=q.device)
    present[ki] = True
    # causal within the segment, over keys present; the diagonal always (no empty row: a
    # padded query attends its own zero key and is discarded)
    mask = (present.unsqueeze(1) & (j.view(1, 1, -1) <= j.view(1, -1, 1))) | torch.eye(
        width, dtype=torch.bool, device=q.device
    )
    o = scaled_dot_product_attention(
        qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask.unsqueeze(1),
        scale=scaling, enable_gqa=q.shape[1] != k.shape[1],
    ).transpose(1, 2)  # fmt: skip
    o_seg = o[qi].float().flatten(1)
    full = o_full[which].float().flatten(1)
    sq = torch.stack([(full - o_seg).square().sum(dim=1), full.square().sum(dim=1)])
    if reduce is not None:
        sq = reduce(sq)
    return sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-6), which
