"""``GET /tokendance/stats``: accounting from the scheduler, served by the HTTP server.

The scheduler adds a ``tokendance`` entry to SGLang's internal state (the same channel as
``/server_info``); the route reads it back through the TokenizerManager. Bytes come from the
real KV pool (layers x K/V heads x head_dim x dtype size). With ``--dp-size N`` (N > 1) every
DP rank has its own scheduler, cache and counters: the route answers ``{"dp_size": N, "dp":
[one dict per rank, each with its dp_rank], "total": counters summed over the ranks,
"per_round": every rank's rounds, each with its dp_rank}``.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang_tokendance.accounting import deviation_histogram
from sglang_tokendance.config import get_config

logger = logging.getLogger(__name__)

ROUTE = "/tokendance/stats"


def _attention(scheduler: Any) -> dict[str, Any] | None:
    """Which kernels ran: forwards on the tagged path vs on the user's backend."""
    from sglang_tokendance.state import pool_state

    ta = pool_state(scheduler.req_to_token_pool).attention
    return ta.counts() if ta is not None else None


def scheduler_stats(scheduler: Any) -> dict[str, Any]:
    """The stats dict, computed in the scheduler process."""
    from sglang_tokendance.cache.integrity import kv_bytes_per_token
    from sglang_tokendance.scheduler import STATE_ATTR

    td = getattr(scheduler, STATE_ATTR, None)
    cache = scheduler.tree_cache
    kv_pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    bpt = int(kv_bytes_per_token(kv_pool))
    out: dict[str, Any] = {"enabled": td is not None, "kv_bytes_per_token": bpt}
    if td is None:
        return out
    store = cache.stats(bpt) if hasattr(cache, "stats") else {}
    c = td.acct.counters
    ledger = getattr(cache, "ledger", None)
    out.update(
        dp_rank=td.ranks.dp,
        tp_size=td.ranks.tp_size,
        all_rounds_store=ledger.totals() if ledger is not None else None,
        mode=td.cfg.mode,
        config=td.cfg.to_dict(),
        store=store,
        master_tokens=store.get("master_tokens"),
        mirror_tokens=store.get("mirror_tokens"),
        dense_equiv_tokens=store.get("dense_equiv_tokens"),
        compression_ratio=store.get("compression_ratio"),
        segments=store.get("segments"),
        evictions=store.get("evictions"),
        rounds=c.rounds,
        requests=c.requests,
        prompt_tokens=c.prompt_tokens,
        prefill_tokens_computed=c.prompt_tokens - c.cached_tokens,
        reused_master_tokens=c.reused_tokens,
        recompute_tokens=c.recompute_tokens,
        masters_created=c.masters_created,
        author_masters_used=c.author_masters_used,
        early_master_agents=c.early_master_agents,
        rounds_timed_out=c.rounds_timed_out,
        late_arrivals=c.late_arrivals,
        retries=c.retries,
        authored_masters_live=len(cache.authored) if hasattr(cache, "authored") else 0,
        deviation_selections=c.deviation_selections,
        nonleading_selections=c.nonleading_selections,
        mirror_slots_kept=c.mirror_slots_kept,
        mirror_slots_freed=c.mirror_slots_freed,
        mirror_deviation=deviation_histogram(c.mirror_dev_counts),
        collector_ms=round(c.collector_s * 1000, 3),
        barrier_wait_ms=round(c.barrier_wait_s * 1000, 3),
        kv_tokens_peak=td.acct.peak_used_tokens,
        kv_bytes_peak=td.acct.peak_used_tokens * bpt,
        kv_peak_parts=td.acct.peak_parts._asdict(),
        pool_tokens=int(scheduler.token_to_kv_pool_allocator.size),
        held_requests=td.held(),
        per_round=td.acct.round_report(bpt),
        watch=td.watch.to_dict() if td.watch is not None else None,
        attention=_attention(scheduler),
    )
    out["integrity"] = _integrity(scheduler, td)
    rid = td.acct.last_round
    if rid is not None and hasattr(cache, "round_stats"):
        last_store = cache.round_stats(rid, bpt)  # the round at its fullest (the ledger)
        last_store["round"] = rid
        out["store_last_round"] = last_store
    last = out["per_round"][-1] if out["per_round"] else None
    out["last_round"] = last
    if last is not None:
        out["kv_bytes_per_agent"] = last["kv_bytes_per_agent"]
        out["dense_kv_bytes_per_agent"] = last["dense_kv_bytes_per_agent"]
    return out


