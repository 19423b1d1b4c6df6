"""The layer loop of a pic forward: ``LlamaModel.forward`` / ``Qwen2Model.forward`` (around).

Only a forward whose :class:`~.tagged.TaggedAttention` holds a :class:`~.blend.BlendPlan` (a
batch with a pic row whose reused tokens have masters) takes :func:`blend_forward`; every other
forward calls SGLang's model forward untouched. The loop is SGLang's own (embed, layers, final
norm through its residual stream), with two additions: the dense copy is seeded before layer 0,
and after the check layer the batch shrinks to the kept tokens (:mod:`.blend`). The residual
stream is cut the way SGLang cuts it across an eager graph break (export / import of the
replay handoff), so the kept tokens' arithmetic is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_tokendance.attention.blend import (
    BlendPlan,
    kept_tokens,
    record_picks,
    select_per_request,
)
from sglang_tokendance.attention.hooks import _tagged_for


def around_model_forward(
    original: Any,
    model: Any,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    forward_batch: Any,
    input_embeds: torch.Tensor | None = None,
    pp_proxy_tensors: Any = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``LlamaModel.forward`` / ``Qwen2Model.forward`` (around): pic forwards blend."""
    ta = _tagged_for(forward_batch)
    plan = ta.blend if ta is not None else None
    if plan is None or pp_proxy_tensors is not None or args or kwargs:
        return original(
            model, input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors,
            *args, **kwargs,
        )  # fmt: skip
    return blend_forward(model, ta, plan, input_ids, positions, forward_batch, input_embeds)


def blend_forward(
    model: Any,
    ta: Any,
    plan: BlendPlan,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    fb: Any,
    input_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """SGLang's decoder loop with the CacheBlend subset (see module docstring).

    Raises:
        NotImplementedError: pipeline parallelism or auxiliary hidden-state capture.
    """
    from sglang.srt.layers.layer_boundary.residual import batch as residual_batch

    if getattr(model, "layers_to_capture", None) or not (
        model.pp_group.is_first_rank and model.pp_group.is_last_rank
    ):
        raise NotImplementedError("pic mode runs without pipeline parallelism or aux capture")
    hidden = model.embed_tokens(input_ids) if input_embeds is None else input_embeds
    residual_batch.start(fb)
    end = model.end_layer
    check = min(max(plan.check_layer, model.start_layer), end - 1)
    plan.check_layer = check
    if check + 1 < end:
        ta.seed(plan, fb, check, end)
    else:  # no layer after the check layer: every token runs every layer, nothing to seed
        ta.blend = None
        ta.work["blend_forwards"] += 1
        ta.work["blend_reused"] += int(plan.tok.numel())
        ta.work["blend_recomputed"] += int(plan.tok.numel())
    for i in range(model.start_layer, end):
        hidden = model.layers[i](positions, hidden, fb)
        if i == check and i + 1 < end:
            hidden, positions = _narrow(ta, plan, hidden, positions, fb, end - i - 1)
    return residual_batch.final_norm(hidden, fb, model.norm)


def _narrow(
    ta: Any,
    plan: BlendPlan,
    hidden: Any,
    positions: torch.Tensor,
    fb: Any,
    later_layers: int,
) -> tuple[Any, torch.Tensor]:
    """Pick each request's tokens and cut the batch to the kept ones (after the check layer)."""
    from sglang.srt.layers.layer_boundary.residual import batch as residual_batch

    dev = plan.dev if plan.dev is not None else torch.zeros_like(plan.tok, dtype=torch.float32)
    chosen = select_per_request(dev, plan.req_of, plan.quota)
    record_picks(plan, chosen, positions)
    nar = kept_tokens(plan, chosen, int(positions.numel()))
    ta.narrowed(plan, int(positions.numel()) - int(nar.keep.numel()), later_layers)
    if nar.all_kept:
        return hidden, positions
    keep = nar.keep
    hidden = residual_batch.complete_output(hidden, fb)
    h = residual_batch.export_replay_handoff(hidden, fb)
    cut = h._replace(value=h.value[keep], residual=None if h.residual is None else h.residual[keep])
    hidden = residual_batch.import_replay_handoff(cut, fb)
    positions = positions[keep]
    narrow_batch(fb, keep, nar.ext_lens, positions)
    return hidden, positions


def narrow_batch(fb: Any, keep: torch.Tensor, ext_lens: list[int], positions: torch.Tensor) -> None:
    """Give the forward batch the kept tokens only: what later layers' attention (query
    positions, KV write slots, per-row query counts) and the logits processor (each request's
    last token: ``cumsum(extend_seq_lens) - 1``) read. Fields are replaced, not written in
    place: SGLang's batch tensors may be shared with the scheduler's."""
    fb.positions = positions
    fb.out_cache_loc = fb.out_cache_loc[keep]
    lens = torch.tensor(ext_lens, dtype=fb.extend_seq_lens.dtype, device=positions.device)
    fb.extend_seq_lens = lens
    fb.extend_seq_lens_cpu = list(ext_lens)
    start = torch.zeros_like(lens)
    start[1:] = torch.cumsum(lens[:-1], 0)
    if getattr(fb, "extend_start_loc", None) is not None:
        fb.extend_start_loc = start.to(fb.extend_start_loc.dtype)
    fb.extend_num_tokens = int(keep.numel())
