"""Capacity under an SLO: the most agents a fixed KV pool serves per round, per mode.

Every server of a mode gets the same pool (``--max-total-tokens P``, default 16384 slots) and
``--max-running-requests 128`` (so only KV, not a request cap, limits a round). A probe with N
agents replays a generated trace of N agents for ``--rounds`` rounds (cache flushed, fresh round
ids) and judges the LAST round (steady state: its shared segments are the previous round's
outputs). The round is SERVED when all of these hold:

1. every request answered (no HTTP error, no abort);
2. no request was retracted (SGLang's per-request ``meta_info.num_retractions`` is 0): a
   retracted request is recomputed later, which is the eviction thrash a pool that is too small
   causes;
3. every agent was resident at once: each agent's first token (streamed) arrived before any
   agent of the round finished. An agent that got its first token later waited for KV that
   another agent of the same round had to free first;
4. optionally (``--slo-k K`` > 0; off by default on CPU) a latency guard: round latency <=
   K x N x L1, where L1 is the median round latency of a single agent in the same mode and
   pool. A probe that fails only this guard is run again, up to 3 tries, and passes if one try
   does. Off by default because on a shared 2-core machine it measured other jobs: in the first
   quick report mode off "failed" one agent at 856 ms against a 263 ms limit (load average 6.7)
   while no agent waited for KV; checks 1-3 already catch the thrash it was meant for.

Why this SLO on CPU: on a GPU a round's batch runs in parallel, so round latency is about flat
in N until the pool runs out; then agents queue for KV (a whole extra wave of latency) or get
retracted, and a latency SLO of k x single-agent latency trips exactly there. On 2 CPU cores the
batch is computed serially: round latency grows with the round's tokens (here ~N^2: N prompts,
each holding the N previous outputs) even when KV is plentiful (measured with an ample pool on
the tiny model: 59 ms at 1 agent, ~270 ms at 8, ~3 s at 32), so "<= k x single-agent latency"
would measure the CPU, not the pool. The SLO above therefore checks directly the events that
break the GPU SLO (queueing for KV, retraction, failure); the latency guard is there for quiet
machines and GPUs.

Search per mode: N = 1, 2, 4, ... doubling until a probe fails (or ``--max-agents``), then a
binary search between the last pass and the first fail. Capacity = the largest N served.

    python benchmarks/capacity.py --out runs/bench/capacity
    python benchmarks/capacity.py --quick --out runs/bench/capacity
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

from benchmarks import common

logger = logging.getLogger("benchmarks.capacity")

SLO_TEXT = (
    "served(N) = all requests answered AND no retraction (meta_info.num_retractions == 0) AND "
    "all N agents resident at once (every first token before any agent of the round finished) "
    "AND, when slo_k > 0, round latency <= slo_k x N x L1 (L1: median single-agent round "
    "latency, same mode and pool; a probe failing only this guard is tried up to 3 times). "
    "Judged on the last round. "
    "Why: on 2 CPU cores round latency grows with the round's "
    "tokens even with ample KV, so a plain k x L1 latency SLO would measure the CPU; the checks "
    "above are the events (queueing for KV, retraction, failure) that break a GPU latency SLO."
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny | small | model directory")
    ap.add_argument(
        "--modes", nargs="+", default=["off", "pic", "tokendance"], choices=common.MODES
    )
    ap.add_argument("--pool", type=int, default=16384, help="--max-total-tokens of every server")
    ap.add_argument("--ratio", type=float, default=0.15, help="recompute ratio (tokendance, pic)")
    ap.add_argument("--workload", default="generative_agents")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per probe (last is judged)")
    ap.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    ap.add_argument("--private-words", type=int, default=300)
    ap.add_argument("--shared-words", type=int, default=40)
    ap.add_argument(
        "--slo-k", type=float, default=0.0, help="latency guard factor; 0: no guard (see doc)"
    )
    ap.add_argument("--max-agents", type=int, default=64)
    ap.add_argument("--l1-repeats", type=int, default=3, help="single-agent runs for L1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--server-args",
        default=common.UNIFORM,
        help="more launch_server flags (default: one attention path for all modes)",
    )
    ap.add_argument("--quick", action="store_true", help="pool 8192, modes off tokendance")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/capacity"))
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.pool = 8192
        args.modes = [m for m in args.modes if m != "pic"] or ["tokendance"]
        args.max_agents = min(args.max_agents, 32)
        args.l1_repeats = 2


def server_extra(args: argparse.Namespace) -> list[str]:
    """Pool and request cap first; ``--server-args`` may add more (or override)."""
    extra = shlex.split(args.server_args)
    given = {a.split("=", 1)[0] for a in extra}
    base = []
    if "--max-total-tokens" not in given:
        base += ["--max-total-tokens", str(args.pool)]
    if "--max-running-requests" not in given:
        base += ["--max-running-requests", "128"]
    return base + extra


def probe(url: str, args: argparse.Namespace, n: int, l1_ms: float | None) -> dict[str, Any]:
    """Run one N-agent trace and judge its last round."""
    trace = common.make_trace(
        args.workload,
        n,
        args.rounds,
        args.seed,
        max_tokens=args.max_tokens,
        private_words=args.private_words,
        shared_words=args.shared_words,
    )
    common.flush_cache(url)
    t0 = time.perf_counter()
    res = common.run_rounds(url, trace, common.run_prefix(f"cap{n}"), timeout_s=900.0)
    lat, reps = res[-1]
    ok = all(r.ok for r in reps)
    retractions = sum(r.num_retractions for r in reps)
    firsts = [r.t_first for r in reps if r.t_first is not None]
    resident = ok and len(firsts) == len(reps) and max(firsts) <= min(r.t_done for r in reps)
    waited = sum(
        1 for r in reps if r.t_first is not None and r.t_first > min(q.t_done for q in reps)
    )
    limit = None if l1_ms is None or args.slo_k <= 0 else args.slo_k * n * l1_ms
    within = limit is None or lat <= limit
    served = ok and retractions == 0 and resident and within
    all_retractions = sum(r.num_retractions for _, rr in res for r in rr)
    return {
        "agents": n,
        "served": served,
        "round_latency_ms": round(lat, 2),
        "latency_limit_ms": None if limit is None else round(limit, 2),
        "all_ok": ok,
        "failed": sum(1 for r in reps if not r.ok),
        "first_error": next((r.error for r in reps if r.error), None),
        "retractions_last_round": retractions,
        "retractions_all_rounds": all_retractions,
        "resident": resident,
        "agents_waited_for_kv": waited,
        "prompt_tokens": sum(r.prompt_tokens for r in reps),
        "cached_tokens": sum(r.cached_tokens for r in reps),
        "ttft_ms_max": max((r.ttft_ms for r in reps if r.ttft_ms is not None), default=None),
        "round_latencies_ms": [round(x, 2) for x, _ in res],
        "loadavg_1min": common.loadavg(),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def search(url: str, args: argparse.Namespace, l1_ms: float) -> tuple[int, list[dict]]:
    """Doubling, then binary search; returns (capacity, probes in the order run)."""
    probes: list[dict[str, Any]] = []
    seen: dict[int, bool] = {}

    def check(n: int) -> bool:
        if n not in seen:
            p = probe(url, args, n, l1_ms)
            tries = [p["round_latency_ms"]]
            # failed only the latency guard: other jobs? judge the fastest of up to 3 tries
            while (
                not p["served"]
                and p["resident"]
                and p["all_ok"]
                and not p["retractions_last_round"]
                and len(tries) < 3
            ):
                p = probe(url, args, n, l1_ms)
                tries.append(p["round_latency_ms"])
            p["latency_tries_ms"] = tries
            probes.append(p)
            seen[n] = p["served"]
            logger.info(
                "  N=%d served=%s latency %.0f ms (limit %s) resident=%s retract=%d failed=%d",
                n,
                p["served"],
                p["round_latency_ms"],
                p["latency_limit_ms"],
                p["resident"],
                p["retractions_last_round"],
                p["failed"],
            )
        return seen[n]

    lo, hi, n = 0, None, 1
    while n <= args.max_agents:
        if check(n):
            lo, n = n, n * 2
        else:
            hi = n
            break
    if hi is None:  # served up to the cap
        if lo < args.max_agents and check(args.max_agents):
            lo = args.max_agents
        elif lo < args.max_agents:
            hi = args.max_agents
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if check(mid):
                lo = mid
            else:
                hi = mid
    return lo, probes


def run(args: argparse.Namespace, pool: common.ServerPool | None = None) -> dict[str, Any]:
    """Capacity per mode; returns the result dict."""
    apply_quick(args)
    model = common.model_path(args.model)
    extra = server_extra(args)
    t_start = time.perf_counter()
    per_mode: dict[str, Any] = {}
    servers = []
    with common.pool_or_new(pool, args.out / "logs") as pool:
        keys = pool.order([pool.key(model, m, args.ratio, extra) for m in args.modes])
        for i, key in enumerate(keys):
            pool.ensure(keys[i : i + pool.start_parallel])
            srv = pool.get(key)
            servers.append(srv.describe())
            common.warm_up(srv.url)
            l1s = []
            for _ in range(args.l1_repeats):
                p = probe(srv.url, args, 1, None)
                if p["all_ok"]:
                    l1s.append(p["round_latency_ms"])
            l1 = statistics.median(l1s) if l1s else None
            logger.info("%s: single-agent round latency L1 = %s ms", key.label(), l1)
            if l1 is None:
                per_mode[key.mode] = {
                    "capacity": 0,
                    "l1_ms": None,
                    "probes": [],
                    "error": "single-agent probe failed",
                }
                continue
            try:
                cap, probes = search(srv.url, args, l1)
            except Exception as e:  # a dead server must not lose the other modes' results
                logger.exception("%s: capacity search failed", key.label())
                per_mode[key.mode] = {
                    "label": key.label(),
                    "capacity": None,
                    "l1_ms": round(l1, 2),
                    "probes": [],
                    "error": f"{type(e).__name__}: {str(e)[:300]}",
                }
                continue
            logger.info("%s: capacity %d agents", key.label(), cap)
            per_mode[key.mode] = {
                "label": key.label(),
                "capacity": cap,
                "l1_ms": round(l1, 2),
                "l1_samples_ms": l1s,
                "probes": probes,
                "hit_max_agents": cap >= args.max_agents,
            }
    caps = {m: v["capacity"] for m, v in per_mode.items()}
    ratios = {}
    if "tokendance" in caps:
        for base in ("off", "pic"):
            if base in caps:
                ratios[f"tokendance/{base}"] = common.ratio(caps["tokendance"], caps[base])
    return {
        "benchmark": "capacity",
        "slo": SLO_TEXT,
        "config": {
            "model": common.model_label(args.model, model),
            "pool_tokens": args.pool,
            "modes": args.modes,
            "ratio": args.ratio,
            "selection": "leading",
            "workload": args.workload,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "private_words": args.private_words,
            "shared_words": args.shared_words,
            "slo_k": args.slo_k,
            "max_agents": args.max_agents,
            "seed": args.seed,
            "server_flags": extra,
            "quick": args.quick,
        },
        "servers": servers,
        "per_mode": per_mode,
        "capacity": caps,
        "ratios": ratios,
        "spread_note": (
            "one search per mode; a probe is a single run, so a noisy latency near the guard "
            "or a scheduling race near the pool limit can move a capacity by one step"
        ),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": common.machine_info(),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Round latency of every probe vs agents (served: filled, not served: hollow)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, v in result["per_mode"].items():
        pts = sorted((p["agents"], p["round_latency_ms"], p["served"]) for p in v["probes"])
        if not pts:
            continue
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], alpha=0.5)[0]
        c = line.get_color()
        for n, lat, ok in pts:
            ax.scatter([n], [lat], color=c if ok else "none", edgecolors=c, zorder=3)
        if v.get("capacity") is not None:
            ax.axvline(v["capacity"], color=c, ls="--", lw=1, label=f"{mode}: {v['capacity']}")
    cfg = result["config"]
    ax.set_title(
        f"capacity at a {cfg['pool_tokens']}-token pool ({cfg['model'].split()[0]}); "
        f"hollow = not served",
        fontsize=10,
    )
    ax.set_xlabel("agents per round")
    ax.set_ylabel("last-round latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"SLO: {result['slo']}",
        "",
        f"Pool {cfg['pool_tokens']} tokens, model {cfg['model']}, {cfg['workload']}, "
        f"{cfg['rounds']} rounds/probe, {cfg['max_tokens']} output tokens, slo_k {cfg['slo_k']}.",
        "",
        "| mode | capacity (agents) | L1 ms | probes (N: served) |",
        "|---|---|---|---|",
    ]
    for m, v in result["per_mode"].items():
        pr = ", ".join(
            f"{p['agents']}:{'y' if p['served'] else 'n'}"
            for p in sorted(v["probes"], key=lambda p: p["agents"])
        )
        cap = v["capacity"] if v.get("capacity") is not None else f"failed ({v.get('error')})"
        lines.append(f"| {m} | {cap} | {v['l1_ms']} | {pr} |")
    for k, r in result["ratios"].items():
        lines.append(f"\n{k}: {r}x")
    return "\n".join(lines)


def summary_line(result: dict[str, Any]) -> str:
    caps = ", ".join(f"{m} {c}" for m, c in result["capacity"].items())
    rat = ", ".join(f"{k} {v}x" for k, v in result["ratios"].items())
    return (
        f"capacity at {result['config']['pool_tokens']} KV tokens: {caps} agents"
        f"{'; ' + rat if rat else ''} ({result['wall_s']:.0f} s)"
    )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    common.write_outputs("capacity", result, out, markdown, plot)


def exit_code(result: dict[str, Any]) -> int:
    return 0


def main(argv: list[str] | None = None, pool: common.ServerPool | None = None) -> int:
    return common.bench_main(sys.modules[__name__], argv, pool)


if __name__ == "__main__":
    sys.exit(main())
