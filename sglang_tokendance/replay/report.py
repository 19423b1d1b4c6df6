"""The replay report (JSON), its one-screen summary, and the side-by-side comparison.

Where the numbers come from:
- token counts: SGLang's ``meta_info`` per request; ``prefill_tokens_computed`` is the sum of
  ``prompt_tokens - cached_tokens``.
- ``prefill_token_layers``: the prefill work the server measured (``attention`` in the stats:
  extend tokens x the layers each ran through; pic counts its check-layer subset), since the
  server started (an embedded server: this replay only); null when the server has no count.
- ``ttft_ms``: measured on the client from the streamed answer (``ttft_source: "stream"``).
- KV sizes: ``GET /tokendance/stats`` (read once, after the last round) when the server has it
  (``kv_tokens_peak``, ``kv_bytes_per_agent``, ``dense_kv_bytes_per_agent``,
  ``kv_bytes_per_token``, as the server defines them; the whole answer is kept under
  ``server_stats``). What the server does not report is computed where the inputs are known:
  ``kv_bytes_per_token`` from the model's ``config.json`` (readable when the server runs on
  this machine) and the KV dtype; ``dense_kv_bytes_per_agent`` as the mean over the last
  round's requests of (prompt + completion tokens) x ``kv_bytes_per_token`` (the server's
  basis: its last round); ``kv_bytes_per_agent`` (e.g. mode off, where the server reports only
  its peak) as ``kv_tokens_peak`` x ``kv_bytes_per_token`` / the widest round's requests, i.e.
  the KV the pool held at its peak, per agent. Anything else unknown is null. ``kv_source``
  says where each value came from ("server", "model_config", "computed" or null).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sglang_tokendance.replay.runner import ReplayOptions, ReplayResult

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
SERVER_FLAG_KEYS = (
    "attention_backend",
    "radix_cache_backend",
    "dtype",
    "kv_cache_dtype",
    "page_size",
    "max_total_tokens",
    "max_running_requests",
    "mem_fraction_static",
    "chunked_prefill_size",
    "disable_radix_cache",
    "disable_overlap_schedule",
    "schedule_policy",
)
STAT_KEYS = (
    "kv_bytes_per_token",
    "kv_tokens_peak",
    "kv_bytes_per_agent",
    "dense_kv_bytes_per_agent",
)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """``{"p50", "p90", "max"}`` with linear interpolation; all None for no values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"p50": None, "p90": None, "max": None}

    def pct(q: float) -> float:
        k = (len(xs) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"p50": round(pct(0.5), 3), "p90": round(pct(0.9), 3), "max": round(xs[-1], 3)}


def kv_bytes_per_token_from_config(info: dict[str, Any] | None) -> int | None:
    """2 x layers x kv_heads x head_dim x dtype bytes, from the model's local config.json."""
    if not info or not info.get("model_path"):
        return None
    cfg_path = Path(str(info["model_path"])) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    layers, heads = cfg.get("num_hidden_layers"), cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads if heads else None)
    dtype = str(info.get("kv_cache_dtype") or "auto")
    if dtype == "auto":
        dtype = str(info.get("dtype") or "auto")
    if dtype == "auto":
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    nbytes = DTYPE_BYTES.get(dtype.replace("torch.", ""))
    if not (layers and kv_heads and head_dim and nbytes):
        return None
    return int(2 * layers * kv_heads * head_dim * nbytes)


