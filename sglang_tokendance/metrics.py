"""TokenDance counters on SGLang's Prometheus ``/metrics`` (``--enable-metrics``).

SGLang runs prometheus_client in multiprocess mode: each scheduler process writes its metrics
to ``PROMETHEUS_MULTIPROC_DIR`` and the HTTP server's ``/metrics`` merges them. The scheduler
of every DP rank (its TP rank 0 only: TP ranks hold the same state) registers the gauges below
once and sets them from its counters, labelled ``dp_rank`` beside SGLang's own ``sglang:*``
series. Values are totals since start (monotonic) except where the name says ``live`` or
``last_round``; gauges, not counters, because the values are set from the accounting, not
incremented here.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

PREFIX = "tokendance_"
DECODE_UPDATE_S = 1.0  # decode batches change little: refresh at most this often on them

# name -> help text; values come from :func:`snapshot`
METRICS: dict[str, str] = {
    "rounds": "Rounds planned by the KV Collector.",
    "rounds_timed_out": "Rounds released by the round timeout with agents missing.",
    "late_arrivals": "Requests that came after their round was released.",
    "requests": "Hinted requests planned.",
    "masters_created": "Shared-segment masters computed (one per segment per round at most).",
    "author_masters_used": "Segments served by the KV their author produced (round-spanning).",
    "mirrors": "Agent views of a master (mirrors) recorded, all rounds.",
    "mirror_tokens": "Private (recomputed) tokens kept by mirrors, all rounds.",
    "stored_tokens": "Tokens stored for shared segments (masters + mirror slots), all rounds.",
    "dense_equiv_tokens": "Tokens dense per-agent copies would have stored, all rounds.",
    "compression_ratio": "dense_equiv_tokens / stored_tokens over all rounds.",
    "last_round_compression_ratio": "Dense vs stored KV of the newest round's shared segments.",
    "reused_tokens": "Prompt tokens read from masters instead of computed.",
    "recomputed_tokens": "Tokens of reused segments recomputed per agent (recompute sets).",
    "prompt_tokens": "Prompt tokens of hinted requests.",
    "live_master_tokens": "Master tokens in the KV pool now.",
    "live_mirror_tokens": "Mirror tokens in the KV pool now.",
    "held_requests": "Requests held at the round barrier now.",
}


class Ranks(NamedTuple):
    """Where a scheduler sits: its DP rank, its TP rank and the TP size."""

    dp: int
    tp: int
    tp_size: int


def scheduler_ranks(scheduler: Any) -> Ranks:
    """The scheduler's DP rank (0 without DP), TP rank and TP size."""
    dp = 0
    try:
        from sglang.srt.runtime_context import get_parallel

        dp = int(get_parallel().dp_rank or 0)
    except (ImportError, AttributeError, RuntimeError):
        pass
    group = getattr(scheduler, "tp_group", None)
    tp = int(getattr(group, "rank_in_group", 0) or 0)
    return Ranks(dp, tp, int(getattr(scheduler, "tp_size", 1) or 1))


def snapshot(td: Any) -> dict[str, float]:
    """The exported values of one scheduler's TokenDance state (see :data:`METRICS`)."""
    c = td.acct.counters
    cache = td.scheduler.tree_cache
    ledger = getattr(cache, "ledger", None)
    totals = ledger.totals() if ledger is not None else {}
    # (evictable master, protected master, mirror) tokens in the pool now
    live = cache.store.totals() if hasattr(cache, "store") else (0, 0, 0)
    last = None
    if td.acct.last_round is not None and ledger is not None:
        last = ledger.stats(td.acct.last_round).get("compression_ratio")
    return {
        "rounds": c.rounds,
        "rounds_timed_out": c.rounds_timed_out,
        "late_arrivals": c.late_arrivals,
        "requests": c.requests,
        "masters_created": c.masters_created,
        "author_masters_used": c.author_masters_used,
        "mirrors": totals.get("mirrors") or 0,
        "mirror_tokens": totals.get("mirror_tokens") or 0,
        "stored_tokens": totals.get("stored_tokens") or 0,
        "dense_equiv_tokens": totals.get("dense_equiv_tokens") or 0,
        "compression_ratio": totals.get("compression_ratio") or 0.0,
        "last_round_compression_ratio": last or 0.0,
        "reused_tokens": c.reused_tokens,
        "recomputed_tokens": c.recompute_tokens,
        "prompt_tokens": c.prompt_tokens,
        "live_master_tokens": live[0] + live[1],
        "live_mirror_tokens": live[2],
        "held_requests": td.held(),
    }


class TokenDanceMetrics:
    """The gauges of one scheduler process, labelled with its DP rank."""

    def __init__(self, dp_rank: int) -> None:
        from prometheus_client import Gauge

        labels = {"dp_rank": str(dp_rank)}
        self.gauges = {
            name: Gauge(
                PREFIX + name, doc, labelnames=list(labels), multiprocess_mode="mostrecent"
            ).labels(**labels)
            for name, doc in METRICS.items()
        }
        self.last_update = 0.0

    @classmethod
    def create(cls, scheduler: Any, ranks: Ranks) -> TokenDanceMetrics | None:
        """The metrics of ``scheduler`` if SGLang exports metrics (``--enable-metrics``)."""
        reporter = getattr(scheduler, "metrics_reporter", None)
        if not getattr(reporter, "enable_metrics", False):
            return None
        try:
            return cls(ranks.dp)
        except ImportError:
            logger.warning("--enable-metrics without prometheus_client: no tokendance_ metrics")
            return None

    def update(self, td: Any, extend: bool = True) -> None:
        """Set every gauge from ``td`` (on decode batches at most every DECODE_UPDATE_S)."""
        now = time.monotonic()
        if not extend and now - self.last_update < DECODE_UPDATE_S:
            return
        self.last_update = now
        for name, value in snapshot(td).items():
            self.gauges[name].set(float(value))
