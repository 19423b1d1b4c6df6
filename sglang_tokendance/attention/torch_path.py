"""The backend's torch path for one request: gather, rotate by delta, SDPA with a position mask.

Same math as :func:`sglang_tokendance.attention.reference.attend_ref`, but in the model dtype
through ``scaled_dot_product_attention`` (the kernel torch_native uses), so that the rotation
is the only extra work over SGLang's torch_native backend. No SGLang import.

What depends only on the row and the position tables (slots, key positions, which keys move,
their cos/sin) is a :class:`RowKeys` plan, computed once per forward and reused by every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.functional import scaled_dot_product_attention

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


def attend_sdpa(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: RowKeys,
    query_pos: torch.Tensor | None,
    rope: RopeParams,
    scaling: float | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Position-tagged attention of one request (torch path of the backend).

    Args:
        q: ``[nq, H, D]`` queries of the request.
        k_buffer, v_buffer: the layer's KV pool buffers.
        plan: the row's keys (:func:`plan_row`).
        query_pos: ``[nq]`` int64 query positions; None means no mask (decode).
        rope: the model's RoPE parameters.
        scaling: softmax scale (None: SDPA's default).
        sliding_window: keep only keys with ``query_pos - key_pos <= sliding_window``.

    Returns:
        ``[nq, H, Dv]`` in ``q.dtype``.

    Raises:
        NotImplementedError: a sliding window without query positions.
    """
    k = gather_keys(k_buffer, plan, rope)
    v = v_buffer[plan.slots]
    if not (q.dtype == k.dtype == v.dtype):
        k, v = k.to(q.dtype), v.to(q.dtype)
    mask = None
    key_pos = plan.key_pos
    if query_pos is not None:
        # [nq, S]: visibility by position, not by row index (a row may be in any order).
        mask = key_pos.view(1, -1) <= query_pos.view(-1, 1)
        if sliding_window is not None and sliding_window > -1:
            mask &= key_pos.view(1, -1) >= query_pos.view(-1, 1) - sliding_window
    elif sliding_window is not None and sliding_window > -1:
        raise NotImplementedError("sliding window needs query positions")
    out = scaled_dot_product_attention(
        q.movedim(0, 1).unsqueeze(0),  # [1, H, nq, D]
        k.movedim(0, 1).unsqueeze(0),  # [1, Hkv, S, D]
        v.movedim(0, 1).unsqueeze(0),
        attn_mask=mask,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).movedim(1, 0)
