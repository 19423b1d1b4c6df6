"""Command line of the replayer.

``python -m sglang_tokendance.replay TRACE [--url URL] [--mode tokendance|pic|off]
[--closed-loop] [--report FILE.json] [--concurrency K] [--model tiny|small|DIR]
[--max-rounds R] [--round-prefix P] [--group G] [--server-args "..."] [--save-prompts]
[--no-progress]``

Without ``--url`` an embedded CPU server is started (the tiny Llama unless ``--model``, with
``--enable-tokendance --tokendance-mode MODE``) and always stopped at the end.

``python -m sglang_tokendance.replay compare A.json B.json [...]`` prints reports side by side.
Exit status: 0 on success, 1 if the trace is invalid or any request failed, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sglang_tokendance.replay.report import build_report, compare, summary
from sglang_tokendance.replay.runner import MODES, ReplayOptions, replay
from sglang_tokendance.trace.format import TraceError, read_trace


def _model_path(spec: str, arch: str) -> Path:
    if spec in ("tiny", "small"):
        from sglang_tokendance.models import build

        return build(spec, arch)
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"error: --model {spec!r} is neither tiny, small nor a directory")
    return path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m sglang_tokendance.replay TRACE ...``."""
    ap = argparse.ArgumentParser(
        prog="python -m sglang_tokendance.replay",
        description="Replay a tokendance-trace against SGLang round by round and report "
        "prefill, KV and latency. Subcommand: compare A.json B.json.",
    )
    ap.add_argument("trace", metavar="TRACE", help="trace file (JSON Lines, format v1)")
    ap.add_argument("--url", help="server URL (default: start an embedded CPU server)")
    ap.add_argument(
        "--mode",
        choices=MODES,
        default="tokendance",
        help="hints sent (off: plain prompts) and the embedded server's mode",
    )
    ap.add_argument(
        "--closed-loop",
        action="store_true",
        help="feed each round's generated outputs into the next round's shared "
        "segments (default: open loop, recorded texts)",
    )
    ap.add_argument("--report", metavar="FILE.json", help="write the JSON report here")
    ap.add_argument(
        "--concurrency",
        type=int,
        metavar="K",
        help="at most K requests in flight (default: a whole round at once)",
    )
    ap.add_argument("--model", default="tiny", help="embedded server model: tiny | small | DIR")
    ap.add_argument("--arch", default="llama", choices=("llama", "qwen2"))
    ap.add_argument("--max-rounds", type=int, metavar="R", help="replay only the first R rounds")
    ap.add_argument(
        "--server-args",
        default="",
        metavar="ARGS",
        help="more launch_server flags for the embedded server (one string)",
    )
    ap.add_argument("--server-log", metavar="FILE", help="embedded server log file")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-request timeout, seconds")
    ap.add_argument(
        "--ignore-arrival",
        action="store_true",
        help="send a round's requests at once even if the trace has arrival_s",
    )
    ap.add_argument(
        "--round-prefix",
        default="",
        metavar="P",
        help="send round ids P + r<N> (default r<N>); a fresh P replays other texts against a "
        "server that has already seen these rounds",
    )
    ap.add_argument(
        "--group",
        default=None,
        metavar="G",
        help="routing key sent as the hint's group and the X-SMG-Routing-Key header (default: "
        "the trace header's group, else derived from the round ids)",
    )
    ap.add_argument(
        "--save-prompts",
        action="store_true",
        help="include every prompt sent (and its kv_hints) in the report",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def run(args: argparse.Namespace) -> int:
    """Replay as the parsed arguments say; returns the exit status."""
    try:
        trace = read_trace(args.trace)
        opts = ReplayOptions(
            mode=args.mode,
            closed_loop=args.closed_loop,
            concurrency=args.concurrency,
            max_rounds=args.max_rounds,
            timeout_s=args.timeout,
            honor_arrival=not args.ignore_arrival,
            progress=not args.no_progress,
            round_prefix=args.round_prefix,
            group=args.group,
        )
    except (TraceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TraceError) else 2
    launch: dict[str, Any] | None = None
    if args.url:
        result = replay(trace, args.url, opts)
    else:
        from sglang_tokendance.server import ServerProcess

        extra = ["--enable-tokendance", "--tokendance-mode", args.mode]
        extra += shlex.split(args.server_args)
        model = _model_path(args.model, args.arch)
        t0 = time.perf_counter()
        print(
            f"starting embedded SGLang server ({model.name}, mode {args.mode}) ...",
            file=sys.stderr,
            flush=True,
        )
        with ServerProcess(model, extra, log_path=args.server_log) as srv:
            started = time.perf_counter() - t0
            result = replay(trace, srv.url, opts)
        launch = {"embedded": True, "launch_args": extra, "startup_s": round(started, 1)}
    report = build_report(
        result,
        opts,
        str(args.trace),
        trace.header.workload,
        len(trace.header.agents),
        launch,
        include_prompts=args.save_prompts,
    )
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(summary(report))
    if args.report:
        print(f"  report: {args.report}")
    return 1 if report["errors"] else 0


def compare_main(argv: Sequence[str]) -> int:
    """``compare A.json B.json ...``: print the reports side by side."""
    ap = argparse.ArgumentParser(prog="python -m sglang_tokendance.replay compare")
    ap.add_argument("reports", nargs="+", metavar="REPORT.json")
    args = ap.parse_args(list(argv))
    reports, names = [], []
    for path in args.reports:
        try:
            rep = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            return 1
        reports.append(rep)
        mode, stem = str(rep.get("mode", "?")), Path(path).stem
        names.append(mode if stem == mode else f"{mode} ({stem})")
    first = reports[0]
    print(
        f"{first.get('workload')}: {first.get('agents')} agents, {first.get('rounds')} rounds, "
        f"{first.get('requests')} requests"
    )
    print(compare(reports, names))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
