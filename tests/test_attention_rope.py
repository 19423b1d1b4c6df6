"""RoPE delta rotation: algebra, SGLang's real rotary modules, and shifted reuse of a block."""

from __future__ import annotations

import os

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # before sglang is imported (CPU rope path)

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from sglang_tokendance.attention.reference import attend_ref
from sglang_tokendance.attention.rope import RopeParams, rotate_by_delta
from sglang_tokendance.attention.rope_source import rope_module_from_config, rope_params_from_model

SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def _rope_at(params: RopeParams, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate raw vectors to absolute positions (a delta from position 0)."""
    return rotate_by_delta(x, pos, params)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotate_by_delta_composes(is_neox: bool, rotary_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    params = RopeParams.default(10000.0, head_dim=16, rotary_dim=rotary_dim, is_neox=is_neox)
    k = torch.randn(6, 3, 16, generator=g, dtype=torch.float64).float()
    a = torch.tensor([0, 3, 17, 200, 5, 1000])
    b = torch.tensor([0, -3, 40, -150, 7, -999])
    two_steps = rotate_by_delta(rotate_by_delta(k, a, params), b, params)
    one_step = rotate_by_delta(k, a + b, params)
    torch.testing.assert_close(two_steps, one_step, atol=2e-5, rtol=1e-5)
    # Dims past rotary_dim are not touched; a zero delta is the identity.
    torch.testing.assert_close(two_steps[..., rotary_dim:], k[..., rotary_dim:])
    torch.testing.assert_close(rotate_by_delta(k, 0, params), k)


def test_rotate_by_delta_negative_undoes_positive() -> None:
    params = RopeParams.default(500000.0, head_dim=32)
    k = torch.randn(4, 2, 32)
    d = torch.tensor([1, 64, 4095, 12])
    back = rotate_by_delta(rotate_by_delta(k, d, params), -d, params)
    torch.testing.assert_close(back, k, atol=1e-5, rtol=1e-5)


def test_rotate_by_delta_matches_sglang_rope_module() -> None:
    """Rotating raw keys from 0 by p equals SGLang's own RoPE at p (neox and interleaved)."""
    from sglang.srt.layers.rotary_embedding import get_rope

    for neox in (True, False):
        mod = get_rope(16, 16, 2048, 10000, neox, None, torch.float32)
        params = RopeParams.default(10000.0, 16, is_neox=neox)
        pos = torch.tensor([0, 1, 7, 300, 2047])
        k = torch.randn(5, 2, 16)
        _, k_sgl = mod.forward_native(pos, torch.zeros(5, 2 * 16), k.reshape(5, -1).clone())
        torch.testing.assert_close(
            rotate_by_delta(k, pos, params), k_sgl.view(5, 2, 16), atol=1e-4, rtol=1e-4
        )


ROPE_CASES = {
    "llama-default": LlamaConfig(**SHAPE, max_position_embeddings=4096),
    "llama-llama3": LlamaConfig(
        **SHAPE,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    ),
    "llama-linear": LlamaConfig(
        **SHAPE,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "llama-dynamic": LlamaConfig(
        **SHAPE,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "qwen2-default": Qwen2Config(**SHAPE, max_position_embeddings=4096),
    "qwen2-yarn": Qwen2Config(
        **SHAPE,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 2048,
        },
    ),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_shifted_block_reuse_equals_fresh_block(case: str) -> None:
    """K/V of a block rotated at p..p+L by SGLang's rope, moved to q..q+L by the delta, gives
    the attention output of the block computed at q..q+L."""
    config = ROPE_CASES[case]
    mod = rope_module_from_config(config)
    params = rope_params_from_model(config)
    assert params.scaling == case.split("-")[1]
    hd, heads, kv_heads, n = params.head_dim, 4, 2, 24
    g = torch.Generator().manual_seed(1)
    q_raw = torch.randn(n, heads * hd, generator=g)
    k_raw = torch.randn(n, kv_heads * hd, generator=g)
    v = torch.randn(n, kv_heads, hd, generator=g)
    p, q0 = 1500, 37  # written far away, reused near the start (delta -1463)
    at_p = torch.arange(p, p + n)
    at_q = torch.arange(q0, q0 + n)
    _, k_at_p = mod.forward_native(at_p, q_raw.clone(), k_raw.clone())
    q_at_q, k_at_q = mod.forward_native(at_q, q_raw.clone(), k_raw.clone())
    q_at_q = q_at_q.view(n, heads, hd)
    slots = torch.arange(n)
    fresh = attend_ref(
        q_at_q, k_at_q.view(n, kv_heads, hd), v, slots, at_q, at_q, at_q, params, hd**-0.5
    )
    reused = attend_ref(
        q_at_q, k_at_p.view(n, kv_heads, hd), v, slots, at_q, at_p, at_q, params, hd**-0.5
    )
    torch.testing.assert_close(reused, fresh, atol=2e-4, rtol=2e-4)
    # The rotated keys themselves match too (mscale of yarn is carried by K, not re-applied).
    moved = rotate_by_delta(k_at_p.view(n, kv_heads, hd), at_q - at_p, params)
    torch.testing.assert_close(moved, k_at_q.view(n, kv_heads, hd), atol=2e-4, rtol=2e-4)


def test_unsupported_rope_is_refused_with_model_name() -> None:
    from sglang.srt.layers.rotary_embedding import get_rope

    class Qwen2VLForConditionalGeneration(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rotary_emb = get_rope(
                16,
                16,
                512,
                10000,
                True,
                {"rope_type": "default", "mrope_section": [2, 3, 3]},
                torch.float32,
            )

    with pytest.raises(ValueError, match="Qwen2VLForConditionalGeneration.*MRotaryEmbedding"):
        rope_params_from_model(Qwen2VLForConditionalGeneration())
    with pytest.raises(ValueError, match="gemma"):
        rope_params_from_model(type("Cfg", (), {"model_type": "gemma"})())


def test_rope_params_read_from_a_model_module() -> None:
    config = LlamaConfig(**SHAPE, max_position_embeddings=4096)

    class LlamaForCausalLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
            shared = rope_module_from_config(config)
            for layer in self.layers:
                layer.rotary_emb = shared

    params = rope_params_from_model(LlamaForCausalLM())
    assert (params.rotary_dim, params.head_dim, params.is_neox) == (16, 16, True)
    torch.testing.assert_close(params.inv_freq, RopeParams.default(10000.0, 16).inv_freq)
