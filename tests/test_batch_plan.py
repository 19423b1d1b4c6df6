"""The batched torch path (attention/batch_plan.py, batch_exec.py) against the float32
reference, on tensors."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from sglang_tokendance.attention import batch_exec as bx
from sglang_tokendance.attention import batch_plan as bp
from sglang_tokendance.attention.reference import (
    decode_attention_ref,
    extend_attention_ref,
)
from sglang_tokendance.attention.rope import RopeParams

H, HKV, D, SLOTS, ROWS, CTX = 4, 2, 16, 400, 6, 64
TOL = dict(atol=2e-5, rtol=2e-5)


class World:
    """KV buffers and position tables: row 1 is an ordinary row; rows 2-4 are laid out over a
    master written at shifted positions (rows 2-3: most keys moved; row 4: a few)."""

    def __init__(self, rope: RopeParams) -> None:
        g = torch.Generator().manual_seed(3)
        self.rope = rope
        self.k = torch.randn(SLOTS, HKV, D, generator=g)
        self.v = torch.randn(SLOTS, HKV, D, generator=g)
        self.r2t = torch.zeros(ROWS, CTX, dtype=torch.int32)
        self.r2p = torch.zeros(ROWS, CTX, dtype=torch.int32)
        self.ll = torch.zeros(ROWS, dtype=torch.int32)
        self.spos = torch.randint(0, 300, (SLOTS,), generator=g, dtype=torch.int32)
        self.r2t[1, :40] = torch.arange(1, 41, dtype=torch.int32)
        self.spos[1:41] = torch.arange(40, dtype=torch.int32)  # ordinary: written in place
        for row, n, shifted in ((2, 30, 24), (3, 37, 30), (4, 33, 3)):
            slots = torch.randperm(300, generator=g)[:n] + 50
            self.r2t[row, :n] = slots.int()
            perm = torch.randperm(n, generator=g)
            self.r2p[row, :n] = perm.int()
            self.ll[row] = n
            self.spos[slots] = perm.int()  # fresh keys: written at their true positions
            self.spos[slots[:shifted]] += 1000  # master keys: written elsewhere
        self.tables = bp.Tables(self.r2t, self.r2p, self.ll, self.spos)


@pytest.mark.parametrize("neox,rotary_dim", [(True, D), (False, D), (True, D // 2)])
@pytest.mark.parametrize("block_bytes", [1, 1 << 30])  # a block per row / one block
def test_decode_batch_matches_reference(
    neox: bool, rotary_dim: int, block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bx, "BLOCK_BYTES", block_bytes)
    rope = RopeParams.default(10000.0, D, rotary_dim, neox)
    w = World(rope)
    rows, seq = torch.tensor([1, 2, 3, 4]), [40, 30, 37, 33]
    q = torch.randn(4, H, D, generator=torch.Generator().manual_seed(5))
    want = decode_attention_ref(
        q, w.k, w.v, w.r2t, w.r2p, w.ll, w.spos, rows, torch.tensor(seq), rope, 0.3
    )
    plan = bp.plan_batch(rows, seq, w.tables, rope, headroom=8, sort=True)
    assert plan.order.tolist() == [1, 3, 2, 0]  # by length: 30, 33, 37, 40
    assert plan.moves == [True, True, True, False] and plan.rot is not None
    ws = bx.Workspace()
    for _ in range(2):  # the second call reuses the workspace
        torch.testing.assert_close(bx.decode_batch(q, w.k, w.v, plan, rope, 0.3, ws), want, **TOL)
    still = bp.plan_batch(rows[:1], [40], w.tables, rope)
    assert still.rot is None and still.moves == [False]
    torch.testing.assert_close(bx.decode_batch(q[:1], w.k, w.v, still, rope, 0.3), want[:1], **TOL)


def test_appended_plan_equals_a_rebuilt_one_and_stops_at_its_width() -> None:
    rope = RopeParams.default(10000.0, D)
    w = World(rope)
    rows, seq = torch.tensor([2, 3]), [30, 37]
    plan = bp.plan_batch(rows, seq, w.tables, rope, headroom=2)
    for step in range(2):
        new = torch.tensor([350 + step, 360 + step])
        w.r2t[2, 30 + step], w.r2t[3, 37 + step] = new[0], new[1]
        w.spos[new] = torch.tensor([30 + step, 37 + step], dtype=torch.int32)
        plan = bp.append_decode(plan, new)
        rebuilt = bp.plan_batch(rows, plan.seq_lens, w.tables, rope)
        width = rebuilt.width
        assert torch.equal(plan.slots[:, :width], rebuilt.slots)
        assert torch.equal(plan.key_pos[:, :width], rebuilt.key_pos)
        assert torch.equal(plan.valid[:, :width], rebuilt.valid)
    assert plan.seq_lens == [32, 39]
    full = plan._replace(seq_lens=[plan.width, plan.width])
    assert bp.append_decode(full, torch.tensor([370, 371])) is None  # past the width: rebuild


class ExtendCase(NamedTuple):
    """A whole prompt (row 1) beside two short extends of laid-out rows (2, 4), and the
    reference output."""

    w: World
    rope: RopeParams
    rows: torch.Tensor
    seq: list[int]
    ext: list[int]
    qpos: torch.Tensor
    q: torch.Tensor
    want: torch.Tensor


def _extend_case() -> ExtendCase:
    rope = RopeParams.default(10000.0, D)
    w = World(rope)
    rows = torch.tensor([1, 2, 4])
    seq, ext = [40, 30, 33], [40, 5, 11]
    qpos = torch.cat([torch.arange(40), w.r2p[2, 25:30].long(), w.r2p[4, 22:33].long()])
    q = torch.randn(sum(ext), H, D, generator=torch.Generator().manual_seed(9))
    want = extend_attention_ref(
        q, w.k, w.v, w.r2t, w.r2p, w.ll, w.spos, rows, torch.tensor(seq), torch.tensor(ext),
        qpos, rope, 0.3,
    )  # fmt: skip
    return ExtendCase(w, rope, rows, seq, ext, qpos, q, want)


def test_extend_rows_match_reference_for_rows_of_different_lengths() -> None:
    c = _extend_case()
    keys = bp.plan_batch(c.rows, c.seq, c.w.tables, c.rope)
    out = torch.empty_like(c.q)
    bx.extend_rows(c.q, out, c.w.k, c.w.v, keys, c.ext, c.qpos, c.rope, 0.3)
    torch.testing.assert_close(out, c.want, **TOL)


def test_a_decode_row_gets_the_same_bits_alone_or_batched() -> None:
    """A row alone and the same row batched: on one thread CPU SDPA gives the same bits; with
    more, torch's CPU flash kernel splits its work by the batch's shape (torch 2.13, AVX-512:
    differences of ~1e-7), which is float rounding. (Masked padding adds exact zeros, so this
    cannot tell how rows are padded: the next test checks that.)"""
    rope = RopeParams.default(10000.0, D)
    w = World(rope)
    q = torch.randn(4, H, D, generator=torch.Generator().manual_seed(6))
    rows, seq = torch.tensor([1, 2, 3, 4]), [40, 30, 37, 33]

    def both() -> list[tuple[torch.Tensor, torch.Tensor]]:
        plan = bp.plan_batch(rows, seq, w.tables, rope, 64, sort=True)
        batched = bx.decode_batch(q, w.k, w.v, plan, rope, 0.3)
        out = []
        for i in range(4):
            alone = bp.plan_batch(rows[i : i + 1], seq[i : i + 1], w.tables, rope, 64, sort=True)
            out.append((bx.decode_batch(q[i : i + 1], w.k, w.v, alone, rope, 0.3)[0], batched[i]))
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert all(torch.equal(a, b) for a, b in both())
    finally:
        torch.set_num_threads(threads)
    for a, b in both():
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_decode_pads_each_row_to_its_own_bucket_not_the_batchs_longest() -> None:
    rope = RopeParams.default(10000.0, D)
    w = World(rope)
    wide = 320  # room for a 200-key row beside the 30-40-key ones

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(x.shape[0], wide - x.shape[1])], 1)

    r2t = pad(w.r2t)
    r2t[5, :200] = torch.arange(1, 201, dtype=torch.int32)
    tables = bp.Tables(r2t, pad(w.r2p), w.ll, w.spos)
    plan = bp.plan_batch(torch.tensor([1, 2, 5]), [40, 30, 200], tables, rope, 64, sort=True)
    assert plan.width == wide and plan.seq_lens == [30, 40, 200]
    assert bx.decode_groups(plan, w.k) == [(0, 2, 128), (2, 3, 256)]


def test_position_sorted_extend_attends_fewer_keys_and_matches_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A by-position plan cuts each row's queries into blocks that attend a prefix of the
    row's position-sorted keys; queries out of position order (row 2) are still exact."""
    monkeypatch.setattr(bx, "QUERY_BLOCKS", 3)
    monkeypatch.setattr(bx, "MIN_BLOCK_QUERIES", 4)
    c = _extend_case()
    keys = bp.plan_batch(c.rows, c.seq, c.w.tables, c.rope, by_position=True)
    for b, n in enumerate(c.seq):  # a row's positions are a permutation: sorted, 0..n-1
        assert keys.key_pos[b, :n].tolist() == list(range(n))
    blocks = bx.extend_blocks(keys, c.ext, c.qpos)
    assert blocks[0] == [(0, 13, 13), (13, 26, 26), (26, 40, 40)]  # causal: about half
    tops = [int(c.qpos[40:45].max()) + 1, int(c.qpos[45:50].max()) + 1]
    assert blocks[1] == [(0, 5, tops[0])]  # 5 queries: one block
    assert blocks[2][0] == (0, 5, tops[1]) and len(blocks[2]) == 2
    out = torch.empty_like(c.q)
    bx.extend_rows(c.q, out, c.w.k, c.w.v, keys, c.ext, c.qpos, c.rope, 0.3, blocks=blocks)
    torch.testing.assert_close(out, c.want, **TOL)
