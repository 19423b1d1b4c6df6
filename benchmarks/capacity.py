"""Capacity under an SLO: for a fixed KV pool, the most agents whose every round meets the SLO.

Every server of a mode gets the same pool (``--max-total-tokens P``, default 16384 slots) and
``--max-running-requests 128`` (so KV, not a request cap, limits a round); ``--pool 0`` keeps
the server's own pool. A probe with N agents replays ``--rounds`` rounds of an N-agent trace
(:mod:`benchmarks.capacity_probe`) and is SERVED when

1. every request of every round was answered (no HTTP error, no abort),
2. no request was retracted (SGLang's ``meta_info.num_retractions`` is 0), and
3. EVERY round's latency, first request sent -> last answer (so it includes the round barrier
   and any queueing for KV), is <= the SLO: ``--slo-k`` (default 4) x mode off's round latency
   at ``--ref-agents`` (default 4) agents on the same workload and pool (the median over
   ``--ref-repeats`` runs of the worst round). The reference runs again before every probe
   and the probe's SLO is k x the median of the last 3 references, so the SLO follows a
   machine whose speed drifts (``--fixed-slo``: the first SLO for every probe).
   ``--slo-ms`` gives the SLO directly instead.

A probe that fails only the latency condition is run once more (the machine is shared); the
faster try counts. Search per (workload, mode): N = 1, 2, 4, ... doubling until a probe fails
(or ``--max-agents``; GA: at most the trace's 25 agents), then a binary search between the last
pass and the first fail. Capacity = the largest N served; the ratios tokendance / off and
tokendance / pic are reported per workload.

Workloads: ``society`` (the AgentSociety-shaped generator, ``--private-words 120
--shared-words 22`` as in the 64 x 4 storage trace) and ``ga`` (the real GenerativeAgents trace
``workloads/ga_the_ville_n25.jsonl``: its first N agents, prompts unchanged).

On CPU a round's batch is computed serially, so round latency grows with the round's tokens
even when KV is plentiful: there this SLO measures prefill work as much as the pool (a mode
that computes less prefill serves more agents at the same SLO); on a GPU the batch runs in
parallel and the latency jumps where the pool runs out (queueing, retraction).

    python benchmarks/capacity.py --out runs/bench/capacity
    python benchmarks/capacity.py --quick --out runs/bench/capacity-quick
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
from benchmarks.capacity_probe import GA_TRACE, PairedSlo, TraceSpec, judged, probe, search

logger = logging.getLogger("benchmarks.capacity")

WORKLOADS = ("society", "ga")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny | small | trained | model directory")
    ap.add_argument(
        "--modes", nargs="+", default=["off", "pic", "tokendance"], choices=common.MODES
    )
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--ga-trace", type=Path, default=GA_TRACE)
    ap.add_argument(
        "--pool", type=int, default=16384, help="--max-total-tokens of every server (0: own)"
    )
    ap.add_argument("--ratio", type=float, default=0.15, help="recompute ratio (tokendance, pic)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per probe (every one judged)")
    ap.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    ap.add_argument("--private-words", type=int, default=120, help="society generator")
    ap.add_argument("--shared-words", type=int, default=22, help="society generator")
    ap.add_argument("--slo-k", type=float, default=4.0, help="SLO = k x off's latency at ref")
    ap.add_argument("--ref-agents", type=int, default=4, help="agents of the reference probe")
    ap.add_argument("--ref-repeats", type=int, default=3, help="reference probes (median)")
    ap.add_argument("--slo-ms", type=float, default=0.0, help="a given SLO (skips the reference)")
    ap.add_argument(
        "--fixed-slo",
        dest="paired",
        action="store_false",
        help="judge every probe against the SLO measured at the start (default: the reference "
        "runs again before each probe and the SLO follows the machine's speed)",
    )
    ap.add_argument(
        "--no-slo",
        dest="slo",
        action="store_false",
        help="resident capacity only (no reference, no SLO search): what the pool holds",
    )
    ap.add_argument("--max-agents", type=int, default=64)
    ap.add_argument(
        "--no-resident",
        dest="resident",
        action="store_false",
        help="skip the resident-capacity search (the most agents whose rounds never wait for KV)",
    )
    ap.add_argument("--seed", type=int, default=0, help="society traces")
    ap.add_argument(
        "--server-args",
        default=common.UNIFORM,
        help="more launch_server flags (default: one attention path for all modes)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="pool 8192, society, 8 agents at most, 1 reference"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/capacity"))
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.pool = min(args.pool, 8192) if args.pool else 0
        args.workloads = [w for w in args.workloads if w == "society"] or ["society"]
        args.max_agents = min(args.max_agents, 8)
        args.ref_repeats = 1
        args.max_tokens = min(args.max_tokens, 8)
        args.private_words = min(args.private_words, 60)


def server_extra(args: argparse.Namespace) -> list[str]:
    """Pool and request cap first (unless ``--pool 0``); ``--server-args`` may add more."""
    extra = shlex.split(args.server_args)
    given = {a.split("=", 1)[0] for a in extra}
    base = []
    if args.pool and "--max-total-tokens" not in given:
        base += ["--max-total-tokens", str(args.pool)]
    if args.pool and "--max-running-requests" not in given:
        base += ["--max-running-requests", "128"]
    return base + extra


def _spec(args: argparse.Namespace, workload: str) -> TraceSpec:
    return TraceSpec(
        workload,
        args.rounds,
        args.max_tokens,
        args.private_words,
        args.shared_words,
        args.seed,
        args.ga_trace,
    )


def reference(url: str, spec: TraceSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Mode off's worst-round latency at ``ref_agents`` (median of ``ref_repeats``)."""
    runs = [probe(url, spec, args.ref_agents, None) for _ in range(max(1, args.ref_repeats))]
    good = [p["worst_round_ms"] for p in runs if p["all_ok"]]
    if not good:
        raise RuntimeError(f"the reference probe failed: {runs[0]['first_error']}")
    ms = statistics.median(good)
    return {
        "agents": args.ref_agents,
        "latency_ms": round(ms, 2),
        "samples_ms": good,
        # per run: every round's latency and the load, to see a noisy reference afterwards
        "runs": [{k: p[k] for k in ("round_latencies_ms", "loadavg_1min", "all_ok")} for p in runs],
    }


