"""Command line: ``python -m sglang_tokendance.trace {validate,generate,stats} ...``.

- ``validate FILE...``: prints ``FILE: ok (N requests, R rounds, A agents)`` per valid file, or
  one ``FILE:LINE: problem`` line per violation; exit status 1 if any file has a problem.
- ``generate WORKLOAD --agents N --rounds R --seed S [...] -o FILE``: writes a synthetic trace.
- ``stats FILE...``: a per-round table of requests and character counts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sglang_tokendance.trace.format import TraceError, read_trace, round_stats, write_trace
from sglang_tokendance.trace.generators import ALIASES, WORKLOADS, generate
from sglang_tokendance.trace.validate import summarize_trace_file


def _summary(path: str, n_requests: int, rounds: int, agents: int) -> str:
    return f"{path}: ok ({n_requests} requests, {rounds} rounds, {agents} agents)"


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate each file; 0 if all are valid, 1 otherwise."""
    status = 0
    for path in args.files:
        errors, summary = summarize_trace_file(path)
        if errors or summary is None:
            status = 1
            for err in errors:
                print(err)
            continue
        print(_summary(path, summary.requests, summary.rounds, summary.agents))
    return status


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a trace and write it to ``args.output``."""
    try:
        trace = generate(
            args.workload,
            agents=args.agents,
            rounds=args.rounds,
            seed=args.seed,
            private_words=args.private_words,
            shared_words=args.shared_words,
            shuffle=args.shuffle,
            max_tokens=args.max_tokens,
            arrival_jitter_s=args.arrival_jitter,
        )
        write_trace(args.output, trace)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    h = trace.header
    print(_summary(args.output, len(trace.requests), h.rounds, len(h.agents)))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print per-round statistics of each file; 1 if a file is invalid."""
    status = 0
    for path in args.files:
        try:
            trace = read_trace(path)
        except TraceError as e:
            print(e, file=sys.stderr)
            status = 1
            continue
        stats = round_stats(trace)
        total_prompt = sum(s.prompt_chars for s in stats)
        total_shared = sum(s.shared_chars for s in stats)
        share = total_shared / total_prompt if total_prompt else 0.0
        print(
            f"{path}: workload {trace.header.workload}, {len(trace.requests)} requests, "
            f"{total_prompt} prompt chars, shared {share:.1%}"
        )
        print(
            "| round | requests | prompt chars | shared chars | private chars | shared share "
            "| unique shared chars |"
        )
        print("|---|---|---|---|---|---|---|")
        for s in stats:
            print(
                f"| {s.round} | {s.requests} | {s.prompt_chars} | {s.shared_chars} | "
                f"{s.private_chars} | {s.shared_share:.1%} | {s.unique_shared_chars} |"
            )
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the trace CLI."""
    ap = argparse.ArgumentParser(
        prog="python -m sglang_tokendance.trace", description="tokendance-trace v1 tools"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate trace files")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)
    g = sub.add_parser("generate", help="generate a synthetic All-Gather trace")
    g.add_argument("workload", choices=[*WORKLOADS, *ALIASES], metavar="WORKLOAD",
                   help=f"one of {', '.join([*WORKLOADS, *ALIASES])}")  # fmt: skip
    g.add_argument("--agents", type=int, default=8)
    g.add_argument("--rounds", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--private-words", type=int, default=300)
    g.add_argument("--shared-words", type=int, default=40)
    g.add_argument("--max-tokens", type=int, default=32)
    jitter_help = "arrival_s drawn uniformly from [0, SECONDS] (0: no arrival_s)"
    g.add_argument("--arrival-jitter", type=float, default=0.0, metavar="SECONDS", help=jitter_help)
    shuffle_help = "per-agent shuffled order of shared segments (default on)"
    g.add_argument(
        "--shuffle", action=argparse.BooleanOptionalAction, default=True, help=shuffle_help
    )
    g.add_argument("-o", "--output", required=True, metavar="FILE")
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("stats", help="per-round character statistics")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.set_defaults(func=cmd_stats)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
