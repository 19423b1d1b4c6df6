"""Reading a model's RoPE parameters (:class:`~.rope.RopeParams`) off SGLang's rotary module.

Supported: the model types in :data:`SUPPORTED_MODEL_TYPES` with a RoPE whose angle is
``pos * inv_freq`` (see :mod:`.rope`); anything else is refused at startup with a sentence that
names the model. SGLang is imported lazily, so :mod:`.rope` and the kernels load without it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sglang_tokendance.attention.rope import RopeParams

logger = logging.getLogger(__name__)


def _inv_freq_of(rope: Any) -> tuple[str, torch.Tensor, float, float]:
    """(scaling name, inv_freq, mscale, effective base) of a supported SGLang RoPE module.

    Raises:
        ValueError: for a RoPE class whose angle is not ``pos * fixed inv_freq``.
    """
    from sglang.srt.layers.rotary_embedding.base import (
        LinearScalingRotaryEmbedding,
        RotaryEmbedding,
    )
    from sglang.srt.layers.rotary_embedding.rope_variant import (
        DynamicNTKAlphaRotaryEmbedding,
        DynamicNTKScalingRotaryEmbedding,
        Llama3RotaryEmbedding,
    )
    from sglang.srt.layers.rotary_embedding.yarn import YaRNScalingRotaryEmbedding

    kind = type(rope)
    base = float(rope.base)
    rd = rope.rotary_dim
    if kind is RotaryEmbedding:
        return "default", rope._compute_inv_freq(rope.base), 1.0, base
    if kind is Llama3RotaryEmbedding:
        return "llama3", rope._compute_inv_freq(rope.base), 1.0, base
    if kind is LinearScalingRotaryEmbedding:
        if len(rope.scaling_factors) != 1:
            raise ValueError("linear RoPE with several scaling factors (LoRA) is not supported")
        factor = float(rope.scaling_factors[0])
        return "linear", rope._compute_inv_freq(rope.base) / factor, 1.0, base
    if kind is YaRNScalingRotaryEmbedding:
        return "yarn", rope._compute_inv_freq(rope.scaling_factor), float(rope.mscale), base
    if kind is DynamicNTKScalingRotaryEmbedding:
        # SGLang's "dynamic" fixes the base at construction (see its _compute_cos_sin_cache),
        # unlike HF's, which changes it with the sequence length: here it is a plain rotation.
        sf = rope.scaling_factor
        max_len = rope.max_position_embeddings * sf
        eff = rope.base * ((sf * max_len / rope.max_position_embeddings) - (sf - 1)) ** (
            rd / (rd - 2)
        )
        return "dynamic", rope._compute_inv_freq(eff), 1.0, float(eff)
    if kind is DynamicNTKAlphaRotaryEmbedding:
        eff = rope.base * rope.scaling_alpha ** (rd / (rd - 2))
        return "dynamic", rope._compute_inv_freq(eff), 1.0, float(eff)
    raise ValueError(
        f"RoPE module {kind.__name__} is not supported by TokenDance: its angle is not "
        "position * a fixed inv_freq (mrope, dual-chunk, long-rope, fourier, ...)"
    )


def _check_against_cache(rope: Any, inv_freq: torch.Tensor, mscale: float, name: str) -> None:
    """Check that ``inv_freq`` reproduces rows of the module's own cos/sin cache.

    Raises:
        ValueError: when it does not (a RoPE variant we read wrongly).
    """
    cache = rope.cos_sin_cache.detach().to("cpu", torch.float32)
    half = inv_freq.numel()
    last = cache.shape[0] - 1
    rows = torch.tensor(sorted({1, 2, 3, 17, min(100, last), last}), dtype=torch.float32)
    ang = rows.view(-1, 1) * inv_freq.view(1, -1)
    want = torch.cat((ang.cos(), ang.sin()), dim=-1) * mscale
    got = cache[rows.long(), : 2 * half]
    # Tolerance: the cache's own dtype rounding, plus float32 rounding of t * inv_freq.
    atol = max(torch.finfo(rope.cos_sin_cache.dtype).eps, 1e-5) * 2 + 4e-7 * rows.view(-1, 1)
    if not bool(((got - want).abs() <= atol * max(mscale, 1.0)).all()):
        err = float((got - want).abs().max())
        raise ValueError(
            f"{name}: the inv_freq read from {type(rope).__name__} does not reproduce its "
            f"cos/sin cache (max error {err:.3g}); refusing to rotate keys with it"
        )


def _rope_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m for m in model.modules() if hasattr(m, "cos_sin_cache") or "Rotary" in type(m).__name__
    ]


def rope_module_from_config(config: Any) -> Any:
    """The rotary module a Llama/Qwen2-style SGLang model builds for ``config`` (float32)."""
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang.srt.utils.hf_transformers_utils import get_rope_config

    model_type = getattr(config, "model_type", "?")
    if getattr(config, "dual_chunk_attention_config", None) is not None:
        raise ValueError(f"model type {model_type}: dual-chunk attention is not supported")
    theta, scaling = get_rope_config(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary_dim = int(getattr(config, "partial_rotary_factor", 1) * head_dim)
    return get_rope(
        head_dim,
        rotary_dim=rotary_dim,
        max_position=getattr(config, "max_position_embeddings", 8192),
        base=theta,
        rope_scaling=dict(scaling) if scaling is not None else None,
        is_neox_style=getattr(config, "rope_is_neox_style", True),
        dtype=torch.float32,
    )


SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def rope_params_from_model(model_or_config: Any) -> RopeParams:
    """Read the RoPE parameters of an SGLang model (or of a HF config, as SGLang would build).

    Args:
        model_or_config: an SGLang model (``model_runner.model``) or a transformers config of
            a Llama/Qwen2-style model.

    Returns:
        The parameters, with ``inv_freq`` from the model's own rotary module, checked against
        that module's cos/sin cache.

    Raises:
        ValueError: naming the model, for models whose RoPE TokenDance cannot move (mrope,
            dual-chunk, several distinct RoPEs, sliding-window models, unknown variants).
    """
    if isinstance(model_or_config, torch.nn.Module):
        name = type(model_or_config).__name__
        mods = _rope_modules(model_or_config)
        if not mods:
            raise ValueError(f"model {name}: no rotary embedding module found")
        distinct = {id(m): m for m in mods}.values()
        keys = {(type(m), m.rotary_dim, float(m.base), m.is_neox_style) for m in distinct}
        if len(keys) != 1:
            raise ValueError(f"model {name}: several distinct RoPE modules are not supported")
        rope = next(iter(distinct))
        config = getattr(model_or_config, "config", None)
    else:
        config = model_or_config
        model_type = getattr(config, "model_type", None)
        name = f"model type {model_type!r}"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{name} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        rope = rope_module_from_config(config)
    if config is not None and getattr(config, "use_sliding_window", False):
        raise ValueError(f"{name}: sliding-window attention is not supported")
    try:
        scaling, inv_freq, mscale, base = _inv_freq_of(rope)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    inv_freq = inv_freq.detach().to("cpu", torch.float32)
    _check_against_cache(rope, inv_freq, mscale, name)
    params = RopeParams(
        theta=base,
        rotary_dim=int(rope.rotary_dim),
        head_dim=int(rope.head_size),
        is_neox=bool(rope.is_neox_style),
        scaling=scaling,
        inv_freq=inv_freq,
        mscale=mscale,
    )
    logger.info(
        "TokenDance RoPE: %s scaling=%s theta=%g rotary_dim=%d head_dim=%d neox=%s",
        name,
        scaling,
        base,
        params.rotary_dim,
        params.head_dim,
        params.is_neox,
    )
    return params
