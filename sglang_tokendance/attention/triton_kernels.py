"""Triton extend/decode attention over position-tagged KV, rotation fused into the key load.

The math of :mod:`sglang_tokendance.attention.reference` (page_size 1); the Python wrappers with
the reference's signatures are in :mod:`sglang_tokendance.attention.triton_ops`. For
each key block a program loads the slots through ``req_to_token``, the key positions (from
``req_to_pos`` inside the row's layout, else the index), the slot positions, and rotates the
loaded K by ``delta = key_pos - slot_pos`` in registers before the QK dot. ``ROTATE=False``
compiles the rotation out (the delta-0 baseline the GPU check times against). No SGLang import.

Rotation in registers: each dim ``d`` is combined with its pair partner ``d'``::

    k'[d] = k[d] cos(delta * inv_freq[f(d)]) + sign(d) k[d'] sin(delta * inv_freq[f(d)])
    neox:        d' = d +- rd/2, f(d) = d mod rd/2, sign = - for the first half
    interleaved: d' = d xor 1,   f(d) = d // 2,    sign = - for even d
    d >= rotary_dim: cos = 1, sin = 0 (pass through)

GQA: one program serves one KV head and all its query heads, so each key is loaded and rotated
once per group; the q tile rows are ``(token, head-in-group)`` pairs, token-major.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Kernel signatures and launches stay dense (one parameter group per line), as usual for Triton.
# fmt: off


@triton.jit
def _pair_layout(offs_d, ROT_DIM: tl.constexpr, IS_NEOX: tl.constexpr):
    """(rotated?, freq index, partner dim, sign) per head dim."""
    HALF: tl.constexpr = ROT_DIM // 2
    rot = offs_d < ROT_DIM
    if IS_NEOX:
        lo = offs_d < HALF
        fidx = tl.where(lo, offs_d, offs_d - HALF)
        partner = tl.where(lo, offs_d + HALF, offs_d - HALF)
        sign = tl.where(lo, -1.0, 1.0)
    else:
        fidx = offs_d // 2
        partner = offs_d ^ 1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    partner = tl.where(rot, partner, offs_d)
    fidx = tl.where(rot, fidx, 0)
    return rot, fidx, partner, sign


@triton.jit
def _rotate(k, k_partner, delta, inv, sign, rot):
    """Rotate float32 keys ``[N, D]`` by ``delta [N]``; angle reduced to [-pi, pi] first.

    Two-constant (Cody-Waite) reduction keeps the angle exact enough for |angle| < 4e5 even
    when tl.cos/tl.sin lower to approximate instructions.
    """
    ang = delta[:, None] * inv[None, :]
    n = tl.floor(ang * 0.15915494309189535 + 0.5)
    r = (ang - n * 6.28125) - n * 0.0019353071795864769
    c = tl.where(rot[None, :], tl.cos(r), 1.0)
    s = tl.where(rot[None, :], tl.sin(r), 0.0)
    return k * c + sign[None, :] * k_partner * s


@triton.jit
def _load_keys(K, slot, kvh, stride_kt, stride_kh, offs_d, d_ok, n_ok, delta, inv, sign, rot,
               partner, ROTATE: tl.constexpr):
    """Gather K ``[N, D]`` for ``slot`` and rotate it by ``delta`` (float32 result)."""
    base = K + slot[:, None] * stride_kt + kvh * stride_kh
    ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(base + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    if ROTATE:
        kp = tl.load(base + partner[None, :], mask=ok, other=0.0).to(tl.float32)
        k = _rotate(k, kp, delta, inv, sign, rot)
    return k


@triton.jit
def _key_positions(ReqToPos, row, stride_rp, offs_n, n_ok, layout_len):
    in_layout = offs_n < layout_len
    kpos = tl.load(ReqToPos + row * stride_rp + offs_n, mask=n_ok & in_layout, other=0)
    return tl.where(in_layout, kpos, offs_n)


@triton.jit
def _extend_kernel(
    Q, K, V, Out, ReqToToken, ReqToPos, LayoutLen, SlotPos, InvFreq,
    ReqPoolIdx, SeqLens, ExtStart, ExtLens, QPos, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_rt, stride_rp,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    ROT_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_NEOX: tl.constexpr,
    ROTATE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    mb = tl.program_id(2)
    ext_len = tl.load(ExtLens + b)
    if mb * BLOCK_M >= ext_len:
        return
    seq_len = tl.load(SeqLens + b)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    q_start = tl.load(ExtStart + b)
    layout_len = tl.load(LayoutLen + row)

    ROWS: tl.constexpr = BLOCK_M * GROUP_P
    r = tl.arange(0, ROWS)
    m = mb * BLOCK_M + r // GROUP_P
    g = r % GROUP_P
    row_ok = (m < ext_len) & (g < GROUP)
    tok = (q_start + m).to(tl.int64)
    h = kvh * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    q = tl.load(Q + tok[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = tl.load(QPos + tok, mask=row_ok, other=-1)
    qpos_max = tl.max(qpos)
    rot, fidx, partner, sign = _pair_layout(offs_d, ROT_DIM, IS_NEOX)
    inv = tl.load(InvFreq + fidx, mask=rot, other=0.0)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        kpos = _key_positions(ReqToPos, row, stride_rp, offs_n, n_ok, layout_len)
        # Skip blocks no query can see (keys sit in any row order, so test positions).
        if tl.min(tl.where(n_ok, kpos, 1 << 30)) <= qpos_max:
            slot = tl.load(ReqToToken + row * stride_rt + offs_n, mask=n_ok, other=0).to(tl.int64)
            delta = tl.zeros([BLOCK_N], tl.float32)
            if ROTATE:
                spos = tl.load(SlotPos + slot, mask=n_ok, other=0)
                delta = (kpos - spos).to(tl.float32)
            k = _load_keys(K, slot, kvh, stride_kt, stride_kh, offs_d, d_ok, n_ok, delta, inv,
                           sign, rot, partner, ROTATE)
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * sm_scale
            visible = (kpos[None, :] <= qpos[:, None]) & n_ok[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible
            p = tl.exp(qk - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
                        mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + tok[:, None] * stride_ot + h[:, None] * stride_oh + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _decode_split_kernel(
    Q, K, V, MidO, MidLse, ReqToToken, ReqToPos, LayoutLen, SlotPos, InvFreq,
    ReqPoolIdx, SeqLens, sm_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_rt, stride_rp,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    ROT_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IS_NEOX: tl.constexpr,
    ROTATE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Stage 1 of split-KV decode: split ``s`` of the row -> normalised partial output + lse."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    layout_len = tl.load(LayoutLen + row)
    chunk = tl.cdiv(seq_len, NUM_SPLITS)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    g = tl.arange(0, GROUP_P)
    g_ok = g < GROUP
    h = kvh * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    rot, fidx, partner, sign = _pair_layout(offs_d, ROT_DIM, IS_NEOX)
    inv = tl.load(InvFreq + fidx, mask=rot, other=0.0)

    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        slot = tl.load(ReqToToken + row * stride_rt + offs_n, mask=n_ok, other=0).to(tl.int64)
        delta = tl.zeros([BLOCK_N], tl.float32)
        if ROTATE:
            kpos = _key_positions(ReqToPos, row, stride_rp, offs_n, n_ok, layout_len)
            spos = tl.load(SlotPos + slot, mask=n_ok, other=0)
            delta = (kpos - spos).to(tl.float32)
        k = _load_keys(K, slot, kvh, stride_kt, stride_kh, offs_d, d_ok, n_ok, delta, inv,
                       sign, rot, partner, ROTATE)
        # No position mask: a row's positions are a permutation of 0..seq_len-1 and the query
        # sits at seq_len-1, so every key is visible.
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * sm_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * stride_mb + h[:, None] * stride_mh + split * stride_ms + offs_dv[None, :],
             out, mask=g_ok[:, None] & dv_ok[None, :])
    tl.store(MidLse + b * stride_lb + h * stride_lh + split, lse, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(
    MidO, MidLse, Out, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
):
    """Stage 2: combine the splits of one (request, head) by their log-sum-exp."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P)
    s_ok = s < NUM_SPLITS
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # empty splits: exp(-inf) = 0
    part = tl.load(MidO + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + offs_dv[None, :],
                   mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_dv, out.to(Out.dtype.element_ty),
             mask=dv_ok)


# fmt: on
