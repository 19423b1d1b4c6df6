"""A/B of two checkouts on the capacity probe: is a change faster, on the same machine, now?

Two servers of one mode and flags run side by side, one importing the plugin from another
checkout (``--base DIR``, e.g. a ``git worktree`` of the commit before a change; its
``sglang_tokendance`` comes first on the server's PYTHONPATH), one from this checkout. The
same society probe (the capacity benchmark's: ``rounds`` rounds of an N-agent trace, cache
flushed, fresh round ids) runs on both, interleaved and alternating which goes first, per N.
Idle servers sleep (``--sleep-on-idle``), so the one not probed takes no CPU.

Reported per N: the worst round latency of every probe on each side, medians, and base / new
(above 1: this checkout is faster).

    git worktree add /tmp/base HEAD~1
    python benchmarks/checkout_ab.py --base /tmp/base --mode tokendance --agents 12 24 \
        --out runs/bench/checkout_ab
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from benchmarks import common
from benchmarks.capacity_probe import TraceSpec, probe

logger = logging.getLogger("benchmarks.checkout_ab")
ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (a directory)")
    ap.add_argument("--mode", default="tokendance", choices=common.MODES)
    ap.add_argument("--agents", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--repeats", type=int, default=4, help="probes per N and side")
    ap.add_argument("--pool", type=int, default=16384, help="--max-total-tokens")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/checkout_ab"))
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def run(args: argparse.Namespace, pool: Any = None) -> dict[str, Any]:
    """Probe both servers, interleaved; returns the result record."""
    from sglang_tokendance.server import ServerProcess, start_all

    base = args.base.resolve()
    if not (base / "sglang_tokendance" / "__init__.py").is_file():
        raise ValueError(f"--base {base} is not a checkout of this project (no sglang_tokendance)")
    flags = ["--max-total-tokens", str(args.pool), "--max-running-requests", "128"]
    extra = common.server_flags(args.mode, args.ratio, [*flags, common.UNIFORM])
    model = common.model_path(args.model)
    spec = TraceSpec("society", args.rounds, args.max_tokens, 120, 22, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sides = {
        name: ServerProcess(
            model, extra, log_path=args.out / f"{name}.log", env={"PYTHONPATH": str(src)}
        )
        for name, src in (("base", base), ("new", ROOT))
    }
    start_all(sides.values())
    worst: dict[str, dict[int, list[float]]] = {"base": {}, "new": {}}
    try:
        for srv in sides.values():  # warm-up: the first forwards of new shapes are slow
            common.warm_up(srv.url)
            probe(srv.url, spec, min(args.agents), None)
        bar = tqdm(total=2 * args.repeats * len(args.agents), unit="probe", disable=None)
        for n in args.agents:
            for rep in range(args.repeats):
                order = ("base", "new") if rep % 2 == 0 else ("new", "base")
                for name in order:
                    res = probe(sides[name].url, spec, n, None)
                    if not res["all_ok"]:
                        raise RuntimeError(f"{name} failed a probe at N={n}: {res['first_error']}")
                    worst[name].setdefault(n, []).append(res["worst_round_ms"])
                    bar.update(1)
        bar.close()
    finally:
        for srv in sides.values():
            srv.stop()
    per_n = {}
    for n in args.agents:
        b, w = statistics.median(worst["base"][n]), statistics.median(worst["new"][n])
        pairs = [x / y for x, y in zip(worst["base"][n], worst["new"][n], strict=True)]
        per_n[str(n)] = {
            "base_ms": worst["base"][n],
            "new_ms": worst["new"][n],
            "base_median_ms": b,
            "new_median_ms": w,
            "base_over_new": b / w,
            "paired_ratio": common.spread(pairs),
        }
    return {
        "benchmark": "checkout_ab",
        "base": str(base),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "server_flags": extra,
        "per_agents": per_n,
        "machine": common.machine_info(),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Checkout A/B ({result['config']['mode']}, base {result['base']})",
        "",
        "| agents | base worst round, median | new worst round, median | base / new | paired |",
        "|---|---|---|---|---|",
    ]
    for n, r in result["per_agents"].items():
        lines.append(
            f"| {n} | {r['base_median_ms']:.0f} ms | {r['new_median_ms']:.0f} ms | "
            f"{r['base_over_new']:.2f}x | {common.fmt_spread(r['paired_ratio'])} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ns = [int(n) for n in result["per_agents"]]
    for side in ("base", "new"):
        ax.plot(
            ns, [result["per_agents"][str(n)][f"{side}_median_ms"] for n in ns], "o-", label=side
        )
    ax.set_xlabel("agents")
    ax.set_ylabel("worst round, median (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    common.write_outputs("checkout_ab", result, out, markdown, plot)


def summary_line(result: dict[str, Any]) -> str:
    parts = [f"N={n} {r['base_over_new']:.2f}x" for n, r in result["per_agents"].items()]
    return f"checkout_ab ({result['config']['mode']}): base / new worst round " + ", ".join(parts)


def exit_code(result: dict[str, Any]) -> int:
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.bench_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
