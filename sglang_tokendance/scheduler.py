"""Round-aware scheduling: hooks into SGLang's Scheduler (never touches tensors).

- ``_add_request_to_queue``: a request with a TokenDance hint goes to the round barrier instead
  of the waiting queue (tokendance mode); in pic mode it is planned alone and queued at once.
  Requests without hints, and everything with TokenDance off, take SGLang's path unchanged.
- ``get_next_batch_to_run`` (before): released rounds are planned by the collector and their
  requests queued; agents waiting for masters are queued as the masters appear.
- ``process_batch_result`` (before): after a prefill forward, the collector promotes masters
  and attaches mirrors, before SGLang may release a finished request.
- ``abort_request`` (around): held requests are handed back to SGLang's abort path; an aborted
  master agent releases the rest of its round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sglang_tokendance.collector import ATTR, Collector, layout_of
from sglang_tokendance.config import TokenDanceConfig
from sglang_tokendance.rounds import RoundBarrier
from sglang_tokendance.watch import IntegrityWatch

logger = logging.getLogger(__name__)

STATE_ATTR = "_tokendance"
RELEASED_ATTR = "_tokendance_released"
MAX_MEMBERS = 65536  # (round, agent) pairs remembered for the duplicate check


class TokenDanceScheduler:
    """Per-scheduler TokenDance state: the barrier and the collector."""

    def __init__(self, scheduler: Any, cfg: TokenDanceConfig) -> None:
        self.cfg = cfg
        self.scheduler = scheduler
        self.barrier: RoundBarrier[Any] = RoundBarrier(cfg.round_timeout_ms / 1000.0)
        self.collector = Collector(cfg, scheduler.tree_cache)
        self.started = time.monotonic()
        self.peak_used_tokens = 0
        self.rounds: dict[str, RoundCounters] = {}
        self.members: dict[tuple[str, str], Any] = {}  # (round, agent) -> latest request
        self.watch = IntegrityWatch() if IntegrityWatch.enabled() else None
        logger.info("TokenDance scheduler ready (mode=%s)", cfg.mode)

    # ---- accounting -----------------------------------------------------------------------
    def observe_batch(self, batch: Any) -> None:
        """Track peak KV held for running work (pool - free - evictable) and per-round use."""
        sched = self.scheduler
        alloc = sched.token_to_kv_pool_allocator
        used = int(alloc.size - alloc.available_size() - sched.tree_cache.evictable_size())
        self.peak_used_tokens = max(self.peak_used_tokens, used)
        seen: set[str] = set()
        for req in batch.reqs:
            rid = _round_of(req)
            if rid is None:
                continue
            rc = self.rounds.setdefault(rid, RoundCounters(rid))
            if rid not in seen:
                rc.peak_used_tokens = max(rc.peak_used_tokens, used)
                seen.add(rid)
            if not getattr(req, "_tokendance_counted", False) and batch.forward_mode.is_extend():
                req._tokendance_counted = True
                rc.agents += 1
                rc.prompt_tokens += len(req.origin_input_ids)
                rc.cached_tokens += int(req.prefix_len)
                rc.max_new_tokens += int(req.sampling_params.max_new_tokens or 0)
                self.collector.counters.requests += 1
                self.collector.counters.prompt_tokens += len(req.origin_input_ids)
                self.collector.counters.cached_tokens += int(req.prefix_len)
        while len(self.rounds) > 256:
            self.rounds.pop(next(iter(self.rounds)))

    def round_report(self, bytes_per_token: int) -> list[dict[str, Any]]:
        out = []
        for rc in self.rounds.values():
            agents = max(rc.agents, 1)
            out.append(
                {
                    "round": rc.round_id,
                    "agents": rc.agents,
                    "prompt_tokens": rc.prompt_tokens,
                    "prefill_tokens_computed": rc.prompt_tokens - rc.cached_tokens,
                    "kv_tokens_peak": rc.peak_used_tokens,
                    "kv_bytes_per_agent": rc.peak_used_tokens * bytes_per_token / agents,
                    # what private per-agent copies of every prompt (+ its outputs) would take
                    "dense_kv_bytes_per_agent": (rc.prompt_tokens + rc.max_new_tokens)
                    * bytes_per_token
                    / agents,
                }
            )
        return out

    # ---- queueing -----------------------------------------------------------------------
    def intercept(self, req: Any) -> bool:
        """True if the request was taken (held or planned); False: SGLang queues it as usual."""
        if not self.cfg.active or getattr(req, RELEASED_ATTR, False):
            return False
        try:
            lay = self.collector.parse(req)
        except ValueError as e:  # entry validated already; be safe, never crash the loop
            logger.warning("ignoring TokenDance hint of %s: %s", req.rid, e)
            return False
        if lay is None:
            return False
        problem = self._duplicate(lay.round_id, lay.agent, req)
        if problem is not None:
            req.set_finish_with_abort(problem)  # SGLang answers it (400) from its queue
            return False
        setattr(req, ATTR, lay)
        req.tokendance_agent = (lay.agent, lay.round_id)
        if self.cfg.mode == "pic":
            self.collector.plan_alone(req)
            self._queue([req])
            return True
        size = self._round_size(req)
        try:
            self.barrier.add(lay.round_id, size, lay.agent, req)
        except ValueError as e:  # the entry checks sizes first; never crash the loop
            setattr(req, ATTR, None)
            req.tokendance_agent = None
            req.set_finish_with_abort(f"invalid TokenDance hint: {e}")
            return False
        return True

    def _duplicate(self, round_id: str, agent: str, req: Any) -> str | None:
        """One request per agent per round at a time: a second one while the first is held or
        running is refused (it could not share with its own round); one sent after the first
        finished is a retry and runs as a late arrival (counted in ``retries``)."""
        key = (round_id, agent)
        first = self.members.get(key)
        self.members[key] = req
        while len(self.members) > MAX_MEMBERS:
            self.members.pop(next(iter(self.members)))
        if first is None or first is req:
            return None
        if not first.finished():
            self.members[key] = first
            return (
                f"invalid TokenDance hint: agent {agent!r} already has a request in round "
                f"{round_id!r} that is still held or running (one request per agent per round; "
                "a retry is accepted once the first has finished)"
            )
        self.collector.counters.retries += 1
        return None

    @staticmethod
    def _round_size(req: Any) -> int:
        from sglang_tokendance.hints import find_action

        return int(find_action(req.kv_hints)["round_size"])

    def _queue(self, reqs: list[Any]) -> None:
        for req in reqs:
            setattr(req, RELEASED_ATTR, True)
            self.scheduler._add_request_to_queue(req)

    def poll(self) -> None:
        """Release complete / timed-out rounds and late arrivals."""
        for rel in self.barrier.poll():
            if rel.reason == "late":
                self.collector.counters.late_arrivals += len(rel.requests)
                for req in rel.requests:
                    self.collector.plan_alone(req)
                self._queue(rel.requests)
                continue
            if rel.reason == "timeout":
                self.collector.counters.rounds_timed_out += 1
                logger.info(
                    "round %s timed out with %d agents present", rel.round_id, len(rel.requests)
                )
            self._queue(self.collector.start_round(rel.round_id, rel.requests, rel.waited_s))

    # ---- after a forward ----------------------------------------------------------------
    def after_prefill(self, batch: Any) -> None:
        if not self.cfg.active:
            return
        ready: list[Any] = []
        for req in batch.reqs:
            if req.inflight_middle_chunks > 0 or req.is_retracted:
                continue
            if getattr(req, "_tokendance_prefilled", False):
                continue
            if layout_of(req) is None and getattr(req, "tokendance_master", None) is None:
                continue
            req._tokendance_prefilled = True
            ready += self.collector.on_prefill_done(req)
        self._queue(ready)

    def abort(self, rid: str, abort_all: bool) -> None:
        def match(req: Any) -> bool:
            return abort_all or req.rid.startswith(rid)

        held = self.barrier.remove(match)
        # SGLang's own abort path answers the client for requests in its waiting queue.
        self.scheduler.waiting_queue.extend(held)
        self._queue(self.collector.on_abort(rid, abort_all))


@dataclass(slots=True)
class RoundCounters:
    round_id: str
    agents: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    max_new_tokens: int = 0
    peak_used_tokens: int = 0


def _round_of(req: Any) -> str | None:
    from sglang_tokendance.hints import find_action

    try:
        payload = find_action(getattr(req, "kv_hints", None))
    except ValueError:
        return None
    return None if payload is None else str(payload.get("round"))


def _state(scheduler: Any) -> TokenDanceScheduler | None:
    return getattr(scheduler, STATE_ATTR, None)


def install_hooks() -> None:
    """Register the Scheduler hooks (each a no-op unless TokenDance is active)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    base = "sglang.srt.managers.scheduler.Scheduler."

    def after_init(result: Any, scheduler: Any, server_args: Any, *args: Any, **kw: Any) -> None:
        from sglang_tokendance.plugin import get_config

        cfg = get_config(server_args)
        if cfg.enabled:
            setattr(scheduler, STATE_ATTR, TokenDanceScheduler(scheduler, cfg))

    def around_add(original: Any, scheduler: Any, req: Any, *args: Any, **kw: Any) -> Any:
        td = _state(scheduler)
        is_retracted = kw.get("is_retracted", args[0] if args else False)
        if td is not None and not is_retracted and td.intercept(req):
            return None
        return original(scheduler, req, *args, **kw)

    def before_next_batch(scheduler: Any, *args: Any, **kw: Any) -> None:
        td = _state(scheduler)
        if td is not None:
            td.poll()

    def before_result(scheduler: Any, batch: Any, *args: Any, **kw: Any) -> None:
        td = _state(scheduler)
        if td is None or batch is None:
            return
        if batch.forward_mode.is_extend():
            td.after_prefill(batch)
        if td.watch is not None:
            td.watch.check(scheduler, batch)
        td.observe_batch(batch)

    def around_abort(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kw: Any) -> Any:
        td = _state(scheduler)
        if td is not None:
            td.abort(recv_req.rid or "", bool(recv_req.abort_all))
        return original(scheduler, recv_req, *args, **kw)

    HookRegistry.register(base + "__init__", after_init, HookType.AFTER)
    HookRegistry.register(base + "_add_request_to_queue", around_add, HookType.AROUND)
    HookRegistry.register(base + "get_next_batch_to_run", before_next_batch, HookType.BEFORE)
    HookRegistry.register(base + "process_batch_result", before_result, HookType.BEFORE)
    HookRegistry.register(base + "abort_request", around_abort, HookType.AROUND)
