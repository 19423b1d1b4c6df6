"""``TaggedAttention``: the position-tagged path of batches that hold a laid-out row.

One instance per model runner, in the pool's ``PoolState.attention`` record, created when the
runner builds its attention backends (so an unsupported RoPE is refused at startup). Per forward
(:meth:`TaggedAttention.prepare`, from ``ForwardBatch.init_new``) it records the position every
written slot was rotated at and decides the batch's path (:mod:`.dispatch`). Per layer
(:meth:`TaggedAttention.forward`), for tagged batches only: write K/V, then

- triton: one extend or decode kernel launch for the whole batch (:mod:`.triton_ops`);
- torch: one vectorized key plan per forward (:mod:`.batch_plan`; decode: kept across steps
  and extended by the new token); gather + rotation + SDPA by blocks of rows sized to the
  cache, in a reused workspace (:mod:`.batch_exec`; decode: one SDPA per block; extend: per
  row).

Everything else (stock batches) never reaches this class: the user's backend runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_tokendance.attention import batch_exec as bx
from sglang_tokendance.attention import batch_plan as bp
from sglang_tokendance.attention import shared_decode as sd
from sglang_tokendance.attention.blend import BlendPlan, key_deviation, seed_kv
from sglang_tokendance.attention.deviation import get_probe_board
from sglang_tokendance.attention.dispatch import batch_is_tagged, host_list, resolve_path
from sglang_tokendance.attention.rope import RopeParams
from sglang_tokendance.attention.rope_source import rope_params_from_model
from sglang_tokendance.attention.tagged_probes import ProbeSide, tp_sum
from sglang_tokendance.config import TokenDanceConfig
from sglang_tokendance.positions import get_position_table

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)


class TaggedAttention(ProbeSide):
    """Position-tagged attention over SGLang's pools for one model runner."""

    def __init__(self, model_runner: Any, cfg: TokenDanceConfig) -> None:
        """Args:
            model_runner: SGLang's ModelRunner (pools, device, model).
            cfg: the server's TokenDance config.

        Raises:
            ValueError: an unsupported RoPE (names the model) or an unusable
                ``--tokendance-attention`` choice on this device.
        """
        self.kv_pool = model_runner.token_to_kv_pool
        self.r2t_pool = model_runner.req_to_token_pool
        self.table = get_position_table(self.r2t_pool, self.kv_pool)
        self.kind = resolve_path(cfg.attention, str(model_runner.device))
        self.uniform = cfg.uniform_attention
        self.shared_decode = cfg.decode == "shared"
        self.rope: RopeParams = rope_params_from_model(model_runner.model).to(model_runner.device)
        self.probes = get_probe_board(self.r2t_pool)
        layers = getattr(getattr(model_runner, "model_config", None), "num_hidden_layers", None)
        self.probes.check_layer = min(cfg.check_layer, layers - 1) if layers else cfg.check_layer
        self.num_layers = int(layers or 0)
        self.ratio = cfg.recompute_ratio  # pic: share of each request's reused tokens recomputed
        self.blend: BlendPlan | None = None  # pic: this forward's CacheBlend work (.blend)
        # prefill work actually done: extend tokens x layers they ran through (every mode)
        self.work = {"prefill_token_layers": 0, "blend_forwards": 0, "blend_reused": 0}
        self.work["blend_recomputed"] = 0
        self.blend_picks: dict[str, list[int]] = {}  # last pic requests' recomputed positions
        self.tables = bp.Tables(
            self.r2t_pool.req_to_token,
            self.table.req_to_pos,
            self.table.layout_len,
            self.table.slot_pos,
        )
        self._fb: Any = None  # the forward prepared last (graph runners reuse objects: identity)
        self.active = False
        self.probing = False  # deviation probes to fill in this forward
        # forwards per path, and tagged decode steps per decode kind (the stats route)
        self.forwards = {"tagged": 0, "stock": 0, "decode_shared": 0, "decode_rows": 0}
        self._rows: list[int] = []
        self._extend: tuple[bp.BatchKeys, list[int], list[list[bx.Block]]] | None = None
        self._ws = bx.Workspace()  # gathered K/V of one block, reused by every layer
        self._groups: list[tuple[int, int, int]] = []  # decode blocks of this forward
        self._decode: bp.BatchKeys | sd.SharedPlan | None = None  # kept across decode steps
        self._decode_key: tuple[tuple[int, ...], int] | None = None
        self._decode_fb: Any = None
        logger.info("TokenDance attention: %s kernels for laid-out batches", self.kind)

    # ---- per forward ----------------------------------------------------------------------
    def prepare(self, fb: ForwardBatch) -> bool:
        """Tag this forward's KV writes and decide its path; True: the tagged path (idempotent)."""
        if fb is self._fb:
            return self.active
        self._fb, self._extend, self.blend = fb, None, None
        loc, pos = fb.out_cache_loc, fb.positions
        if fb.forward_mode.is_idle() or loc is None or pos is None:
            self.active = False
            return False
        if loc.numel() != pos.numel():
            raise RuntimeError(
                f"cannot tag KV with positions: {loc.numel()} slots written but "
                f"{pos.numel()} positions (mode {fb.forward_mode})"
            )
        self.table.record_write(loc, pos)
        if fb.forward_mode.is_extend():
            self.work["prefill_token_layers"] += int(loc.numel()) * self.num_layers
        self._rows = host_list(fb.req_pool_indices_cpu, fb.req_pool_indices)
        self.active = batch_is_tagged(self._rows, self.table.laid_out_rows, self.uniform)
        self.forwards["tagged" if self.active else "stock"] += 1
        self.probing = (
            bool(self.probes.rows)
            and fb.forward_mode.is_extend()
            and not self.probes.rows.keys().isdisjoint(self._rows)
        )
        return self.active

    def counts(self) -> dict[str, object]:
        """The path's kernels and how many forwards ran on each side."""
        return {
            "kernels": self.kind,
            "tagged_forwards": self.forwards["tagged"],
            "stock_forwards": self.forwards["stock"],
            "decode_steps_shared": self.forwards["decode_shared"],
            "decode_steps_rows": self.forwards["decode_rows"],
            **self.work,
            "blend_picks": {rid: list(p) for rid, p in self.blend_picks.items()},
        }

    # ---- pic (CacheBlend, :mod:`.blend`) --------------------------------------------------
    def seed(self, plan: BlendPlan, fb: ForwardBatch, first_layer: int, end_layer: int) -> None:
        """Write the dense copy of this forward's reused tokens (layers ``first..end-1``)."""
        layers = range(first_layer, end_layer)
        seed_kv(
            plan,
            [self.kv_pool.get_key_buffer(i) for i in layers],
            [self.kv_pool.get_value_buffer(i) for i in layers],
            fb.out_cache_loc, fb.positions, self.table.slot_pos, self.rope, 0,
        )  # fmt: skip
        self.work["blend_forwards"] += 1
        self.work["blend_reused"] += int(plan.tok.numel())

    def narrowed(self, plan: BlendPlan, dropped: int, later_layers: int) -> None:
        """Past the check layer only the kept tokens run: the key plan stays (rows and their
        keys are unchanged), the per-row query counts follow the batch's new extend lengths."""
        self._extend = None
        self.work["prefill_token_layers"] -= dropped * later_layers
        self.work["blend_recomputed"] += sum(int(p.numel()) for p in plan.picks.values())
        for rid, picks in plan.picks.items():
            self.blend_picks[rid] = picks.tolist()
        while len(self.blend_picks) > 64:  # a bounded record for the stats route
            self.blend_picks.pop(next(iter(self.blend_picks)))

    def adopt(self, old: ForwardBatch, new: ForwardBatch) -> None:
        """``new`` is the copy of the prepared forward ``old`` that the model will see."""
        if old is self._fb:
            self._fb = new

    def handles(self, layer: RadixAttention, fb: ForwardBatch) -> bool:
        """True for a causal decoder self-attention layer of a tagged forward."""
        return (
            self.prepare(fb)
            and not layer.is_cross_attention
            and layer.attn_type == AttentionType.DECODER
            and fb.encoder_lens is None
        )

    def _extend_keys(
        self, fb: ForwardBatch
    ) -> tuple[bp.BatchKeys, list[int], list[list[bx.Block]]]:
        """The extend's key plan and query blocks (once per forward, read by every layer)."""
        if self._extend is None:
            ext = host_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens)
            seq = host_list(fb.seq_lens_cpu, fb.seq_lens)
            plan = bp.plan_batch(fb.req_pool_indices, seq, self.tables, self.rope, by_position=True)
            self._extend = (plan, ext, bx.extend_blocks(plan, ext, fb.positions))
        return self._extend

    def _decode_plan(self, fb: ForwardBatch) -> bp.BatchKeys | sd.SharedPlan:
        """The decode plan: the last one plus this step's token, or rebuilt when rows changed
        (a shared plan when the batch's rows share enough keys, :mod:`.shared_decode`)."""
        if self._decode_fb is fb and self._decode is not None:
            return self._decode
        seq = host_list(fb.seq_lens_cpu, fb.seq_lens)
        key = (tuple(self._rows), self.table.version)
        plan: bp.BatchKeys | sd.SharedPlan | None = None
        prev = self._decode
        if isinstance(prev, sd.SharedPlan) and key == self._decode_key:
            if seq == [s + 1 for s in prev.seq_lens]:
                plan = sd.append_step(prev, fb.out_cache_loc)
        elif prev is not None and key == self._decode_key:
            order = prev.order.tolist() if prev.order is not None else range(len(seq))
            if [seq[i] for i in order] == [s + 1 for s in prev.seq_lens]:
                loc = fb.out_cache_loc if prev.order is None else fb.out_cache_loc[prev.order]
                plan = bp.append_decode(prev, loc)
        if plan is None and self.shared_decode:
            plan = sd.plan_shared(fb.req_pool_indices, seq, self.tables, self.rope)
        if plan is None:
            plan = bp.plan_batch(
                fb.req_pool_indices, seq, self.tables, self.rope, bp.DECODE_HEADROOM, sort=True
            )
        self._decode, self._decode_key, self._decode_fb = plan, key, fb
        if isinstance(plan, bp.BatchKeys):
            self._groups = bx.decode_groups(plan, self.kv_pool.get_key_buffer(0))
        self.forwards["decode_shared" if isinstance(plan, sd.SharedPlan) else "decode_rows"] += 1
        return plan

    # ---- per layer ------------------------------------------------------------------------
    def forward(
        self,
        layer: RadixAttention,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        fb: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        """Attention of one layer for a tagged batch; returns ``[T, H * Dv]`` like a backend."""
        plan = self.blend
        if plan is not None and k is not None and layer.layer_id == plan.check_layer:
            # the seed is still in the slots: the deviation is measured before it is replaced
            seed = self.kv_pool.get_key_buffer(layer.layer_id)[fb.out_cache_loc[plan.tok].long()]
            plan.dev = key_deviation(k[plan.tok], seed.view_as(k[plan.tok]))
            reduce = tp_sum()
            if reduce is not None:
                plan.dev = reduce(plan.dev)
        if save_kv_cache and k is not None and v is not None:
            self.kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, None), k, v)
        heads, dv = layer.tp_q_head_num, layer.v_head_dim
        q_ = q.reshape(-1, heads, layer.qk_head_dim)
        kbuf = self.kv_pool.get_key_buffer(layer.layer_id)
        vbuf = self.kv_pool.get_value_buffer(layer.layer_id)
        decode = fb.forward_mode.is_decode()
        if self.kind == "triton":
            o = self._triton(q_, kbuf, vbuf, layer, fb, decode)
        elif decode:
            plan = self._decode_plan(fb)
            if isinstance(plan, sd.SharedPlan):
                o = sd.shared_decode(q_, kbuf, vbuf, plan, self.rope, layer.scaling, self._ws)
            else:
                o = bx.decode_batch(
                    q_, kbuf, vbuf, plan, self.rope, layer.scaling, self._ws, self._groups
                )
        else:
            o = q_.new_empty((q_.shape[0], heads, dv))
            keys, ext, blocks = self._extend_keys(fb)
            bx.extend_rows(
                q_, o, kbuf, vbuf, keys, ext, fb.positions, self.rope, layer.scaling, self._ws,
                blocks,
            )  # fmt: skip
        return o.reshape(-1, heads * dv)

    def _triton(self, q_, kbuf, vbuf, layer, fb, decode: bool) -> torch.Tensor:  # noqa: ANN001
        from sglang_tokendance.attention import triton_ops

        common = (kbuf, vbuf, *self.tables[:1], self.table.req_to_pos, self.table.layout_len)
        if decode:
            return triton_ops.decode_attention(
                q_, *common, self.table.slot_pos, fb.req_pool_indices, fb.seq_lens,
                self.rope, layer.scaling,
            )  # fmt: skip
        ext = host_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens)
        return triton_ops.extend_attention(
            q_, *common, self.table.slot_pos, fb.req_pool_indices, fb.seq_lens,
            fb.extend_seq_lens, fb.positions, self.rope, layer.scaling,
            max_extend_len=max(ext) if ext else 0,
        )  # fmt: skip
