"""``TokenDanceAttnBackend``: SGLang's torch_native backend with position-tagged KV.

Per forward (``init_forward_metadata``) it records the position every written slot was rotated
at (``slot_pos[out_cache_loc] = positions``). Per layer:

- no row of the batch has a layout -> exactly TorchNativeAttnBackend's code (bit-identical);
- otherwise, per request: rows with a layout gather their keys through ``req_to_token``, rotate
  each by ``key_pos - slot_pos[slot]`` and mask by position (see ``torch_path.attend_sdpa``);
  rows without a layout run torch_native's own per-request code, so a plain request's output
  does not depend on what it is batched with.

Register it with :func:`register_backend` (name ``"tokendance"``, ``--attention-backend
tokendance``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_tokendance.attention.deviation import context_deviation, get_probe_board
from sglang_tokendance.attention.rope import RopeParams, rope_params_from_model
from sglang_tokendance.attention.torch_path import RowKeys, attend_sdpa, gather_keys, plan_row
from sglang_tokendance.positions import PositionTable, get_position_table

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

BACKEND_NAME = "tokendance"


class TokenDanceAttnBackend(TorchNativeAttnBackend):
    """torch_native + rotation by position delta + position mask for laid-out rows."""

    def __init__(self, model_runner: Any) -> None:
        """Args:
            model_runner: SGLang's ModelRunner (pools, device, and the loaded model).

        Raises:
            ValueError: if the model's RoPE cannot be moved by a delta (names the model).
        """
        super().__init__(model_runner)
        self.model_runner = model_runner
        self.table: PositionTable = get_position_table(
            model_runner.req_to_token_pool, model_runner.token_to_kv_pool
        )
        self._rope: RopeParams | None = None
        if getattr(model_runner, "model", None) is not None:
            self._rope = rope_params_from_model(model_runner.model).to(self.device)
        # Per forward, not per layer: the batch's rows (None: fast path) and each laid-out
        # row's key plan, keyed by the ForwardBatch object they were computed for.
        self._rows_for: tuple[Any, list[int] | None] = (None, None)
        self._plans: dict[int, RowKeys] = {}
        # --tokendance-uniform-attention: every row takes the position-aware path, so a
        # benchmark compares modes on one attention code path (off by default: plain rows keep
        # torch_native's code and bit-identical outputs).
        from sglang_tokendance.config import get_config

        server_args = getattr(model_runner, "server_args", None)
        cfg = get_config(server_args) if server_args is not None else None
        self.uniform = bool(cfg is not None and cfg.uniform_attention)
        # Deviation probes (selection "deviation"/"both"): scored at the check layer, clamped
        # to the model's last layer.
        self.probes = get_probe_board(model_runner.req_to_token_pool)
        layers = getattr(getattr(model_runner, "model_config", None), "num_hidden_layers", None)
        check = cfg.check_layer if cfg is not None else 1
        self.probes.check_layer = min(check, layers - 1) if layers else check

    @property
    def rope(self) -> RopeParams:
        if self._rope is None:  # model attached after the backend was built
            self._rope = rope_params_from_model(self.model_runner.model).to(self.device)
        return self._rope

    # ---- per forward ----------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """torch_native's metadata, plus the slot positions of this forward's KV writes.

        Raises:
            RuntimeError: if the batch writes KV at a different count of slots than positions.
        """
        super().init_forward_metadata(forward_batch)
        # Forget the last forward's rows and plans: graph runners reuse ForwardBatch objects.
        self._rows_for, self._plans = (None, None), {}
        loc, pos = forward_batch.out_cache_loc, forward_batch.positions
        if forward_batch.forward_mode.is_idle() or loc is None or pos is None:
            return
        if loc.numel() != pos.numel():
            raise RuntimeError(
                f"cannot tag KV with positions: {loc.numel()} slots written but "
                f"{pos.numel()} positions (mode {forward_batch.forward_mode})"
            )
        self.table.record_write(loc, pos)

    def _layout_rows(self, forward_batch: ForwardBatch) -> list[int] | None:
        """The batch's rows if any of them has a layout, else None (the fast path)."""
        if not self.table.laid_out_rows and not self.uniform:
            return None
        fb, rows = self._rows_for
        if fb is not forward_batch:
            idx = forward_batch.req_pool_indices_cpu
            if idx is None:
                idx = forward_batch.req_pool_indices
            rows = [int(r) for r in idx.tolist()]
            if not self.uniform and self.table.laid_out_rows.isdisjoint(rows):
                rows = None
            self._rows_for = (forward_batch, rows)
            self._plans = {}
        return rows

    def _plan(self, row: int, seq_len: int) -> RowKeys:
        """The row's key plan for this forward (slot positions do not change within one)."""
        plan = self._plans.get(row)
        if plan is None or plan.slots.numel() != seq_len:
            slots = self.req_to_token_pool.req_to_token[row, :seq_len]
            plan = plan_row(
                slots, self.table.row_positions(row, seq_len), self.table.slot_pos, self.rope
            )
            self._plans[row] = plan
        return plan

    @staticmethod
    def _positional(layer: RadixAttention, forward_batch: ForwardBatch) -> bool:
        """Position tags apply to causal self-attention of decoder layers only."""
        return (
            not layer.is_cross_attention
            and layer.attn_type == AttentionType.DECODER
            and forward_batch.encoder_lens is None
        )

    def _write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write K/V as torch_native does; returns (o, q_ view, o_ view)."""
        if layer.qk_head_dim != layer.v_head_dim:
            o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        else:
            o = torch.empty_like(q)
        if save_kv_cache and k is not None and v is not None:
            loc = KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc)
            self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        return o, q_, o_

    @staticmethod
    def _window(layer: RadixAttention) -> int | None:
        w = layer.sliding_window_size
        return w if w is not None and w > -1 else None

    # ---- extend ---------------------------------------------------------------------------
    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        o = self._extend(q, k, v, layer, forward_batch, save_kv_cache)
        if self.probes.rows and layer.layer_id == self.probes.check_layer:
            self._run_probes(q, layer, forward_batch)
        return o

    def _run_probes(self, q: torch.Tensor, layer: RadixAttention, fb: ForwardBatch) -> None:
        """Fill the deviation probes of this batch's rows (reads KV only; see deviation.py)."""
        if not self._positional(layer, fb):
            return
        idx = fb.req_pool_indices_cpu
        rows = [int(r) for r in (fb.req_pool_indices if idx is None else idx).tolist()]
        if self.probes.rows.keys().isdisjoint(rows):
            return
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        seq_lens = _as_list(fb.seq_lens_cpu, fb.seq_lens)
        ext_lens = _as_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens)
        start = 0
        for i, row in enumerate(rows):
            end = start + ext_lens[i]
            probes = self.probes.rows.get(row)
            if probes:
                qpos = fb.positions[start:end].long()
                plan = self._plan(row, seq_lens[i])
                keys = gather_keys(k_cache, plan, self.rope)
                values = v_cache[plan.slots]
                for p in probes.values():
                    sel = torch.nonzero((qpos >= p.start) & (qpos < p.end)).flatten()
                    if sel.numel() == 0:
                        continue
                    dev = context_deviation(
                        q_[start:end][sel],
                        keys,
                        values,
                        qpos[sel],
                        plan.key_pos,
                        p.start,
                        layer.scaling,
                        _tp_sum(),
                    )
                    p.scores[(qpos[sel] - p.start).cpu()] = dev.cpu()
            start = end

    def _extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool,
    ) -> torch.Tensor:
        rows = self._layout_rows(forward_batch)
        if rows is None or not self._positional(layer, forward_batch):
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        o, q_, o_ = self._write_kv(q, k, v, layer, forward_batch, save_kv_cache)
        fb = forward_batch
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        seq_lens = _as_list(fb.seq_lens_cpu, fb.seq_lens)
        ext_lens = _as_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens)
        gqa = layer.tp_q_head_num != layer.tp_k_head_num
        window = self._window(layer)
        start = 0
        for i, row in enumerate(rows):
            s, e = seq_lens[i], ext_lens[i]
            end = start + e
            if self.uniform or self.table.has_layout(row):
                o_[start:end] = attend_sdpa(
                    q_[start:end],
                    k_cache,
                    v_cache,
                    self._plan(row, s),
                    fb.positions[start:end].long(),
                    self.rope,
                    layer.scaling,
                    window,
                )
            else:  # torch_native's own code for this one request
                self._run_sdpa_forward_extend(
                    q_[start:end],
                    o_[start:end],
                    k_cache,
                    v_cache,
                    req_to_token,
                    fb.req_pool_indices[i : i + 1],
                    fb.seq_lens[i : i + 1],
                    fb.extend_prefix_lens[i : i + 1],
                    fb.extend_seq_lens[i : i + 1],
                    None,
                    scaling=layer.scaling,
                    enable_gqa=gqa,
                    causal=True,
                    sliding_window_size=window,
                )
            start = end
        return o

    # ---- decode ---------------------------------------------------------------------------
    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        rows = self._layout_rows(forward_batch)
        if rows is None or not self._positional(layer, forward_batch):
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o, q_, o_ = self._write_kv(q, k, v, layer, forward_batch, save_kv_cache)
        fb = forward_batch
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        seq_lens = _as_list(fb.seq_lens_cpu, fb.seq_lens)
        gqa = layer.tp_q_head_num != layer.tp_k_head_num
        window = self._window(layer)
        for i, row in enumerate(rows):
            s = seq_lens[i]
            if self.uniform or self.table.has_layout(row):
                # The row's positions are a permutation of 0..s-1 (checked by set_layout) and
                # the query sits at s-1: every key is visible, no mask unless a window.
                qpos = fb.positions[i : i + 1].long() if window is not None else None
                o_[i : i + 1] = attend_sdpa(
                    q_[i : i + 1],
                    k_cache,
                    v_cache,
                    self._plan(row, s),
                    qpos,
                    self.rope,
                    layer.scaling,
                    window,
                )
            else:
                self._run_sdpa_forward_decode(
                    q_[i : i + 1],
                    o_[i : i + 1],
                    k_cache,
                    v_cache,
                    req_to_token,
                    fb.req_pool_indices[i : i + 1],
                    fb.seq_lens[i : i + 1],
                    None,
                    scaling=layer.scaling,
                    enable_gqa=gqa,
                    causal=False,
                    sliding_window_size=window,
                )
        return o