def run_workload(
    pool: common.ServerPool, args: argparse.Namespace, workload: str, model: Path
) -> dict[str, Any]:
    """The SLO and every mode's capacity on one workload."""
    spec = _spec(args, workload)
    extra = server_extra(args)
    cap = min(args.max_agents, spec.max_agents() or args.max_agents)
    ref = None
    slo: float | None = None
    if not args.slo:
        if not args.resident:
            raise ValueError("--no-slo with --no-resident leaves nothing to search")
    elif args.slo_ms > 0:
        slo = args.slo_ms
    else:
        off_key = pool.key(model, "off", args.ratio, extra)
        srv = pool.get(off_key)
        common.warm_up(srv.url)
        ref = reference(srv.url, spec, args)
        slo = args.slo_k * ref["latency_ms"]
    paired = None
    if ref is not None and args.paired:

        def measure() -> float:  # off's server stays up beside the mode's (pool.max_alive)
            return probe(pool.get(off_key).url, spec, args.ref_agents, None)["worst_round_ms"]

        paired = PairedSlo(measure, args.slo_k, ref["samples_ms"])
    logger.info("%s: SLO %s ms per round (reference %s)", workload, slo, ref)
    per_mode: dict[str, Any] = {}
    for key in pool.order([pool.key(model, m, args.ratio, extra) for m in args.modes]):
        srv = pool.get(key)
        common.warm_up(srv.url)
        probes: dict[int, dict[str, Any]] = {}

        def check(n: int, url: str = srv.url, probes: dict = probes) -> bool:
            if n not in probes:
                probes[n] = judged(url, spec, n, paired.next() if paired else slo)
            return bool(probes[n]["served"])

        def check_resident(n: int, url: str = srv.url, probes: dict = probes) -> bool:
            if n not in probes:  # no latency condition: the pool alone decides
                probes[n] = probe(url, spec, n, None)
            return bool(probes[n]["resident"])

        capacity: int | None = None
        resident: int | None = None
        error = None
        try:
            if slo is not None:
                capacity = search(check, cap)
            if args.resident:
                resident = search(check_resident, cap)
        except Exception as e:  # a dead server must not lose the other modes' results
            logger.exception("%s %s: capacity search failed", workload, key.label())
            error = f"{type(e).__name__}: {str(e)[:300]}"
        logger.info(
            "%s %s: capacity %s agents (resident %s)", workload, key.label(), capacity, resident
        )
        per_mode[key.mode] = {
            "label": key.label(),
            "server": srv.describe(),
            "capacity": capacity,
            "capped": capacity is not None and capacity >= cap,
            "resident_capacity": resident,
            "resident_capped": resident is not None and resident >= cap,
            "error": error,
            "probes": [probes[n] for n in sorted(probes)],
        }
    caps = {m: v["capacity"] for m, v in per_mode.items()}
    res_caps = {m: v["resident_capacity"] for m, v in per_mode.items()}
    ratios = {
        f"tokendance/{b}": common.ratio(caps["tokendance"], caps[b])
        for b in ("off", "pic")
        if slo is not None and "tokendance" in caps and b in caps
    }
    res_ratios = {
        f"tokendance/{b}": common.ratio(res_caps["tokendance"], res_caps[b])
        for b in ("off", "pic")
        if args.resident and "tokendance" in res_caps and b in res_caps
    }
    if paired is not None:  # every reference, in order: the machine's speed over the run
        ref["paired_samples_ms"] = [round(x, 2) for x in paired.samples]
    return {
        "slo_ms": None if slo is None else round(slo, 2),
        "slo_source": _slo_source(args, ref),
        "reference": ref,
        "max_agents": cap,
        "per_mode": per_mode,
        "capacity": caps,
        "ratios": ratios,
        "resident_capacity": res_caps,
        "resident_ratios": res_ratios,
    }


