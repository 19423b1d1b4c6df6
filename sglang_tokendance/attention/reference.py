"""Pure-torch reference of position-tagged attention: the spec the Triton kernels must meet.

Readable over fast: everything in float32, explicit softmax, one request at a time. No SGLang
import (the GPU check runs it on machines that only have torch and triton).

The inputs mirror SGLang's pools plus the two TokenDance position tables::

    req_to_token[row, j] -> slot          key j of the row lives in k_buffer[slot], v_buffer[slot]
    slot_pos[slot]       -> p_w            position K was rotated at when written
    req_to_pos[row, j]   -> p_j            true position of entry j if j < layout_len[row]
                                           (else p_j = j: ordinary rows and decode tokens)

    key j as seen by a query at position p_q:
        k_j = R(p_j - p_w) k_buffer[slot]          (rotate by the delta)
        visible iff p_j <= p_q                     (mask by position, not by index)
"""

from __future__ import annotations

import torch

from sglang_tokendance.attention.rope import RopeParams, rotate_by_delta


def key_positions(
    req_to_pos: torch.Tensor, layout_len: torch.Tensor, row: int, seq_len: int
) -> torch.Tensor:
    """True positions (int64) of ``row[:seq_len]``: ``req_to_pos`` inside the layout, else j."""
    j = torch.arange(seq_len, dtype=torch.int64, device=req_to_pos.device)
    laid = req_to_pos[row, :seq_len].to(torch.int64)
    return torch.where(j < int(layout_len[row]), laid, j)


def attend_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    key_pos: torch.Tensor,
    slot_pos: torch.Tensor,
    query_pos: torch.Tensor | None,
    rope: RopeParams | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of one request's queries over the keys in ``slots``.

    Args:
        q: ``[nq, H, D]`` queries (already rotated at ``query_pos``).
        k_buffer, v_buffer: ``[num_slots, Hkv, D]`` / ``[num_slots, Hkv, Dv]`` KV pool of a layer.
        slots: ``[S]`` slots of the request's keys, in row order.
        key_pos: ``[S]`` true position of each key.
        slot_pos: ``[num_slots]`` position each slot's K was rotated at.
        query_pos: ``[nq]`` query positions, or None for no mask (decode).
        rope: the model's RoPE; None skips the rotation.
        scaling: softmax scale.

    Returns:
        ``[nq, H, Dv]`` in ``q.dtype``.
    """
    slots = slots.long()
    k = k_buffer[slots]
    if rope is not None:
        delta = key_pos.long() - slot_pos[slots].long()
        k = rotate_by_delta(k, delta, rope)
    k = k.float()
    v = v_buffer[slots].float()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # GQA: query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scaling
    if query_pos is not None:
        visible = key_pos.long().view(1, -1) <= query_pos.long().view(-1, 1)  # [nq, S]
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def extend_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_to_pos: torch.Tensor,
    layout_len: torch.Tensor,
    slot_pos: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    query_pos: torch.Tensor,
    rope: RopeParams | None,
    scaling: float,
) -> torch.Tensor:
    """Extend (prefill) attention for a batch; the extend tokens are the row's last entries.

    ::

        q rows:  | req 0: extend_seq_lens[0] | req 1: ... |      (concatenated, like SGLang)
        req b keys: row[:seq_lens[b]] (prefix + extend), each rotated by its delta and
                    visible to query t iff key_pos <= query_pos[t]

    Args:
        q: ``[T, H, D]``, T = sum of extend_seq_lens.
        query_pos: ``[T]`` positions the queries were rotated at (SGLang's
            ``forward_batch.positions``).
        Others: see :func:`attend_ref` and the module docstring.

    Returns:
        ``[T, H, Dv]``.
    """
    out = q.new_empty((q.shape[0], q.shape[1], v_buffer.shape[-1]))
    start = 0
    for b in range(int(seq_lens.numel())):
        row, s, e = int(req_pool_indices[b]), int(seq_lens[b]), int(extend_seq_lens[b])
        slots = req_to_token[row, :s]
        kpos = key_positions(req_to_pos, layout_len, row, s)
        out[start : start + e] = attend_ref(
            q[start : start + e],
            k_buffer,
            v_buffer,
            slots,
            kpos,
            slot_pos,
            query_pos[start : start + e],
            rope,
            scaling,
        )
        start += e
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_to_pos: torch.Tensor,
    layout_len: torch.Tensor,
    slot_pos: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    rope: RopeParams | None,
    scaling: float,
) -> torch.Tensor:
    """Decode attention: one query per request, at position ``seq_len - 1``, over the row.

    No mask: the row's positions are a permutation of ``0..seq_len-1``, all ``<=`` the query's.

    Args:
        q: ``[B, H, D]``.
        Others: see :func:`extend_attention_ref`.

    Returns:
        ``[B, H, Dv]``.
    """
    out = q.new_empty((q.shape[0], q.shape[1], v_buffer.shape[-1]))
    for b in range(int(seq_lens.numel())):
        row, s = int(req_pool_indices[b]), int(seq_lens[b])
        kpos = key_positions(req_to_pos, layout_len, row, s)
        out[b : b + 1] = attend_ref(
            q[b : b + 1],
            k_buffer,
            v_buffer,
            req_to_token[row, :s],
            kpos,
            slot_pos,
            None,
            rope,
            scaling,
        )
    return out