def _as_list(cpu: Any, dev: torch.Tensor) -> list[int]:
    """Host copy of per-request lengths, preferring SGLang's CPU mirror (no device sync)."""
    src = cpu if cpu is not None else dev
    return [int(x) for x in (src.tolist() if isinstance(src, torch.Tensor) else src)]


def create_tokendance_backend(runner: Any) -> TokenDanceAttnBackend:
    """Factory for SGLang's attention registry."""
    return TokenDanceAttnBackend(runner)


def register_backend() -> None:
    """Register ``"tokendance"`` with SGLang's attention registry and CLI choices (idempotent).

    Call before SGLang parses its arguments (the plugin's ``register()`` does).
    """
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )

    if ATTENTION_BACKENDS.get(BACKEND_NAME) is not create_tokendance_backend:
        register_attention_backend(BACKEND_NAME)(create_tokendance_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        ATTENTION_BACKEND_CHOICES.append(BACKEND_NAME)


def _tp_sum() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A sum over the TP ranks when there are several (deviation scores over all heads)."""
    from sglang.srt.distributed.communication_op import tensor_model_parallel_all_reduce
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_world_size

    try:
        many = get_tensor_model_parallel_world_size() > 1
    except (AssertionError, AttributeError, RuntimeError):  # no TP group (unit tests)
        return None
    return tensor_model_parallel_all_reduce if many else None
