"""The torch path's key plan for a whole batch: one per forward, read by every layer.

A :class:`BatchKeys` plan holds, for every row of a batch, its slots and true key positions
padded to one width ``C`` (the batch's longest row, plus room for decode steps), and per key the
rotation that moves it to its true position in a dense form (``k * cos + swap_pairs(k) * sin``;
1 and 0 for keys that do not move). Every layer of a forward reads the same plan; a decode step
appends its new token in place instead of rebuilding (:func:`append_decode`). No SGLang import.

Index arithmetic of the plan (B rows, width C)::

    slots[b, j]   j < seq_len[b]: req_to_token[row_b, j]   else 0 (SGLang's padding slot)
    key_pos[b, j] j < layout_len[row_b]: req_to_pos[row_b, j]; j < seq_len[b]: j; else BIG
    valid[b, j] = j < seq_len[b]
    rot[b, j]   = cos/sin of (key_pos - slot_pos[slot]) * inv_freq, full head width

The torch execution of a plan (gather, rotation, SDPA by blocks) is :mod:`.batch_exec`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglang_tokendance.attention.rope import RopeParams, delta_cos_sin, full_width

BIG = 1 << 30  # key position of padding: never visible to any query
DECODE_HEADROOM = 64  # decode steps a plan absorbs before it is rebuilt wider
BUCKET = 128  # decode pads a row's keys to a multiple of this, whatever it is batched with


class Tables(NamedTuple):
    """The pools' index tables the plan reads (SGLang's req_to_token + the position tables)."""

    req_to_token: torch.Tensor  # int32 [rows, ctx]
    req_to_pos: torch.Tensor  # int32 [rows, ctx]
    layout_len: torch.Tensor  # int32 [rows]
    slot_pos: torch.Tensor  # int32 [slots]


class BatchKeys(NamedTuple):
    """The keys of every row of one batch, as each layer reads them."""

    seq_lens: list[int]  # host copy, per row
    slots: torch.Tensor  # int64 [B, C]
    key_pos: torch.Tensor  # int64 [B, C]
    valid: torch.Tensor  # bool [B, C]
    rot: tuple[torch.Tensor, torch.Tensor] | None  # float32 [B, C, 1, D] each; None: none move
    moves: list[bool]  # host: does any key of row b move
    order: torch.Tensor | None = None  # plan row i is batch row order[i] (None: the same)
    by_position: bool = False  # each row's keys sorted by true position (extend plans)

    @property
    def width(self) -> int:
        return int(self.slots.shape[1])


def bucket(n: int) -> int:
    """The padded key count decode attends over for a row of ``n`` keys (batch-independent)."""
    return -(-n // BUCKET) * BUCKET


def plan_batch(
    rows: torch.Tensor,
    seq_lens: list[int],
    tables: Tables,
    rope: RopeParams,
    headroom: int = 0,
    sort: bool = False,
    by_position: bool = False,
) -> BatchKeys:
    """Vectorized key plan of ``rows`` (no per-row Python loop).

    Args:
        rows: ``[B]`` request rows (``req_pool_indices``).
        seq_lens: keys per row, host side.
        tables: the index tables.
        rope: the model's RoPE.
        headroom: extra columns for decode steps to append into.
        sort: order the plan's rows by length (decode: rows of one padded length are then
            adjacent, and stay so as every row grows by one per step).
        by_position: order each row's keys by true position (extend: query blocks then
            attend a prefix of the keys, :func:`extend_blocks`).
    """
    dev = tables.req_to_token.device
    rows = rows.to(dev, torch.int64)
    order = None
    if sort:
        perm = sorted(range(len(seq_lens)), key=seq_lens.__getitem__)
        order = torch.tensor(perm, dtype=torch.int64, device=dev)
        rows, seq_lens = rows[order], [seq_lens[i] for i in perm]
    width = bucket(max(seq_lens) + headroom) if headroom else max(seq_lens)
    width = min(width, tables.req_to_token.shape[1])
    slots, key_pos, delta, valid = row_keys(rows, seq_lens, tables, width)
    key_pos = key_pos.masked_fill(~valid, BIG)
    if by_position:  # padding (BIG) sorts last: valid stays a prefix of each row
        perm = torch.argsort(key_pos, dim=1, stable=True)
        slots, key_pos = slots.gather(1, perm), key_pos.gather(1, perm)
        valid, delta = valid.gather(1, perm), delta.gather(1, perm)
    rot, moves = key_rotation(delta, rope)
    return BatchKeys(list(seq_lens), slots, key_pos, valid, rot, moves, order, by_position)


def key_rotation(
    delta: torch.Tensor, rope: RopeParams
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, list[bool]]:
    """The dense rotation ``[B, C, 1, D]`` (cos, sin) of keys moved by ``delta`` ``[B, C]``,
    None when no key moves, and per row whether any of its keys moves."""
    moves = (delta != 0).any(dim=1)
    if not bool(moves.any()):
        return None, moves.tolist()
    c, s = full_width(*delta_cos_sin(delta.reshape(-1), rope.inv_freq), rope)
    shape = (*delta.shape, 1, rope.head_dim)
    return (c.view(shape), s.view(shape)), moves.tolist()


def row_keys(
    rows: torch.Tensor, seq_lens: list[int], tables: Tables, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, width]`` slots, true key positions, rotation deltas and validity of ``rows``
    (slot 0 and delta 0 past a row's length; positions there are the column index)."""
    dev = tables.req_to_token.device
    rows = rows.to(dev, torch.int64)
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=dev)
    j = torch.arange(width, dtype=torch.int64, device=dev).view(1, -1)
    valid = j < lens.view(-1, 1)
    slots = tables.req_to_token[rows, :width].to(torch.int64).masked_fill_(~valid, 0)
    laid = j < tables.layout_len[rows].to(torch.int64).view(-1, 1)
    key_pos = torch.where(laid, tables.req_to_pos[rows, :width].to(torch.int64), j)
    delta = (key_pos - tables.slot_pos[slots].to(torch.int64)).masked_fill_(~valid, 0)
    return slots, key_pos, delta, valid


def append_decode(plan: BatchKeys, new_slots: torch.Tensor) -> BatchKeys | None:
    """The plan one decode step later: each row gained the token at index ``seq_len``.

    The new token was written at its own position (delta 0: its rotation columns already hold
    1 and 0, like all padding), so nothing else changes. Returns None when a row would outgrow
    the plan's width (the caller rebuilds).
    """
    if max(plan.seq_lens) >= plan.width:
        return None
    b = torch.arange(len(plan.seq_lens), device=plan.slots.device)
    col = torch.tensor(plan.seq_lens, dtype=torch.int64, device=plan.slots.device)
    plan.slots[b, col] = new_slots.to(plan.slots.device, torch.int64)
    plan.key_pos[b, col] = col
    plan.valid[b, col] = True
    return plan._replace(seq_lens=[s + 1 for s in plan.seq_lens])
