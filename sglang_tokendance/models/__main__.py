"""``python -m sglang_tokendance.models build tiny|small [--arch llama|qwen2]``."""

from __future__ import annotations

import argparse
import logging

from sglang_tokendance.models.builder import ARCHS, SIZES, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_tokendance.models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (if needed) and print the model directory")
    b.add_argument("size", choices=sorted(SIZES))
    b.add_argument("--arch", choices=ARCHS, default="llama")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(build(args.size, args.arch, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
