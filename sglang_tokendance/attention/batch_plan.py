"""The torch path for a whole batch: one gather, one rotation, one SDPA per layer.

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

    extend queries, token i < ext_len[b] of row b is flat token t = ext_start[b] + i:
        q_pad[b, i] = q[t]      (padding queries read token 0; their outputs are dropped)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_tokendance.attention.rope import RopeParams, apply_rotation, delta_cos_sin

BIG = 1 << 30  # key position of padding: never visible to any query
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
    return BatchKeys(rows, list(seq_lens), slots, key_pos, valid, moved, cos, sin)


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


class ExtendQueries(NamedTuple):
    """Where each row's extend tokens sit in the flat batch, padded to ``E`` per row."""

    index: torch.Tensor  # int64 [B, E] into the flat tokens (padding: 0)
    pos: torch.Tensor  # int64 [B, E] query positions (padding: 0, sees key 0 only)
    real: torch.Tensor  # bool [B, E]


def extend_queries(
    ext_lens: list[int], starts: list[int], positions: torch.Tensor
) -> ExtendQueries:
    """Pad the extend tokens of some rows (``starts``: each row's first flat token)."""
    dev = positions.device
    lens = torch.tensor(ext_lens, dtype=torch.int64, device=dev)
    start = torch.tensor(starts, dtype=torch.int64, device=dev)
    i = torch.arange(max(ext_lens), dtype=torch.int64, device=dev).view(1, -1)
    real = i < lens.view(-1, 1)
    index = (start.view(-1, 1) + i).masked_fill_(~real, 0)
    pos = positions.to(torch.int64)[index].masked_fill_(~real, 0)
    return ExtendQueries(index, pos, real)


def extend_batch(
    q: torch.Tensor,
    out: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: BatchKeys,
    queries: ExtendQueries,
    rope: RopeParams,
    scale: float,
) -> None:
    """Extend attention of the plan's rows: reads flat ``q`` ``[T, H, D]``, writes their tokens
    of ``out`` ``[T, H, Dv]``.

    Visibility is by position (``key_pos <= query_pos``), not by row index: a laid-out row holds
    its keys in any order.
    """
    k, v = gather_batch(k_buffer, v_buffer, plan, rope)
    mask = plan.key_pos.unsqueeze(1) <= queries.pos.unsqueeze(2)  # [B, E, C]
    res = _sdpa(q[queries.index], k, v, mask.unsqueeze(1), scale)  # [B, E, H, Dv]
    out[queries.index[queries.real]] = res[queries.real].to(out.dtype)


def row_groups(ext_lens: list[int], waste: float = 1.5, slack: int = 64) -> list[list[int]]:
    """Rows grouped so that padding each group to its longest extend wastes little.

    Rows are taken longest first; a group closes when ``size * longest`` would pass
    ``waste * (sum of its lengths) + slack``. Typically one group (rows of a round have similar
    lengths); a long master prompt batched with short reuse rows gets its own.
    """
    order = sorted(range(len(ext_lens)), key=lambda i: -ext_lens[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        longest = ext_lens[cur[0]] if cur else ext_lens[i]
        if cur and (len(cur) + 1) * longest > waste * (total + ext_lens[i]) + slack:
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += ext_lens[i]
    if cur:
        groups.append(cur)
    return groups
