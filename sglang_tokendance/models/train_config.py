"""What decides the trained model's weights (:class:`TrainConfig`), where it lives, and the
``LlamaConfig`` and learning-rate schedule derived from it (see :mod:`.train`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINED_DIR = Path(__file__).parent / "trained"
SEED = 1234


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (recorded in ``train_info.json``)."""

    vocab_size: int = 1024
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688
    max_positions: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = SEED
    threads: int = 2
    steps: int | None = None
    budget_min: float = 20.0
    eval_reserve_s: float = 120.0
    timing_steps: int = 40
    val_every: int = 50
    repeat_frac: float = 0.2
    copy_warmup_steps: int = 1500  # at most; ends early once copying works (below)
    copy_warmup_until: float = 0.2  # induction ratio (2nd/1st copy loss) that ends the warm-up
    copy_lr: float = 1e-3  # lr cap during the warm-up (the measured plant runs used 1e-3)
    copy_batch_size: int = 16
    copy_seq_len: int = 128
    plant_prev_token_head: bool = True  # induction_init.py (fresh models only)
    resume: str | None = None  # continue from this model dir (its tokenizer, its weights)


def trained_dir() -> Path:
    """Directory of the committed trained model (``sglang_tokendance/models/trained``)."""
    return TRAINED_DIR


def trained_model_dir() -> Path:
    """The committed trained model's directory.

    Raises:
        FileNotFoundError: if its weights are missing (then rebuild with ``... models train``).
    """
    d = trained_dir()
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no trained model at {d}; build it (~20 min on CPU) with: "
            "python -m sglang_tokendance.models train"
        )
    return d


def make_config(cfg: TrainConfig, tokenizer: Any) -> Any:
    """The ``LlamaConfig`` of the trained model (vocab size from the tokenizer)."""
    from transformers import LlamaConfig

    from sglang_tokendance.models.tokenizer import BOS, EOS, PAD

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up, then cosine down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * frac))
