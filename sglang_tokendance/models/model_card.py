"""The trained model's card (``README.md`` beside the weights), written from its measurements.

:func:`write_card` reads ``train_info.json`` (what training did, both stages) and the
evaluation's numbers, and writes a card whose every number comes from those two.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sglang_tokendance.models.train_config import TrainConfig  # the card describes its fields

CARD = "README.md"
TRAIN_INFO = "train_info.json"
EVAL_INFO = "eval.json"
CURVE_JSON = "loss_curve.json"
CURVE_PNG = "loss_curve.png"


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
first-copy loss; 1.0 means no copying). These were exploratory runs, one seed each, from scratch
scripts that are not in the repository: read them as the reasons for the recipe, not as
reproducible results. Only this model's own warm-up record (below) comes from `train`:

- vocabulary 4,096, untied embeddings, 1,174 steps, 20% of rows ending by repeating their own
  last 16–128 tokens: ratio 1.00 (validation ppl 64.5);
- vocabulary 1,024, tied, 600 warm-up steps of 32 × 64 copy rows, then prose with 20% copy rows
  (the previous version of this model): 0.84 after the warm-up, 0.88 at the end;
- copy rows alone (16 × 128, periods 8–64), from random weights: 2 layers at lr 1e-3 still 0.87
  after 1,150 steps, 4 layers at lr 3e-3 0.98 after 600; fine-tuning the previous model on 50%
  copy rows (lr 1e-3): 0.88 after 800 steps. All on the plateau;
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
