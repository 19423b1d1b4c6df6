"""Hooks on the batch path: row layouts become positions the model sees.

- ``ScheduleBatch.prepare_for_extend`` (after): rows now exist; the tree cache records each
  laid-out row's true positions and its claims (:func:`cache.laid_out.on_rows_allocated`).
  Rows of master agents that carry deviation probes (``req.tokendance_probes``) are put on the
  probe board, which the attention backend fills at the check layer.
- ``ForwardBatch.init_new`` (after): extend tokens of laid-out rows take their positions from
  ``req_to_pos`` instead of ``prefix_len + arange``. Batches without laid-out rows are untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_tokendance.attention.deviation import get_probe_board
from sglang_tokendance.positions import get_position_table

PROBES_ATTR = "tokendance_probes"  # set by the collector (collector.PROBES_ATTR)


def register_probes(reqs: list[Any], req_to_token_pool: Any) -> None:
    """Put the probes of requests that have rows now on the board (idempotent per chunk)."""
    board = None
    for req in reqs:
        spans = getattr(req, PROBES_ATTR, None)
        row = req.kv.req_pool_idx
        if not spans or row is None:
            continue
        board = board or get_probe_board(req_to_token_pool)
        for key, start, end in spans:
            board.add(int(row), key, start, end)


def fix_extend_positions(forward_batch: Any, req_to_token_pool: Any) -> None:
    """Overwrite positions of laid-out rows' extend tokens in place."""
    table = getattr(req_to_token_pool, "_tokendance_positions", None)
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


def install_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    def after_prepare(result: Any, batch: Any, *args: Any, **kw: Any) -> None:
        cache = batch.tree_cache
        fn = getattr(cache, "on_rows_allocated", None)
        if fn is not None:
            fn(batch.reqs)
            register_probes(batch.reqs, batch.req_to_token_pool)

    def after_init_new(result: Any, cls: Any, batch: Any, model_runner: Any, *a: Any, **k: Any):
        fix_extend_positions(result, model_runner.req_to_token_pool)
        return result

    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend",
        after_prepare,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        after_init_new,
        HookType.AFTER,
    )


__all__ = ["fix_extend_positions", "get_position_table", "install_hooks", "torch"]
