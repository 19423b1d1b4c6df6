"""Round latency, TTFT and decode speed per mode, as a user runs them (issue 13's benchmark).

Cases (each its own trace, model and server flags; every mode of a case uses the same ones):

- ``ga25``: workloads/ga_the_ville_n25.jsonl (25 agents x 6 rounds), tiny model, the default
  CPU flags (pool 65,536 tokens, 32 running requests).
- ``society64``: a generated agent_society trace, 64 agents x 4 rounds (seed 0, 120 private
  words, 22 shared words per output), tiny model, a pool large enough for every agent
  (``--max-total-tokens 450000 --max-running-requests 64``).
- ``society16-small``: the same generator at 16 agents x 3 rounds, the small model.
- ``society4``: a small swarm (a debate or planning team), 4 agents x 6 rounds, tiny model, the
  default CPU flags: whether a round that shares little pays for TokenDance's extra work.
- ``society16-capacity``: the capacity benchmark's society probe at 16 agents (2 rounds, 16
  output tokens, pool 32,768, every mode on the position-aware attention path as there): where
  its rounds spend their time near off's pool limit.
- ``society32-capacity``: the same probe at 32 agents (off's pool limit is 18 agents there:
  off's rounds queue for KV, tokendance's do not): where tokendance's round spends its time
  past off's limit.
- ``society32-trained``: 32 agents x 3 rounds, 70 private / 11 shared words (prompts fit the
  trained model's 4,096-token context), the trained model (real attention patterns: its
  threshold mirror policy keeps part of the diff, the random models' frees all of it).
- ``decode``: decode time per token of laid-out rows vs plain rows of the same length: one
  society round (16 agents) sent with hints to a tokendance server (laid-out rows), then the
  same prompts without hints to the same server (plain rows, the user's backend), 64 tokens
  each; per request ``(latency - TTFT) / (tokens - 1)``.

Per run: round latency p50/p90 over the trace's rounds (first request sent -> last answer in),
TTFT p50 (streamed, per request), decode tokens/s (median over requests of ``(tokens - 1) /
(latency - TTFT)``), and the round split in two: ``all_first`` (first request sent -> the last
agent's first token: the barrier, every prefill and any wait for KV) and ``tail`` (from there to
the last answer: decode only), p50 over rounds. Modes run interleaved (repeat k rotates the
order) on servers that stay up (``--sleep-on-idle``), the cache flushed before each run, fresh
round ids each run. Spread: median and min/max over repeats; ratios off/tokendance are paired
per repeat. ``--variant NAME=FLAGS`` adds a tokendance arm with more launch flags, interleaved
and paired the same way (``NAME/tokendance``), to measure one option in one run.

    python benchmarks/round_latency.py --out runs/bench/round_latency
    python benchmarks/round_latency.py --cases ga25 decode --repeats 3 --out ...
    python benchmarks/round_latency.py --quick --out runs/bench/round_latency-quick
    python benchmarks/round_latency.py --cases society4 --repeats 5 \
        --variant release="--tokendance-master-start release"
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from benchmarks import common

logger = logging.getLogger("benchmarks.round_latency")
ROOT = Path(__file__).resolve().parents[1]
METRICS = (
    "round_ms_p50",
    "round_ms_p90",
    "ttft_ms_p50",
    "decode_tok_s",
    "all_first_ms_p50",
    "tail_ms_p50",
)


class Case(NamedTuple):
    """One workload of the benchmark."""

    model: str
    server_args: str
    trace: dict[str, Any]  # {"file": path} or generator parameters


SOCIETY = dict(workload="agent_society", seed=0, private_words=120, shared_words=22)
CASES: dict[str, Case] = {
    "ga25": Case("tiny", "", {"file": "workloads/ga_the_ville_n25.jsonl"}),
    "society64": Case(
        "tiny",
        "--max-total-tokens 450000 --max-running-requests 64",
        dict(SOCIETY, agents=64, rounds=4),
    ),
    "society16-small": Case(
        "small",
        "--max-total-tokens 131072 --max-running-requests 32",
        dict(SOCIETY, agents=16, rounds=3),
    ),
    "society4": Case("tiny", "", dict(SOCIETY, agents=4, rounds=6)),
    "society16-capacity": Case(
        "tiny",
        "--max-total-tokens 32768 --tokendance-uniform-attention",
        dict(SOCIETY, agents=16, rounds=2, max_tokens=16),
    ),
    "society32-capacity": Case(
        "tiny",
        "--max-total-tokens 32768 --tokendance-uniform-attention",
        dict(SOCIETY, agents=32, rounds=2, max_tokens=16),
    ),
    "society32-trained": Case(
        "trained",
        "--max-total-tokens 200000 --max-running-requests 64",
        dict(SOCIETY, agents=32, rounds=3, private_words=70, shared_words=11),
    ),
}
QUICK = {"ga25": Case("tiny", "", {"file": "workloads/ga_the_ville_n8.jsonl"})}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=[*CASES, "decode"], choices=[*CASES, "decode"])
    ap.add_argument("--modes", nargs="+", default=["off", "tokendance"], choices=common.MODES)
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode and case (interleaved)")
    ap.add_argument("--ratio", type=float, default=0.15, help="recompute ratio (tokendance, pic)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="", help="more launch_server flags, every case")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="one more tokendance arm with these launch flags, interleaved with the modes and "
        "paired with tokendance (ratio NAME/tokendance), e.g. "
        "release='--tokendance-master-start release'; repeatable",
    )
    ap.add_argument("--quick", action="store_true", help="GA n8 and decode only, 2 repeats")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/round_latency"))
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _trace(case: Case) -> Any:
    if "file" in case.trace:
        return common.load_trace(ROOT / case.trace["file"])
    params = dict(case.trace)
    return common.make_trace(params.pop("workload"), **params)


def _decode_rate(q: Any) -> float | None:
    """Decode tokens/s of one request (its tokens after the first, over the time after TTFT)."""
    if q.error is not None or q.ttft_ms is None or q.completion_tokens < 2:
        return None
    span = (q.latency_ms - q.ttft_ms) / 1e3
    return (q.completion_tokens - 1) / span if span > 0 else None


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def _all_first_ms(rnd: Any) -> float | None:
    """Round start -> the last agent's first token (a round's requests are sent at once)."""
    ttft = [q.ttft_ms for q in rnd.requests if q.ttft_ms is not None and q.error is None]
    return max(ttft) if ttft and len(ttft) == len(rnd.requests) else None


def run_metrics(result: Any) -> dict[str, Any]:
    """Per-run numbers from a ReplayResult."""
    lat = [r.latency_ms for r in result.rounds]
    first = [(r.latency_ms, f) for r in result.rounds if (f := _all_first_ms(r)) is not None]
    reqs = [q for r in result.rounds for q in r.requests]
    ttft = [q.ttft_ms for q in reqs if q.ttft_ms is not None and q.error is None]
    rates = [x for x in (_decode_rate(q) for q in reqs) if x is not None]
    return {
        "round_ms_p50": _pct(lat, 0.5),
        "round_ms_p90": _pct(lat, 0.9),
        "ttft_ms_p50": _pct(ttft, 0.5),
        "decode_tok_s": statistics.median(rates) if rates else None,
        "all_first_ms_p50": _pct([f for _, f in first], 0.5),
        "tail_ms_p50": _pct([max(0.0, t - f) for t, f in first], 0.5),
        "round_ms": [round(x, 1) for x in lat],
        "errors": sum(1 for q in reqs if q.error is not None),
    }


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """``--variant NAME=FLAGS`` as {name: flags} (names must not be a mode or repeat)."""
    out: dict[str, list[str]] = {}
    for v in args.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name or name in common.MODES or name in out:
            raise SystemExit(f"--variant wants NAME=FLAGS with a new name, got {v!r}")
        out[name] = shlex.split(flags)
    return out


def arms(args: argparse.Namespace) -> list[str]:
    """Every arm of a run: the modes, then the variants."""
    return [*args.modes, *variants(args)]


def run_case(name: str, case: Case, args: argparse.Namespace, pool: Any) -> list[dict[str, Any]]:
    """Interleaved replays of every mode (and variant) on one case."""
    from sglang_tokendance.replay import ReplayOptions, replay

    trace = _trace(case)
    model = common.model_path(case.model)
    extra = shlex.split(case.server_args) + shlex.split(args.server_args)
    mode_of = {m: m for m in args.modes} | {v: "tokendance" for v in variants(args)}
    keys = {m: pool.key(model, m, args.ratio, extra) for m in args.modes}
    keys |= {
        v: pool.key(model, "tokendance", args.ratio, extra + f) for v, f in variants(args).items()
    }
    pool.ensure(list(keys.values()))
    servers = {m: pool.get(k) for m, k in keys.items()}
    for m, srv in servers.items():  # warm-up: the first forwards of new shapes are slow
        common.warm_up(srv.url)
        # a fresh prefix: cases share servers, and a round id never repeats on one
        warm = ReplayOptions(
            mode=mode_of[m], progress=False, max_rounds=1, round_prefix=common.run_prefix("warm")
        )
        replay(trace, srv.url, warm)
    runs = []
    names = arms(args)
    bar = tqdm(total=args.repeats * len(names), desc=name, unit="run", disable=None)
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for m in order:
            url = servers[m].url
            common.flush_cache(url)
            opts = ReplayOptions(
                mode=mode_of[m],
                progress=False,
                honor_arrival=False,
                round_prefix=common.run_prefix(m),
            )
            rec = {"case": name, "mode": m, "repeat": rep, "loadavg": common.loadavg()}
            rec.update(run_metrics(replay(trace, url, opts)))
            runs.append(rec)
            bar.update(1)
    bar.close()
    return runs


def run_decode(args: argparse.Namespace, pool: Any) -> list[dict[str, Any]]:
    """Decode per token: laid-out rows vs plain rows of the same length, on one server."""
    from sglang_tokendance.replay import ReplayOptions, replay

    trace = common.make_trace(**dict(SOCIETY, agents=16, rounds=2, max_tokens=args.decode_tokens))
    model = common.model_path("tiny")
    extra = ["--max-total-tokens", "200000"] + shlex.split(args.server_args)
    srv = pool.get(pool.key(model, "tokendance", args.ratio, extra))
    common.warm_up(srv.url)
    runs = []
    for rep in range(args.repeats):
        for hinted in (rep % 2 == 0, rep % 2 == 1):  # alternate which goes first
            common.flush_cache(srv.url)
            opts = ReplayOptions(
                mode="tokendance" if hinted else "off",
                progress=False,
                honor_arrival=False,
                round_prefix=common.run_prefix("dec"),
            )
            res = replay(trace, srv.url, opts)
            last = res.rounds[-1:]  # round 2: laid out against round 1's masters when hinted
            rates = [x for q in last[0].requests if (x := _decode_rate(q)) is not None]
            runs.append(
                {
                    "case": "decode",
                    "rows": "laid-out" if hinted else "plain",
                    "repeat": rep,
                    "ms_per_token": 1e3 / statistics.median(rates) if rates else None,
                    "prompt_tokens": statistics.median(q.prompt_tokens for q in last[0].requests),
                }
            )
    return runs


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Spread per case, mode and metric; paired ratios off/tokendance (and pic/tokendance,
    and NAME/tokendance for each variant)."""
    out: dict[str, Any] = {}
    for case in dict.fromkeys(r["case"] for r in runs if r["case"] != "decode"):
        mine = [r for r in runs if r["case"] == case]
        per = {
            m: {k: common.spread(r[k] for r in mine if r["mode"] == m) for k in METRICS}
            for m in modes
        }
        ratios = {}
        for base in ("off", "pic", *(m for m in modes if m not in common.MODES)):
            if base in modes and "tokendance" in modes:
                for k in METRICS:
                    vals = []
                    for rep in {r["repeat"] for r in mine}:
                        b = next(r for r in mine if r["repeat"] == rep and r["mode"] == base)
                        t = next(
                            r for r in mine if r["repeat"] == rep and r["mode"] == "tokendance"
                        )
                        vals.append(common.ratio(b[k], t[k]))
                    ratios[f"{k}:{base}/tokendance"] = common.spread(vals)
        out[case] = {"per_mode": per, "ratios": ratios}
    dec = [r for r in runs if r["case"] == "decode"]
    if dec:
        lo = [r for r in dec if r["rows"] == "laid-out"]
        pl = [r for r in dec if r["rows"] == "plain"]
        paired = [
            common.ratio(a["ms_per_token"], b["ms_per_token"]) for a, b in zip(lo, pl, strict=True)
        ]
        out["decode"] = {
            "laid_out_ms_per_token": common.spread(r["ms_per_token"] for r in lo),
            "plain_ms_per_token": common.spread(r["ms_per_token"] for r in pl),
            "laid_out/plain": common.spread(paired),
        }
    return out