def server_description(
    info: dict[str, Any] | None, launch: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``{"model", "device", "flags"}`` from /server_info (and the embedded launch, if any)."""
    info = info or {}
    flags: dict[str, Any] = {k: info[k] for k in SERVER_FLAG_KEYS if k in info}
    if launch:
        flags.update(launch)
    return {"model": info.get("model_path"), "device": info.get("device"), "flags": flags}


def build_report(
    result: ReplayResult,
    opts: ReplayOptions,
    trace_path: str,
    workload: str,
    agents: int,
    launch: dict[str, Any] | None = None,
    include_prompts: bool = False,
) -> dict[str, Any]:
    """The report dict (see the module doc for each value's source)."""
    reqs = [q for r in result.rounds for q in r.requests]
    ok = [q for q in reqs if q.error is None]
    stats = result.stats or {}
    src: dict[str, str | None] = {
        k: "server" if stats.get(k) is not None else None for k in STAT_KEYS
    }
    per_tok = stats.get("kv_bytes_per_token")
    if per_tok is None:
        per_tok = kv_bytes_per_token_from_config(result.server_info)
        src["kv_bytes_per_token"] = "model_config" if per_tok is not None else None
    last = [q for q in (result.rounds[-1].requests if result.rounds else []) if q.error is None]
    dense = stats.get("dense_kv_bytes_per_agent")
    if dense is None and per_tok is not None and last:
        mean_tokens = sum(q.prompt_tokens + q.completion_tokens for q in last) / len(last)
        dense = round(mean_tokens * per_tok, 1)
        src["dense_kv_bytes_per_agent"] = "computed"
    per_agent = stats.get("kv_bytes_per_agent")
    peak = stats.get("kv_tokens_peak")
    if per_agent is None and peak is not None and per_tok is not None and result.rounds:
        per_agent = round(peak * per_tok / max(len(r.requests) for r in result.rounds), 1)
        src["kv_bytes_per_agent"] = "computed"
    prompt_tokens = sum(q.prompt_tokens for q in ok)
    computed = sum(q.prompt_tokens - q.cached_tokens for q in ok)
    last_round = stats.get("last_round") or {}
    # the pool was full while the measured round ran: its KV is what fitted (a lower bound)
    saturated = bool(last_round.get("pool_saturated")) or (
        src.get("kv_bytes_per_agent") == "computed"
        and peak is not None
        and stats.get("pool_tokens")
        and peak >= 0.98 * stats["pool_tokens"]
    )
    report: dict[str, Any] = {
        "mode": opts.mode,
        "closed_loop": opts.closed_loop,
        "trace": trace_path,
        "workload": workload,
        "agents": agents,
        "rounds": len(result.rounds),
        "requests": len(reqs),
        "concurrency": opts.concurrency,
        "round_prefix": opts.round_prefix,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": sum(q.cached_tokens for q in ok),
        "completion_tokens": sum(q.completion_tokens for q in ok),
        "prefill_tokens_computed": computed,
        "prefill_token_layers": (stats.get("attention") or {}).get("prefill_token_layers"),
        "kv_tokens_peak": stats.get("kv_tokens_peak"),
        # who held the measured round's peak (tokens): rows, mirrors, masters, radix
        "kv_peak_parts": last_round.get("kv_peak_parts"),
        "kv_bytes_per_token": per_tok,
        "kv_bytes_per_agent": per_agent,
        "kv_per_agent_lower_bound": saturated,
        "dense_kv_bytes_per_agent": dense,
        "kv_source": src,
        # only rounds whose every request was answered: a round that failed did not run
        "round_latency_ms": percentiles(
            [r.latency_ms for r in result.rounds if all(q.error is None for q in r.requests)]
        ),
        "rounds_failed": sum(1 for r in result.rounds if any(q.error for q in r.requests)),
        "ttft_ms": percentiles([q.ttft_ms for q in ok if q.ttft_ms is not None]),
        "ttft_source": "stream",
        "request_latency_ms": percentiles([q.latency_ms for q in ok]),
        "wall_s": round(result.wall_s, 3),
        "server": server_description(result.server_info, launch),
        "server_stats": result.stats,
        "per_round": [
            {
                "round": r.round,
                "requests": len(r.requests),
                "latency_ms": round(r.latency_ms, 3),
                "prompt_tokens": sum(q.prompt_tokens for q in r.requests if q.error is None),
                "prefill_tokens_computed": sum(
                    q.prompt_tokens - q.cached_tokens for q in r.requests if q.error is None
                ),
            }
            for r in result.rounds
        ],
        "outputs": [{"round": q.round, "agent": q.agent, "text": q.text} for q in reqs],
        "errors": [
            {"round": q.round, "agent": q.agent, "error": q.error}
            for q in reqs
            if q.error is not None
        ],
    }
    if include_prompts:
        report["prompts"] = [
            {"round": s.round, "agent": s.agent, "text": s.text, "kv_hints": s.kv_hints}
            for s in result.sent
        ]
    return report


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def _kib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1024:,.1f} KiB"


def summary(report: dict[str, Any]) -> str:
    """A one-screen text summary of a report."""
    rl, tt = report["round_latency_ms"], report["ttft_ms"]
    srv = report["server"]
    ttft_label = f"TTFT ms ({report['ttft_source']})"
    lines = [
        f"TokenDance replay: {report['workload']} ({report['trace']})",
        f"  mode {report['mode']}{' closed loop' if report['closed_loop'] else ' open loop'}, "
        f"{report['agents']} agents, {report['rounds']} rounds, {report['requests']} requests",
        f"  server: {srv.get('model')} on {srv.get('device')}",
        f"  prompt tokens            {_fmt(report['prompt_tokens'])}",
        f"  prefill tokens computed  {_fmt(report['prefill_tokens_computed'])}",
        f"  prefill token-layers     {_fmt(report.get('prefill_token_layers'))}",
        f"  completion tokens        {_fmt(report['completion_tokens'])}",
        f"  KV per agent             {_kib(report['kv_bytes_per_agent'])} "
        f"(dense {_kib(report['dense_kv_bytes_per_agent'])})"
        + (
            "  LOWER BOUND: the pool was full in the measured round"
            if report.get("kv_per_agent_lower_bound")
            else ""
        ),
        f"  KV tokens peak           {_fmt(report['kv_tokens_peak'])}",
    ]
    parts = report.get("kv_peak_parts")
    if parts:
        lines.append(
            "  KV at the round's peak   "
            + "  ".join(f"{k} {_fmt(v)}" for k, v in parts.items())
            + " (tokens)"
        )
    failed = report.get("rounds_failed", 0)
    if rl["p50"] is None:
        lines.append("  round latency ms         none: no round was answered in full")
    else:
        lines.append(
            f"  round latency ms         p50 {_fmt(rl['p50'])}  p90 {_fmt(rl['p90'])}  "
            f"max {_fmt(rl['max'])}" + (f"  ({failed} failed rounds left out)" if failed else "")
        )
    if tt["p50"] is not None:
        lines.append(
            f"  {ttft_label:25}p50 {_fmt(tt['p50'])}  p90 {_fmt(tt['p90'])}  max {_fmt(tt['max'])}"
        )
    lines.append(f"  wall                     {report['wall_s']:.2f} s")
    if report["errors"]:
        lines.append(
            f"  ERRORS: {len(report['errors'])} failed requests, first: "
            f"{report['errors'][0]['error'][:200]}"
        )
    return "\n".join(lines)


COMPARE_ROWS: tuple[tuple[str, str], ...] = (
    ("prompt tokens", "prompt_tokens"),
    ("prefill tokens computed", "prefill_tokens_computed"),
    ("prefill token-layers", "prefill_token_layers"),
    ("KV bytes per agent", "kv_bytes_per_agent"),
    ("dense KV bytes per agent", "dense_kv_bytes_per_agent"),
    ("KV tokens peak", "kv_tokens_peak"),
    ("round latency p50 (ms)", "round_latency_ms.p50"),
    ("TTFT p50 (ms)", "ttft_ms.p50"),
    ("wall (s)", "wall_s"),
)


def _get(report: dict[str, Any], key: str) -> Any:
    v: Any = report
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def compare(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """A side-by-side table of reports (the last column: first / last, when both known)."""
    w = max(24, *(len(n) for n in names))
    head = f"{'':26}" + "".join(f"{n:>{w}}" for n in names)
    if len(reports) > 1:
        head += f"{'first/last':>12}"
    lines = [head]
    for label, key in COMPARE_ROWS:
        vals = [_get(r, key) for r in reports]
        row = f"{label:26}" + "".join(f"{_fmt(v):>{w}}" for v in vals)
        if len(vals) > 1:
            a, b = vals[0], vals[-1]
            row += f"{(a / b):>11.2f}x" if a is not None and b else f"{'':>12}"
        lines.append(row)
    return "\n".join(lines)
