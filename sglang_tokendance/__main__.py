"""``python -m sglang_tokendance serve [--model tiny|small|DIR] [--arch A] [SGLang flags...]``.

Starts the real SGLang server on CPU with TokenDance enabled and sane CPU defaults; every flag
not listed here is passed to ``sglang.launch_server`` unchanged (and overrides the defaults).
With ``--dp-size``/``--tp-size`` above 1 it sets ``SGLANG_CPU_OMP_THREADS_BIND`` (the cores
split per rank, e.g. ``0|1``) unless it is set already.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sglang_tokendance.server import build_command
from sglang_tokendance.server_env import server_env


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_tokendance serve",
        description="Start SGLang with TokenDance on CPU; unknown flags go to launch_server.",
    )
    parser.add_argument("--model", default="tiny", help="tiny | small | a model directory")
    parser.add_argument("--arch", default="llama", choices=("llama", "qwen2"))
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument(
        "--no-tokendance", action="store_true", help="do not add --enable-tokendance"
    )
    args, rest = parser.parse_known_args(argv)
    if args.model in ("tiny", "small"):
        from sglang_tokendance.models import build

        model = build(args.model, args.arch)
    else:
        model = Path(args.model)
        if not model.exists():
            parser.error(f"--model {args.model!r} is neither tiny, small nor a directory")
    extra = list(rest)
    if not args.no_tokendance and "--enable-tokendance" not in extra:
        extra.insert(0, "--enable-tokendance")
    cmd = build_command(model, args.port, extra)
    print(" ".join(cmd), flush=True)
    os.execve(sys.executable, cmd, server_env(cmd))
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands: serve, build (= python -m sglang_tokendance.models build)")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return _serve(rest)
    if cmd == "build":
        from sglang_tokendance.models.__main__ import main as build_main

        return build_main(["build", *rest])
    print(f"unknown command {cmd!r}; try: serve, build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
