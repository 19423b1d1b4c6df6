"""Build the project's models: random weights (seeded) + the offline tokenizer.

Models are built once into a cache directory keyed by a hash of the spec and of this package's
builder sources, so editing the builder rebuilds them and nothing else does. They are saved with
``save_pretrained`` and loaded by SGLang through its ordinary loading path.

Sizes:
- ``tiny``: hidden 64, 2 layers. Tests: a server starts in seconds and a forward is ~free.
- ``small``: hidden 512, 8 layers, 8 heads (head_dim 64), GQA 8/4, MLP 1408 (~30M params).
  Benchmarks: large enough that prefill on 2 CPU cores is dominated by matmuls (compute-bound),
  so prefill tokens saved show up as time saved, yet a 25-agent round still runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)

ARCHS = ("llama", "qwen2")
SEED = 1234


class ModelSpec(NamedTuple):
    """Shape of one model size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    rope_theta: float


SIZES: dict[str, ModelSpec] = {
    "tiny": ModelSpec(64, 2, 4, 2, 128, 2048, 16384, 10000.0),
    "small": ModelSpec(512, 8, 8, 4, 1408, 4096, 16384, 100000.0),
}


def cache_root() -> Path:
    """Where built models live (``TOKENDANCE_MODEL_CACHE`` or ~/.cache/sglang-tokendance)."""
    env = os.environ.get("TOKENDANCE_MODEL_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "sglang-tokendance" / "models"


def _builder_fingerprint(size: str, arch: str) -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("builder.py", "tokenizer.py", "corpus/generative_agents.txt"):
        h.update((here / name).read_bytes())
    h.update(repr((size, arch, SIZES[size], SEED)).encode())
    import transformers

    h.update(transformers.__version__.encode())
    return h.hexdigest()[:12]


def model_dir(size: str = "tiny", arch: str = "llama") -> Path:
    """The directory the model of this size and architecture is (or will be) built in."""
    _check(size, arch)
    return cache_root() / f"{arch}-{size}-{_builder_fingerprint(size, arch)}"


def _check(size: str, arch: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHS)}")


def build(size: str = "tiny", arch: str = "llama", force: bool = False) -> Path:
    """Build the model if it is not cached yet and return its directory.

    Args:
        size: "tiny" or "small".
        arch: "llama" or "qwen2".
        force: rebuild even when a cached copy exists.

    Returns:
        The model directory (config.json, model.safetensors, tokenizer files).
    """
    out = model_dir(size, arch)
    done = out / ".complete"
    if done.exists() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from sglang_tokendance.models.tokenizer import BOS, EOS, PAD, train_tokenizer

    spec = SIZES[size]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train_tokenizer(tmp, spec.vocab)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp))
    common = dict(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    config.dtype = "float32"
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "tokendance_model.json").write_text(
        json.dumps({"size": size, "arch": arch, "spec": spec._asdict(), "seed": SEED}, indent=1)
    )
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("built %s %s model at %s", arch, size, out)
    return out
