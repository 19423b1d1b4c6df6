"""The models' command line: ``python -m sglang_tokendance.models build|train|evaluate``.

- ``build tiny|small [--arch llama|qwen2]`` builds (if needed) a random-weight model and prints
  its directory; ``build trained`` prints the directory of the committed trained model;
- ``train [--budget-min 20] [--steps N] [--out DIR]`` retrains that model (~20 min on CPU,
  :mod:`.train`), then evaluates it and rewrites its card;
- ``evaluate [--model DIR]`` measures a trained model and (re)writes ``eval.json`` and its card
  (:mod:`.train_eval`).

``python -m sglang_tokendance.models.train train|evaluate`` is the same command line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sglang_tokendance.models.builder import ARCHS, SIZES, build
from sglang_tokendance.models.train_config import TRAINED_DIR, TrainConfig, trained_model_dir

TRAINED = "trained"


def main(argv: list[str] | None = None) -> int:
    """Run one command of the models' command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m sglang_tokendance.models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (if needed) and print the model directory")
    b.add_argument("size", choices=[*sorted(SIZES), TRAINED])
    b.add_argument("--arch", choices=ARCHS, default="llama")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    t = sub.add_parser("train", help="train the small trained Llama, evaluate it, write its card")
    add_train_args(t)
    e = sub.add_parser("evaluate", help="measure the model and (re)write eval.json + README.md")
    e.add_argument("--model", type=Path, default=None, help="model directory (default: trained)")
    args = parser.parse_args(argv)
    if args.cmd == "train":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        return run_train(args)
    if args.cmd == "evaluate":
        from sglang_tokendance.models.train_eval import evaluate

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        print(json.dumps(evaluate(args.model), indent=1))
        return 0
    logging.basicConfig(level=logging.WARNING)
    if args.size == TRAINED:
        if args.arch != "llama" or args.force:
            parser.error("the trained model is a committed llama; --arch/--force do not apply")
        try:
            print(trained_model_dir())
        except FileNotFoundError as err:
            parser.exit(1, f"{err}\n")
        return 0
    print(build(args.size, args.arch, force=args.force))
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
    from sglang_tokendance.models.train import train
    from sglang_tokendance.models.train_eval import evaluate

    out, streams = train(cfg, args.out)
    if not args.no_evaluate:
        evaluate(out, streams=streams)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