def _slo_source(args: argparse.Namespace, ref: dict[str, Any] | None) -> str:
    if not args.slo:
        return "none (--no-slo: resident capacity only)"
    if ref is None:
        return "given (--slo-ms)"
    if args.paired:
        return (
            f"{args.slo_k:g} x off at {args.ref_agents} agents, measured again before each "
            "probe (median of the last 3)"
        )
    return f"{args.slo_k:g} x off at {args.ref_agents} agents"


def run(args: argparse.Namespace, pool: common.ServerPool | None = None) -> dict[str, Any]:
    """Capacity per workload and mode; returns the result dict."""
    apply_quick(args)
    model = common.model_path(args.model)
    t_start = time.perf_counter()
    with common.pool_or_new(pool, args.out / "logs") as pool:
        workloads = {w: run_workload(pool, args, w, model) for w in args.workloads}
    return {
        "benchmark": "capacity",
        "slo": (
            "served(N) = every request of every round answered AND no retraction AND every "
            "round's latency (first request sent -> last answer: includes the barrier and "
            "queueing for KV) <= SLO; SLO = slo_k x mode off's worst-round latency at "
            "ref_agents agents (same workload, pool, machine), unless given; resident(N) = "
            "every request answered AND no retraction AND in no round whose pool was saturated "
            "did an agent get its first token after another agent of the round had finished "
            "(none waited for KV)"
        ),
        "config": {
            "model": common.model_label(args.model, model),
            "pool_tokens": args.pool or "server default",
            "modes": args.modes,
            "workloads": args.workloads,
            "ga_trace": str(args.ga_trace),
            "ratio": args.ratio,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "private_words": args.private_words,
            "shared_words": args.shared_words,
            "slo_k": args.slo_k,
            "slo_ms": args.slo_ms or None,
            "slo_search": args.slo,
            "slo_paired": args.paired,
            "ref_agents": args.ref_agents,
            "ref_repeats": args.ref_repeats,
            "max_agents": args.max_agents,
            "resident": args.resident,
            "seed": args.seed,
            "server_flags": server_extra(args),
            "quick": args.quick,
        },
        "workloads": workloads,
        "spread_note": (
            "one search per (workload, mode); the SLO comes from a median of reference runs; a "
            "probe failing only on latency is tried twice; near the SLO a noisy machine can "
            "move a capacity by one search step"
        ),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": common.machine_info(),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Worst-round latency of every probe vs agents, per workload (hollow: not served)."""
    plt = common.pyplot()
    items = list(result["workloads"].items())
    fig, axes = plt.subplots(1, len(items), figsize=(6.5 * len(items), 4.5), squeeze=False)
    for ax, (workload, w) in zip(axes[0], items, strict=True):
        for mode, v in w["per_mode"].items():
            pts = [(p["agents"], p["worst_round_ms"], p["served"]) for p in v["probes"]]
            if not pts:
                continue
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], alpha=0.5)[0]
            c = line.get_color()
            for n, lat, ok in pts:
                ax.scatter([n], [lat], color=c if ok else "none", edgecolors=c, zorder=3)
            ax.axvline(v["capacity"] or 0, color=c, ls="--", lw=1, label=f"{mode}: {v['capacity']}")
        if w["slo_ms"] is not None:
            ax.axhline(w["slo_ms"], color="grey", lw=1, label=f"SLO {w['slo_ms']:.0f} ms")
        ax.set_title(f"{workload}, pool {result['config']['pool_tokens']} (hollow: not served)")
        ax.set_xlabel("agents per round")
        ax.set_ylabel("worst round latency (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"SLO: {result['slo']}.",
        "",
        f"Pool {cfg['pool_tokens']} tokens, model {cfg['model']}, {cfg['rounds']} rounds per "
        f"probe, {cfg['max_tokens']} output tokens, ratio {cfg['ratio']}.",
    ]
    for workload, w in result["workloads"].items():
        lines += [
            "",
            f"**{workload}**: SLO {_ms(w['slo_ms'])} ({w['slo_source']}{_ref(w)}), at most "
            f"{w['max_agents']} agents.",
            "",
            "| mode | capacity under the SLO | resident capacity | probes (N: served, worst "
            "round ms[/its SLO], resident, peak KV tokens of the rounds) |",
            "|---|---|---|---|",
        ]
        for m, v in w["per_mode"].items():
            pr = ", ".join(
                f"{p['agents']}: {'y' if p['served'] else 'n'} {p['worst_round_ms']:.0f}"
                f"{_probe_slo(p, w)} "
                f"{'r' if p.get('resident') else '-'}{_peaks(p)}"
                for p in v["probes"]
            )
            cap = v["capacity"] if v["error"] is None else f"failed ({v['error']})"
            cap = "n/a" if cap is None else cap
            res = v.get("resident_capacity")
            res_s = "n/a" if res is None else f"{res}{' (capped)' if v['resident_capped'] else ''}"
            lines.append(f"| {m} | {cap}{' (capped)' if v['capped'] else ''} | {res_s} | {pr} |")
        lines += _limit_lines(w)
        lines += [f"\n{k} (SLO): {r}x" for k, r in w["ratios"].items()]
        lines += [f"\n{k} (resident): {r}x" for k, r in w.get("resident_ratios", {}).items()]
    return "\n".join(lines)


