"""The backend's torch path for one request: gather, rotate by delta, SDPA with a position mask.

Same math as :func:`sglang_tokendance.attention.reference.attend_ref`, but in the model dtype
through ``scaled_dot_product_attention`` (the kernel torch_native uses), so that the rotation
is the only extra work over SGLang's torch_native backend. No SGLang import.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_tokendance.attention.rope import RopeParams, rotate_by_delta


def gather_rotated_keys(
    k_buffer: torch.Tensor,
    slots: torch.Tensor,
    key_pos: torch.Tensor,
    slot_pos: torch.Tensor,
    rope: RopeParams,
) -> torch.Tensor:
    """``k_buffer[slots]`` rotated to ``key_pos`` (``[S, Hkv, D]``).

    The rotation is skipped when every delta is 0 (ordinary rows, fresh tokens): the keys are
    then exactly what torch_native would read.
    """
    k = k_buffer[slots]
    delta = key_pos - slot_pos[slots].to(torch.int64)
    if bool(delta.any()):
        k = rotate_by_delta(k, delta, rope)
    return k


def attend_sdpa(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    key_pos: torch.Tensor,
    slot_pos: torch.Tensor,
    query_pos: torch.Tensor | None,
    rope: RopeParams,
    scaling: float | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Position-tagged attention of one request (torch path of the backend).

    Args:
        q: ``[nq, H, D]`` queries of the request.
        k_buffer, v_buffer: the layer's KV pool buffers.
        slots: ``[S]`` int64 slots of the request's keys (row order).
        key_pos: ``[S]`` int64 true positions of the keys.
        slot_pos: ``[num_slots]`` positions the slots were written at.
        query_pos: ``[nq]`` int64 query positions; None means no mask (decode).
        rope: the model's RoPE parameters (``inv_freq`` on the keys' device).
        scaling: softmax scale (None: SDPA's default).
        sliding_window: keep only keys with ``query_pos - key_pos <= sliding_window``.

    Returns:
        ``[nq, H, Dv]`` in ``q.dtype``.
    """
    k = gather_rotated_keys(k_buffer, slots, key_pos, slot_pos, rope)
    v = v_buffer[slots]
    if not (q.dtype == k.dtype == v.dtype):
        k, v = k.to(q.dtype), v.to(q.dtype)
    mask = None
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
