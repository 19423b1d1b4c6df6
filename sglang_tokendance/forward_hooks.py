"""Hooks on the batch path: row layouts become positions the model sees.

- ``ScheduleBatch.prepare_for_extend`` (after): rows now exist; the tree cache records each
  laid-out row's true positions and its claims (:func:`cache.row_admission.on_rows_allocated`).
  Rows of master agents that carry deviation probes (``RequestState.probes``) are put on the
  probe board, which the attention backend fills at the check layer.
- ``ForwardBatch.init_new`` (after): extend tokens of laid-out rows take their positions from
  ``req_to_pos`` instead of ``prefix_len + arange``. Batches without laid-out rows are untouched.
  The first one also binds the mirror judge (``--tokendance-mirror threshold``) to the model
  runner's KV pool and RoPE. A batch holding pic rows gets its CacheBlend plan
  (:func:`plan_blend`, read by :mod:`.attention.blend_loop`).
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_tokendance.attention.blend import build_plan
from sglang_tokendance.attention.deviation import get_probe_board
from sglang_tokendance.attention.hooks import begin_forward
from sglang_tokendance.attention.mirror_deviation import bind_judge
from sglang_tokendance.state import layout_of, pool_state, state_of


def register_probes(reqs: list[Any], req_to_token_pool: Any) -> None:
    """Put the probes of requests that have rows now on the board (idempotent per chunk)."""
    board = None
    for req in reqs:
        st = state_of(req)
        spans = st.probes if st is not None else None
        row = req.kv.req_pool_idx
        if not spans or row is None:
            continue
        board = board or get_probe_board(req_to_token_pool)
        for key, start, end in spans:
            board.add(int(row), key, start, end)


def fix_extend_positions(forward_batch: Any, req_to_token_pool: Any) -> None:
    """Overwrite positions of laid-out rows' extend tokens in place (vectorized).

    SGLang gave extend token ``i`` of a row the position ``j = prefix_len + i``, its row index;
    inside a row's layout the true position is ``req_to_pos[row, j]`` instead.
    """
    table = pool_state(req_to_token_pool).positions
    fb = forward_batch
    if table is None or not table.laid_out_rows or fb.positions is None:
        return
    if not fb.forward_mode.is_extend() or fb.extend_seq_lens is None:
        return
    idx = fb.req_pool_indices_cpu
    rows = (fb.req_pool_indices if idx is None else idx).tolist()
    if table.laid_out_rows.isdisjoint(rows):
        return
    row_of = torch.repeat_interleave(fb.req_pool_indices.long(), fb.extend_seq_lens.long())
    j = fb.positions.long()
    inside = j < table.layout_len[row_of].long()
    true = table.req_to_pos[row_of, j.clamp(max=table.req_to_pos.shape[1] - 1)].long()
    fb.positions.copy_(torch.where(inside, true, j).to(fb.positions.dtype))


def plan_blend(forward_batch: Any, batch: Any, req_to_token_pool: Any) -> None:
    """Give the forward's TaggedAttention the CacheBlend plan of its pic rows (if any).

    A pic row is in true order, so extend token ``i`` of request ``b`` sits at row index and
    true position ``prefix_lens[b] + i``; its seed source is ``blend_src`` there. Decode tails
    of a mixed batch lie past the prompt (no source). Logprob batches run without the subset
    (the input logprobs need every token's hidden state).
    """
    fb = forward_batch
    ta = pool_state(req_to_token_pool).attention
    if ta is None or not ta.active or not fb.forward_mode.is_extend() or fb.return_logprob:
        return
    reqs = getattr(batch, "reqs", None) or []
    lays = [layout_of(r) for r in reqs]
    if not any(lay is not None and lay.blend_src is not None for lay in lays):
        return
    ext = host_ints(fb.extend_seq_lens_cpu, fb.extend_seq_lens)
    pre = list(batch.prefix_lens)
    srcs: list[torch.Tensor | None] = []
    for lay, p, e in zip(lays, pre, ext, strict=True):  # once per forward, per request
        if lay is None or lay.blend_src is None:
            srcs.append(None)
            continue
        s = lay.blend_src[p : p + e]
        srcs.append(torch.cat([s, s.new_full((e - s.numel(),), -1)]) if s.numel() < e else s)
    rids = [str(r.rid) for r in reqs]
    ta.blend = build_plan(srcs, ext, rids, ta.ratio, ta.probes.check_layer, fb.positions.device)


def host_ints(cpu: Any, dev: torch.Tensor | None) -> list[int]:
    """Per-request integers on the host, preferring SGLang's CPU copy."""
    src = cpu if cpu is not None else dev
    return [int(x) for x in (src.tolist() if isinstance(src, torch.Tensor) else src)]


def after_prepare(result: Any, batch: Any, *args: Any, **kw: Any) -> None:
    """``ScheduleBatch.prepare_for_extend`` (after): rows exist; record layouts and probes."""
    fn = getattr(batch.tree_cache, "on_rows_allocated", None)
    if fn is not None:
        fn(batch.reqs)
        register_probes(batch.reqs, batch.req_to_token_pool)


def after_init_new(result: Any, cls: Any, batch: Any, model_runner: Any, *a: Any, **k: Any) -> Any:
    """``ForwardBatch.init_new`` (after): extend positions of laid-out rows, then the forward's
    attention path (its KV writes tagged with those positions)."""
    fix_extend_positions(result, model_runner.req_to_token_pool)
    begin_forward(result, model_runner)
    plan_blend(result, batch, model_runner.req_to_token_pool)
    bind_judge(model_runner)
    return result
