"""The deviation probes of :class:`~.tagged.TaggedAttention` (a mixin, split out for size).

At the check layer of a forward that computes masters, every probed row's segments are scored
for collective selection (:mod:`.deviation`): each segment's tokens attended alone against the
forward's own full-context attention output. Once per master computed, not per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sglang_tokendance.attention.deviation import segment_deviation, span_of
from sglang_tokendance.attention.dispatch import host_list
from sglang_tokendance.attention.rope import RopeParams
from sglang_tokendance.attention.torch_path import gather_keys, plan_row

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch


class ProbeSide:
    """The probe half of ``TaggedAttention``: reads its pools, tables, rows and probe board."""

    kv_pool: Any  # SGLang's KV pool
    r2t_pool: Any  # SGLang's req_to_token pool
    table: Any  # the position tables (positions.py)
    rope: RopeParams
    probes: Any  # the probe board (deviation.py)
    probing: bool  # this forward has probes to fill
    _rows: list[int]  # this forward's request rows
    _fb: Any  # the forward prepared last

    def wants_probes(self, layer: RadixAttention, fb: ForwardBatch) -> bool:
        """True at the check layer of an extend whose rows have deviation probes pending."""
        return self.probing and layer.layer_id == self.probes.check_layer and fb is self._fb

    def run_probes(
        self, q: torch.Tensor, out: torch.Tensor, layer: RadixAttention, fb: ForwardBatch
    ) -> None:
        """Fill the deviation probes of this batch's rows at the check layer, from the layer's
        queries and attention output ``out`` (it reads KV only, so it runs after the layer's
        attention on either path).

        Once per master computed (not per step): a loop over the probed rows is fine here; a
        row's segments are scored in one batched attention (a master agent of a large round
        holds dozens of segments), and the full-context attention is the forward's own.
        """
        rows = self._rows
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o_ = out.reshape(-1, layer.tp_q_head_num, layer.v_head_dim)
        k_cache = self.kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.kv_pool.get_value_buffer(layer.layer_id)
        seq_lens = host_list(fb.seq_lens_cpu, fb.seq_lens)
        ext_lens = host_list(fb.extend_seq_lens_cpu, fb.extend_seq_lens)
        start = 0
        for i, row in enumerate(rows):
            end = start + ext_lens[i]
            probes = self.probes.rows.get(row)
            if probes:
                qpos = fb.positions[start:end].long()
                spans = list(probes.values())
                bounds = torch.tensor([[p.start, p.end] for p in spans], device=qpos.device)
                # only the keys inside the spans: the segment-only attention reads no other
                kpos = self.table.row_positions(row, seq_lens[i])
                inside = torch.nonzero(span_of(kpos, bounds) >= 0).flatten()
                slots = self.r2t_pool.req_to_token[row, : seq_lens[i]][inside]
                plan = plan_row(slots, kpos[inside], self.table.slot_pos, self.rope)
                keys, values = gather_keys(k_cache, plan, self.rope), v_cache[plan.slots]
                dev, which = segment_deviation(
                    q_[start:end], o_[start:end], keys, values, qpos, plan.key_pos, bounds,
                    layer.scaling, tp_sum(),
                )  # fmt: skip
                if which.numel():
                    pos = qpos[which]
                    seg = span_of(pos, bounds).cpu()
                    dev, pos = dev.cpu(), pos.cpu()
                    for s, p in enumerate(spans):
                        mine = seg == s
                        if bool(mine.any()):
                            p.scores[pos[mine] - p.start] = dev[mine]
            start = end


def tp_sum() -> Any:
    """A sum over the TP ranks when there are several (deviation scores over all heads)."""
    from sglang.srt.distributed.communication_op import tensor_model_parallel_all_reduce
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_world_size

    try:
        many = get_tensor_model_parallel_world_size() > 1
    except (AssertionError, AttributeError, RuntimeError):  # no TP group (unit tests)
        return None
    return tensor_model_parallel_all_reduce if many else None
