"""Train the project's small *trained* Llama model on CPU (then evaluate it and write its card).

Random-weight models cannot tell a faithful KV reuse from a sloppy one: nothing they output
depends on the context in a meaningful way. A trained model does (induction heads copy earlier
spans), so fidelity numbers measured with it mean something. Under 30 minutes on 2 CPU threads:

- corpus: the Python 3.11 HTML docs as prose + the project's GA text (:mod:`.corpus_prose`);
- tokenizer: the project's byte-level BPE (same special tokens and chat template as
  :mod:`.tokenizer`), retrained on the train split with a 1,024-token vocabulary;
- model: ``LlamaForCausalLM`` (RoPE, GQA, tied embeddings), 4 layers, hidden 256, 8 heads / 4 KV
  heads, MLP 688; layer 0's head 0 planted as a previous-token head (:mod:`.induction_init`);
- training: a copy warm-up that ends once the induction check passes, then 256-token rows of
  prose with copying practice mixed in; AdamW, linear warm-up then cosine decay, a wall-clock
  budget that fixes the number of steps after a short timing warm-up (or ``--steps``); a second
  stage (``--resume``) continues at 2,048 tokens;
- output: fp16 safetensors + tokenizer + chat template (``save_pretrained``), the loss curve
  (JSON + PNG), ``train_info.json``, ``eval.json`` (:mod:`.measures`) and the model card
  (:mod:`.model_card`).

Commands (``python -m sglang_tokendance.models.train ...``)::

    train    [--budget-min 20] [--steps N] [--out DIR]   # train, then evaluate + write the card
    evaluate [--model DIR]                                # measure and (re)write eval.json + card

``python -m sglang_tokendance.models train`` is the same as ``... .train train``.
"""

from __future__ import annotations

import argparse
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
from sglang_tokendance.models.measures import (
    attention_sink_check,
    greedy_samples,
    induction_check,
    position_loss,
    text_copy_check,
    unigram_loss,
    windows_loss,
)
from sglang_tokendance.models.model_card import (
    CURVE_JSON,
    CURVE_PNG,
    EVAL_INFO,
    TRAIN_INFO,
    write_card,
)

logger = logging.getLogger(__name__)

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
