"""Hooks on the batch path: row layouts become positions the model sees.

- ``ScheduleBatch.prepare_for_extend`` (after): rows now exist; the tree cache records each
  laid-out row's true positions and its claims (:func:`cache.row_admission.on_rows_allocated`).
  Rows of master agents that carry deviation probes (``RequestState.probes``) are put on the
  probe board, which the attention backend fills at the check layer.
- ``ForwardBatch.init_new`` (after): extend tokens of laid-out rows take their positions from
  ``req_to_pos`` instead of ``prefix_len + arange``. Batches without laid-out rows are untouched.
  The first one also binds the mirror judge (``--tokendance-mirror threshold``) to the model
  runner's KV pool and RoPE.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_tokendance.attention.deviation import get_probe_board
from sglang_tokendance.attention.hooks import begin_forward
from sglang_tokendance.attention.mirror_deviation import bind_judge
from sglang_tokendance.state import pool_state, state_of


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
    bind_judge(model_runner)
    return result
