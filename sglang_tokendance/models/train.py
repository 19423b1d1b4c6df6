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

Commands (``python -m sglang_tokendance.models ...``, the same as ``... .models.train ...``)::

    train    [--budget-min 20] [--steps N] [--out DIR]   # train, then evaluate + write the card
    evaluate [--model DIR]                                # measure and (re)write eval.json + card

Around this module: :mod:`.train_config` (what decides the weights), :mod:`.train_data`
(tokenizer, streams, batches), :mod:`.train_eval` (evaluation, curve, card).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sglang_tokendance.models.induction_init import plant_previous_token_head
from sglang_tokendance.models.measures import induction_check, windows_loss
from sglang_tokendance.models.model_card import CURVE_JSON, CURVE_PNG, TRAIN_INFO
from sglang_tokendance.models.train_config import TRAINED_DIR, TrainConfig, lr_at, make_config
from sglang_tokendance.models.train_data import (
    copy_batch,
    encode_stream,
    sample_batch,
    train_prose_tokenizer,
)
from sglang_tokendance.models.train_eval import plot_curve

logger = logging.getLogger(__name__)


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


if __name__ == "__main__":
    from sglang_tokendance.models.__main__ import main

    raise SystemExit(main())
