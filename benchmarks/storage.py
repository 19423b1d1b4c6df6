"""KV per agent and compression: tokendance vs pic vs off, over agent count and recompute ratio.

Definition (the replayer's and the server's ``kv_bytes_per_agent``)::

    KV per agent = peak non-evictable KV during the round / agents in the round
                 = max over the round's forward batches of (pool - free - evictable) slots
                   x kv_bytes_per_token / agents

measured by the server (``GET /tokendance/stats`` -> ``per_round``) for the LAST round of each
run (round >= 2: the steady state, where the round's shared segments are the previous round's
outputs). It counts everything the round needs resident: private prefixes and suffixes, the
masters of shared segments, mirrors (tokendance) or dense copies (pic) and the generated
tokens. A mirror is freed when the request that made it finishes, so no earlier round's diffs
are held. Evictable radix entries and unreferenced masters are not counted.
``dense_kv_bytes_per_agent`` is what private copies of every prompt (+ its outputs) would take.

Every mode gets the same prompts. Requests carry TokenDance hints in every mode: a mode-off
server ignores them (stock SGLang path: same text, same tokens, same outputs) except to
attribute each batch to its round, which is what gives mode off a per-round peak too (the
replayer alone can only divide mode off's lifetime peak by the widest round).

Servers: one per (mode, ratio) (one for off), reused across workloads and agent counts; the
cache is flushed (``POST /flush_cache``) and a fresh round-id prefix is used before every run.
Default pool ``--max-total-tokens 262144`` so that no mode is short of KV at 32 agents (a
storage number taken while requests queue for KV would understate the need).

    python benchmarks/storage.py --out runs/bench/storage            # full sweep
    python benchmarks/storage.py --quick --out runs/bench/storage    # 4, 8 agents; ratio 0.15
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from benchmarks import common

logger = logging.getLogger("benchmarks.storage")

DEFAULT_SERVER_ARGS = common.TINY_SERVER_ARGS
DEFINITION = (
    "KV per agent = peak non-evictable KV during the round (pool - free - evictable slots, "
    "max over the round's batches, measured by the server) x kv_bytes_per_token / agents; "
    "taken for the last round of each run (steady state). Dense = (prompt + max_new_tokens) "
    "x kv_bytes_per_token per agent, i.e. private copies of everything."
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["generative_agents", "agent_society"])
    ap.add_argument("--agents", nargs="+", type=int, default=[4, 8, 16, 32])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.15, 0.3])
    ap.add_argument(
        "--pic-ratios",
        nargs="*",
        type=float,
        default=[0.15],
        help="recompute ratios of the pic servers (default 0.15: pic keeps a dense private copy "
        "per agent, so its KV does not depend on the ratio)",
    )
    ap.add_argument("--modes", nargs="+", default=list(common.MODES), choices=common.MODES)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per run (the last is measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    ap.add_argument("--private-words", type=int, default=300)
    ap.add_argument("--shared-words", type=int, default=40)
    ap.add_argument("--model", default="tiny", help="tiny | small | model directory")
    ap.add_argument(
        "--server-args",
        default=DEFAULT_SERVER_ARGS,
        help="more launch_server flags for every server",
    )
    ap.add_argument("--quick", action="store_true", help="agents 4 8, ratio 0.15 only")
    ap.add_argument(
        "--no-flush",
        action="store_true",
        help="never POST /flush_cache (a server shared with others; leftovers may then count)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench/storage"),
        help="output directory (storage.json, storage.png, storage.md)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.agents = [4, 8]
        args.ratios = [0.15]
        args.pic_ratios = [0.15]


def _one_run(url: str, trace: Any, label: str, flush: bool = True) -> dict[str, Any]:
    if flush:
        common.flush_cache(url)
    prefix = common.run_prefix(f"st-{label}")
    t0 = time.perf_counter()
    rep = common.replay_trace(url, trace, prefix, hints=True)
    stats = rep.get("server_stats") or {}
    last = max(r["round"] for r in rep["per_round"])
    rid = f"{prefix}r{last}"
    rs = common.round_stats(stats, rid) or {}
    bpt = stats.get("kv_bytes_per_token") or rep.get("kv_bytes_per_token")
    store = stats.get("store_last_round") or {}
    if store.get("round") not in (None, rid):
        store = {}
    keys = (
        "master_tokens",
        "mirror_tokens",
        "mirrors",
        "segments",
        "dense_equiv_tokens",
        "stored_tokens",
        "compression_ratio",
    )
    return {
        "round_id": rid,
        "kv_bytes_per_agent": rs.get("kv_bytes_per_agent"),
        "dense_kv_bytes_per_agent": rs.get("dense_kv_bytes_per_agent"),
        "kv_tokens_peak": rs.get("kv_tokens_peak"),
        "kv_bytes_per_token": bpt,
        "last_round_prompt_tokens": rs.get("prompt_tokens"),
        "last_round_prefill_tokens_computed": rs.get("prefill_tokens_computed"),
        "prefill_tokens_computed": rep.get("prefill_tokens_computed"),
        "prompt_tokens": rep.get("prompt_tokens"),
        "per_round_server": [
            {k: r.get(k) for k in ("round", "agents", "kv_tokens_peak", "kv_bytes_per_agent")}
            for r in stats.get("per_round") or []
            if str(r.get("round", "")).startswith(prefix)
        ],
        "store_last_round": {k: store.get(k) for k in keys} if store else None,
        "errors": len(rep.get("errors") or []),
        "first_error": (rep.get("errors") or [{}])[0].get("error"),
        "integrity": stats.get("integrity"),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def run(args: argparse.Namespace, pool: common.ServerPool | None = None) -> dict[str, Any]:
    """Run the sweep; returns the result dict (also written by :func:`main`)."""
    apply_quick(args)
    model = common.model_path(args.model)
    extra = shlex.split(args.server_args)
    t_start = time.perf_counter()
    traces = {
        (w, n): common.make_trace(
            w,
            n,
            args.rounds,
            args.seed,
            max_tokens=args.max_tokens,
            private_words=args.private_words,
            shared_words=args.shared_words,
        )
        for w in args.workloads
        for n in sorted(args.agents)
    }
    runs: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    with common.pool_or_new(pool, args.out / "logs") as pool:
        keys = [pool.key(model, "off", 0.0, extra)] if "off" in args.modes else []
        if "tokendance" in args.modes:
            keys += [pool.key(model, "tokendance", r, extra) for r in args.ratios]
        if "pic" in args.modes:
            keys += [pool.key(model, "pic", r, extra) for r in args.pic_ratios]
        keys = pool.order(list(dict.fromkeys(keys)))
        bar = tqdm(total=len(keys) * len(traces), desc="storage", unit="run", disable=None)
        selection = None
        for i, key in enumerate(keys):
            pool.ensure(keys[i : i + pool.start_parallel])
            srv = pool.get(key)
            common.warm_up(srv.url, flush=not args.no_flush)
            servers.append(srv.describe())
            if key.mode != "off":
                selection = common.get_stats(srv.url).get("config", {}).get("selection")
            for (w, n), trace in traces.items():
                rec = {
                    "workload": w,
                    "agents": n,
                    "mode": key.mode,
                    "ratio": key.ratio,
                    "server": key.label(),
                }
                rec.update(_one_run(srv.url, trace, key.label(), flush=not args.no_flush))
                if rec["errors"]:
                    logger.warning(
                        "%s %s N=%d: %d failed requests: %s",
                        key.label(),
                        w,
                        n,
                        rec["errors"],
                        rec["first_error"],
                    )
                runs.append(rec)
                bar.update(1)
        bar.close()
    result = {
        "benchmark": "storage",
        "definition": DEFINITION,
        "hints_in_mode_off": "sent; ignored by mode off except for per-round accounting",
        "config": {
            "modes": args.modes,
            "flushed_between_runs": not args.no_flush,
            "workloads": args.workloads,
            "agents": sorted(args.agents),
            "tokendance_ratios": args.ratios,
            "pic_ratios": args.pic_ratios,
            "rounds": args.rounds,
            "seed": args.seed,
            "max_tokens": args.max_tokens,
            "private_words": args.private_words,
            "shared_words": args.shared_words,
            "model": common.model_label(args.model, model),
            "server_args": args.server_args,
            "selection": selection,  # the servers' (token counts do not depend on it)
            "quick": args.quick,
        },
        "servers": servers,
        "runs": runs,
        "comparisons": compare(runs),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": common.machine_info(),
    }
    result["headline"] = headline(result)
    return result


def _find(runs: list[dict[str, Any]], w: str, n: int, label: str) -> dict[str, Any] | None:
    return next(
        (r for r in runs if r["workload"] == w and r["agents"] == n and r["server"] == label), None
    )


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload, agent count and tokendance ratio: KV reduction vs off and vs pic.

    pic is compared at the same ratio when measured there, else at the nearest measured ratio
    (``pic_ratio``): a pic request keeps a dense private copy, so its KV does not depend on it.
    """
    out = []
    pic_ratios = sorted({r["ratio"] for r in runs if r["mode"] == "pic"})
    for r in runs:
        if r["mode"] != "tokendance":
            continue
        off = _find(runs, r["workload"], r["agents"], "off")
        pr = min(pic_ratios, key=lambda x: abs(x - r["ratio"])) if pic_ratios else None
        pic = None if pr is None else _find(runs, r["workload"], r["agents"], f"pic@{pr:g}")
        kv = r["kv_bytes_per_agent"]
        out.append(
            {
                "workload": r["workload"],
                "agents": r["agents"],
                "ratio": r["ratio"],
                "pic_ratio": pr,
                "tokendance_kv_bytes_per_agent": kv,
                "off_kv_bytes_per_agent": off and off["kv_bytes_per_agent"],
                "pic_kv_bytes_per_agent": pic and pic["kv_bytes_per_agent"],
                "kv_reduction_vs_off": common.ratio(off and off["kv_bytes_per_agent"], kv),
                "kv_reduction_vs_pic": common.ratio(pic and pic["kv_bytes_per_agent"], kv),
                "kv_reduction_vs_dense": common.ratio(r["dense_kv_bytes_per_agent"], kv),
                "shared_segment_compression": (r["store_last_round"] or {}).get(
                    "compression_ratio"
                ),
            }
        )
    return out


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """KV reduction of tokendance at the ratio closest to 0.15 and the most agents measured,
    per workload; the spread is over workloads (KV sizes do not depend on timing)."""
    comps = result["comparisons"]
    if not comps:
        return {}
    ratio = min({c["ratio"] for c in comps}, key=lambda r: abs(r - 0.15))
    top = max(c["agents"] for c in comps)
    sel = [c for c in comps if c["ratio"] == ratio and c["agents"] == top]
    return {
        "ratio": ratio,
        "agents": top,
        "per_workload": {
            c["workload"]: {
                k: c[k]
                for k in (
                    "kv_reduction_vs_off",
                    "kv_reduction_vs_pic",
                    "shared_segment_compression",
                    "tokendance_kv_bytes_per_agent",
                    "off_kv_bytes_per_agent",
                    "pic_kv_bytes_per_agent",
                )
            }
            for c in sel
        },
        "kv_reduction_vs_off": common.spread(c["kv_reduction_vs_off"] for c in sel),
        "kv_reduction_vs_pic": common.spread(c["kv_reduction_vs_pic"] for c in sel),
        "spread_over": "workloads",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """KV per agent vs agents (top) and reduction vs off (bottom), one column per workload."""
    plt = common.pyplot()
    runs, wls = result["runs"], result["config"]["workloads"]
    fig, axes = plt.subplots(2, len(wls), figsize=(5.5 * len(wls), 8), squeeze=False)
    labels = list(dict.fromkeys(r["server"] for r in runs))
    for j, w in enumerate(wls):
        ax = axes[0][j]
        for lab in labels:
            pts = sorted(
                (r["agents"], r["kv_bytes_per_agent"])
                for r in runs
                if r["workload"] == w and r["server"] == lab and r["kv_bytes_per_agent"] is not None
            )
            if pts:
                style = "--" if lab.startswith("pic") else ("-" if lab != "off" else ":")
                ax.plot(
                    [p[0] for p in pts], [p[1] / 1024 for p in pts], style, marker="o", label=lab
                )
        dense = sorted(
            {
                (r["agents"], r["dense_kv_bytes_per_agent"])
                for r in runs
                if r["workload"] == w and r["server"] == "off" and r["dense_kv_bytes_per_agent"]
            }
        )
        if dense:
            ax.plot(
                [d[0] for d in dense],
                [d[1] / 1024 for d in dense],
                color="grey",
                alpha=0.5,
                label="dense (private copies)",
            )
        ax.set_title(f"{w}: KV per agent (last round)")
        ax.set_xlabel("agents")
        ax.set_ylabel("KiB per agent")
        ax.legend(fontsize=7)
        ax = axes[1][j]
        for ratio in sorted({c["ratio"] for c in result["comparisons"]}):
            pts = sorted(
                (c["agents"], c["kv_reduction_vs_off"], c["kv_reduction_vs_pic"])
                for c in result["comparisons"]
                if c["workload"] == w and c["ratio"] == ratio
            )
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"vs off, r={ratio:g}"
            )
            same = [c for c in result["comparisons"] if c["ratio"] == ratio]
            if any(c.get("pic_ratio", ratio) == ratio for c in same):
                ax.plot(
                    [p[0] for p in pts],
                    [p[2] for p in pts],
                    "--",
                    marker="x",
                    label=f"vs pic, r={ratio:g}",
                )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{w}: KV reduction of tokendance (x)")
        ax.set_xlabel("agents")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """Tables: KV per agent (KiB) per workload and agent count, and the reductions."""
    runs = result["runs"]
    labels = list(dict.fromkeys(r["server"] for r in runs))
    lines = [
        f"Definition: {result['definition']}",
        "",
        "Shared-segment compression (tokendance): dense-equivalent tokens of the last round's "
        "shared segments (every agent's copy) / tokens stored for them (masters + mirrors), "
        "from the server's store_last_round.",
        "",
    ]
    for w in result["config"]["workloads"]:
        lines += [
            f"**{w}** - KV per agent, KiB (last round)",
            "",
            "| agents | " + " | ".join(labels) + " | dense |",
            "|---" * (len(labels) + 2) + "|",
        ]
        for n in result["config"]["agents"]:
            cells = []
            for lab in labels:
                r = _find(runs, w, n, lab)
                v = r and r["kv_bytes_per_agent"]
                cells.append("n/a" if v is None else f"{v / 1024:,.0f}")
            off = _find(runs, w, n, "off")
            d = off and off["dense_kv_bytes_per_agent"]
            cells.append("n/a" if not d else f"{d / 1024:,.0f}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| agents | ratio | vs off | vs pic (pic's ratio) | shared-segment compression |",
            "|---|---|---|---|---|",
        ]
        for c in result["comparisons"]:
            if c["workload"] == w:
                lines.append(
                    f"| {c['agents']} | {c['ratio']:g} | {_x(c['kv_reduction_vs_off'])} | "
                    f"{_x(c['kv_reduction_vs_pic'])} ({_r(c.get('pic_ratio'))}) | "
                    f"{_x(c['shared_segment_compression'])} |"
                )
        lines.append("")
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def summary_line(result: dict[str, Any]) -> str:
    h = result.get("headline") or {}
    if not h:
        return "storage: no tokendance runs"
    off, pic = h["kv_reduction_vs_off"], h["kv_reduction_vs_pic"]
    return (
        f"storage: KV/agent tokendance@{h['ratio']:g} at {h['agents']} agents: "
        f"{common.fmt_spread(off)}x less than off, {common.fmt_spread(pic)}x less than pic "
        f"(median [min-max] over {off['n']} workloads; {result['wall_s']:.0f} s)"
    )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    common.write_outputs("storage", result, out, markdown, plot)


def exit_code(result: dict[str, Any]) -> int:
    return 1 if sum(r["errors"] for r in result["runs"]) else 0


def main(argv: list[str] | None = None, pool: common.ServerPool | None = None) -> int:
    return common.bench_main(sys.modules[__name__], argv, pool)


if __name__ == "__main__":
    sys.exit(main())
