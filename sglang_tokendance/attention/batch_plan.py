"""The torch path for a whole batch: one gather and one rotation per layer for all its rows.

A :class:`BatchKeys` plan holds, for every row of a batch, its slots and true key positions
padded to one width ``C`` (the batch's longest row, plus room for decode steps), and the flat
indices of the keys that moved (``delta = key_pos - slot_pos != 0``) with their cos/sin. Every
layer of a forward reads the same plan; a decode step appends its new token in place instead of
rebuilding (:func:`append_decode`). No SGLang import.

Index arithmetic of the padded plan (B rows, width C)::

    slots[b, j]   j < seq_len[b]: req_to_token[row_b, j]   else 0 (SGLang's padding slot)
    key_pos[b, j] j < layout_len[row_b]: req_to_pos[row_b, j]; j < seq_len[b]: j; else BIG
    valid[b, j] = j < seq_len[b]
    moved       = flat indices b * C + j with a nonzero delta (padding never moves)

    extend (FlatKeys): the valid entries of the same plan, row after row (no padding); row b's
        keys are flat[off_b : off_b + seq_len[b]], off_b = sum of the seq_lens before it
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_tokendance.attention.rope import (
    RopeParams,
    apply_rotation,
    delta_cos_sin,
    full_width,
    swap_pairs,
)

BIG = 1 << 30  # key position of padding: never visible to any query
DENSE_FRACTION = 0.4  # rotate every key (dense form) when more than this share of them moves
DECODE_HEADROOM = 64  # decode steps a plan absorbs before it is rebuilt wider


class Tables(NamedTuple):
    """The pools' index tables the plan reads (SGLang's req_to_token + the position tables)."""

    req_to_token: torch.Tensor  # int32 [rows, ctx]
    req_to_pos: torch.Tensor  # int32 [rows, ctx]
    layout_len: torch.Tensor  # int32 [rows]
    slot_pos: torch.Tensor  # int32 [slots]


class BatchKeys(NamedTuple):
    """The keys of every row of one batch, as each layer reads them."""

    rows: torch.Tensor  # int64 [B]
    seq_lens: list[int]  # host copy, per row
    slots: torch.Tensor  # int64 [B, C]
    key_pos: torch.Tensor  # int64 [B, C]
    valid: torch.Tensor  # bool [B, C]
    moved: torch.Tensor  # int64 [M], flat indices into B * C
    cos: torch.Tensor  # float32 [M, rotary_dim // 2]
    sin: torch.Tensor
    # Dense form (most keys move): every key rotated as k * C + swap_pairs(k) * S, with
    # C, S [B, C, 1, head_dim] (1 and 0 where a key does not move): two elementwise ops
    # instead of a gather, a rotation and a scatter of the moved keys (~1.6x faster on CPU).
    dense: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def width(self) -> int:
        return int(self.slots.shape[1])


def plan_batch(
    rows: torch.Tensor, seq_lens: list[int], tables: Tables, rope: RopeParams, headroom: int = 0
) -> BatchKeys:
    """Vectorized key plan of ``rows`` (no per-row Python loop).

    Args:
        rows: ``[B]`` request rows (``req_pool_indices``).
        seq_lens: keys per row, host side.
        tables: the index tables.
        rope: the model's RoPE.
        headroom: extra columns for decode steps to append into.
    """
    dev = tables.req_to_token.device
    rows = rows.to(dev, torch.int64)
    width = min(max(seq_lens) + headroom, tables.req_to_token.shape[1])
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=dev)
    j = torch.arange(width, dtype=torch.int64, device=dev).view(1, -1)
    valid = j < lens.view(-1, 1)
    slots = tables.req_to_token[rows, :width].to(torch.int64).masked_fill_(~valid, 0)
    laid = j < tables.layout_len[rows].to(torch.int64).view(-1, 1)
    key_pos = torch.where(laid, tables.req_to_pos[rows, :width].to(torch.int64), j)
    delta = (key_pos - tables.slot_pos[slots].to(torch.int64)).masked_fill_(~valid, 0)
    key_pos = key_pos.masked_fill(~valid, BIG)
    moved = delta.view(-1).nonzero().squeeze(1)
    cos, sin = delta_cos_sin(delta.view(-1)[moved], rope.inv_freq)
    dense = None
    if moved.numel() > DENSE_FRACTION * sum(seq_lens):
        c, s = full_width(*delta_cos_sin(delta.view(-1), rope.inv_freq), rope)
        shape = (*slots.shape, 1, rope.head_dim)
        dense = (c.view(shape), s.view(shape))
    return BatchKeys(rows, list(seq_lens), slots, key_pos, valid, moved, cos, sin, dense)


def append_decode(plan: BatchKeys, new_slots: torch.Tensor) -> BatchKeys | None:
    """The plan one decode step later: each row gained the token at index ``seq_len``.

    The new token was written at its own position (delta 0), so nothing moves. Returns None when
    a row would outgrow the plan's width (the caller rebuilds).
    """
    if max(plan.seq_lens) >= plan.width:
        return None
    b = torch.arange(len(plan.seq_lens), device=plan.slots.device)
    col = torch.tensor(plan.seq_lens, dtype=torch.int64, device=plan.slots.device)
    plan.slots[b, col] = new_slots.to(plan.slots.device, torch.int64)
    plan.key_pos[b, col] = col
    plan.valid[b, col] = True
    return plan._replace(seq_lens=[s + 1 for s in plan.seq_lens])


def gather_batch(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, plan: BatchKeys, rope: RopeParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, Hkv, D]`` keys (moved ones rotated to their true positions) and values."""
    k = k_buffer[plan.slots]  # a copy: safe to rotate in place
    if plan.dense is not None:
        c, s = plan.dense
        if k.dtype != c.dtype:
            k = k.to(c.dtype)
        swapped = swap_pairs(k, rope)
        k.mul_(c).addcmul_(swapped, s)
        return k.to(k_buffer.dtype), v_buffer[plan.slots]
    if plan.moved.numel():
        flat = k.view(-1, *k.shape[2:])
        flat[plan.moved] = apply_rotation(flat[plan.moved], plan.cos, plan.sin, rope)
    return k, v_buffer[plan.slots]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """SDPA over ``[B, nq, H, D]`` queries and ``[B, C, Hkv, D]`` keys/values."""
    if not (q.dtype == k.dtype == v.dtype):
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)  # [B, nq, H, Dv]


