"""Recompute-set selection, deviation scoring and the authored-master index (pure, CPU)."""

from __future__ import annotations

import pytest
import torch

from sglang_tokendance.attention.deviation import (
    ProbeBoard,
    context_deviation,
    segment_deviation,
)
from sglang_tokendance.cache.authored import AuthoredIndex
from sglang_tokendance.cache.nodes import AllGatherNode, token_hash
from sglang_tokendance.selection import select_recompute


def test_leading_takes_the_first_ceil_ratio_tokens() -> None:
    assert select_recompute(10, 0.25, "leading").tolist() == [0, 1, 2]
    assert select_recompute(4, 0.0, "leading").numel() == 0


def test_deviation_takes_the_highest_scores_sorted() -> None:
    scores = torch.tensor([0.1, 0.9, 0.0, 0.5, 0.8, 0.2, 0.3, 0.0, 0.7, 0.05])
    assert select_recompute(10, 0.3, "deviation", scores).tolist() == [1, 4, 8]


def test_both_keeps_the_leading_half_then_deviation() -> None:
    scores = torch.tensor([0.0, 0.0, 0.0, 0.9, 0.0, 0.8, 0.0, 0.0, 0.7, 0.0])
    # k = 4: leading ceil(4/2) = 2 (0, 1), then the two highest of the rest (3, 5)
    assert select_recompute(10, 0.4, "both", scores).tolist() == [0, 1, 3, 5]


def test_deviation_without_scores_falls_back_to_leading() -> None:
    assert select_recompute(8, 0.25, "deviation", None).tolist() == [0, 1]


def test_selection_rejects_unknown_policies_and_wrong_lengths() -> None:
    with pytest.raises(ValueError, match="unknown recompute selection"):
        select_recompute(8, 0.5, "random")
    with pytest.raises(ValueError, match="deviation scores have 3 entries"):
        select_recompute(8, 0.5, "deviation", torch.zeros(3))


def test_context_deviation_is_zero_without_context_and_positive_with_it() -> None:
    g = torch.Generator().manual_seed(0)
    n_ctx, n_seg, heads, dim = 5, 4, 2, 8
    k = torch.randn(n_ctx + n_seg, heads, dim, generator=g)
    v = torch.randn(n_ctx + n_seg, heads, dim, generator=g)
    q = torch.randn(n_seg, heads, dim, generator=g)
    key_pos = torch.arange(n_ctx + n_seg)
    qpos = torch.arange(n_ctx, n_ctx + n_seg)
    dev = context_deviation(q, k, v, qpos, key_pos, n_ctx, None)
    assert dev.shape == (n_seg,) and bool((dev > 0).all())
    # a segment at position 0 has no context: full == segment-only attention
    dev0 = context_deviation(q, k[:n_seg], v[:n_seg], torch.arange(n_seg), key_pos[:n_seg], 0, None)
    assert torch.allclose(dev0, torch.zeros(n_seg), atol=1e-6)


def test_segment_deviation_equals_the_reference_for_every_segment_of_a_row_at_once() -> None:
    """The batched probe (full-context output from the forward, segment-only attention for
    all segments in one call) against :func:`context_deviation`, one segment at a time; keys
    in a shuffled order (a laid-out row) and grouped heads (4 query heads, 2 KV heads)."""
    g = torch.Generator().manual_seed(1)
    n, heads, kv_heads, dim = 24, 4, 2, 8
    perm = torch.randperm(n, generator=g)
    key_pos = torch.arange(n)[perm]
    k, v = torch.randn(n, kv_heads, dim, generator=g), torch.randn(n, kv_heads, dim, generator=g)
    segs = [(3, 7), (7, 12), (15, 18)]
    qpos = torch.tensor([20, *range(3, 12), 13, *range(15, 18)])  # and two outside any span
    q = torch.randn(len(qpos), heads, dim, generator=g)
    # the forward's own output: each query over every key at positions <= its own
    mask = key_pos.view(1, -1) <= qpos.view(-1, 1)
    o_full = torch.nn.functional.scaled_dot_product_attention(
        q.movedim(0, 1).unsqueeze(0), k.movedim(0, 1).unsqueeze(0), v.movedim(0, 1).unsqueeze(0),
        attn_mask=mask, enable_gqa=True,
    ).squeeze(0).movedim(1, 0)  # fmt: skip
    bounds = torch.tensor(segs)
    dev, which = segment_deviation(q, o_full, k, v, qpos, key_pos, bounds, None)
    assert which.tolist() == [*range(1, 10), *range(11, 14)]
    expected = []
    for a, b in segs:
        sel = torch.nonzero((qpos >= a) & (qpos < b)).flatten()
        expected.append(context_deviation(q[sel], k, v, qpos[sel], key_pos, a, None))
    assert torch.allclose(dev, torch.cat(expected), atol=1e-5)
    assert bool((dev[1:4] > 0).all())  # the first segment's later tokens had context before it


