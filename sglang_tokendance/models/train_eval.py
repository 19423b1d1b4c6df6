"""Evaluating the trained model: load it, measure it (:mod:`.measures`), plot its loss curve,
write ``eval.json`` and its card (:mod:`.model_card`)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from sglang_tokendance.models.measures import (
    attention_sink_check,
    greedy_samples,
    induction_check,
    position_loss,
    text_copy_check,
    unigram_loss,
    windows_loss,
)
from sglang_tokendance.models.model_card import CURVE_JSON, CURVE_PNG, EVAL_INFO, write_card
from sglang_tokendance.models.train_config import trained_model_dir
from sglang_tokendance.models.train_data import load_streams

logger = logging.getLogger(__name__)


def plot_curve(curve_json: Path, png: Path) -> None:
    """Plot the train loss (and the val-probe points) of ``curve_json`` into ``png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a bench extra
        logger.warning("matplotlib missing; no %s", png.name)
        return
    data = json.loads(curve_json.read_text())
    steps = [c["step"] for c in data["train"]]
    losses = np.asarray([c["loss"] for c in data["train"]])
    k = 20
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid") if len(losses) > k else losses
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="0.8", lw=0.8, label="train (per step)")
    ax.plot(steps[len(steps) - len(smooth) :], smooth, lw=1.5, label=f"train ({k}-step mean)")
    if data.get("val_probe"):
        ax.plot(
            [v["step"] for v in data["val_probe"]],
            [v["val_loss"] for v in data["val_probe"]],
            "o-",
            ms=3,
            label="val (probe, 4k tokens)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_ylim(bottom=max(0.0, float(losses.min()) - 0.5), top=min(9.0, float(losses.max())))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ind = [v for v in data.get("val_probe", []) if "induction_ratio" in v]
    if ind:
        ax2 = ax.twinx()
        ax2.plot(
            [v["step"] for v in ind],
            [v["induction_ratio"] for v in ind],
            "s--",
            ms=3,
            color="tab:red",
            label="induction ratio (2nd/1st copy)",
        )
        ax2.set_ylabel("induction ratio")
        ax2.set_ylim(0.0, 1.1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def load_model(model_dir: Path | None = None) -> tuple[Any, Any]:
    """The trained model (float32, eval mode) and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = model_dir or trained_model_dir()
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(d))


def evaluate(
    model_dir: Path | None = None,
    install: bool = True,
    streams: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Measure the saved (fp16) model: val perplexity vs unigram, induction, greedy samples.

    Writes ``eval.json`` and the model card ``README.md`` into the model directory.

    Args:
        model_dir: the model (default: the committed trained model).
        install: allow installing the Python docs (the corpus) with apt-get.
        streams: the corpus already encoded with this model's tokenizer (default: encode it).
    """
    import torch

    torch.set_num_threads(1)
    d = model_dir or trained_model_dir()
    t0 = time.monotonic()
    model, tok = load_model(d)
    if streams is None:
        streams = load_streams(tok, install=install)
    seq_len = 256
    val_loss = windows_loss(model, streams["val"], seq_len)
    n = (len(streams["val"]) - 1) // seq_len
    targets = np.concatenate(
        [streams["val"][i * seq_len + 1 : i * seq_len + seq_len + 1] for i in range(n)]
    )
    uni = unigram_loss(streams["train"], targets, model.config.vocab_size)
    result = {
        "vocab": int(model.config.vocab_size),
        "val_tokens_scored": int(targets.size),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "unigram_loss": uni,
        "unigram_ppl": math.exp(uni),
        "induction": induction_check(model),
        "text_copy": text_copy_check(model, streams["val"]),
        "attention_sink": attention_sink_check(model, streams["val"], seq_len),
        "position_loss": position_loss(model, streams["val"]),
        "greedy": greedy_samples(model, tok),
        "eval_s": 0.0,
    }
    result["eval_s"] = round(time.monotonic() - t0, 1)
    (d / EVAL_INFO).write_text(json.dumps(result, indent=1) + "\n")
    if (d / CURVE_JSON).exists():
        plot_curve(d / CURVE_JSON, d / CURVE_PNG)
    write_card(d, result)
    logger.info(
        "val ppl %.2f vs unigram %.2f; induction %.3f -> %.3f",
        result["val_ppl"],
        result["unigram_ppl"],
        result["induction"]["first_copy_loss"],
        result["induction"]["second_copy_loss"],
    )
    return result