def run(args: argparse.Namespace, pool: common.ServerPool | None = None) -> dict[str, Any]:
    """Every case asked for; returns the result dict."""
    cases = dict(CASES)
    if args.quick:
        cases = dict(QUICK)
        args.cases = [c for c in args.cases if c in (*QUICK, "decode")]
        args.repeats = min(args.repeats, 2)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with common.pool_or_new(pool, args.out / "logs", max_alive=len(arms(args)) + 1) as pool:
        for name in args.cases:
            if name == "decode":
                runs += run_decode(args, pool)
            else:
                runs += run_case(name, cases[name], args, pool)
        servers = [s.describe() for s in pool._alive.values()]
    return {
        "benchmark": "round_latency",
        "config": {
            "cases": {n: cases[n]._asdict() for n in args.cases if n in cases},
            "modes": args.modes,
            "repeats": args.repeats,
            "ratio": args.ratio,
            "decode_tokens": args.decode_tokens,
            "server_args": args.server_args,
            "variants": variants(args),
            "quick": args.quick,
        },
        "servers_last_alive": servers,
        "runs": runs,
        "summary": summarize(runs, arms(args)),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": common.machine_info(),
    }


def _f(s: dict[str, Any] | None, d: int = 2) -> str:
    return common.fmt_spread(s, d) if s else "-"