def at_limit(mode_result: dict[str, Any]) -> dict[str, Any] | None:
    """The probe at a mode's SLO capacity: agents, prefill tokens computed (all its rounds),
    worst round; and the same for the smallest failing probe above it (None: no SLO limit)."""
    cap = mode_result.get("capacity")
    probes = {p["agents"]: p for p in mode_result.get("probes") or []}
    if cap is None or cap not in probes:
        return None

    def row(p: dict[str, Any]) -> dict[str, Any]:
        computed = p["prompt_tokens"] - p["cached_tokens"]
        return {"agents": p["agents"], "computed_tokens": computed, "worst_ms": p["worst_round_ms"]}

    above = [p for n, p in sorted(probes.items()) if n > cap and not p["served"]]
    return {"served": row(probes[cap]), "first_fail": row(above[0]) if above else None}


def _limit_lines(w: dict[str, Any]) -> list[str]:
    """What each mode computed at its SLO limit: on a CPU, where the round runs serially, the
    limits sit where the rounds' work reaches the SLO."""
    out = []
    for m, v in w["per_mode"].items():
        lim = at_limit(v)
        if lim is None:
            continue
        s, f = lim["served"], lim["first_fail"]
        text = (
            f"- {m} at its SLO limit, {s['agents']} agents: {s['computed_tokens']:,} prefill "
            f"tokens computed over the probe, worst round {s['worst_ms']:.0f} ms"
        )
        if f is not None:
            text += (
                f"; first failing probe {f['agents']} agents: {f['computed_tokens']:,} tokens, "
                f"{f['worst_ms']:.0f} ms"
            )
        out.append(text)
    return ["", *out] if out else []


