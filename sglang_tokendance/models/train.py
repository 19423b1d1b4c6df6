"""Train the project's small *trained* Llama model on CPU, evaluate it, write its model card.

Random-weight models cannot tell a faithful KV reuse from a sloppy one: nothing they output
depends on the context in a meaningful way. A trained model does (induction heads copy earlier
spans, attention sinks form on the first tokens), so fidelity numbers measured with it mean
something. This module trains one in about 20 minutes on one CPU thread:

- corpus: the Python 3.11 HTML docs as prose + the project's GA text (:mod:`.corpus_prose`);
- tokenizer: the project's byte-level BPE (same special tokens and chat template as
  :mod:`.tokenizer`), trained on the train split with a 4096 vocabulary;
- model: ``LlamaForCausalLM`` (RoPE, GQA), 4 layers, hidden 256, 8 heads / 4 KV heads, MLP 688;
- training: sequences of 256 tokens, AdamW, linear warm-up then cosine decay, a wall-clock budget
  that fixes the number of steps after a short timing warm-up (or an explicit ``--steps``);
- output: fp16 safetensors + tokenizer + chat template (``save_pretrained``), the loss curve
  (JSON + PNG), ``train_info.json``, ``eval.json`` and the model card ``README.md``.

Commands (``python -m sglang_tokendance.models.train ...``)::

    train    [--budget-min 20] [--steps N] [--out DIR]   # train, then evaluate + write the card
    evaluate [--model DIR]                                # measure and (re)write eval.json + card

``python -m sglang_tokendance.models train`` is the same as ``... .train train``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sglang_tokendance.models.induction_init import plant_previous_token_head

logger = logging.getLogger(__name__)

TRAINED_DIR = Path(__file__).parent / "trained"
SEED = 1234
CARD = "README.md"
TRAIN_INFO = "train_info.json"
EVAL_INFO = "eval.json"
CURVE_JSON = "loss_curve.json"
CURVE_PNG = "loss_curve.png"

GREEDY_PROMPTS = (
    "The Python interpreter",
    "A list is a",
    "Arthur Burton is",
    "Name: Isabella Rodriguez\nAge:",
    "To open a file for reading,",
)


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


# --------------------------------------------------------------------------------- tokenizer


def train_prose_tokenizer(out_dir: Path, texts: Sequence[str], vocab_size: int) -> None:
    """Train the project's byte-level BPE on ``texts`` and save it into ``out_dir``.

    Same settings, special tokens and chat template as
    :func:`sglang_tokendance.models.tokenizer.train_tokenizer`, which trains on the GA corpus
    only; this one takes the corpus as an argument (and leaves ``build``'s tokenizer untouched).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sglang_tokendance.models.tokenizer import (
        BOS,
        CHAT_TEMPLATE,
        EOS,
        IM_END,
        IM_START,
        PAD,
        SPECIAL_TOKENS,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def lines() -> Iterator[str]:
        for text in texts:
            yield from text.splitlines(keepends=True)

    tok.train_from_iterator(lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    fast.save_pretrained(str(out_dir))


def encode_stream(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Token ids of ``texts`` concatenated, each document followed by EOS (int32 array)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def load_streams(tokenizer: Any, install: bool = True) -> dict[str, np.ndarray]:
    """The corpus's train and val splits as token streams (``{"train": ..., "val": ...}``)."""
    from sglang_tokendance.models.corpus_prose import load_corpus

    corpus = load_corpus(install=install)
    return {k: encode_stream(tokenizer, [d.text for d in v]) for k, v in corpus.items()}


# ------------------------------------------------------------------------------------- model


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


def copy_batch(cfg: TrainConfig, rng: np.random.Generator, vocab: int) -> np.ndarray:
    """A ``(copy_batch_size, copy_seq_len + 1)`` batch of pure copying practice (warm-up).

    Each row is ``L`` random token ids (``L`` uniform in 8..copy_seq_len/2, ids in
    256..vocab-1) repeated to the end of the row: only copying from context predicts the
    repeats, and periods vary so no fixed-offset shortcut does.
    """
    n = cfg.copy_seq_len + 1
    rows = []
    for length in rng.integers(8, cfg.copy_seq_len // 2 + 1, size=cfg.copy_batch_size):
        seg = rng.integers(256, vocab, size=int(length))
        rows.append(np.tile(seg, n // int(length) + 1)[:n])
    return np.stack(rows).astype(np.int64)


def sample_batch(
    stream: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    repeat_frac: float,
    vocab: int,
) -> np.ndarray:
    """A ``(batch, seq_len + 1)`` batch of windows of ``stream`` at random offsets.

    A share ``repeat_frac`` of rows (on average) is copying practice: a window of text of ``H``
    tokens (``H`` uniform in 0..seq_len/2), then ``L`` random token ids (``L`` uniform in
    8..64, ids uniform in 256..vocab-1: no bytes, no specials) repeated until the row is full.
    Only copying from context predicts the repeats.
    """
    n = cfg.seq_len + 1
    starts = rng.integers(0, len(stream) - n, size=cfg.batch_size)
    rows = [stream[s : s + n] for s in starts]
    if repeat_frac > 0:
        repeat = rng.random(cfg.batch_size) < repeat_frac
        lengths = rng.integers(8, 65, size=cfg.batch_size)
        heads = rng.integers(0, n // 2 + 1, size=cfg.batch_size)
        for i in np.flatnonzero(repeat):
            length = int(lengths[i])
            seg = rng.integers(256, vocab, size=length).astype(stream.dtype)
            reps = n // length + 1
            rows[i] = np.concatenate([rows[i][: int(heads[i])], *([seg] * reps)])[:n]
    return np.stack(rows)


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train(
    cfg: TrainConfig, out_dir: Path = TRAINED_DIR, install: bool = True
) -> tuple[Path, dict[str, np.ndarray]]:
    """Train the model and save it (fp16 safetensors + tokenizer) into ``out_dir``.

    The run is deterministic for a given number of steps (seeded, one thread). With
    ``cfg.steps`` unset, the number of steps is fixed after ``cfg.timing_steps`` steps so that
    the whole command (corpus, tokenizer, training, evaluation) fits ``cfg.budget_min``; a hard
    stop at the budget guards against a slower machine. The step count used is recorded.

    Returns:
        ``out_dir`` and the encoded corpus (``{"train": ids, "val": ids}``) for :func:`evaluate`.
    """
    t0 = time.monotonic()
    budget_s = cfg.budget_min * 60.0
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sglang_tokendance.models.corpus_prose import load_corpus

    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    corpus = load_corpus(install=install)
    stage1: dict[str, Any] | None = None
    if cfg.resume:  # a later stage: same tokenizer (same ids), weights from the earlier stage
        src = Path(cfg.resume)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy2(src / name, tmp / name)
        if (src / TRAIN_INFO).exists():
            stage1 = json.loads((src / TRAIN_INFO).read_text())
            if (src / CURVE_JSON).exists():  # keep the earlier stage's checks for the card
                stage1["val_probe"] = json.loads((src / CURVE_JSON).read_text())["val_probe"]
    else:
        train_prose_tokenizer(tmp, [d.text for d in corpus["train"]], cfg.vocab_size)
    tok = AutoTokenizer.from_pretrained(str(tmp))
    streams = {k: encode_stream(tok, [d.text for d in v]) for k, v in corpus.items()}
    train_ids, val_ids = streams["train"], streams["val"]
    logger.info(
        "tokens: train %d, val %d (vocab %d); setup took %.1fs",
        len(train_ids),
        len(val_ids),
        len(tok),
        time.monotonic() - t0,
    )

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.resume:
        model = LlamaForCausalLM.from_pretrained(cfg.resume, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(make_config(cfg, tok))
        if cfg.plant_prev_token_head:
            plant_previous_token_head(model)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=False
    )
    val_probe = val_ids[: 16 * cfg.seq_len + 1]  # a fixed slice for the curve's val points

    if cfg.timing_steps > cfg.warmup_steps:
        raise ValueError("timing_steps must not exceed warmup_steps (the schedule needs total)")
    total = cfg.steps or 10**9
    curve: list[dict[str, float]] = []
    val_curve: list[dict[str, float]] = []
    loop_t0 = time.monotonic()
    stopped_early = False
    bar = tqdm(total=cfg.steps, desc="train", unit="step", dynamic_ncols=True)
    step = 0
    warmup_end = cfg.copy_warmup_steps  # lowered when the induction check passes early
    while step < total:
        warming = step < warmup_end
        if warming:
            x = torch.from_numpy(copy_batch(cfg, rng, len(tok)))
        else:
            x = torch.from_numpy(
                sample_batch(train_ids, cfg, rng, cfg.repeat_frac, len(tok))
            ).long()
        lr = lr_at(step, total, cfg)  # warm-up (< timing_steps) does not depend on total
        if warming:
            lr = min(lr, cfg.copy_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_v = loss.item()
        now = time.monotonic()
        curve.append(
            {
                "step": step,
                "tokens": step * cfg.batch_size * cfg.seq_len,
                "loss": loss_v,
                "lr": lr,
                "elapsed_s": round(now - t0, 2),
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.2e}")
        if cfg.steps is None and step == cfg.timing_steps:
            per_step = (now - loop_t0) / step
            left = budget_s - (now - t0) - cfg.eval_reserve_s
            total = max(step + 1, step + int(left / (per_step * 1.03)))
            bar.total = total
            bar.refresh()
            logger.info(
                "%.2fs/step -> %d steps fit the %.0f min budget", per_step, total, cfg.budget_min
            )
        if step % cfg.val_every == 0 or step == total:
            vl = windows_loss(model, val_probe, cfg.seq_len)
            ind = induction_check(model, length=64, trials=4, seed=1)["ratio"]
            model.train()
            val_curve.append({"step": step, "val_loss": vl, "induction_ratio": ind})
            if warming and ind <= cfg.copy_warmup_until:
                warmup_end = step
                logger.info("copying works (induction ratio %.3f): warm-up ends", ind)
            logger.info(
                "step %d loss %.3f val(probe) %.3f induction %.3f lr %.2e",
                step,
                loss_v,
                vl,
                ind,
                lr,
            )
        if cfg.steps is None and now - t0 > budget_s - cfg.eval_reserve_s and step < total:
            logger.warning("time budget reached at step %d of %d; stopping", step, total)
            stopped_early = True
            break
    bar.close()
    train_s = time.monotonic() - loop_t0

    val_loss = windows_loss(model, val_ids, cfg.seq_len)
    logger.info("final val loss %.4f (ppl %.2f)", val_loss, math.exp(val_loss))
    model.config.dtype = "float16"
    model.half().save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "tokendance_model.json").write_text(
        json.dumps(
            {
                "size": "trained",
                "arch": "llama",
                "spec": {
                    k: getattr(cfg, k)
                    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")
                }
                | {"vocab": len(tok), "max_positions": cfg.max_positions},
                "seed": cfg.seed,
            },
            indent=1,
        )
        + "\n"
    )
    info = {
        "config": asdict(cfg),
        "steps": step,
        "planned_steps": total,
        "stopped_early": stopped_early,
        "copy_warmup_steps_run": min(warmup_end, step),
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "params": n_params,
        "train_loop_s": round(train_s, 1),
        "wall_s": round(time.monotonic() - t0, 1),
        "final_train_loss_avg50": float(np.mean([c["loss"] for c in curve[-50:]])),
        "val_loss_fp32": val_loss,
        "torch": torch.__version__,
        "rebuild": f"python -m sglang_tokendance.models train --steps {step}"
        + (
            f" --resume STAGE1_DIR --seq-len {cfg.seq_len} --batch-size {cfg.batch_size} "
            f"--lr {cfg.lr:g} --copy-warmup-steps {cfg.copy_warmup_steps}"
            if cfg.resume
            else ""
        )
        + (" (approximate: the budget stopped this run early)" if stopped_early else ""),
        "previous_stage": stage1,
    }
    (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=1) + "\n")
    (tmp / CURVE_JSON).write_text(json.dumps({"train": curve, "val_probe": val_curve}) + "\n")
    plot_curve(tmp / CURVE_JSON, tmp / CURVE_PNG)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    logger.info("saved trained model to %s (%.1f min)", out_dir, (time.monotonic() - t0) / 60)
    return out_dir, streams


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


# -------------------------------------------------------------------------------- evaluation


def load_model(model_dir: Path | None = None) -> tuple[Any, Any]:
    """The trained model (float32, eval mode) and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = model_dir or trained_model_dir()
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(d))


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


# -------------------------------------------------------------------------------- model card


def write_card(d: Path, ev: dict[str, Any]) -> None:
    """(Re)write the model card ``README.md`` from ``train_info.json`` and ``ev``."""
    info = json.loads((d / TRAIN_INFO).read_text()) if (d / TRAIN_INFO).exists() else {}
    cfg = info.get("config", asdict(TrainConfig()))
    size_mb = (d / "model.safetensors").stat().st_size / 1e6
    ind = ev["induction"]
    tc = ev.get("text_copy") or {
        "trials": 0,
        "length": 0,
        "first_copy_loss": float("nan"),
        "second_copy_loss": float("nan"),
        "ratio": float("nan"),
    }
    copies = ind["ratio"] < 0.5
    summary = (
        f"validation perplexity {ev['val_ppl']:.1f} against {ev['unigram_ppl']:.1f} for token "
        f"frequencies alone; on a repeated random sequence its loss falls from "
        f"{ind['first_copy_loss']:.2f} to {ind['second_copy_loss']:.2f} nats on the second copy"
    )
    if ev.get("text_copy"):
        summary += (
            f", and on a repeated passage of unseen text from {tc['first_copy_loss']:.2f} to "
            f"{tc['second_copy_loss']:.2f}"
        )
    verdict = (
        "It has learned to use its context: it predicts prose and copies repeated spans"
        if copies
        else "WARNING: the induction check does not pass (second copy not below half the first)"
    )
    samples = "\n".join(
        f"- `{json.dumps(s['prompt'])[1:-1]}` → `{json.dumps(s['completion'])[1:-1]}`"
        for s in ev["greedy"]
    )
    sink = ev.get("attention_sink")
    sink_md = ""
    if sink:
        rows = "\n".join(
            f"| {i} | {a:.3f} | {m:.3f} | {sink['uniform']:.3f} |"
            for i, (a, m) in enumerate(
                zip(
                    sink["first_token_attention"],
                    sink["first_token_attention_max_head"],
                    strict=True,
                )
            )
        )
        sink_md = f"""
Attention sink: attention weight on each window's first token, averaged over query positions
{sink["from_pos"]}..{sink["seq_len"] - 1} of {sink["windows"]} validation windows (all heads, and
the head that attends to it most), against what uniform attention would give.

| layer | mean over heads | top head | uniform |
|---|---|---|---|
{rows}
"""
    steps = info.get("steps", "?")
    per_step = info.get("train_loop_s", 0) / max(1, info.get("steps") or 1)
    budget = f"`--budget-min {cfg['budget_min']:g}`"
    if cfg.get("steps"):
        how = (
            f"the step count was fixed with `--steps {cfg['steps']}` (the default, {budget}, "
            f"instead fixes it after {cfg['timing_steps']} timed steps so that the command fits)"
        )
    else:
        how = f"the default {budget} fixed the step count after {cfg['timing_steps']} timed steps"
    if per_step > 1.2:
        how += (
            "; the machine was shared with other jobs during this run (one free core does "
            "about 0.8 s/step)"
        )
    pos = ev.get("position_loss", {"windows": 0})
    pos_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in pos.items() if k != "windows")
    tied = "tied input/output embeddings" if cfg.get("tie_embeddings") else "untied embeddings"
    card = f"""# tokendance-trained-llama (≈{info.get("params", 0) / 1e6:.1f}M parameters)

A small **trained** Llama-architecture model for sglang-tokendance's fidelity measurements.
Random-weight models (`build tiny|small`) output noise whatever the context, so they cannot show
whether reused KV changes an answer. This one has {summary}. {verdict}. It is not a useful
language model for anything else.

Directory: `python -m sglang_tokendance.models build trained` prints it. The weights are
committed (fp16 safetensors, {size_mb:.1f} MB), so tests and CI never train.

## Architecture

- `LlamaForCausalLM`, {cfg["layers"]} layers, hidden {cfg["hidden"]}
- {cfg["heads"]} attention heads / {cfg["kv_heads"]} KV heads (GQA), head dim
  {cfg["hidden"] // cfg["heads"]}
- SwiGLU MLP {cfg["intermediate"]}, RMSNorm, RoPE (theta {cfg["rope_theta"]:g}), {tied}
- vocabulary {ev.get("vocab", cfg["vocab_size"])}: the project's byte-level BPE (same special
  tokens and ChatML chat template as the `tiny`/`small` models), trained on this corpus's train
  split
- stored in fp16; load it in float32 (`ServerProcess(dir, ["--dtype", "float32"])`, the CPU
  default)

`max_position_embeddings` is **{cfg["max_positions"]}** although training used
{cfg["seq_len"]}-token windows: SGLang caps a request's context at this value, and the project's
Generative Agents prompts and multi-round traces run to a few thousand tokens, which must be
accepted. RoPE has no learned position table, so allowing positions past {cfg["seq_len"]} costs
nothing; quality degrades there (positions never seen in training), but the model stays
deterministic and context-dependent, which is what fidelity comparisons need (the same prompt
with and without KV reuse must give the same output).

## Training data

- The Python 3.11 documentation (Debian `python3.11-doc`, `/usr/share/doc/python3.11/html`),
  turned into plain prose with the standard library's `html.parser`: page bodies only; code
  blocks, navigation, indexes and permalink marks dropped (`corpus_prose.py`). PSF license.
- The project's Generative Agents text (`models/corpus/generative_agents.txt`, Apache-2.0),
  cut into 12-line blocks and repeated 4 times so agent-style prompts are in-domain.
- Split by a hash of each document's name: ~98% train / ~2% validation (whole pages).
- Train {info.get("train_tokens", 0):,} tokens, validation {info.get("val_tokens", 0):,} tokens.

## Training
{_stages(info)}
- seed {cfg["seed"]}, `torch.set_num_threads({cfg["threads"]})`
- batch {cfg["batch_size"]} × {cfg["seq_len"]} tokens at random offsets of the train stream
  (documents joined with EOS)
{_warmup_line(cfg, info)}- {cfg.get("repeat_frac", 0.0):.0%} of rows are copying practice (a window
  of text, 0 to {cfg["seq_len"] // 2} tokens, then 8–64 random ids repeated to the end of the
  row) and the others plain text windows. See "Why tied embeddings, copying practice and a
  planted previous-token head" below
- AdamW (betas {tuple(cfg["betas"])}, weight decay {cfg["weight_decay"]} on matrices), lr
  {cfg["lr"]:g}, {cfg["warmup_steps"]} warm-up steps, cosine decay to {cfg["min_lr_ratio"]:g}×,
  gradient clip {cfg["grad_clip"]}
- {steps} steps ({info.get("tokens_seen", 0) / 1e6:.2f}M tokens) in
  {info.get("train_loop_s", 0) / 60:.1f} min of training ({per_step:.2f} s/step),
  {info.get("wall_s", 0) / 60:.1f} min for the command up to the final validation; {how}
- final train loss (mean of the last 50 steps) {info.get("final_train_loss_avg50", 0):.3f};
  loss curve in `loss_curve.png` / `loss_curve.json`

Rebuild: `{info.get("rebuild", "python -m sglang_tokendance.models train")}` (deterministic for
a fixed step count on the same torch build and CPU).

### Why tied embeddings, copying practice and a planted previous-token head

An induction head (the circuit that copies from context: "... A B ... A" -> "B") is two heads in
series: a previous-token head, and a later head that matches the current token against what it
wrote. Neither lowers the loss alone, so training sits on a plateau until both appear at once,
and the plateau grows with the vocabulary. The budget is about 4,000 steps of 2k tokens (2 CPU
threads, under 30 minutes). Measured while building this model (induction ratio = second-copy /
first-copy loss; 1.0 means no copying):

- vocabulary 4,096, untied embeddings, 1,174 steps, 20% of rows ending by repeating their own
  last 16–128 tokens: ratio 1.00 (validation ppl 64.5);
- vocabulary 1,024, tied, 600 warm-up steps of 32 × 64 copy rows, then prose with 20% copy rows
  (the previous version of this model): 0.84 after the warm-up, 0.88 at the end;
- copy rows alone (16 × 128, periods 8–64), lr 1e-3, from random weights: 2 layers still 0.87
  after 1,150 steps, 4 layers 0.98 after 600; fine-tuning the previous model on 50% copy rows:
  0.88 after 800 steps. All on the plateau;
- the same copy rows with layer 0's head 0 **planted as a previous-token head** at initialisation
  (`induction_init.py`: a constant embedding channel, which tied logits ignore, read by that
  head's q/k so that RoPE makes it attend one token back; everything stays trainable): 2 layers
  leave the plateau at step ~500 and reach 0.05 by step 750.

So the model ties its embeddings (as small Llamas do, e.g. Llama 3.2 1B/3B; an ordinary config
flag that SGLang loads), uses a 1,024-token vocabulary, starts with the planted head and a copy
warm-up that ends as soon as the check passes, then learns prose with copying practice mixed in
so the circuit stays. {_warmup_record(info)}Because the random-id check resembles the warm-up
data, the evaluation also measures copying of **real text from the validation split** (never
trained on), which is what KV-reuse fidelity depends on.

## Evaluation

Measured on the committed fp16 weights (loaded in float32) by
`python -m sglang_tokendance.models.train evaluate`, which writes `eval.json` and this card.

| metric | value |
|---|---|
| validation loss (nats/token) | {ev["val_loss"]:.3f} |
| **validation perplexity** | **{ev["val_ppl"]:.1f}** |
| unigram baseline perplexity (train token frequencies, add-one) | {ev["unigram_ppl"]:.1f} |
| validation tokens scored (non-overlapping {cfg["seq_len"]}-token windows) | \
{ev["val_tokens_scored"]:,} |

Loss by position on {pos["windows"]} validation windows of 1,024 tokens (training used
{cfg["seq_len"]}; positions past that are RoPE extrapolation):

| positions | loss (nats) |
|---|---|
{pos_rows}

Induction check: {ind["trials"]} random sequences of {ind["length"]} tokens (uniform over
non-byte, non-special ids), each repeated twice; mean next-token loss on each copy (the first
token of each copy excluded). Uniform guessing costs {ind["uniform_loss"]:.2f} nats.

| | loss (nats) |
|---|---|
| first copy | {ind["first_copy_loss"]:.3f} |
| second copy | {ind["second_copy_loss"]:.3f} |
| ratio second / first | {ind["ratio"]:.3f} |
{sink_md}
Copying real text: {tc["trials"]} passages of {tc["length"]} tokens of the validation split,
each repeated twice (same measure).

| | loss (nats) |
|---|---|
| first copy | {tc["first_copy_loss"]:.3f} |
| second copy | {tc["second_copy_loss"]:.3f} |
| ratio second / first | {tc["ratio"]:.3f} |

Greedy continuations (40 new tokens, HF `generate`, no BOS):

{samples}

## Files

`model.safetensors`, `config.json`, `generation_config.json`, tokenizer files
(`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`), `tokendance_model.json`,
`train_info.json`, `eval.json`, `loss_curve.json`, `loss_curve.png`, this card.
"""
    (d / CARD).write_text(_reflow(card))


def _warmup_line(cfg: dict[str, Any], info: dict[str, Any]) -> str:
    """The card's bullet on this stage's copy warm-up ("" when it had none)."""
    run = info.get("copy_warmup_steps_run", cfg.get("copy_warmup_steps", 0))
    if not run:
        return ""
    return (
        f"- copy warm-up: the first {run} steps (at most {cfg['copy_warmup_steps']}; it ends at"
        f" the first check with induction ratio <= {cfg.get('copy_warmup_until', 0):g}) are"
        f" batches of {cfg['copy_batch_size']} rows × {cfg['copy_seq_len']} tokens, each 8 to"
        f" {cfg['copy_seq_len'] // 2} random token ids repeated to the end of the row, lr capped"
        f" at {cfg.get('copy_lr', cfg['lr']):g}\n"
    )


def _warmup_record(info: dict[str, Any]) -> str:
    """A sentence with the induction checks of the run's copy warm-up, from its curve."""
    stage = info.get("previous_stage") or info
    curve = stage.get("val_probe") or []
    run = stage.get("copy_warmup_steps_run")
    if not curve or not run:
        return ""
    pts = ", ".join(
        f"{p['induction_ratio']:.2f} at step {p['step']}" for p in curve if p["step"] <= run
    )
    after = [p["induction_ratio"] for p in curve if p["step"] > run]
    tail = (
        f"; through the prose that followed it stayed between {min(after):.2f} and {max(after):.2f}"
        if after
        else ""
    )
    return f"In this model's warm-up the induction ratio went {pts}{tail}. "


def _stages(info: dict[str, Any]) -> str:
    """The card's paragraph on a two-stage run (empty for a single stage)."""
    first = info.get("previous_stage")
    if not first:
        return ""
    c1, c2 = first["config"], info["config"]
    plant = (
        "layer 0's head 0 planted as a previous-token head (see below)"
        if c1.get("plant_prev_token_head")
        else "no planted head"
    )
    return f"""
Two stages; this directory holds the result of the second, and the list below describes it.

- stage 1, `{first.get("rebuild", "?")}`: {first["steps"]} steps of {c1["batch_size"]} ×
   {c1["seq_len"]} tokens ({first["tokens_seen"] / 1e6:.2f}M tokens,
   {first["wall_s"] / 60:.1f} min), from random weights with {plant} and starting with
   {first.get("copy_warmup_steps_run", c1.get("copy_warmup_steps", 0))} copy warm-up steps of
   {c1.get("copy_batch_size", 0)} × {c1.get("copy_seq_len", 0)}; validation loss
   {first["val_loss_fp32"]:.3f} on {c1["seq_len"]}-token windows.
- stage 2, long context: {info["steps"]} steps of {c2["batch_size"]} × {c2["seq_len"]} tokens
   from the first stage's weights ({info["wall_s"] / 60:.1f} min). The project's Generative
   Agents prompts are 1.4k-3.5k tokens with this tokenizer; on an earlier version of this model,
   stage 1 alone left the loss at positions 512-1023 at 6.3 nats (noise: the trace's agents
   answered garbage) against 2.8 at 0-255.

Both stages: {(first["wall_s"] + info["wall_s"]) / 60:.1f} min on this machine's 2 CPU cores.
"""


def _reflow(md: str, width: int = 100) -> str:
    """Re-wrap the card's prose paragraphs and list items to ``width`` (tables/headings kept)."""
    import textwrap

    out: list[str] = []
    for block in md.split("\n\n"):
        lines = block.split("\n")
        if any(ln.startswith(("|", "#", "```")) for ln in lines):
            out.append(block)
            continue
        items: list[list[str]] = []
        for ln in lines:
            if ln.startswith("- ") or not items:
                items.append([ln])
            else:
                items[-1].append(ln)
        wrapped = []
        for item in items:
            text = " ".join(x.strip() for x in item)
            bullet = item[0].startswith("- ")
            wrapped.append(
                textwrap.fill(
                    text,
                    width=width,
                    subsequent_indent="  " if bullet else "",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
        out.append("\n".join(wrapped))
    return "\n\n".join(out)


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
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = model(input_ids=x, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
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


# -------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m sglang_tokendance.models.train train|evaluate``."""
    parser = argparse.ArgumentParser(prog="python -m sglang_tokendance.models.train")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the model, then evaluate it and write its card")
    add_train_args(t)
    e = sub.add_parser("evaluate", help="measure the model and (re)write eval.json + README.md")
    e.add_argument("--model", type=Path, default=None, help="model directory (default: trained)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "train":
        return run_train(args)
    print(json.dumps(evaluate(args.model), indent=1))
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Flags of the ``train`` command (shared with ``python -m sglang_tokendance.models``)."""
    p.add_argument("--budget-min", type=float, default=20.0, help="wall-clock budget (minutes)")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (overrides budget)")
    p.add_argument("--out", type=Path, default=TRAINED_DIR, help="output directory")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--untied", action="store_true", help="untie input/output embeddings")
    p.add_argument(
        "--repeat-frac",
        type=float,
        default=TrainConfig.repeat_frac,
        help="share of rows that are copying practice (after the copy warm-up)",
    )
    p.add_argument(
        "--copy-warmup-steps",
        type=int,
        default=TrainConfig.copy_warmup_steps,
        help="first steps whose rows are all copying practice",
    )
    p.add_argument(
        "--copy-warmup-until",
        type=float,
        default=TrainConfig.copy_warmup_until,
        help="end the copy warm-up once the induction ratio (2nd/1st copy loss) is this low",
    )
    p.add_argument(
        "--no-plant",
        action="store_true",
        help="start from plain random weights (no previous-token head; see induction_init.py)",
    )
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len, help="tokens per row")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue training this model directory (keeps its tokenizer): a later stage",
    )
    p.add_argument("--no-evaluate", action="store_true", help="skip evaluation and the card")


def run_train(args: argparse.Namespace) -> int:
    """Run ``train`` (then ``evaluate``) from parsed :func:`add_train_args` flags."""
    cfg = TrainConfig(
        steps=args.steps,
        budget_min=args.budget_min,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        repeat_frac=args.repeat_frac,
        copy_warmup_steps=args.copy_warmup_steps,
        copy_warmup_until=args.copy_warmup_until,
        plant_prev_token_head=not args.no_plant,
        tie_embeddings=not args.untied,
        seq_len=args.seq_len,
        resume=str(args.resume) if args.resume else None,
    )
    out, streams = train(cfg, args.out)
    if not args.no_evaluate:
        evaluate(out, streams=streams)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
