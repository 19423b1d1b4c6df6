"""``python -m sglang_tokendance.models build tiny|small|trained [--arch llama|qwen2]``.

``build tiny|small`` builds (if needed) a random-weight model and prints its directory;
``build trained`` prints the directory of the committed trained model (see ``train.py``);
``train`` retrains that model (~20 min on one CPU thread) and rewrites its model card.
"""

from __future__ import annotations

import argparse
import logging

from sglang_tokendance.models.builder import ARCHS, SIZES, build

TRAINED = "trained"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_tokendance.models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (if needed) and print the model directory")
    b.add_argument("size", choices=[*sorted(SIZES), TRAINED])
    b.add_argument("--arch", choices=ARCHS, default="llama")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    t = sub.add_parser("train", help="train the small trained Llama, evaluate it, write its card")
    from sglang_tokendance.models.train import add_train_args, run_train, trained_model_dir

    add_train_args(t)
    args = parser.parse_args(argv)
    if args.cmd == "train":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        return run_train(args)
    logging.basicConfig(level=logging.WARNING)
    if args.size == TRAINED:
        if args.arch != "llama" or args.force:
            parser.error("the trained model is a committed llama; --arch/--force do not apply")
        try:
            print(trained_model_dir())
        except FileNotFoundError as e:
            parser.exit(1, f"{e}\n")
        return 0
    print(build(args.size, args.arch, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
