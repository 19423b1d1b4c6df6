"""Accounting in one room: the counters, the per-round records and the peak tracking.

The scheduler feeds it each batch (``observe_batch``) with how many pool tokens running work
holds; the collector counts its decisions in ``counters``; ``GET /tokendance/stats`` reads it.
Plain numbers only: no tensors, no SGLang imports.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sglang_tokendance.state import state_of

MAX_ROUNDS = 256  # per-round records kept (oldest dropped first)
# A round whose tightest batch left less than this share of the pool free (or evictable) ran
# against a full pool: its KV figure is what fitted, a lower bound of what it needed.
SATURATED_SHARE = 0.02
# Bin edges of the mirror deviations the threshold policy measured: 4 per decade, 1e-4 .. 1e2.
MIRROR_DEV_EDGES: tuple[float, ...] = tuple(10.0 ** (e / 4) for e in range(-16, 9))


class KVParts(NamedTuple):
    """Who holds the pool tokens of running work (their sum is ``used_tokens``).

    ``rows``: slots the running requests own themselves (tokens they computed fresh: private
    text, outputs, pic copies); ``mirrors``: recomputed slots kept as sparse diffs;
    ``masters``: master segments pinned while a round reads them; ``radix``: SGLang's radix
    nodes locked by running requests (shared and private prefixes)."""

    rows: int = 0
    mirrors: int = 0
    masters: int = 0
    radix: int = 0


@dataclass(slots=True)
class Counters:
    """Totals since the server started."""

    rounds: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    reused_tokens: int = 0
    recompute_tokens: int = 0
    masters_created: int = 0
    author_masters_used: int = 0  # (round, segment) pairs served by an authored master
    early_master_agents: int = 0  # master agents started at arrival, before their round was whole
    rounds_timed_out: int = 0  # rounds released by the timeout with agents missing
    late_arrivals: int = 0  # requests that came after their round was released
    retries: int = 0  # an agent's second request of a round, sent after its first finished
    deviation_selections: int = 0  # recompute sets chosen with deviation scores
    nonleading_selections: int = 0  # ... that differ from the leading tokens
    collector_s: float = 0.0
    barrier_wait_s: float = 0.0
    # --tokendance-mirror threshold / drop: recomputed slots kept as diffs vs freed after prefill
    mirror_slots_kept: int = 0
    mirror_slots_freed: int = 0
    # threshold: counts of measured deviations per bin of MIRROR_DEV_EDGES (below, between, above)
    mirror_dev_counts: list[int] = field(default_factory=list)


@dataclass(slots=True)
class RoundCounters:
    """One round's prompt and KV figures, as its requests' first prefill batches saw them."""

    round_id: str
    agents: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    max_new_tokens: int = 0
    peak_used_tokens: int = 0
    peak_parts: KVParts = KVParts()  # the breakdown at that peak
    min_free_tokens: int | None = None  # free + evictable slots at the tightest batch
    queued_for_memory: bool = False  # requests waited in SGLang's queue while the round ran


def deviation_histogram(counts: list[int]) -> dict[str, Any] | None:
    """The threshold policy's deviations as ``{edges, counts, n, median_upper}`` (None when none
    was measured). ``counts[i]`` holds values in ``[edges[i-1], edges[i])`` (``counts[0]``:
    below the first edge; the last: at or above the last); ``median_upper``: the upper edge of
    the bin holding the median (None if that is the open top bin)."""
    n = sum(counts)
    if not n:
        return None
    acc, median_bin = 0, len(counts) - 1
    for i, c in enumerate(counts):
        acc += c
        if 2 * acc >= n:
            median_bin = i
            break
    top = median_bin >= len(MIRROR_DEV_EDGES)
    return {
        "edges": list(MIRROR_DEV_EDGES),
        "counts": list(counts),
        "n": n,
        "median_upper": None if top else MIRROR_DEV_EDGES[median_bin],
    }


class Accounting:
    """Counters, per-round records and the peak of KV held for running work."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.rounds: OrderedDict[str, RoundCounters] = OrderedDict()
        self.peak_used_tokens = 0
        self.peak_parts = KVParts()
        self.pool_tokens = 0

    def observe_batch(
        self,
        reqs: list[Any],
        is_extend: bool,
        used_tokens: int,
        pool_tokens: int = 0,
        queued: int = 0,
        parts: KVParts | None = None,
        kv_blocked: bool = False,
    ) -> None:
        """Track the peak of ``used_tokens`` (pool - free - evictable) overall and per round,
        with who held it (``parts``, kept at each peak), how close each round came to a full
        pool (``queued``: requests waiting in SGLang's queue meanwhile; ``kv_blocked``: SGLang's
        last admission pass stopped for want of KV, not of request rows), and count each hinted
        request's prompt once, at its first prefill.

        A round queued for memory when requests waited while the pool was nearly full, or while
        SGLang refused the next one for KV: SGLang reserves decode room for running requests and
        admits a prompt only whole, so requests wait with several percent of the pool free."""
        assert parts is None or sum(parts) == used_tokens, (parts, used_tokens)
        parts = parts if parts is not None else KVParts(rows=used_tokens)
        if used_tokens > self.peak_used_tokens:
            self.peak_used_tokens, self.peak_parts = used_tokens, parts
        self.pool_tokens = pool_tokens or self.pool_tokens
        free = self.pool_tokens - used_tokens
        seen: set[str] = set()
        for req in reqs:
            st = state_of(req)
            if st is None:
                continue
            rc = self.rounds.get(st.round_id)
            if rc is None:
                rc = self.rounds[st.round_id] = RoundCounters(st.round_id)
                while len(self.rounds) > MAX_ROUNDS:
                    self.rounds.popitem(last=False)
            if st.round_id not in seen:
                if used_tokens > rc.peak_used_tokens:
                    rc.peak_used_tokens, rc.peak_parts = used_tokens, parts
                rc.min_free_tokens = (
                    free if rc.min_free_tokens is None else min(rc.min_free_tokens, free)
                )
                rc.queued_for_memory |= queued > 0 and (
                    kv_blocked or free < SATURATED_SHARE * self.pool_tokens
                )
                seen.add(st.round_id)
            if is_extend and not st.counted:
                st.counted = True
                prompt, cached = len(req.origin_input_ids), int(req.prefix_len)
                rc.agents += 1
                rc.prompt_tokens += prompt
                rc.cached_tokens += cached
                rc.max_new_tokens += int(req.sampling_params.max_new_tokens or 0)
                self.counters.requests += 1
                self.counters.prompt_tokens += prompt
                self.counters.cached_tokens += cached

    def round_report(self, bytes_per_token: int) -> list[dict[str, Any]]:
        """Per-round records for the stats route (oldest first)."""
        out = []
        for rc in self.rounds.values():
            agents = max(rc.agents, 1)
            tight = rc.min_free_tokens is not None and (
                rc.min_free_tokens < SATURATED_SHARE * max(self.pool_tokens, 1)
            )
            out.append(
                {
                    "round": rc.round_id,
                    "agents": rc.agents,
                    "prompt_tokens": rc.prompt_tokens,
                    "prefill_tokens_computed": rc.prompt_tokens - rc.cached_tokens,
                    "kv_tokens_peak": rc.peak_used_tokens,
                    "kv_peak_parts": rc.peak_parts._asdict(),
                    "min_free_tokens": rc.min_free_tokens,
                    # a full pool capped the figure: what fitted, a lower bound of the need
                    "pool_saturated": tight or rc.queued_for_memory,
                    "kv_bytes_per_agent": rc.peak_used_tokens * bytes_per_token / agents,
                    # what private per-agent copies of every prompt (+ its outputs) would take
                    "dense_kv_bytes_per_agent": (rc.prompt_tokens + rc.max_new_tokens)
                    * bytes_per_token
                    / agents,
                }
            )
        return out

    @property
    def last_round(self) -> str | None:
        return next(reversed(self.rounds)) if self.rounds else None
