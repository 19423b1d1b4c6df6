"""Run a set of benchmarks and write ``benchmarks/results/<YYYY-MM-DD>-<machine>[-quick]/``.

The directory gets every benchmark's JSON, PNG and markdown, ``report.json`` (the headline
numbers, timings, machine, command) and ``README.md`` with the three headline ratios (KV per
agent, prefill tokens/time, capacity) with their spread, and the fidelity table. Server logs
go to ``runs/bench-logs/<name>/`` (not committed).

One server pool is shared by all benchmarks: servers with the same model and flags are started
once (storage and fidelity share the tiny-model servers; with ``--quick`` the prefill run does
too). Every server is stopped at the end, also on errors or Ctrl-C.

    python benchmarks/report.py --quick       # smoke: small sweeps, prefill on tiny
    python benchmarks/report.py               # full: sweeps of the issue, prefill on small
    python benchmarks/report.py --only storage fidelity

Sizes: ``--quick`` = storage 4 and 8 agents at ratio 0.15; prefill tiny 4 agents x 2 repeats;
capacity on an 8192-token pool (off, tokendance); fidelity ratios 0.15 and 1.0 (tokendance).
Full = storage 4/8/16/32 agents x tokendance ratios 0.05/0.15/0.3 (pic at 0.15: its dense copy
does not depend on the ratio) on both generated workloads; prefill small 8 agents x 2 rounds x
4 interleaved repeats; capacity on a 16384-token pool (off, pic, tokendance); fidelity ratios
0/0.05/0.15/0.3/1.0 x tokendance/pic on 2 rounds of the real GA trace.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import capacity, common, fidelity, prefill, storage

logger = logging.getLogger("benchmarks.report")

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("storage", "fidelity", "prefill", "capacity", "kernels")
MODULES: dict[str, Any] = {
    "storage": storage,
    "fidelity": fidelity,
    "prefill": prefill,
    "capacity": capacity,
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    ap.add_argument("--out-root", type=Path, default=common.RESULTS_ROOT)
    ap.add_argument("--name", help="results directory name (default <date>-<machine>[-quick])")
    ap.add_argument(
        "--fidelity-model",
        default=common.default_fidelity_model(),
        help="tiny | small | trained | model directory (default: trained when present)",
    )
    ap.add_argument("--prefill-model", default=None, help="default: small (full), tiny (quick)")
    ap.add_argument("--max-alive", type=int, default=5, help="servers kept running at once")
    ap.add_argument(
        "--render",
        type=Path,
        metavar="DIR",
        help="no runs: rewrite DIR's markdown and README.md from its JSON files",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def bench_argv(args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    """The command line of each benchmark in this report."""
    q = ["--quick"] if args.quick else []
    # "--server-args=VALUE": a value that starts with "--" is not taken as an argument otherwise
    tiny = [f"--server-args={common.TINY_SERVER_ARGS}"]
    pmodel = args.prefill_model or ("tiny" if args.quick else "small")
    # a quick prefill on tiny shares the storage servers (same flags); small gets its own
    pflags = tiny if pmodel == "tiny" else [f"--server-args={common.UNIFORM}"]
    return {
        "storage": [*q, *tiny, "--out", str(out)],
        "fidelity": [*q, *tiny, "--model", args.fidelity_model, "--out", str(out)],
        "prefill": [*q, *pflags, "--model", pmodel, "--out", str(out)],
        "capacity": [*q, "--out", str(out)],
    }


def run_kernels(out: Path) -> dict[str, Any]:
    """benchmarks/kernels.py on a GPU; on CPU a "skipped: no CUDA" record."""
    if not common.has_cuda():
        res = {"benchmark": "kernels", "status": "skipped: no CUDA"}
        common.write_json(out / "kernels.json", res)
        return res
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "kernels.py"),
        "--out",
        str(out / "kernels.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    res: dict[str, Any] = {
        "benchmark": "kernels",
        "status": status,
        "stdout_tail": proc.stdout[-3000:],
        "stderr_tail": proc.stderr[-3000:],
    }
    if (out / "kernels.json").exists():
        res["result"] = json.loads((out / "kernels.json").read_text())
    common.write_json(out / "kernels.json", res)
    return res


def git_state() -> dict[str, Any]:
    """Commit and whether the working tree differs from it (read only)."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
    }