SUMMED = (
    "rounds", "requests", "prompt_tokens", "prefill_tokens_computed", "reused_master_tokens",
    "recompute_tokens", "masters_created", "author_masters_used", "early_master_agents",
    "rounds_timed_out", "late_arrivals", "retries", "master_tokens", "mirror_tokens",
    "held_requests", "kv_tokens_peak", "kv_bytes_peak", "pool_tokens",
)  # fmt: skip
STORE_SUMMED = ("mirrors", "mirror_tokens", "dense_equiv_tokens", "stored_tokens")


def combine(per_dp: list[dict[str, Any]]) -> dict[str, Any]:
    """The route's answer for several DP ranks: each rank's stats and their total."""
    # the schedulers answer in any order
    per_dp = sorted(per_dp, key=lambda d: int(d.get("dp_rank") or 0))
    total: dict[str, Any] = {key: sum(int(d.get(key) or 0) for d in per_dp) for key in SUMMED}
    store = {
        key: sum(int((d.get("all_rounds_store") or {}).get(key) or 0) for d in per_dp)
        for key in STORE_SUMMED
    }
    stored = store["stored_tokens"]
    store["compression_ratio"] = store["dense_equiv_tokens"] / stored if stored else None
    total["all_rounds_store"] = store
    states = {d.get("integrity") for d in per_dp}
    total["integrity"] = (
        "ok"
        if states == {"ok"}
        else ("busy" if "busy" in states else "/".join(sorted(str(s) for s in states)))
    )
    per_round = [
        {**r, "dp_rank": d.get("dp_rank", i)}
        for i, d in enumerate(per_dp)
        for r in d.get("per_round") or []
    ]
    return {
        "enabled": any(d.get("enabled") for d in per_dp),
        "dp_size": len(per_dp),
        "dp": per_dp,
        "total": total,
        "per_round": per_round,
        "integrity": total["integrity"],
    }


def _integrity(scheduler: Any, td: Any) -> str:
    """ "ok", "busy" (requests in flight: not checked), or the broken invariant."""
    running = scheduler.running_batch
    if (running is not None and not running.is_empty()) or scheduler.waiting_queue:
        return "busy"
    if td.held() or scheduler.chunked_req is not None:
        return "busy"
    check = getattr(scheduler.tree_cache, "check_integrity", None)
    if check is None:
        return "n/a"
    try:
        check(idle=True)
    except AssertionError as e:
        return str(e)
    return "ok"


def after_internal_state(result: Any, controller: Any, *args: Any, **kw: Any) -> Any:
    """``SchedulerInternalStateController.get_internal_state`` (after): add the stats."""
    try:
        result.internal_state["tokendance"] = scheduler_stats(controller.scheduler)
    except Exception as e:  # stats must never break /server_info
        logger.exception("tokendance stats failed")
        result.internal_state["tokendance"] = {"error": str(e)}
    return result


def before_launch(server_args: Any, *args: Any, **kw: Any) -> None:
    """``http_server.launch_server`` (before): the stats route and the kv_hints handler."""
    if get_config(server_args).enabled:
        from sglang.srt.entrypoints import http_server

        from sglang_tokendance.entry import add_kv_hints_error_handler

        add_route()
        add_kv_hints_error_handler(http_server.app)


def add_route() -> None:
    """Add GET /tokendance/stats to SGLang's FastAPI app (idempotent)."""
    from fastapi.responses import ORJSONResponse
    from sglang.srt.entrypoints import http_server

    app = http_server.app
    if any(getattr(r, "path", None) == ROUTE for r in app.routes):
        return

    async def tokendance_stats() -> Any:
        states = await http_server._global_state.tokenizer_manager.get_internal_state()
        per_dp = [s.get("tokendance", {}) for s in states]
        return ORJSONResponse(per_dp[0] if len(per_dp) == 1 else combine(per_dp))

    app.add_api_route(ROUTE, tokendance_stats, methods=["GET"])