def markdown(result: dict[str, Any]) -> str:
    """A table per case (median [min, max] over repeats)."""
    m = result["machine"]
    lines = [f"# Round latency ({m.get('name', '?')}, {result['config']['repeats']} repeats)", ""]
    for case, s in result["summary"].items():
        if case == "decode":
            continue
        lines += [f"## {case}", "", "| mode | " + " | ".join(METRICS) + " |"]
        lines.append("|---" * (len(METRICS) + 1) + "|")
        for mode, per in s["per_mode"].items():
            lines.append(f"| {mode} | " + " | ".join(_f(per[k], 1) for k in METRICS) + " |")
        for k, v in s["ratios"].items():
            lines.append(f"\n{k}: {_f(v)}")
        lines.append("")
    d = result["summary"].get("decode")
    if d:
        lines += [
            "## decode per token",
            "",
            f"laid-out rows {_f(d['laid_out_ms_per_token'])} ms, plain rows "
            f"{_f(d['plain_ms_per_token'])} ms, laid-out/plain {_f(d['laid_out/plain'])}",
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Round latency p50 per case and mode (median over repeats, min-max bars)."""
    plt = common.pyplot()
    cases = [c for c in result["summary"] if c != "decode"]
    modes = result["config"]["modes"]
    fig, ax = plt.subplots(figsize=(2.5 + 2 * len(cases), 4))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        for i, c in enumerate(cases):
            s = result["summary"][c]["per_mode"][mode]["round_ms_p50"]
            if s["median"] is None:
                continue
            err = [[s["median"] - s["min"]], [s["max"] - s["median"]]]
            ax.bar(i + j * width, s["median"], width, yerr=err, label=mode if i == 0 else None)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(cases))], cases)
    ax.set_ylabel("round latency p50 (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    common.write_outputs("round_latency", result, out, markdown, plot)


def summary_line(result: dict[str, Any]) -> str:
    parts = []
    for case, s in result["summary"].items():
        if case == "decode":
            parts.append(f"decode laid-out/plain {_f(s['laid_out/plain'])}")
        elif "round_ms_p50:off/tokendance" in s["ratios"]:
            parts.append(
                f"{case} round p50 off/tokendance {_f(s['ratios']['round_ms_p50:off/tokendance'])}"
            )
    return "round_latency: " + "; ".join(parts)


def exit_code(result: dict[str, Any]) -> int:
    return 1 if any(r.get("errors") for r in result["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    return common.bench_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