def headlines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline rows: metric, tokendance vs off, vs pic, spread, source."""
    rows: list[dict[str, Any]] = []
    st = results.get("storage") or {}
    h = st.get("headline") or {}
    if h:
        rows.append(
            {
                "metric": f"KV per agent (x less; {h['agents']} agents, ratio {h['ratio']:g})",
                "vs_off": h["kv_reduction_vs_off"],
                "vs_pic": h["kv_reduction_vs_pic"],
                "spread": f"median [min-max] over {h['kv_reduction_vs_off']['n']} workloads",
                "source": "storage.json",
            }
        )
    pf = results.get("prefill") or {}
    if pf.get("summary"):
        r, cfg = pf["summary"]["ratios"], pf["config"]
        spread = f"median [min-max] over {cfg['repeats']} paired repeats"
        for key, label in (
            ("prefill_tokens_per_round", "prefill tokens per round (x fewer)"),
            ("prefill_ms_per_round", "prefill time per round (x faster)"),
            ("ttft_ms_median", "TTFT median (x faster)"),
        ):
            rows.append(
                {
                    "metric": f"{label}; {cfg['model'].split()[0]} model, {cfg['agents']} agents",
                    "vs_off": r.get(f"{key}:off/tokendance"),
                    "vs_pic": r.get(f"{key}:pic/tokendance"),
                    "spread": spread + _best(pf["summary"].get("best_ratios") or {}, key),
                    "source": "prefill.json",
                }
            )
    cap = results.get("capacity") or {}
    for workload, w in (cap.get("workloads") or {}).items():
        c = w["capacity"]
        rows.append(
            {
                "metric": f"capacity under SLO, {workload} (x more agents; "
                f"{cap['config']['pool_tokens']}-token pool, SLO {w['slo_ms']:.0f} ms; "
                f"td {c.get('tokendance')}, off {c.get('off')}, pic {c.get('pic')})",
                "vs_off": w["ratios"].get("tokendance/off"),
                "vs_pic": w["ratios"].get("tokendance/pic"),
                "spread": "one search per mode (no repeats); +-1 search step near the SLO",
                "source": "capacity.json",
            }
        )
    return rows


def _best(best: dict[str, Any], key: str) -> str:
    """``; best of repeats / best: X (off), Y (pic)`` when known."""
    parts = [
        f"{best[f'{key}:{b}/tokendance']:.2f}x ({b})"
        for b in ("off", "pic")
        if best.get(f"{key}:{b}/tokendance") is not None
    ]
    return "; best/best " + ", ".join(parts) if parts else ""


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        return common.fmt_spread(v) + "x"
    return f"{v:.2f}x"


def readme(report: dict[str, Any], results: dict[str, Any]) -> str:
    """The results directory's README.md."""
    m = report["machine"]
    lines = [
        f"# TokenDance benchmarks: {report['date']}, {m['name']}"
        f"{' (quick)' if report['quick'] else ''}",
        "",
        "- command(s): "
        + ", ".join(f"`{c}`" for c in report.get("commands") or [report["command"]])
        + f" (benchmarks' wall time {report.get('benchmarks_wall_s', report['wall_s']) / 60:.1f}"
        " min in all)",
        f"- machine: {m['cpu_cores']} CPU cores ({m['processor']}), {m['platform']}, "
        f"python {m['python']}, torch {m['torch']}, sglang {m['sglang']}, CUDA: {m['cuda']}",
        f"- load average (1/5/15 min) at start {report['load_start']}, at end "
        f"{m.get('loadavg_1_5_15')}: the machine is shared, timings are noisy; compare ratios "
        "within one run, and read the spread",
        f"- code: commit {report['git']['commit']}"
        f"{' + uncommitted changes' if report['git']['dirty'] else ''}",
        f"- models: {report['models']}",
        "- every server: `--enable-tokendance --tokendance-mode M --tokendance-recompute-ratio R "
        "--sleep-on-idle --tokendance-uniform-attention` plus the per-benchmark pool flags; "
        "recompute selection and master policy: the server defaults (`both`, `author`; "
        "`sglang_tokendance/config.py`) unless a fidelity row names others",
        "",
        "## Headline (tokendance relative to each baseline)",
        "",
        "| metric | vs off | vs pic | spread | source |",
        "|---|---|---|---|---|",
    ]
    for r in report["headline"]:
        lines.append(
            f"| {r['metric']} | {_cell(r['vs_off'])} | {_cell(r['vs_pic'])} | "
            f"{r['spread']} | {r['source']} |"
        )
    fid = results.get("fidelity")
    if fid and fid.get("rows"):
        lines += ["", "## Fidelity vs full prefill (mode off)", "", fidelity.markdown(fid)]
    for name, title in (
        ("storage", "Storage"),
        ("prefill", "Prefill"),
        ("capacity", "Capacity under SLO"),
    ):
        res = results.get(name)
        if res and "error" not in res:
            lines += [
                "",
                f"## {title}",
                "",
                f"![{name}]({name}.png)",
                "",
                MODULES[name].markdown(res),
            ]
    lines += ["", "## Kernels", "", f"{(results.get('kernels') or {}).get('status', 'not run')}"]
    lines += ["", "## Runs", "", "| benchmark | status | wall s |", "|---|---|---|"]
    for name, st in report["status"].items():
        lines.append(f"| {name} | {st['status']} | {st.get('wall_s', '')} |")
    lines += ["", "## Caveats", ""] + [f"- {c}" for c in report["caveats"]]
    return "\n".join(lines) + "\n"