def _ms(ms: float | None) -> str:
    return "none" if ms is None else f"{ms:.0f} ms"


def _probe_slo(p: dict[str, Any], w: dict[str, Any]) -> str:
    """``/<its SLO>`` for a probe judged against an SLO other than the workload's first."""
    slo = p.get("slo_ms")
    return "" if slo is None or slo == w["slo_ms"] else f"/{slo:.0f}"


def _peaks(p: dict[str, Any]) -> str:
    peaks = [k for k in p.get("kv_tokens_peak") or [] if k is not None]
    return f" {'/'.join(str(k) for k in peaks)}" if peaks else ""


def _ref(w: dict[str, Any]) -> str:
    ref = w.get("reference")
    if not ref:
        return ""
    return f"; off at {ref['agents']} agents: {ref['latency_ms']:.0f} ms, runs {ref['samples_ms']}"


def summary_line(result: dict[str, Any]) -> str:
    parts = []
    for workload, w in result["workloads"].items():
        caps = ", ".join(f"{m} {c}" for m, c in w["capacity"].items())
        rat = ", ".join(f"{k} {v}x" for k, v in w["ratios"].items())
        res = ", ".join(f"{k} {v}x" for k, v in w.get("resident_ratios", {}).items())
        rat += f"; resident {res}" if res else ""
        rcaps = ", ".join(f"{m} {c}" for m, c in w.get("resident_capacity", {}).items())
        caps = caps if w["slo_ms"] is not None else f"resident {rcaps}"
        parts.append(f"{workload} (SLO {_ms(w['slo_ms'])}): {caps}{'; ' + rat if rat else ''}")
    return (
        f"capacity at {result['config']['pool_tokens']} KV tokens: "
        + " | ".join(parts)
        + f" ({result['wall_s']:.0f} s)"
    )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    common.write_outputs("capacity", result, out, markdown, plot)


def exit_code(result: dict[str, Any]) -> int:
    errors = [v for w in result["workloads"].values() for v in w["per_mode"].values()]
    return 1 if any(v["error"] for v in errors) else 0


def main(argv: list[str] | None = None, pool: common.ServerPool | None = None) -> int:
    """Parse, run, write JSON / markdown / plot, print the one-line summary."""
    return common.bench_main(sys.modules[__name__], argv, pool)


if __name__ == "__main__":
    sys.exit(main())
