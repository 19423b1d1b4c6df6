"""Prefill time and prefill tokens computed per round: tokendance vs pic vs off ("small" model).

Every request asks for one output token (``max_new_tokens=1``), so a round's latency (first
request sent -> last answer in) is the round's prefill plus the fixed HTTP/scheduling costs, and
a request's TTFT (streamed, measured on the client) is its own prefill wait. Prefill tokens
computed are SGLang's ``prompt_tokens - cached_tokens`` per request (``cached_tokens`` counts
radix hits and, for tokendance/pic, reused master tokens).

Measured: the steady-state rounds (round >= 2: the shared segments are the previous round's
outputs; round 1 is reported apart). Runs are interleaved (repeat k runs the modes in a rotated
order) on three servers that stay up (``--sleep-on-idle``: an idle server takes no CPU), the
cache is flushed before each run and every run uses fresh round ids, so each run does the same
work from a cold cache. Spread: median, min/max and IQR over repeats; ratios are taken per
repeat (paired) and then summarized.

    python benchmarks/prefill.py --out runs/bench/prefill
    python benchmarks/prefill.py --quick --out runs/bench/prefill
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from benchmarks import common

logger = logging.getLogger("benchmarks.prefill")

METRICS = ("prefill_ms_per_round", "ttft_ms_median", "ttft_ms_mean", "prefill_tokens_per_round")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="tiny | small | model directory")
    ap.add_argument("--workload", default="generative_agents")
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per run (>= 2 are measured)")
    ap.add_argument("--repeats", type=int, default=4, help="runs per mode (interleaved)")
    ap.add_argument("--ratio", type=float, default=0.15, help="recompute ratio (tokendance, pic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--private-words", type=int, default=300)
    ap.add_argument("--shared-words", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=list(common.MODES), choices=common.MODES)
    ap.add_argument(
        "--server-args",
        default=common.UNIFORM,
        help="more launch_server flags (default: one attention path for all modes)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="4 agents, 2 rounds, 3 repeats, 150 private words"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/prefill"))
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.agents, args.rounds, args.repeats, args.private_words = 4, 2, 3, 150


def _run_metrics(result: Any) -> dict[str, Any]:
    """Per-run numbers from a ReplayResult (steady = rounds >= 2, or all with one round)."""
    rounds = result.rounds
    steady = [r for r in rounds if r.round >= 2] or rounds
    first = rounds[0]

    def computed(r: Any) -> int:
        return sum(q.prompt_tokens - q.cached_tokens for q in r.requests if q.error is None)

    ttfts = [q.ttft_ms for r in steady for q in r.requests if q.ttft_ms is not None]
    errors = [q.error for r in rounds for q in r.requests if q.error is not None]
    return {
        "prefill_ms_per_round": statistics.fmean(r.latency_ms for r in steady),
        "ttft_ms_median": statistics.median(ttfts) if ttfts else None,
        "ttft_ms_mean": statistics.fmean(ttfts) if ttfts else None,
        "prefill_tokens_per_round": statistics.fmean(computed(r) for r in steady),
        "prompt_tokens_per_round": statistics.fmean(
            sum(q.prompt_tokens for q in r.requests) for r in steady
        ),
        "round1": {
            "latency_ms": round(first.latency_ms, 3),
            "prefill_tokens": computed(first),
        },
        "per_round": [
            {
                "round": r.round,
                "latency_ms": round(r.latency_ms, 3),
                "prefill_tokens": computed(r),
                "ttft_ms": sorted(round(q.ttft_ms, 3) for q in r.requests if q.ttft_ms),
            }
            for r in rounds
        ],
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def run(args: argparse.Namespace, pool: common.ServerPool | None = None) -> dict[str, Any]:
    """Interleaved runs of every mode; returns the result dict."""
    from sglang_tokendance.replay import ReplayOptions, replay

    apply_quick(args)
    model = common.model_path(args.model)
    extra = shlex.split(args.server_args)
    trace = common.make_trace(
        args.workload,
        args.agents,
        args.rounds,
        args.seed,
        max_tokens=1,
        private_words=args.private_words,
        shared_words=args.shared_words,
    )
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with common.pool_or_new(pool, args.out / "logs", max_alive=max(3, len(args.modes))) as pool:
        keys = {m: pool.key(model, m, args.ratio, extra) for m in args.modes}
        pool.ensure(list(keys.values()))
        servers = {m: pool.get(k) for m, k in keys.items()}
        for srv in servers.values():
            common.warm_up(srv.url)
            # a second, full-size warm-up: the first forwards of new shapes are slow
            common.flush_cache(srv.url)
            replay(
                trace,
                srv.url,
                ReplayOptions(progress=False, max_rounds=1, round_prefix=common.run_prefix("pw")),
            )
        bar = tqdm(total=args.repeats * len(args.modes), desc="prefill", unit="run", disable=None)
        for rep in range(args.repeats):
            order = args.modes[rep % len(args.modes) :] + args.modes[: rep % len(args.modes)]
            for m in order:
                url = servers[m].url
                common.flush_cache(url)
                opts = ReplayOptions(
                    mode="tokendance",
                    progress=False,
                    honor_arrival=False,
                    round_prefix=common.run_prefix(f"pf-{m}-{rep}"),
                )
                res = replay(trace, url, opts)
                rec = {
                    "mode": m,
                    "repeat": rep,
                    "position": order.index(m),
                    "loadavg_1min_before": common.loadavg(),
                }
                rec.update(_run_metrics(res))
                if rec["errors"]:
                    logger.warning(
                        "%s repeat %d: %d failed requests: %s",
                        m,
                        rep,
                        rec["errors"],
                        rec["first_error"],
                    )
                runs.append(rec)
                bar.update(1)
        bar.close()
        described = [s.describe() for s in servers.values()]
    result = {
        "benchmark": "prefill",
        "definition": (
            "max_new_tokens=1; prefill time per round = round latency (all requests of the "
            "round sent at once, until the last answer), mean over rounds >= 2; TTFT = streamed "
            "time to the first output token per request (rounds >= 2); prefill tokens = "
            "sum(prompt_tokens - cached_tokens) per round (rounds >= 2)."
        ),
        "config": {
            "model": common.model_label(args.model, model),
            "workload": args.workload,
            "agents": args.agents,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "ratio": args.ratio,
            "selection": "leading",
            "seed": args.seed,
            "private_words": args.private_words,
            "shared_words": args.shared_words,
            "modes": args.modes,
            "server_args": args.server_args,
            "quick": args.quick,
        },
        "servers": described,
        "runs": runs,
        "wall_s": 0.0,
        "machine": common.machine_info(),
    }
    result["summary"] = summarize(runs, args.modes)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Spread per mode and metric; paired ratios (per repeat) off/tokendance, pic/tokendance."""
    out: dict[str, Any] = {"per_mode": {}, "ratios": {}, "best_ratios": {}}
    for m in modes:
        mine = [r for r in runs if r["mode"] == m]
        out["per_mode"][m] = {k: common.spread(r[k] for r in mine) for k in METRICS}
    by_rep: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_rep.setdefault(r["repeat"], {})[r["mode"]] = r
    for base in ("off", "pic"):
        if base not in modes or "tokendance" not in modes:
            continue
        for k in METRICS:
            vals = [
                common.ratio(reps[base][k], reps["tokendance"][k])
                for reps in by_rep.values()
                if base in reps and "tokendance" in reps
            ]
            out["ratios"][f"{k}:{base}/tokendance"] = common.spread(vals)
            # best of the repeats: other jobs only ever add time, so min/min is the ratio
            # least disturbed by a shared machine
            best = out["per_mode"]
            out["best_ratios"][f"{k}:{base}/tokendance"] = common.ratio(
                best[base][k]["min"], best["tokendance"][k]["min"]
            )
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-repeat points and medians: prefill ms per round, TTFT, prefill tokens per round."""
    plt = common.pyplot()
    modes = result["config"]["modes"]
    panels = [
        ("prefill_ms_per_round", "prefill time per round (ms)"),
        ("ttft_ms_median", "TTFT median (ms)"),
        ("prefill_tokens_per_round", "prefill tokens computed per round"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, m in enumerate(modes):
            ys = [r[key] for r in result["runs"] if r["mode"] == m and r[key] is not None]
            ax.scatter([i] * len(ys), ys, alpha=0.6)
            s = result["summary"]["per_mode"][m][key]
            if s["median"] is not None:
                ax.hlines(s["median"], i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
    cfg = result["config"]
    fig.suptitle(
        f"{cfg['model']}, {cfg['workload']}, {cfg['agents']} agents, "
        f"ratio {cfg['ratio']:g}, {cfg['repeats']} repeats",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    s, cfg = result["summary"], result["config"]
    lines = [
        f"{result['definition']}",
        "",
        f"Model {cfg['model']}, {cfg['workload']}, {cfg['agents']} agents, {cfg['rounds']} "
        f"rounds, {cfg['repeats']} interleaved repeats; median [min-max] over repeats.",
        "",
        "| mode | prefill ms/round | TTFT median ms | prefill tokens/round |",
        "|---|---|---|---|",
    ]
    for m, per in s["per_mode"].items():
        lines.append(
            f"| {m} | {common.fmt_spread(per['prefill_ms_per_round'], 0)} | "
            f"{common.fmt_spread(per['ttft_ms_median'], 0)} | "
            f"{common.fmt_spread(per['prefill_tokens_per_round'], 0)} |"
        )
    lines += [
        "",
        "| ratio (median [min-max] of paired repeats; best of repeats / best) | time/round "
        "| TTFT median | tokens/round |",
        "|---|---|---|---|",
    ]
    for base in ("off", "pic"):
        r = s["ratios"]
        if f"prefill_ms_per_round:{base}/tokendance" not in r:
            continue
        lines.append(
            f"| {base} / tokendance | "
            f"{common.fmt_spread(r[f'prefill_ms_per_round:{base}/tokendance'])}x | "
            f"{common.fmt_spread(r[f'ttft_ms_median:{base}/tokendance'])}x | "
            f"{common.fmt_spread(r[f'prefill_tokens_per_round:{base}/tokendance'])}x |"
        )
        b = s.get("best_ratios") or {}
        if b:
            lines.append(
                f"| {base} / tokendance, best / best | "
                f"{b[f'prefill_ms_per_round:{base}/tokendance']}x | "
                f"{b[f'ttft_ms_median:{base}/tokendance']}x | "
                f"{b[f'prefill_tokens_per_round:{base}/tokendance']}x |"
            )
    return "\n".join(lines)


def summary_line(result: dict[str, Any]) -> str:
    r = result["summary"]["ratios"]
    parts = []
    for base in ("off", "pic"):
        t = r.get(f"prefill_ms_per_round:{base}/tokendance")
        k = r.get(f"prefill_tokens_per_round:{base}/tokendance")
        if t and k:
            parts.append(f"{base}/td time {common.fmt_spread(t)}x tokens {common.fmt_spread(k)}x")
    cfg = result["config"]
    return (
        f"prefill ({cfg['model'].split()[0]}, {cfg['agents']} agents, {cfg['repeats']} "
        f"repeats): " + "; ".join(parts) + f" ({result['wall_s']:.0f} s)"
    )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    common.write_outputs("prefill", result, out, markdown, plot)


def exit_code(result: dict[str, Any]) -> int:
    return 1 if any(r["errors"] for r in result["runs"]) else 0


def main(argv: list[str] | None = None, pool: common.ServerPool | None = None) -> int:
    return common.bench_main(sys.modules[__name__], argv, pool)


if __name__ == "__main__":
    sys.exit(main())