def decode_batch(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: BatchKeys,
    rope: RopeParams,
    scale: float,
) -> torch.Tensor:
    """Decode attention of one query per row (``q`` ``[B, H, D]``) -> ``[B, H, Dv]``.

    A row's positions are a permutation of ``0..seq_len-1`` and its query sits at ``seq_len-1``,
    so every valid key is visible: the mask only hides padding.
    """
    k, v = gather_batch(k_buffer, v_buffer, plan, rope)
    mask = plan.valid.view(plan.valid.shape[0], 1, 1, -1)
    return _sdpa(q.unsqueeze(1), k, v, mask, scale).squeeze(1)


class FlatKeys(NamedTuple):
    """The keys of every row of an extend batch, concatenated row after row (no padding)."""

    slots: torch.Tensor  # int64 [sum S]
    key_pos: torch.Tensor  # int64 [sum S]
    moved: torch.Tensor  # int64 [M] indices into the flat keys
    cos: torch.Tensor  # float32 [M, rotary_dim // 2]
    sin: torch.Tensor
    seq_lens: list[int]


def plan_flat(
    rows: torch.Tensor, seq_lens: list[int], tables: Tables, rope: RopeParams
) -> FlatKeys:
    """:func:`plan_batch`'s keys with the padding squeezed out (vectorized)."""
    padded = plan_batch(rows, seq_lens, tables, rope)
    valid = padded.valid.view(-1)
    delta_moved = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    delta_moved[padded.moved] = True
    moved = delta_moved[valid].nonzero().squeeze(1)  # same order as padded.moved
    return FlatKeys(
        padded.slots.view(-1)[valid],
        padded.key_pos.view(-1)[valid],
        moved,
        padded.cos,
        padded.sin,
        list(seq_lens),
    )


def extend_rows(
    q: torch.Tensor,
    out: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    keys: FlatKeys,
    ext_lens: list[int],
    positions: torch.Tensor,
    rope: RopeParams,
    scale: float,
) -> None:
    """Extend attention of a batch: one gather and one rotation for all rows, then SDPA per row.

    Reads flat ``q`` ``[T, H, D]`` and writes ``out`` ``[T, H, Dv]``. Visibility is by position
    (``key_pos <= query_pos``), not by row index. Why SDPA per row here and batched in decode:
    rows of an extend differ a lot in length (a master agent's whole prompt beside reuse rows'
    few fresh tokens), padding them to one shape costs up to twice the attention FLOPs, and
    CPU SDPA has no variable-length form; the per-row calls are few and each is large.
    """
    k = k_buffer[keys.slots]
    if keys.moved.numel():
        k[keys.moved] = apply_rotation(k[keys.moved], keys.cos, keys.sin, rope)
    v = v_buffer[keys.slots]
    if not (q.dtype == k.dtype == v.dtype):
        k, v = k.to(q.dtype), v.to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    t = s = 0
    for e, n in zip(ext_lens, keys.seq_lens, strict=True):
        qpos = positions[t : t + e].to(torch.int64)
        mask = keys.key_pos[s : s + n].view(1, -1) <= qpos.view(-1, 1)
        res = scaled_dot_product_attention(
            q[t : t + e].movedim(0, 1).unsqueeze(0),
            k[s : s + n].movedim(0, 1).unsqueeze(0),
            v[s : s + n].movedim(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=gqa,
        )
        out[t : t + e] = res.squeeze(0).movedim(1, 0).to(out.dtype)
        t, s = t + e, s + n
