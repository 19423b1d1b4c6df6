"""Triton kernels vs the torch reference, in Triton's interpreter (CPU).

TRITON_INTERPRET must be set before triton is first imported: ``@triton.jit`` picks interpreted
or compiled mode at decoration time, triton's own standard library included. tests/conftest.py
sets it first thing, so every test process runs the kernels in the interpreter.
bf16 is left to the GPU check: the interpreter's bf16 ``tl.dot`` is broken (garbage results
even for a bare 16x16 product), fp32 and fp16 are exact enough here.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from sglang_tokendance.attention.reference import (  # noqa: E402
    decode_attention_ref,
    extend_attention_ref,
)
from sglang_tokendance.attention.rope import RopeParams  # noqa: E402
from sglang_tokendance.attention.triton_ops import (  # noqa: E402
    decode_attention,
    extend_attention,
)

INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"


def test_kernels_run_in_the_interpreter() -> None:
    """conftest.py sets TRITON_INTERPRET=1 before anything imports triton."""
    assert INTERPRETED


NUM_SLOTS, ROWS, CTX = 160, 5, 48


def _case(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, seed: int, max_delta: int = 300
) -> dict:
    """A batch of three rows over one KV pool::

        row 1: laid out, positions a permutation of 0..19, extend = last 5 entries
        row 2: ordinary (identity positions), prefix 9, extend 14
        row 4: laid out over 30 entries but only 18 in this chunk, extend = entries 12..17

    Every slot's K was "written" at key_pos - delta, delta in [-max_delta, max_delta]
    (zero for about a third of the slots).
    """
    g = torch.Generator().manual_seed(seed)
    kb = torch.randn(NUM_SLOTS, kv_heads, head_dim, generator=g).to(dtype)
    vb = torch.randn(NUM_SLOTS, kv_heads, head_dim, generator=g).to(dtype)
    r2t = torch.zeros(ROWS, CTX, dtype=torch.int32)
    r2p = torch.zeros(ROWS, CTX, dtype=torch.int32)
    layout_len = torch.zeros(ROWS, dtype=torch.int32)
    slot_pos = torch.zeros(NUM_SLOTS, dtype=torch.int32)
    rows, seqs, exts = [1, 2, 4], [20, 23, 18], [5, 14, 6]
    free = (torch.randperm(NUM_SLOTS - 1, generator=g) + 1).int()
    r2t[1, :20], r2t[2, :23], r2t[4, :30] = free[:20], free[20:43], free[43:73]
    r2p[1, :20] = torch.randperm(20, generator=g).int()
    r2p[4, :30] = torch.randperm(30, generator=g).int()
    layout_len[1], layout_len[4] = 20, 30
    qpos = []
    for row, s, e in zip(rows, seqs, exts, strict=True):
        j = torch.arange(s)
        kpos = torch.where(j < layout_len[row], r2p[row, :s].long(), j)
        delta = torch.randint(-max_delta, max_delta + 1, (s,), generator=g)
        delta[torch.rand(s, generator=g) < 0.33] = 0
        slot_pos[r2t[row, :s].long()] = (kpos - delta).int()
        qpos.append(kpos[s - e :])
    q = torch.randn(sum(exts), heads, head_dim, generator=g).to(dtype)
    qd = torch.randn(len(rows), heads, head_dim, generator=g).to(dtype)
    return dict(
        q=q,
        qd=qd,
        kb=kb,
        vb=vb,
        r2t=r2t,
        r2p=r2p,
        ll=layout_len,
        sp=slot_pos,
        rows=torch.tensor(rows),
        seqs=torch.tensor(seqs),
        exts=torch.tensor(exts),
        qpos=torch.cat(qpos),
        scale=head_dim**-0.5,
    )


def _extend_args(c: dict, rope: RopeParams | None) -> tuple:
    return (
        c["q"],
        c["kb"],
        c["vb"],
        c["r2t"],
        c["r2p"],
        c["ll"],
        c["sp"],
        c["rows"],
        c["seqs"],
        c["exts"],
        c["qpos"],
        rope,
        c["scale"],
    )


def _decode_args(c: dict, rope: RopeParams | None) -> tuple:
    return (
        c["qd"],
        c["kb"],
        c["vb"],
        c["r2t"],
        c["r2p"],
        c["ll"],
        c["sp"],
        c["rows"],
        c["seqs"],
        rope,
        c["scale"],
    )


CASES = [
    # dtype, heads, kv_heads, head_dim, rotary_dim, neox
    (torch.float32, 4, 2, 16, 16, True),
    (torch.float32, 6, 2, 24, 16, False),  # group 3 (padded), partial rotary, interleaved
    (torch.float16, 8, 2, 32, 32, True),
    (torch.float16, 2, 2, 16, 8, False),  # MHA, partial rotary
]


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,rotary_dim,neox", CASES)
def test_triton_extend_matches_reference(dtype, heads, kv_heads, head_dim, rotary_dim, neox):
    c = _case(dtype, heads, kv_heads, head_dim, seed=heads * head_dim)
    rope = RopeParams.default(10000.0, head_dim, rotary_dim, neox)
    got = extend_attention(*_extend_args(c, rope), block_m=16, block_n=16)
    want = extend_attention_ref(*_extend_args(c, rope))
    torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,rotary_dim,neox", CASES)
def test_triton_decode_matches_reference(dtype, heads, kv_heads, head_dim, rotary_dim, neox):
    c = _case(dtype, heads, kv_heads, head_dim, seed=1 + heads * head_dim)
    # Decode rows must have permutation positions over the whole row: drop the chunked row's
    # extra layout (row 4 holds 30 laid-out entries but decodes at 18: make it 18 long).
    c["r2p"][4, :18] = torch.argsort(c["r2p"][4, :18]).int()
    c["ll"][4] = 18
    rope = RopeParams.default(1000000.0, head_dim, rotary_dim, neox)
    for splits in (1, 3):
        got = decode_attention(*_decode_args(c, rope), num_splits=splits, block_n=16)
        want = decode_attention_ref(*_decode_args(c, rope))
        torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))


def test_triton_rotation_compiled_out_matches_unrotated_reference():
    c = _case(torch.float32, 4, 2, 16, seed=3)
    rope = RopeParams.default(10000.0, 16)
    got = extend_attention(*_extend_args(c, rope), rotate=False, block_m=16, block_n=16)
    torch.testing.assert_close(
        got, extend_attention_ref(*_extend_args(c, None)), atol=2e-5, rtol=2e-5
    )
    got = decode_attention(*_decode_args(c, rope), rotate=False, num_splits=2, block_n=16)
    torch.testing.assert_close(
        got, decode_attention_ref(*_decode_args(c, None)), atol=2e-5, rtol=2e-5
    )


def test_triton_zero_deltas_equal_no_rotation():
    c = _case(torch.float32, 4, 2, 16, seed=4, max_delta=0)
    rope = RopeParams.default(10000.0, 16)
    rotated = extend_attention(*_extend_args(c, rope), block_m=16, block_n=16)
    plain = extend_attention(*_extend_args(c, rope), rotate=False, block_m=16, block_n=16)
    torch.testing.assert_close(rotated, plain, atol=1e-6, rtol=1e-6)


def test_triton_large_deltas_stay_accurate():
    """Deltas of tens of thousands of positions: the in-kernel angle reduction holds up."""
    c = _case(torch.float32, 4, 2, 16, seed=5, max_delta=60000)
    rope = RopeParams.default(10000.0, 16)
    got = decode_attention(*_decode_args(c, rope), num_splits=2, block_n=16)
    torch.testing.assert_close(
        got, decode_attention_ref(*_decode_args(c, rope)), atol=1e-4, rtol=1e-4
    )


def test_triton_extend_of_a_query_subset_equals_those_rows_of_the_full_extend():
    """pic's later layers run a subset of each row's extend tokens (CacheBlend): the kernel
    takes it as shorter extend lengths and the kept tokens' positions, and each kept query's
    output is the one it has in the full extend (the keys are the whole row either way)."""
    c = _case(torch.float32, 4, 2, 16, seed=7)
    rope = RopeParams.default(10000.0, 16, 16, True)
    full = extend_attention(*_extend_args(c, rope), block_m=16, block_n=16)
    keep = torch.tensor([0, 3, 4, 5, 9, 10, 18, 22, 24])  # rows: 5 -> 3, 14 -> 4, 6 -> 2
    sub = dict(c, q=c["q"][keep], qpos=c["qpos"][keep], exts=torch.tensor([3, 4, 2]))
    got = extend_attention(*_extend_args(sub, rope), block_m=16, block_n=16)
    torch.testing.assert_close(got, full[keep], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(
        got, extend_attention_ref(*_extend_args(sub, rope)), **_tol(torch.float32)
    )
