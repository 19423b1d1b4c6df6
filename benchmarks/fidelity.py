"""Fidelity of reused KV against full prefill (mode off), per recompute ratio and mode.

For every request of a trace (default: the real GenerativeAgents trace
``workloads/ga_the_ville_n8.jsonl``, first 2 rounds) the same prompt goes to a mode-off server
(full prefill with SGLang's prefix caching: the reference) and to tokendance / pic servers at
each recompute ratio. By default every server runs ``--tokendance-uniform-attention`` (all
modes on the position-aware attention path), so the comparison isolates the KV reuse from the
float differences between torch_native's kernel and the position-aware one; pass
``--server-args`` without it to compare against torch_native's path. Two passes per server,
each from a flushed cache with fresh round ids:

- pass A (``max_new_tokens=1``, ``return_logprob``, ``top_logprobs_num=K``,
  ``logprob_start_len=-1``): the next-token distribution after the prompt. K defaults to the
  model's vocabulary size, so the distribution is complete and the KL is exact.
- pass B (``max_new_tokens=--max-new-tokens``, greedy): the generated token ids and, per
  output token, its top-``--decode-top-k`` logprobs (default the whole vocabulary).

Metrics vs off, per (mode, ratio):
- ``top1_agreement``: the first output token equals off's;
- ``kl_first_token``: KL(P_off || P_mode) of the first output token's distribution (nats);
- ``exact_match``: all greedy output ids equal off's; ``first_divergence``: the index of the
  first differing output token (over diverged requests); ``matched_prefix_mean``.
- ``kl_decode``: KL(P_off || P_mode) of the decode steps' distributions, output tokens 2..d+1
  where d is the common prefix (each compared step follows the same tokens in both, so the
  two distributions have the same context). The first token is computed by the prefill, before
  the mirror policy frees anything, so only these steps can show what a mirror policy costs;
  per request the mean over its compared steps, then the mean (and max) over requests.
Each metric is given over all requests and over the REUSED ones (requests whose
``cached_tokens`` exceed off's for the same prompt: they read master KV; the round's master
agents run a full prefill and are exact by construction). An ``off (repeat)`` row gives the
noise floor of the reference itself (batching can change float sums). Ratio 1.0 recomputes
every token of every segment: its exact match must be 1.0 (sanity).

Selection policies of the recompute set (``--selections``, tokendance rows at ratios strictly
between 0 and 1, where the choice matters): "leading" (the first ceil(ratio x L) tokens of every
shared segment), "deviation" (CacheBlend-style, by check-layer deviation measured when the
master is computed) and "both" (half each). pic rows use the server default.

Master policies (``--policies``, closed loop, ``fidelity_closed.py``): round 2 built from the
server's own round-1 outputs; "fresh" computes each segment's master in a master agent's
context, "author" reuses the KV its author produced while generating it. Both are compared to
mode off on the same round-2 prompts.

    python benchmarks/fidelity.py --out runs/bench/fidelity            # tiny model
    python benchmarks/fidelity.py --model /path/to/trained --out ...   # any local model dir
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from benchmarks import common, fidelity_closed

logger = logging.getLogger("benchmarks.fidelity")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT / "workloads" / "ga_the_ville_n8.jsonl"
SELECTIONS = ["leading", "deviation", "both"]
POLICIES = ["fresh", "author"]


def _mirror_spec(text: str) -> str:
    try:
        common.mirror_flags(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default=common.default_fidelity_model(),
        help="tiny | small | trained | model directory (default: trained when present)",
    )
    ap.add_argument(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="trace file (default: the real GA trace, 8 agents)",
    )
    ap.add_argument("--max-rounds", type=int, default=2)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.05, 0.15, 0.3, 1.0])
    ap.add_argument(
        "--modes", nargs="+", default=["tokendance", "pic"], choices=["tokendance", "pic"]
    )
    ap.add_argument("--selections", nargs="+", default=SELECTIONS, choices=SELECTIONS)
    ap.add_argument(
        "--mirrors",
        nargs="+",
        default=["default"],
        type=_mirror_spec,
        help="--tokendance-mirror policies of the tokendance rows (default: the server's own, "
        "no flag; keep: the recomputed slots "
        "stay the agent's; drop: freed after prefill, decode reads the master; threshold:EPS: "
        "freed where K/V stayed within EPS of the master's, e.g. threshold:0.05; "
        "threshold:EPS:layer: the same relative to the layer's mean master norm, "
        "--tokendance-mirror-scale layer)",
    )
    ap.add_argument(
        "--policies",
        nargs="*",
        default=POLICIES,
        choices=POLICIES,
        help="master policies compared in closed loop (none: skip the closed-loop rows)",
    )
    ap.add_argument(
        "--closed-loop-ratio", type=float, default=0.15, help="ratio of the closed-loop rows"
    )
    ap.add_argument(
        "--closed-rounds",
        type=int,
        default=1,
        help="closed-loop steps: round r+1 from the server's own round-r outputs, for the first "
        "N rounds r of --max-rounds (each step is one round of requests)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens (pass B)")
    ap.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="top_logprobs_num of pass A (0: the vocabulary size, exact KL)",
    )
    ap.add_argument(
        "--decode-top-k",
        type=int,
        default=0,
        help="top_logprobs_num of pass B's output tokens, for the decode-step KL (0: the "
        "vocabulary size, exact; -1: not asked, no decode KL)",
    )
    ap.add_argument(
        "--server-args",
        default=common.TINY_SERVER_ARGS,
        help="more launch_server flags (default: one attention path for all modes)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="ratios 0.15 1.0, tokendance only, fewer variants"
    )
    ap.add_argument("--seed", type=int, default=0, help="recorded; runs are greedy")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/fidelity"))
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.ratios = [0.15, 1.0]
        args.modes = ["tokendance"]
        args.max_rounds = min(args.max_rounds, 2)
        args.selections = [x for x in args.selections if x != "both"] or ["leading"]
        args.policies = ["author"] if args.policies else []


def _passes(url: str, trace: Any, rounds: list[int], k: int, g: int, kd: int) -> dict[tuple, dict]:
    """Pass A and B on one server: (round, agent) -> first-token logprobs, ids, every output
    token's top-``kd`` logprobs (0: none), cache hits."""
    extra = fidelity_closed.logprob_fields(k)
    common.flush_cache(url)
    a = common.run_rounds(
        url, trace, common.run_prefix("fa"), rounds, max_new_tokens=1, extra=extra, stream=False
    )
    common.flush_cache(url)
    b = common.run_rounds(
        url,
        trace,
        common.run_prefix("fb"),
        rounds,
        max_new_tokens=g,
        extra=fidelity_closed.logprob_fields(kd),
        stream=False,
    )
    return fidelity_closed.collect(a, b)


