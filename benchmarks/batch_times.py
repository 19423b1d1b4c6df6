"""Summarize the batch timer's files (``benchmarks/timer_site``): per server, the median time of
each kind of prefill batch (by the roles in it and its size), so two arms of one run can be
compared forward by forward.

    TD_TIME_BATCHES=runs/bt PYTHONPATH=benchmarks/timer_site \\
        python benchmarks/round_latency.py --cases society4 --repeats 5 \\
        --variant release="--tokendance-master-start release" --out runs/bt-rl
    python benchmarks/batch_times.py runs/bt --json runs/bt/summary.json

A diagnostic: ``run_batch`` wall time on the scheduler's thread, not a user-facing latency.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)


class Kind(NamedTuple):
    """A prefill batch's kind: the TokenDance role it holds and how many requests."""

    role: str
    requests: int


def _kind(roles: str, requests: int) -> Kind:
    names = set(roles.split(","))
    role = "master" if "master" in names else "reuse" if "reuse" in names else "plain"
    return Kind(role, requests)


def summarize(path: Path) -> dict[str, Any]:
    """One server's file -> its header and, per batch kind, count and median ms / tokens."""
    header, groups = "", defaultdict(list)
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            header = line[1:].strip()
            continue
        fields = line.split()
        if len(fields) < 5 or fields[1] != "E":
            continue
        roles = fields[5] if len(fields) > 5 else "-"
        groups[_kind(roles, int(fields[2]))].append((int(fields[3]), float(fields[4])))
    kinds = {
        f"{k.role}x{k.requests}": {
            "batches": len(v),
            "ms_p50": round(statistics.median(ms for _, ms in v), 2),
            "ms_min": round(min(ms for _, ms in v), 2),
            "ms_max": round(max(ms for _, ms in v), 2),
            "tokens_p50": statistics.median(n for n, _ in v),
        }
        for k, v in sorted(groups.items())
    }
    return {"file": path.name, "server": header, "prefill": kinds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print one line per server and batch kind; optionally write them as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="the TD_TIME_BATCHES folder")
    ap.add_argument("--min-batches", type=int, default=3, help="hide rarer kinds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    files = sorted(args.folder.glob("batches-*.txt"))
    if not files:
        raise SystemExit(f"no batches-*.txt in {args.folder} (was TD_TIME_BATCHES set?)")
    out = {"servers": [summarize(f) for f in files]}
    for s in out["servers"]:
        for kind, k in s["prefill"].items():
            if k["batches"] >= args.min_batches:
                print(
                    f"{s['server']:40s} {kind:10s} n={k['batches']:4d} "
                    f"{k['ms_p50']:8.2f} ms [{k['ms_min']:.2f}-{k['ms_max']:.2f}] "
                    f"{k['tokens_p50']:8.0f} tokens"
                )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
