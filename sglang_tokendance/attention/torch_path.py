"""One request row's key plan: which keys move, their cos/sin, and the rotated gather.

Used by the deviation probes (once per master computed); the batched serving path is
:mod:`.batch_plan`. No SGLang import.

What depends only on the row and the position tables (slots, key positions, which keys move,
their cos/sin) is a :class:`RowKeys` plan, computed once per forward and reused by every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglang_tokendance.attention.rope import RopeParams, apply_rotation, delta_cos_sin


class RowKeys(NamedTuple):
    """The keys of one request row as every layer of one forward reads them."""

    slots: torch.Tensor  # int64 [S], row order
    key_pos: torch.Tensor  # int64 [S], true positions
    moved: torch.Tensor | None  # indices of keys with a nonzero delta; None: all of them
    cos: torch.Tensor  # float32 [len(moved), rotary_dim // 2]
    sin: torch.Tensor


def plan_row(
    slots: torch.Tensor, key_pos: torch.Tensor, slot_pos: torch.Tensor, rope: RopeParams
) -> RowKeys:
    """Which keys of a row move (delta = key_pos - slot_pos != 0) and their cos/sin.

    In a laid-out row only the reused master slots move; private and fresh tokens sit where
    they were written, so a row without shifted keys reads exactly what torch_native would.
    """
    slots = slots.long()
    delta = key_pos - slot_pos[slots].to(torch.int64)
    moved = delta.nonzero().squeeze(1)
    if moved.numel() == delta.numel():
        cos, sin = delta_cos_sin(delta, rope.inv_freq)
        return RowKeys(slots, key_pos, None, cos, sin)
    cos, sin = delta_cos_sin(delta[moved], rope.inv_freq)
    return RowKeys(slots, key_pos, moved, cos, sin)


def gather_keys(k_buffer: torch.Tensor, plan: RowKeys, rope: RopeParams) -> torch.Tensor:
    """``k_buffer[slots]`` with the moved keys rotated to their true positions."""
    k = k_buffer[plan.slots]  # a copy: safe to update in place
    if plan.moved is None:
        return apply_rotation(k, plan.cos, plan.sin, rope)
    if plan.moved.numel():
        k[plan.moved] = apply_rotation(k[plan.moved], plan.cos, plan.sin, rope)
    return k