def mirror_storage(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """What the server's mirror policy kept over both passes: recomputed slots kept / freed,
    the deviations measured (threshold), the last round's shared-segment compression."""
    if not after.get("enabled") or after.get("mode") == "off":
        return None
    kept = after.get("mirror_slots_kept", 0) - before.get("mirror_slots_kept", 0)
    freed = after.get("mirror_slots_freed", 0) - before.get("mirror_slots_freed", 0)
    last = after.get("store_last_round") or {}
    return {
        "mirror_slots_kept": kept,
        "mirror_slots_freed": freed,
        "kept_share": round(kept / (kept + freed), 4) if kept + freed else None,
        "last_round_compression": last.get("compression_ratio"),
        "mirror_deviation": after.get("mirror_deviation"),
    }


def kl(p: dict[int, float], q: dict[int, float]) -> tuple[float | None, bool]:
    """KL(P || Q) in nats from two {token id: logprob} maps; (value, exact).

    Exact when both maps cover the same full support. With truncated top-K maps the sum runs
    over P's ids, Q's missing ids take Q's smallest listed logprob (a lower bound of the true
    KL's contribution is not guaranteed: flagged not exact), and P is renormalized.
    """
    if not p or not q:
        return None, False
    exact = set(p) == set(q)
    zp = math.log(sum(math.exp(v) for v in p.values()))
    floor = min(q.values())
    total = 0.0
    for tok, lp in p.items():
        lp_n = lp - zp
        total += math.exp(lp_n) * (lp_n - q.get(tok, floor))
    return max(total, 0.0), exact


def decode_kl(
    ref: list[dict[int, float]], other: list[dict[int, float]], div: int | None
) -> list[float]:
    """KL(P_ref || P_other) of each decode step both runs reached with the same context.

    Output step i (0-based) is conditioned on the prompt and output tokens 0..i-1, so it is
    comparable while those agree: i <= div (the first differing index; None = no difference).
    Step 0 is the prefill's distribution and is left out (``kl_first_token`` has it)::

        ids ref    a b c d e
        ids other  a b c x .        div = 3
        compared     1 2 3          steps 1..3 (step 3 still follows "a b c" in both)
    """
    last = min(len(ref), len(other)) - 1
    if div is not None:
        last = min(last, div)
    out = []
    for i in range(1, last + 1):
        value, _ = kl(ref[i], other[i])
        if value is not None:
            out.append(value)
    return out


def compare(ref: dict[tuple, dict], other: dict[tuple, dict], g: int) -> dict[str, Any]:
    """Agreement metrics of ``other`` against ``ref`` (all requests and reused ones)."""
    rows = []
    for key, r in ref.items():
        o = other.get(key)
        if o is None or r["error"] or o["error"]:
            rows.append({"key": key, "error": (o or {}).get("error") or r["error"] or "missing"})
            continue
        div = next(
            (i for i, (x, y) in enumerate(zip(r["ids"], o["ids"], strict=False)) if x != y), None
        )
        if div is None and len(r["ids"]) != len(o["ids"]):
            div = min(len(r["ids"]), len(o["ids"]))
        value, exact = kl(r["top"], o["top"])
        steps = decode_kl(r.get("steps") or [], o.get("steps") or [], div)
        rows.append(
            {
                "key": key,
                "error": None,
                "reused": o["cached_a"] > r["cached_a"],
                "top1": r["first"] == o["first"],
                "kl": value,
                "kl_exact": exact,
                "exact": div is None,
                "divergence": div,
                "matched": len(r["ids"]) if div is None else div,
                "kl_decode": statistics.fmean(steps) if steps else None,
                "kl_decode_steps": len(steps),
                "kl_decode_per_step": [round(v, 9) for v in steps],
            }
        )
    return {
        "all": _agg(rows),
        "reused": _agg([x for x in rows if x.get("reused")]),
        "rows": [{**x, "key": list(x["key"])} for x in rows],
    }


def _agg(rows: list[dict[str, Any]]) -> dict[str, Any]:
    good = [x for x in rows if x["error"] is None]
    if not good:
        return {"n": 0, "errors": len(rows)}
    kls = [x["kl"] for x in good if x["kl"] is not None]
    divs = [x["divergence"] for x in good if x["divergence"] is not None]
    dec = [x["kl_decode"] for x in good if x.get("kl_decode") is not None]
    return {
        "n": len(good),
        "errors": len(rows) - len(good),
        "top1_agreement": round(statistics.fmean(x["top1"] for x in good), 4),
        "kl_first_token_mean": round(statistics.fmean(kls), 6) if kls else None,
        "kl_first_token_median": round(statistics.median(kls), 6) if kls else None,
        "kl_first_token_max": round(max(kls), 6) if kls else None,
        "kl_exact": all(x["kl_exact"] for x in good),
        "exact_match": round(statistics.fmean(x["exact"] for x in good), 4),
        "first_divergence_median": statistics.median(divs) if divs else None,
        "first_divergence_min": min(divs) if divs else None,
        "matched_prefix_mean": round(statistics.fmean(x["matched"] for x in good), 3),
        "kl_decode_mean": round(statistics.fmean(dec), 6) if dec else None,
        "kl_decode_max": round(max(dec), 6) if dec else None,
        "kl_decode_n": len(dec),
        "kl_decode_steps": sum(x.get("kl_decode_steps", 0) for x in good),
    }


def run(args: argparse.Namespace, pool: common.ServerPool | None = None) -> dict[str, Any]:
    """Reference + every (mode, ratio); returns the result dict."""
    apply_quick(args)
    model = common.model_path(args.model)
    vocab = common.vocab_size(model)
    k = vocab if args.top_k <= 0 else min(args.top_k, vocab)  # K > vocab crashes SGLang 0.5.23
    kd = 0 if args.decode_top_k < 0 else (vocab if args.decode_top_k == 0 else args.decode_top_k)
    kd = min(kd, vocab)
    trace = common.load_trace(args.trace)
    rounds = sorted(trace.rounds())[: args.max_rounds]
    extra = shlex.split(args.server_args)
    g = args.max_new_tokens
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    servers = []
    sel_flag, pol_flag = "--tokendance-selection", common.POLICY_FLAG
    closed_info: dict[str, Any] = {}
    closed_rows: dict[str, tuple[dict, dict]] = {}
    storage: dict[str, dict[str, Any]] = {}
    with common.pool_or_new(pool, args.out / "logs") as pool:
        ref_key = pool.key(model, "off", 0.0, extra)
        keys = []
        for m in args.modes:
            for r in args.ratios:
                sels = args.selections if m == "tokendance" and 0.0 < r < 1.0 else [None]
                mirrors = args.mirrors if m == "tokendance" else ["default"]
                for sel in sels:
                    for mirror in mirrors:
                        flags = [] if sel is None else [sel_flag, sel]
                        flags += common.mirror_flags(mirror)
                        keys.append(pool.key(model, m, r, [*flags, *extra]))
        closed = [
            pool.key(
                model,
                "tokendance",
                args.closed_loop_ratio,
                [
                    sel_flag,
                    args.selections[-1],
                    pol_flag,
                    p,
                    *common.mirror_flags(mirror),
                    *extra,
                ],
            )
            for p in args.policies
            for mirror in args.mirrors
        ]
        keys = [ref_key] + pool.order(keys)
        results: dict[str, dict[tuple, dict]] = {}
        bar = tqdm(total=len(keys) + 1, desc="fidelity", unit="server-run", disable=None)
        for i, key in enumerate(keys):
            pool.ensure(keys[i : i + pool.start_parallel])
            srv = pool.get(key)
            servers.append(srv.describe())
            common.warm_up(srv.url)
            before = common.get_stats(srv.url)
            results[key.label()] = _passes(srv.url, trace, rounds, k, g, kd)
            storage[key.label()] = mirror_storage(before, common.get_stats(srv.url))
            bar.update(1)
            if key == ref_key:  # the reference's own noise floor
                results["off (repeat)"] = _passes(srv.url, trace, rounds, k, g, kd)
                bar.update(1)
        bar.close()
        for key in closed if len(rounds) >= 2 else []:
            pool.ensure([ref_key, key])
            srv = pool.get(key)
            servers.append(srv.describe())
            common.warm_up(srv.url)
            ref_c, td_c, info = fidelity_closed.closed_steps(
                srv.url, pool.get(ref_key).url, trace, rounds[: args.closed_rounds + 1], k, g, kd
            )
            label = f"{key.label()} closed loop"
            closed_rows[label] = (ref_c, td_c)
            closed_info[label] = info
    ref = results["off"]
    pairs = [(label, ref, res) for label, res in results.items() if label != "off"]
    pairs += [(label, rc, tc) for label, (rc, tc) in closed_rows.items()]
    for label, reference, res in pairs:
        head, _, r = label.partition("@")
        mode, _, opts = head.partition("[")
        opt = opts.rstrip("]").split(",") if opts else []
        cmp = compare(reference, res, g)
        rows.append(
            {
                "label": label,
                "mode": mode.split()[0],
                "ratio": float(r.split()[0]) if r else None,
                "selection": opt[0] if opt else None,
                "policy": opt[1] if len(opt) > 1 else None,
                "mirror": common.mirror_of_label(label),
                "closed_loop": label.endswith("closed loop"),
                "closed_loop_info": closed_info.get(label),
                "storage": storage.get(label),
                "all": cmp["all"],
                "reused": cmp["reused"],
                "requests": cmp["rows"],
            }
        )
    sanity = [x for x in rows if x["ratio"] == 1.0]
    return {
        "benchmark": "fidelity",
        "reference": "mode off (full prefill + SGLang prefix caching), same prompts, same flags",
        "selections": args.selections,
        "mirrors": args.mirrors,
        "policies": args.policies,
        "config": {
            "model": common.model_label(args.model, model),
            "model_path": str(model),
            "vocab_size": vocab,
            "top_logprobs_num": k,
            "decode_top_logprobs_num": kd,
            "trace": str(args.trace),
            "rounds": rounds,
            "requests": sum(len(trace.rounds()[r]) for r in rounds),
            "ratios": args.ratios,
            "modes": args.modes,
            "max_new_tokens": g,
            "closed_rounds": args.closed_rounds,
            "server_args": args.server_args,
            "quick": args.quick,
        },
        "servers": servers,
        "rows": rows,
        "sanity_ratio_1_exact_match": {x["label"]: x["all"].get("exact_match") for x in sanity},
        "sanity_ok": all(x["all"].get("exact_match") == 1.0 for x in sanity) if sanity else None,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": common.machine_info(),
    }


def sorted_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows by (closed loop, mode, ratio, selection, policy)."""
    order = {"off": 0, "tokendance": 1, "pic": 2}
    sel = {None: 0, **{s: i + 1 for i, s in enumerate(SELECTIONS)}}
    return sorted(
        result["rows"],
        key=lambda x: (
            bool(x.get("closed_loop")),
            order.get(x["mode"], 3),
            x["ratio"] or 0.0,
            sel.get(x.get("selection"), 9),
            x.get("policy") or "",
            x.get("mirror") or "default",
        ),
    )


def _group(x: dict[str, Any]) -> tuple:
    """Rows compared with each other: same loop, mode, ratio, selection and master policy."""
    return (bool(x.get("closed_loop")), x["mode"], x["ratio"], x.get("selection"), x.get("policy"))


def paired_vs_keep(
    row: dict[str, Any], keep: dict[str, Any], seed: int = 0, resamples: int = 2000
) -> dict[str, Any] | None:
    """A mirror policy's row against the keep row of its group, request by request.

    ``kl_decode_ratio``: sum of the row's per-request decode KL over keep's, on the requests
    where both have one, with a seeded bootstrap 95% interval over requests; ``higher_share``:
    requests where the row's is higher; ``lost`` / ``gained``: exact greedy answers keep had and
    the row lost, and the reverse. Only meaningful where both saw the same prompts (open loop).
    """
    ref = {tuple(q["key"]): q for q in keep["requests"] if q.get("error") is None}
    pairs, lost, gained = [], 0, 0
    for q in row["requests"]:
        k = ref.get(tuple(q["key"]))
        if k is None or q.get("error") is not None:
            continue
        lost += bool(k["exact"] and not q["exact"])
        gained += bool(q["exact"] and not k["exact"])
        if q.get("kl_decode") is not None and k.get("kl_decode") is not None:
            pairs.append((q["kl_decode"], k["kl_decode"]))
    if not pairs or sum(b for _, b in pairs) <= 0:
        return None
    rng = random.Random(seed)
    n = len(pairs)

    def ratio(idx: list[int]) -> float:
        den = sum(pairs[i][1] for i in idx)
        return sum(pairs[i][0] for i in idx) / den if den > 0 else math.inf

    boot = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return {
        "n": n,
        "kl_decode_ratio": round(ratio(list(range(n))), 4),
        "kl_decode_ratio_ci95": [
            round(boot[int(0.025 * resamples)], 4),
            round(boot[int(0.975 * resamples) - 1], 4),
        ],  # fmt: skip
        "higher_share": round(sum(a > b for a, b in pairs) / n, 3),
        "lost": lost,
        "gained": gained,
    }


def paired_lines(result: dict[str, Any]) -> list[str]:
    """Markdown lines: every non-keep mirror row against its group's keep row."""
    keeps = {_group(x): x for x in result["rows"] if x.get("mirror") == "keep"}
    out = []
    for x in sorted_rows(result):
        keep = keeps.get(_group(x))
        if keep is None or x is keep or x.get("mirror") in (None, "keep"):
            continue
        p = paired_vs_keep(x, keep)
        if p is None:
            continue
        lo, hi = p["kl_decode_ratio_ci95"]
        note = " (each row quotes its own outputs)" if x.get("closed_loop") else ""
        out.append(
            f"- {_server(x['label'])}{note} vs keep, per request (n {p['n']}): decode KL "
            f"x{p['kl_decode_ratio']:.3f} [{lo:.3f}-{hi:.3f}] (bootstrap 95%), higher for "
            f"{p['higher_share']:.0%} of requests; exact answers lost {p['lost']}, gained "
            f"{p['gained']}"
        )
    return out


def between_policy_lines(result: dict[str, Any]) -> list[str]:
    """Markdown lines: every pair of non-keep mirror rows of a group, head to head (the later
    row of the table over the earlier), where both loops saw the same prompts (open loop)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for x in sorted_rows(result):
        if x.get("mirror") not in (None, "keep", "default") and not x.get("closed_loop"):
            groups.setdefault(_group(x), []).append(x)
    out = []
    for rows in groups.values():
        for i, base in enumerate(rows):
            for x in rows[i + 1 :]:
                p = paired_vs_keep(x, base)
                if p is None:
                    continue
                lo, hi = p["kl_decode_ratio_ci95"]
                out.append(
                    f"- {x['mirror']} / {base['mirror']} ({_server(x['label'])}), per request "
                    f"(n {p['n']}): decode KL x{p['kl_decode_ratio']:.3f} [{lo:.3f}-{hi:.3f}] "
                    f"(bootstrap 95%); exact answers lost {p['lost']}, gained {p['gained']}"
                )
    return out


def closed_loop_lines(result: dict[str, Any]) -> list[str]:
    """What the closed-loop rows reused (authored masters vs fresh ones in round 2)."""
    out = []
    for x in sorted_rows(result):
        info = x.get("closed_loop_info")
        if info:
            nxt = info.get("masters_created_next_round")
            made = (
                f"{nxt} fresh masters were computed in round {info['round']}"
                if nxt is not None
                else f"{info['masters_created']} fresh masters were computed over rounds "
                f"{info['round'] - 1}-{info['round']} (round {info['round'] - 1} has no "
                "outputs to reuse)"
            )
            out.append(
                f"- {x['label']}: round {info['round']}, {info['author_masters_used']} segments "
                f"reused their author's decode-time KV; {made}"
            )
    return out


def _server(label: str) -> str:
    """The row's server without its ratio (``tokendance[both]@0.15 (drop mirrors)`` ->
    ``tokendance[both] (drop mirrors)``)."""
    head, _, rest = label.partition("@")
    return head + rest[len(rest.split()[0]) :] if rest else head


def table_rows(result: dict[str, Any]) -> list[str]:
    """Markdown table of the fidelity rows (all requests; reused ones in parentheses)."""
    lines = [
        "| server | ratio | top-1 agree | KL first token (mean / max, nats) | "
        "KL decode steps (mean / max, nats) | exact match | "
        "first divergence (median) | n (reused) | slots kept | compression |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, d: int = 3) -> str:
        return "n/a" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    def e(v: Any) -> str:
        return "n/a" if v is None else f"{v:.1e}"

    def g(v: Any) -> str:
        return "n/a" if v is None else f"{v:g}"

    for x in sorted_rows(result):
        a, u = x["all"], x["reused"]
        ratio = "-" if x["ratio"] is None else f"{x['ratio']:g}"
        lines.append(
            f"| {_server(x['label'])} "
            f"| {ratio} | "
            f"{f(a.get('top1_agreement'))} ({f(u.get('top1_agreement'))}) | "
            f"{e(a.get('kl_first_token_mean'))} / {e(a.get('kl_first_token_max'))} | "
            f"{e(a.get('kl_decode_mean'))} / {e(a.get('kl_decode_max'))} | "
            f"{f(a.get('exact_match'))} ({f(u.get('exact_match'))}) | "
            f"{g(a.get('first_divergence_median'))} | {a.get('n')} ({u.get('n')}) | "
            f"{f((x.get('storage') or {}).get('kept_share'))} | "
            f"{f((x.get('storage') or {}).get('last_round_compression'), 2)} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return "\n".join(
        [
            f"Reference: {result['reference']}. Selections: {', '.join(result['selections'])}; "
            f"master policies (closed loop): {', '.join(result['policies']) or 'none'}. "
            f"Model {cfg['model']}, trace {Path(cfg['trace']).name} rounds {cfg['rounds']} "
            f"({cfg['requests']} requests), {cfg['max_new_tokens']} greedy tokens, KL over "
            f"top-{cfg['top_logprobs_num']} of a {cfg['vocab_size']}-token vocabulary (decode "
            f"steps: top-{cfg.get('decode_top_logprobs_num')}; output tokens 2..d+1, d the "
            "common prefix with off: the only steps a mirror policy can change). Values over "
            "all requests, (in parentheses) over requests that reused master KV.",
            "",
            *table_rows(result),
            "",
            *closed_loop_lines(result),
            "",
            *paired_lines(result),
            "",
            *between_policy_lines(result),
            "",
            f"Sanity (ratio 1.0 exact match == 1.0): {result['sanity_ok']}",
        ]
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Exact match, top-1 agreement and KL vs ratio, per mode and selection (all requests)."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [
        ("exact_match", "greedy exact match"),
        ("top1_agreement", "first-token top-1"),
        ("kl_first_token_mean", "KL first token (nats)"),
    ]
    open_rows = [x for x in result["rows"] if not x.get("closed_loop") and x["ratio"] is not None]
    series = sorted({(x["mode"], x.get("selection")) for x in open_rows if x.get("selection")})
    series += [(m, None) for m in result["config"]["modes"] if not any(s[0] == m for s in series)]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for mode, sel in series:
            # rows without a selection (ratios 0 and 1) belong to every series of their mode
            pts = sorted(
                (x["ratio"], x["all"].get(key))
                for x in open_rows
                if x["mode"] == mode and x.get("selection") in (sel, None)
            )
            name = mode if sel is None else f"{mode} {sel}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        noise = next((x for x in result["rows"] if x["label"] == "off (repeat)"), None)
        if noise and noise["all"].get(key) is not None:
            ax.axhline(noise["all"][key], color="grey", lw=0.8, label="off vs off")
        ax.set_xlabel("recompute ratio")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"fidelity vs full prefill ({result['config']['model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_line(result: dict[str, Any]) -> str:
    parts = []
    for x in result["rows"]:
        if x["ratio"] is None:
            continue
        a = x["all"]
        parts.append(
            f"{x['label']} top1 {a.get('top1_agreement')} exact {a.get('exact_match')} "
            f"kl_decode {a.get('kl_decode_mean')}"
        )
    return (
        f"fidelity ({result['config']['model'].split()[0]}): "
        + "; ".join(parts)
        + f"; sanity {result['sanity_ok']} ({result['wall_s']:.0f} s)"
    )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    common.write_outputs("fidelity", result, out, markdown, plot)


def exit_code(result: dict[str, Any]) -> int:
    return 0 if result["sanity_ok"] in (True, None) else 1


def main(argv: list[str] | None = None, pool: common.ServerPool | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--render"]:  # --render RESULT.json OUT: the markdown and plot again
        if len(args) != 3:
            raise SystemExit("usage: fidelity.py --render RESULT.json OUT_DIR")
        write_outputs(json.loads(Path(args[1]).read_text()), Path(args[2]))
        return 0
    return common.bench_main(sys.modules[__name__], argv, pool)


if __name__ == "__main__":
    sys.exit(main())