CAVEATS = [
    "CPU only (2 cores, torch reference attention): absolute times say little about a GPU; "
    "the ratios are the result. Other jobs shared the machine during the run (see the load "
    "average).",
    "The tiny and small models have random (seeded) weights unless --fidelity-model names a "
    "trained one: next-token distributions are nearly flat, so greedy outputs flip on tiny "
    "numeric differences (exact match understates fidelity, KL is small in absolute terms).",
    "KV per agent is the server's peak non-evictable KV of the last round / agents; it counts "
    "private prompt parts, which dominate at few agents (the generated prompts are ~40-80% "
    "shared): the shared-segment compression (storage.md) isolates the shared part.",
    "Capacity is one doubling + binary search per mode on one seed; near the limit a probe can "
    "flip with scheduling noise.",
    "Mode off receives the same hinted requests as the other modes; it ignores the hints "
    "except to attribute KV and tokens to rounds (same text, same tokens, same outputs).",
]


def render(out: Path) -> None:
    """Rewrite the markdown of a results directory from its JSON (derived numbers recomputed)."""
    report = json.loads((out / "report.json").read_text())
    results: dict[str, Any] = {}
    for bench in BENCHES:
        path = out / f"{bench}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        if bench == "prefill" and "runs" in res:
            res["summary"] = prefill.summarize(res["runs"], res["config"]["modes"])
        if bench == "storage" and "runs" in res:
            res["comparisons"] = storage.compare(res["runs"])
            res["headline"] = storage.headline(res)
        if bench in MODULES and "error" not in res:
            MODULES[bench].write_outputs(res, out)
        results[bench] = res
    report["headline"] = headlines(results)
    report["caveats"] = CAVEATS
    common.write_json(out / "report.json", report)
    (out / "README.md").write_text(readme(report, results))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    if args.render:
        render(args.render)
        print(f"rendered {args.render}")
        return 0
    date = dt.date.today().isoformat()
    name = args.name or f"{date}-{common.machine_name()}{'-quick' if args.quick else ''}"
    out = args.out_root / name
    out.mkdir(parents=True, exist_ok=True)
    log_dir = ROOT / "runs" / "bench-logs" / name
    command = "python benchmarks/report.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    load_start = common.machine_info().get("loadavg_1_5_15")
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    status: dict[str, dict[str, Any]] = {}
    argvs = bench_argv(args, out)
    logger.info("report %s -> %s", name, out)
    with common.ServerPool(log_dir, max_alive=args.max_alive) as pool:
        for bench in [b for b in BENCHES if b in args.only]:
            tb = time.perf_counter()
            try:
                if bench == "kernels":
                    res = run_kernels(out)
                else:
                    mod = MODULES[bench]
                    logger.info("=== %s: %s", bench, " ".join(argvs[bench]))
                    res = mod.run(mod.build_parser().parse_args(argvs[bench]), pool)
                    mod.write_outputs(res, out)
                    print(mod.summary_line(res), flush=True)
                results[bench] = res
                status[bench] = {"status": res.get("status", "ok")}
            except (Exception, SystemExit) as e:  # one failure must not lose the others
                logger.exception("%s failed", bench)
                results[bench] = {"error": f"{type(e).__name__}: {e}"}
                status[bench] = {"status": f"failed: {type(e).__name__}: {str(e)[:300]}"}
            status[bench]["wall_s"] = round(time.perf_counter() - tb, 1)
            if bench in argvs:
                status[bench]["argv"] = argvs[bench]
    for bench in BENCHES:  # results of earlier invocations into the same directory
        path = out / f"{bench}.json"
        if bench not in results and path.exists():
            results[bench] = json.loads(path.read_text())
            status[bench] = {
                "status": "ok (from an earlier invocation)",
                "wall_s": results[bench].get("wall_s", 0.0),
            }
    previous = (
        json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    )
    commands = [*previous.get("commands", []), command]
    models = {
        b: (results.get(b) or {}).get("config", {}).get("model") for b in MODULES if b in results
    }
    report = {
        "name": name,
        "date": date,
        "quick": args.quick,
        "command": command,
        "commands": commands,
        "wall_s": round(time.perf_counter() - t0, 1),
        "benchmarks_wall_s": round(sum(float(v.get("wall_s") or 0) for v in status.values()), 1),
        "machine": common.machine_info(),
        "load_start": load_start,
        "git": git_state(),
        "models": models,
        "servers_started": pool.started,
        "status": status,
        "headline": headlines(results),
        "caveats": CAVEATS,
    }
    common.write_json(out / "report.json", report)
    (out / "README.md").write_text(readme(report, results))
    heads = "; ".join(
        f"{r['metric'].split(' (')[0]}: vs off {_cell(r['vs_off'])}, vs pic {_cell(r['vs_pic'])}"
        for r in report["headline"]
    )
    print(f"report {name}: {report['wall_s'] / 60:.1f} min; {heads}; -> {out}")
    return 0 if all(s["status"].startswith(("ok", "skipped")) for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
