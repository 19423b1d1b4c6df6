"""Shared decode (attention/shared_decode.py) against the float32 reference, on tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.decode_paths import RoundBatch, make_round
from sglang_tokendance.attention import shared_decode as sd
from sglang_tokendance.attention.reference import decode_attention_ref
from sglang_tokendance.attention.rope import RopeParams

H, HKV, D = 4, 2, 16
TOL = dict(atol=2e-5, rtol=2e-5)


def _round(rows: int, lens: list[int], seed: int = 0) -> RoundBatch:
    """Row 1 is the master agent, row 2 holds master 0 twice, every row has 2 mirror slots."""
    return make_round(rows, lens, HKV, D, mirrors=2, twice=2, seed=seed)


def _want(w: RoundBatch, q: torch.Tensor, rope: RopeParams, seq: list[int], scale: float):
    t = w.tables
    return decode_attention_ref(
        q, w.k, w.v, t.req_to_token, t.req_to_pos, t.layout_len, t.slot_pos, w.rows,
        torch.tensor(seq), rope, scale,
    )  # fmt: skip


@pytest.mark.parametrize("neox,rotary_dim", [(True, D), (False, D), (True, D // 2)])
@pytest.mark.parametrize("tile", [4, 32])
def test_shared_decode_matches_reference(
    neox: bool, rotary_dim: int, tile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sd, "TILE_KEY_COST", 0.0)  # tiles of 32 over masters of 7-20 keys
    rope = RopeParams.default(10000.0, D, rotary_dim, neox)
    w = _round(6, [9, 13, 7, 20])
    q = torch.randn(6, H, D, generator=torch.Generator().manual_seed(1))
    plan = sd.plan_shared(w.rows, w.seq_lens, w.tables, rope, headroom=8, tile=tile)
    assert plan is not None
    assert plan.shared_keys > 0.5 * sum(w.seq_lens)  # most keys are read once for the batch
    got = sd.shared_decode(q, w.k, w.v, plan, rope, 0.3)
    torch.testing.assert_close(got, _want(w, q, rope, w.seq_lens, 0.3), **TOL)


def test_every_key_is_counted_once() -> None:
    """Tile keys plus private keys of each row are exactly the row's entries."""
    rope = RopeParams.default(10000.0, D)
    w = _round(5, [6, 11, 8], seed=1)
    plan = sd.plan_shared(w.rows, w.seq_lens, w.tables, rope, tile=4)
    assert plan is not None
    per_row = plan.mask.sum(1) + torch.tensor(plan.private.seq_lens)
    assert per_row.tolist() == w.seq_lens
    # row 2 holds master 0 (6 keys) twice: one occurrence is private (a tile has one delta
    # per row), less the at most 2 of its entries the row's mirror slots replaced
    assert plan.private.seq_lens[1] >= (5 + 3 * 2) + 2 + 4 + (6 - 2)  # prefix, mirrors, tail


def test_decode_steps_append_to_the_private_keys() -> None:
    rope = RopeParams.default(10000.0, D, D, False)
    w = _round(4, [10, 10, 10], seed=2)
    plan = sd.plan_shared(w.rows, w.seq_lens, w.tables, rope, headroom=8, tile=8)
    assert plan is not None
    new = torch.arange(int(w.k.shape[0]) - 4, int(w.k.shape[0]))  # unused slots: the new tokens
    for i, (r, n) in enumerate(zip(w.rows.tolist(), w.seq_lens, strict=True)):
        w.tables.req_to_token[r, n] = int(new[i])
        w.tables.slot_pos[new[i]] = n
    plan = sd.append_step(plan, new)
    assert plan is not None
    seq = [n + 1 for n in w.seq_lens]
    assert plan.seq_lens == seq
    q = torch.randn(4, H, D, generator=torch.Generator().manual_seed(2))
    got = sd.shared_decode(q, w.k, w.v, plan, rope, 0.25)
    torch.testing.assert_close(got, _want(w, q, rope, seq, 0.25), **TOL)


def test_mirror_slots_do_not_cut_a_master_into_more_tiles() -> None:
    """Every row (the master agent too) replaced 3 master keys by its own mirror slots: the
    masters still make ceil(40 / 32) + ceil(70 / 32) = 5 tiles, each key a row still holds is
    read from a tile, and the result is the reference's."""
    rope = RopeParams.default(10000.0, D)
    w = make_round(8, [40, 70], HKV, D, mirrors=3, seed=3)
    plan = sd.plan_shared(w.rows, w.seq_lens, w.tables, rope, tile=32)
    assert plan is not None
    assert plan.tiles == 5
    assert plan.shared_keys == 8 * (40 + 70 - 3)
    q = torch.randn(8, H, D, generator=torch.Generator().manual_seed(3))
    got = sd.shared_decode(q, w.k, w.v, plan, rope, 0.3)
    torch.testing.assert_close(got, _want(w, q, rope, w.seq_lens, 0.3), **TOL)


def test_a_batch_without_sharing_keeps_the_row_path() -> None:
    rope = RopeParams.default(10000.0, D)
    w = _round(1, [8, 8])
    assert sd.plan_shared(w.rows, w.seq_lens, w.tables, rope) is None


def test_decode_paths_benchmark_writes_both_paths_and_their_difference(tmp_path: Path) -> None:
    import json

    from benchmarks import decode_paths

    out = tmp_path / "d.json"
    argv = ["--rows", "6", "--masters", "5", "--master-len", "30", "--prefix", "10"]
    argv += ["--warmup", "1", "--repeats", "2", "--rounds", "2", "--out", str(out)]
    assert decode_paths.main(argv) == 0
    doc = json.loads(out.read_text())
    assert len(doc["per_layer_ms"]) == 2 and doc["per_layer_ms"][0]["shared_ms"] > 0
    assert doc["max_abs_diff"] < 1e-4  # the same attention on both paths
    assert 0.5 < doc["shared_share"] <= 1.0
