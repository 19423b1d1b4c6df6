"""Python wrappers of the Triton kernels, with the signatures of the torch reference.

``extend_attention`` / ``decode_attention`` take exactly the arguments of
:func:`~sglang_tokendance.attention.reference.extend_attention_ref` /
:func:`~sglang_tokendance.attention.reference.decode_attention_ref`, plus launch knobs.
``rope=None`` (or ``rotate=False``) compiles the delta rotation out of the kernel. No SGLang
import. Page size 1.
"""

from __future__ import annotations

import torch
import triton

from sglang_tokendance.attention.rope import RopeParams
from sglang_tokendance.attention.triton_kernels import (
    _decode_reduce_kernel,
    _decode_split_kernel,
    _extend_kernel,
)


def _common(q: torch.Tensor, k_buffer: torch.Tensor, rope: RopeParams | None) -> dict:
    """Compile-time parameters shared by the kernels."""
    heads, kv_heads, d = q.shape[1], k_buffer.shape[1], q.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    return dict(
        GROUP=heads // kv_heads,
        D=d,
        ROT_DIM=rope.rotary_dim if rope is not None else d,
        BLOCK_D=triton.next_power_of_2(d),
        IS_NEOX=rope.is_neox if rope is not None else True,
        # fp32 inputs: exact products (the default would be tf32 on recent GPUs).
        DOT_PREC="ieee" if q.dtype == torch.float32 else None,
    )


def _inv_freq(q: torch.Tensor, rope: RopeParams | None) -> torch.Tensor:
    if rope is None:
        return torch.zeros(1, dtype=torch.float32, device=q.device)
    return rope.inv_freq.to(q.device, torch.float32).contiguous()


def extend_attention(
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
    *,
    rotate: bool = True,
    max_extend_len: int | None = None,
    block_m: int = 16,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 1,
) -> torch.Tensor:
    """Extend attention (see ``extend_attention_ref`` for the arguments and the math).

    Args:
        rotate: False compiles the rotation out (timing baseline); also off when rope is None.
        max_extend_len: host-side ``max(extend_seq_lens)``, to avoid a device sync.

    Returns:
        ``[T, H, Dv]`` in ``q.dtype``.
    """
    heads, dv = q.shape[1], v_buffer.shape[-1]
    out = torch.empty((q.shape[0], heads, dv), dtype=q.dtype, device=q.device)
    bs = int(seq_lens.numel())
    if bs == 0 or q.shape[0] == 0:
        return out
    c = _common(q, k_buffer, rope)
    ext_start = torch.zeros(bs, dtype=torch.int32, device=q.device)
    ext_start[1:] = torch.cumsum(extend_seq_lens[:-1], 0)
    if max_extend_len is None:
        max_extend_len = int(extend_seq_lens.max())
    grid = (bs, k_buffer.shape[1], triton.cdiv(max_extend_len, block_m))
    # fmt: off
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_to_pos, layout_len, slot_pos,
        _inv_freq(q, rope), req_pool_indices, seq_lens, ext_start, extend_seq_lens,
        query_pos, float(scaling),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1),
        req_to_token.stride(0), req_to_pos.stride(0),
        GROUP_P=triton.next_power_of_2(c["GROUP"]), DV=dv, BLOCK_DV=triton.next_power_of_2(dv),
        BLOCK_M=block_m, BLOCK_N=block_n, ROTATE=rotate and rope is not None,
        num_warps=num_warps, num_stages=num_stages, **c,
    )
    # fmt: on
    return out


def decode_attention(
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
    *,
    rotate: bool = True,
    num_splits: int = 8,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 1,
) -> torch.Tensor:
    """Split-KV decode attention (see ``decode_attention_ref``).

    Args:
        rotate: False compiles the rotation out (timing baseline); also off when rope is None.
        num_splits: KV splits per (request, KV head), combined by log-sum-exp.

    Returns:
        ``[B, H, Dv]`` in ``q.dtype``.
    """
    bs, heads, dv = q.shape[0], q.shape[1], v_buffer.shape[-1]
    out = torch.empty((bs, heads, dv), dtype=q.dtype, device=q.device)
    if bs == 0:
        return out
    c = _common(q, k_buffer, rope)
    mid_o = torch.empty((bs, heads, num_splits, dv), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((bs, heads, num_splits), dtype=torch.float32, device=q.device)
    block_dv = triton.next_power_of_2(dv)
    # tl.dot needs at least 16 rows: the group's heads are padded up to 16.
    group_p = max(16, triton.next_power_of_2(c["GROUP"]))
    # fmt: off
    _decode_split_kernel[(bs, k_buffer.shape[1], num_splits)](
        q, k_buffer, v_buffer, mid_o, mid_lse, req_to_token, req_to_pos, layout_len, slot_pos,
        _inv_freq(q, rope), req_pool_indices, seq_lens, float(scaling),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        req_to_token.stride(0), req_to_pos.stride(0),
        GROUP_P=group_p, DV=dv, BLOCK_DV=block_dv, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        ROTATE=rotate and rope is not None, num_warps=num_warps, num_stages=num_stages, **c,
    )
    # fmt: on
    _decode_reduce_kernel[(bs, heads)](
        mid_o,
        mid_lse,
        out,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        DV=dv,
        BLOCK_DV=block_dv,
        NUM_SPLITS=num_splits,
        SPLITS_P=triton.next_power_of_2(num_splits),
    )
    return out
