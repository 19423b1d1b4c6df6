"""pic = CacheBlend: the selection and subset math of :mod:`sglang_tokendance.attention.blend`
on tiny tensors (no server)."""

from __future__ import annotations

import torch

from sglang_tokendance.attention.blend import (
    build_plan,
    kept_tokens,
    key_deviation,
    record_picks,
    select_per_request,
)


def test_select_per_request_takes_each_requests_own_top_deviations() -> None:
    req_of = torch.tensor([0, 0, 0, 1, 1])
    dev = torch.tensor([1.0, 5.0, 3.0, 2.0, 7.0])
    quota = torch.tensor([2, 1])
    chosen = select_per_request(dev, req_of, quota)
    assert chosen.tolist() == [False, True, True, False, True]


def test_select_per_request_breaks_ties_towards_the_earlier_token_and_honours_zero_quota() -> None:
    req_of = torch.tensor([0, 0, 0, 1, 1, 1])
    dev = torch.tensor([2.0, 2.0, 2.0, 9.0, 9.0, 1.0])
    chosen = select_per_request(dev, req_of, torch.tensor([1, 0]))
    assert chosen.tolist() == [True, False, False, False, False, False]
    assert select_per_request(dev[:0], req_of[:0], torch.tensor([0])).numel() == 0


def test_key_deviation_is_the_squared_distance_over_heads_and_dims() -> None:
    fresh = torch.zeros(2, 2, 3)
    seed = torch.zeros(2, 2, 3)
    seed[1, 0, 0], seed[1, 1, 2] = 1.0, 2.0
    assert key_deviation(fresh, seed).tolist() == [0.0, 5.0]


def test_plan_and_kept_tokens_subset_per_request_and_keep_every_last_token() -> None:
    # request 0: 5 extend tokens, tokens 1..3 reused (sources 40..42); request 1: not pic (2
    # tokens); request 2: 4 tokens, all but its last reused (sources 50..52)
    srcs = [
        torch.tensor([-1, 40, 41, 42, -1]),
        None,
        torch.tensor([50, 51, 52, -1]),
    ]
    plan = build_plan(srcs, [5, 2, 4], ["a", "b", "c"], 0.5, 1, "cpu")
    assert plan is not None
    assert plan.tok.tolist() == [1, 2, 3, 7, 8, 9]
    assert plan.src.tolist() == [40, 41, 42, 50, 51, 52]
    assert plan.req_of.tolist() == [0, 0, 0, 2, 2, 2]
    assert plan.quota.tolist() == [2, 0, 2]  # ceil(0.5 * 3)
    dev = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8])
    chosen = select_per_request(dev, plan.req_of, plan.quota)
    assert chosen.tolist() == [False, True, True, True, False, True]
    nar = kept_tokens(plan, chosen, 11)
    #  flat: 0 1 2 3 4 | 5 6 | 7 8 9 10 ; dropped: 1 (req 0) and 8 (req 2)
    assert nar.keep.tolist() == [0, 2, 3, 4, 5, 6, 7, 9, 10]
    assert nar.ext_lens == [4, 2, 3] and not nar.all_kept
    positions = torch.tensor([10, 11, 12, 13, 14, 3, 4, 20, 21, 22, 23])
    record_picks(plan, chosen, positions)
    assert {k: v.tolist() for k, v in plan.picks.items()} == {"a": [12, 13], "c": [20, 22]}


def test_a_last_token_that_is_reused_and_unchosen_is_still_kept() -> None:
    plan = build_plan([torch.tensor([-1, 7, 8])], [3], ["a"], 0.0, 1, "cpu")
    assert plan is not None and plan.quota.tolist() == [0]
    nar = kept_tokens(plan, select_per_request(torch.ones(2), plan.req_of, plan.quota), 3)
    assert nar.keep.tolist() == [0, 2] and nar.ext_lens == [2]


def test_no_reused_token_gives_no_plan() -> None:
    assert build_plan([torch.tensor([-1, -1]), None], [2, 1], ["a", "b"], 0.15, 1, "cpu") is None


def test_torch_path_extend_of_a_query_subset_equals_those_rows_of_the_full_extend() -> None:
    """The torch tagged path after the check layer: the same key plan, fewer queries."""
    from test_attention_triton import _case

    from sglang_tokendance.attention import batch_exec as bx
    from sglang_tokendance.attention import batch_plan as bp
    from sglang_tokendance.attention.rope import RopeParams

    c = _case(torch.float32, 4, 2, 16, seed=11)
    rope = RopeParams.default(10000.0, 16, 16, True)
    plan = bp.plan_batch(
        c["rows"], c["seqs"].tolist(), bp.Tables(c["r2t"], c["r2p"], c["ll"], c["sp"]), rope
    )
    full = torch.empty(c["q"].shape[0], 4, 16)
    bx.extend_rows(c["q"], full, c["kb"], c["vb"], plan, c["exts"].tolist(), c["qpos"], rope,
                   c["scale"])  # fmt: skip
    keep = torch.tensor([1, 4, 5, 6, 12, 18, 19, 24])  # rows: 5 -> 2, 14 -> 4, 6 -> 2
    sub = torch.empty(keep.numel(), 4, 16)
    bx.extend_rows(c["q"][keep], sub, c["kb"], c["vb"], plan, [2, 4, 2], c["qpos"][keep], rope,
                   c["scale"])  # fmt: skip
    torch.testing.assert_close(sub, full[keep], atol=1e-6, rtol=1e-6)
