"""The delta rotation of already-rotated keys, and the RoPE parameters it needs.

SGLang stores K after RoPE: the K in a slot is ``R(slot_pos) k``. RoPE is a rotation of each
dimension pair by ``pos * inv_freq[i]``, so ``R(a) R(b) = R(a + b)`` and a key written at
``slot_pos`` is moved to ``key_pos`` by ``R(key_pos - slot_pos)``: exact up to float rounding.
That holds for every RoPE variant whose angle is ``pos * inv_freq`` with ``inv_freq`` fixed
(default, linear, llama3, yarn, and SGLang's "dynamic", whose base is fixed at construction).
YaRN also scales cos/sin by ``mscale``; K already carries that factor, so the delta rotation
must be a pure rotation (no second ``mscale``).

This module must not import SGLang at import time: the Triton kernels and the GPU check use it
on machines without SGLang. The parameters are read off a model by :mod:`.rope_source`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RopeParams(NamedTuple):
    """What the delta rotation needs to know about a model's RoPE.

    ``inv_freq`` is authoritative (float32, ``[rotary_dim // 2]``): it is taken from the very
    SGLang module that rotated the keys, so the delta rotation uses the same frequencies.
    """

    theta: float
    rotary_dim: int
    head_dim: int
    is_neox: bool
    scaling: str  # "default" | "linear" | "dynamic" | "llama3" | "yarn"
    inv_freq: torch.Tensor
    mscale: float = 1.0

    @classmethod
    def default(
        cls, theta: float, head_dim: int, rotary_dim: int | None = None, is_neox: bool = True
    ) -> RopeParams:
        """Plain RoPE (``inv_freq = theta ** (-2i / rotary_dim)``), for kernels and tests.

        The expression is the one SGLang's ``RotaryEmbedding._compute_inv_freq`` uses.
        """
        rd = head_dim if rotary_dim is None else rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float) / rd))
        return cls(float(theta), rd, head_dim, is_neox, "default", inv_freq)

    def to(self, device: torch.device | str) -> RopeParams:
        """The same parameters with ``inv_freq`` on ``device``."""
        return self._replace(inv_freq=self.inv_freq.to(device=device, dtype=torch.float32))


def delta_cos_sin(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``delta * inv_freq`` in float32, shape ``[n, rotary_dim // 2]``.

    The product is formed in float32, as SGLang forms ``t * inv_freq`` for its cache.
    """
    ang = delta.to(torch.float32).reshape(-1, 1) * inv_freq.to(delta.device, torch.float32)
    return ang.cos(), ang.sin()


def rotate_by_delta(k: torch.Tensor, delta: torch.Tensor | int, params: RopeParams) -> torch.Tensor:
    """Rotate already-RoPE'd keys by a per-token position delta.

    Pairs are ``(i, i + rd/2)`` for neox style and ``(2i, 2i + 1)`` for interleaved
    (GPT-J) style; dims past ``rotary_dim`` pass through::

        neox:        [ x1 (rd/2) | x2 (rd/2) | pass ]    x1' = x1 c - x2 s,  x2' = x2 c + x1 s
        interleaved: [ a0 b0 a1 b1 ... | pass ]          a'  = a c - b s,    b'  = b c + a s

    Args:
        k: ``[n, ..., head_dim]`` keys rotated at their slot positions.
        delta: ``[n]`` integer deltas (target position - slot position), or one int for all.

    Returns:
        Keys rotated to the target positions, same shape and dtype as ``k``.
    """
    if not isinstance(delta, torch.Tensor):
        delta = torch.full((k.shape[0],), int(delta), dtype=torch.int64, device=k.device)
    cos, sin = delta_cos_sin(delta, params.inv_freq)
    return apply_rotation(k, cos, sin, params)


def apply_rotation(
    k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, params: RopeParams
) -> torch.Tensor:
    """Rotate keys ``[n, ..., head_dim]`` by per-token angles given as cos/sin ``[n, rd/2]``.

    Split from :func:`rotate_by_delta` so a caller can compute cos/sin once and rotate the
    keys of every layer with them.
    """
    n, rd = k.shape[0], params.rotary_dim
    # [n, rd/2] -> [n, 1, ..., rd/2] to broadcast over the head dims of k.
    view = (n,) + (1,) * (k.dim() - 2) + (rd // 2,)
    cos, sin = cos.view(view), sin.view(view)
    kf = k.to(torch.float32)
    out = torch.empty_like(kf)
    if params.is_neox:
        x1, x2 = kf[..., : rd // 2], kf[..., rd // 2 : rd]
        o1, o2 = out[..., : rd // 2], out[..., rd // 2 : rd]
    else:
        x1, x2 = kf[..., 0:rd:2], kf[..., 1:rd:2]
        o1, o2 = out[..., 0:rd:2], out[..., 1:rd:2]
    # Written into one buffer with out=/in-place ops: on CPU, every fresh temporary of this size
    # is an mmap'd allocation with page faults, which made the naive expression ~10x slower.
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    if rd < k.shape[-1]:
        out[..., rd:] = kf[..., rd:]
    return out.to(k.dtype)


def pair_layout(params: RopeParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head dim ``d``: (its frequency index, its pair partner, the sign of the partner's
    term), as :func:`apply_rotation` pairs them; dims past ``rotary_dim`` pair with themselves.

    With them, rotating every key is two elementwise ops: ``k * C + swap_pairs(k) * S`` where
    ``C[:, d] = cos[:, f(d)]`` and ``S[:, d] = sign(d) sin[:, f(d)]`` (``full_width``).
    """
    d, rd = params.head_dim, params.rotary_dim
    dims = torch.arange(d)
    half = rd // 2
    if params.is_neox:
        lo = dims < half
        fidx = torch.where(lo, dims, dims - half)
        partner = torch.where(lo, dims + half, dims - half)
        sign = torch.where(lo, -1.0, 1.0)
    else:
        fidx = dims // 2
        partner = dims ^ 1
        sign = torch.where(dims % 2 == 0, -1.0, 1.0)
    rot = dims < rd
    return torch.where(rot, fidx, 0), torch.where(rot, partner, dims), torch.where(rot, sign, 0.0)


def full_width(
    cos: torch.Tensor, sin: torch.Tensor, params: RopeParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, S)`` ``[n, head_dim]`` for rotating keys ``[n, ..., head_dim]`` as
    ``k * C + swap_pairs(k) * S`` (cos/sin ``[n, rotary_dim // 2]``; 1 and 0 past
    ``rotary_dim``)."""
    fidx, _, sign = (t.to(cos.device) for t in pair_layout(params))
    rot = torch.arange(params.head_dim, device=cos.device) < params.rotary_dim
    return torch.where(rot, cos[:, fidx], 1.0), sin[:, fidx] * sign


def swap_pairs(
    k: torch.Tensor, params: RopeParams, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``k[..., partner]`` by slicing (a last-dim ``index_select`` is ~3x slower on CPU),
    into ``out`` when given (a reused buffer: no fresh allocation)."""
    rd, half = params.rotary_dim, params.rotary_dim // 2
    if out is None:
        out = torch.empty_like(k)
    if params.is_neox:
        out[..., :half].copy_(k[..., half:rd])
        out[..., half:rd].copy_(k[..., :half])
    else:
        pairs = k[..., :rd].unflatten(-1, (half, 2))
        dst = out[..., :rd].unflatten(-1, (half, 2))
        dst[..., 0].copy_(pairs[..., 1])
        dst[..., 1].copy_(pairs[..., 0])
    if rd < k.shape[-1]:
        out[..., rd:].copy_(k[..., rd:])
    return out
