"""Measurements of a causal LM: validation loss, copying (induction), attention sinks, samples.

Used by the trained model's training loop (a cheap induction probe every few steps) and by
its evaluation (``train.py evaluate``), which puts the numbers in the model card. Each function
takes a Hugging Face ``LlamaForCausalLM`` in eval mode and token ids as numpy / torch arrays.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

GREEDY_PROMPTS = (
    "The Python interpreter",
    "A list is a",
    "Arthur Burton is",
    "Name: Isabella Rodriguez\nAge:",
    "To open a file for reading,",
)


def windows_loss(model: Any, stream: np.ndarray, seq_len: int, batch: int = 16) -> float:
    """Mean next-token loss over non-overlapping windows of ``seq_len`` targets in ``stream``."""
    import torch

    n = (len(stream) - 1) // seq_len
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch):
            rows = [
                stream[i * seq_len : i * seq_len + seq_len + 1]
                for i in range(start, min(n, start + batch))
            ]
            x = torch.from_numpy(np.stack(rows)).long()
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += x[:, 1:].numel()
    return total / max(1, count)


def unigram_loss(train_ids: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    """Cross-entropy of ``targets`` under add-one-smoothed unigram frequencies of ``train_ids``."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].mean())


def copy_losses(model: Any, seq: Any) -> dict[str, float]:
    """Mean next-token loss on the first and second copy of each row of ``seq`` repeated twice.

    ``seq`` is a ``(trials, length)`` tensor of token ids; each row is fed as ``row + row``.
    The first token of each copy is excluded (nothing before it to copy from).
    """
    import torch

    trials, length = seq.shape
    x = torch.cat([seq, seq], dim=1)
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    ).reshape(trials, -1)
    # losses[:, j] is the loss of predicting token j+1.
    first = losses[:, : length - 1].mean().item()
    second = losses[:, length:].mean().item()
    return {
        "length": length,
        "trials": trials,
        "first_copy_loss": first,
        "second_copy_loss": second,
        "ratio": second / first,
    }


def induction_check(
    model: Any, length: int = 64, trials: int = 16, seed: int = 0, low: int = 256
) -> dict[str, float]:
    """Loss on random token sequences repeated twice: first copy vs second copy.

    Tokens are drawn uniformly from ids ``low .. vocab-1`` (merged BPE tokens, no specials).
    The first copy is unpredictable (loss near ln(vocab) or above); a model with induction
    heads predicts the second copy from the first.

    Returns:
        :func:`copy_losses`'s numbers and ``uniform_loss`` (ln of the number of ids drawn from).
    """
    import torch

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(low, vocab, (trials, length), generator=g)
    return copy_losses(model, seq) | {"uniform_loss": math.log(vocab - low)}


def text_copy_check(
    model: Any, stream: np.ndarray, length: int = 64, trials: int = 16
) -> dict[str, float]:
    """:func:`copy_losses` on passages of real text: ``trials`` evenly spaced windows of
    ``length`` tokens of ``stream`` (the validation split, never trained on), each repeated."""
    import torch

    step = (len(stream) - length) // trials
    rows = [stream[i * step : i * step + length] for i in range(trials)]
    return copy_losses(model, torch.from_numpy(np.stack(rows)).long())


def greedy_samples(
    model: Any, tokenizer: Any, prompts: Sequence[str] = GREEDY_PROMPTS, new_tokens: int = 40
) -> list[dict[str, str]]:
    """Greedy continuations of ``prompts`` (HF ``generate``, no sampling)."""
    import torch

    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        out.append({"prompt": p, "completion": tokenizer.decode(gen[0, ids.shape[1] :])})
    return out


def position_loss(
    model: Any, stream: np.ndarray, seq_len: int = 1024, edges: Sequence[int] = (0, 256, 512, 1024)
) -> dict[str, float]:
    """Mean next-token loss by position bucket on non-overlapping ``seq_len`` windows of ``stream``.

    Shows how the model fares past the 256 positions it was trained on (RoPE extrapolation).
    Returns ``{"0-255": loss, "256-511": loss, ...}``.
    """
    import torch

    n = (len(stream) - 1) // seq_len
    sums = np.zeros(seq_len)
    with torch.no_grad():
        for i in range(n):
            x = torch.from_numpy(stream[i * seq_len : (i + 1) * seq_len + 1]).long()[None]
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="none")
            sums += loss.numpy()
    per_pos = sums / max(1, n)
    out: dict[str, float] = {"windows": n}
    for lo, hi in itertools.pairwise(edges):
        out[f"{lo}-{hi - 1}"] = float(per_pos[lo:hi].mean())
    return out


def attention_sink_check(
    model: Any, stream: np.ndarray, seq_len: int = 256, windows: int = 8, from_pos: int = 32
) -> dict[str, Any]:
    """Mean attention on each window's first token, per layer (eager attention, no grad).

    Averaged over heads and query positions ``from_pos .. seq_len-1`` of the first ``windows``
    non-overlapping windows of ``stream``; ``uniform`` is what uniform causal attention gives.
    """
    import torch

    rows = [stream[i * seq_len : (i + 1) * seq_len] for i in range(windows)]
    x = torch.from_numpy(np.stack(rows)).long()
    attn = eager_attentions(model, x)
    first = [float(a[:, :, from_pos:, 0].mean()) for a in attn]
    head_max = [float(a[:, :, from_pos:, 0].mean(dim=(0, 2)).max()) for a in attn]
    uniform = float(np.mean([1.0 / (q + 1) for q in range(from_pos, seq_len)]))
    return {
        "windows": windows,
        "seq_len": seq_len,
        "from_pos": from_pos,
        "first_token_attention": first,
        "first_token_attention_max_head": head_max,
        "uniform": uniform,
    }


def eager_attentions(model: Any, input_ids: Any) -> tuple[Any, ...]:
    """Every layer's attention weights ``[batch, heads, q, k]`` (eager attention, no grad).

    Fused attention kernels do not return weights, so the model runs once with HF's eager
    implementation and is switched back after.
    """
    import torch

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
