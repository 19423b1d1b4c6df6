"""Row layout planning (pure: a fake master node with known slots)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_tokendance.cache.row_plan import RowLayout, SharedUse, plan_row


def _node(tokens: list[int], first_slot: int) -> SimpleNamespace:
    n = len(tokens)
    return SimpleNamespace(
        token_ids=tuple(tokens), master_slots=torch.arange(first_slot, first_slot + n)
    )


def test_row_holds_cached_prefix_then_reused_masters_then_fresh_in_true_order() -> None:
    # true prompt: private 0..3 | shared A 4..7 | shared B 8..11 | suffix 12..13
    ids = list(range(100, 114))
    a = SharedUse("A", 4, 8, _node(ids[4:8], 500), torch.tensor([0]))
    b = SharedUse("B", 8, 12, _node(ids[8:12], 600), torch.tensor([0]))
    lay = RowLayout("r1", "ann", ids, 4, [a, b])
    plan = plan_row(lay, cached_len=2)
    assert plan.row_pos.tolist() == [0, 1, 5, 6, 7, 9, 10, 11, 2, 3, 4, 8, 12, 13]
    assert plan.reused_slots.tolist() == [501, 502, 503, 601, 602, 603]
    assert sorted(plan.row_pos.tolist()) == list(range(14))


def test_last_prompt_token_is_never_reused() -> None:
    ids = list(range(10))
    a = SharedUse("A", 6, 10, _node(ids[6:10], 50), torch.tensor([], dtype=torch.int64))
    plan = plan_row(RowLayout("r", "x", ids, 6, [a]), cached_len=6)
    assert plan.row_pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert plan.reused_slots.tolist() == [50, 51, 52]


def test_full_recompute_and_missing_master_give_true_order() -> None:
    ids = list(range(8))
    a = SharedUse("A", 2, 6, _node(ids[2:6], 10), torch.arange(4))
    b = SharedUse("B", 6, 8, None, None)
    plan = plan_row(RowLayout("r", "x", ids, 2, [a, b]), cached_len=0)
    assert plan.row_pos.tolist() == list(range(8))
    assert plan.reused_slots.numel() == 0


def test_cached_len_beyond_private_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the private prefix"):
        plan_row(RowLayout("r", "x", [1, 2, 3], 1, []), cached_len=2)