def test_probe_board_fills_and_pops_per_row() -> None:
    board = ProbeBoard()
    board.add(3, "s", 10, 14)
    board.add(3, "s", 10, 14)  # idempotent (chunked prefill re-registers)
    probe = board.rows[3]["s"]
    assert not probe.complete
    probe.scores[:] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert probe.complete
    assert board.pop(3)["s"] is probe and board.pop(3) == {}
    with pytest.raises(ValueError, match="empty probe span"):
        board.add(1, "t", 5, 5)


def _node(tokens: tuple[int, ...], node_id: int = 1) -> AllGatherNode:
    n = len(tokens)
    slots = torch.arange(1, n + 1, dtype=torch.int64)
    return AllGatherNode(node_id, tokens, token_hash(tokens), slots, torch.arange(n).int())


def test_authored_index_finds_an_output_inside_a_wrapped_segment() -> None:
    index = AuthoredIndex()
    out = (500, 501, 502, 503, 504, 505)
    index.add(_node(out))
    segment = [7, 8, 9, *out, 10]  # "Name: " + output + "\n"
    hit = index.find(segment)
    assert hit is not None and (hit.node_offset, hit.seg_offset, hit.length) == (0, 3, 6)


def test_authored_index_trims_retokenized_ends_and_skips_evicted() -> None:
    index = AuthoredIndex()
    node = _node((499, 500, 501, 502, 503, 504, 598))
    index.add(node)
    segment = [7, 8, 1499, 500, 501, 502, 503, 504, 1598]  # both ends merged differently
    hit = index.find(segment)
    assert hit is not None and (hit.node_offset, hit.seg_offset, hit.length) == (1, 3, 5)
    node.evicted = True
    assert index.find(segment) is None and len(index) == 0


def test_authored_index_reuses_the_longest_run_around_a_token_reencoded_mid_span() -> None:
    """A byte-level token that is not UTF-8 alone decodes to U+FFFD and re-encodes as three
    other tokens: the output's longer side of it is still found (the shorter side goes fresh)."""
    index = AuthoredIndex()
    out = (534, 838, 918, 1336, 154, 612, 830, 324, 977, 300)  # 154: a lone byte
    index.add(_node(out))
    segment = [7, 8, 534, 838, 918, 1336, 176, 128, 126, 612, 830, 324, 977, 300, 10]
    hit = index.find(segment)
    assert hit is not None and (hit.node_offset, hit.seg_offset, hit.length) == (5, 9, 5)
    # the run must still be at least half of the output: 4 of 10 is not
    assert index.find([7, 534, 838, 918, 1336, 176, 128, 126, 10]) is None


def test_authored_index_needs_most_of_the_output() -> None:
    index = AuthoredIndex()
    index.add(_node(tuple(range(600, 620))))
    assert index.find([1, 2, 600, 601, 602, 603, 604, 3]) is None  # 5 of 20 tokens
    assert index.find([600, 601, 602]) is None  # shorter than the minimum
