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

from sglang_tokendance.attention.deviation import get_probe_board
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
    """Overwrite positions of laid-out rows' extend tokens in place."""
    table = pool_state(req_to_token_pool).positions
    if table is None or not table.laid_out_rows or forward_batch.positions is None:
        return
    if not forward_batch.forward_mode.is_extend():
        return
    rows = forward_batch.req_pool_indices.tolist()
    prefix = forward_batch.extend_prefix_lens_cpu
    lens = forward_batch.extend_seq_lens_cpu
    if prefix is None or lens is None:
        return
    start = 0
    for i, row in enumerate(rows):
        n = int(lens[i])
        if table.has_layout(row):
            p = int(prefix[i])
            pos = table.row_positions(row, p + n)[p:]
            forward_batch.positions[start : start + n] = pos.to(forward_batch.positions.dtype)
        start += n


def after_prepare(result: Any, batch: Any, *args: Any, **kw: Any) -> None:
    """``ScheduleBatch.prepare_for_extend`` (after): rows exist; record layouts and probes."""
    fn = getattr(batch.tree_cache, "on_rows_allocated", None)
    if fn is not None:
        fn(batch.reqs)
        register_probes(batch.reqs, batch.req_to_token_pool)


def after_init_new(result: Any, cls: Any, batch: Any, model_runner: Any, *a: Any, **k: Any) -> Any:
    """``ForwardBatch.init_new`` (after): extend positions of laid-out rows."""
    fix_extend_positions(result, model_runner.req_to_token_pool)
    bind_judge(model_runner)
    return result
