"""Round-aware scheduling: the Scheduler's TokenDance state and its hooks (never touches tensors).

- ``_add_request_to_queue`` (around): a hinted request gets its :class:`RequestState` (built
  once from the hint) and goes to the round barrier instead of the waiting queue (tokendance
  mode, ``--tokendance-master-start release``); with ``arrival`` (the default) the barrier
  only counts it and the collector plans it at once: it is queued, or waits for the master
  agents of its round it reads. In pic mode it is planned alone and queued at once. Requests
  without hints, and everything with TokenDance off, take SGLang's path unchanged.
- ``get_next_batch_to_run`` (before): released rounds are planned by the collector and their
  requests queued (through SGLang's own ``_add_request_to_queue``, not the hooked one); agents
  waiting for masters are queued as the masters appear. Under tensor parallelism (tp > 1)
  every rank holds the same rounds (SGLang broadcasts each request to all TP ranks in the same
  order), but the timeout is wall-clock: TP rank 0 decides which rounds time out and
  broadcasts that list over the TP CPU group at this fixed point of every iteration in which a
  round is pending, so every rank releases, plans, selects and evicts alike.
- ``process_batch_result`` (before): after a prefill forward, the collector promotes masters
  and attaches mirrors, before SGLang may release a finished request; the accounting sees
  every batch.
- ``abort_request`` (around): held requests are handed back to SGLang's abort path; an aborted
  master agent releases the rest of its round.

The hook functions are installed from ``patches/sglang-0.5.23/touchpoints.toml``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sglang_tokendance.accounting import Accounting, KVParts
from sglang_tokendance.attention.deviation import get_probe_board
from sglang_tokendance.attention.mirror_deviation import get_mirror_judge
from sglang_tokendance.collector import Collector
from sglang_tokendance.config import TokenDanceConfig, get_config
from sglang_tokendance.hint_state import parse_request, parse_round
from sglang_tokendance.metrics import TokenDanceMetrics, scheduler_ranks
from sglang_tokendance.rounds import RoundBarrier
from sglang_tokendance.state import attach, layout_of, state_of
from sglang_tokendance.watch import IntegrityWatch

logger = logging.getLogger(__name__)

STATE_ATTR = "_tokendance"  # the one TokenDance attribute of SGLang's Scheduler
MAX_MEMBERS = 65536  # (round, agent) pairs remembered for the duplicate check


class TokenDanceScheduler:
    """Per-scheduler TokenDance state: the barrier, the collector and the accounting."""

    def __init__(self, scheduler: Any, cfg: TokenDanceConfig) -> None:
        self.cfg = cfg
        self.scheduler = scheduler
        self.barrier: RoundBarrier[Any] = RoundBarrier(cfg.round_timeout_ms / 1000.0)
        self.acct = Accounting()
        probes = get_probe_board(scheduler.req_to_token_pool)
        # threshold: the judge measures K/V on the model-runner side (bound on the first forward)
        judge = get_mirror_judge(scheduler.req_to_token_pool) if cfg.mirror == "threshold" else None
        self.collector = Collector(cfg, scheduler.tree_cache, probes, self.acct.counters, judge)
        self.started = time.monotonic()
        self.members: dict[tuple[str, str], Any] = {}  # (round, agent) -> latest request
        self.watch = IntegrityWatch() if IntegrityWatch.enabled() else None
        self.ranks = scheduler_ranks(scheduler)
        self.metrics = (
            TokenDanceMetrics.create(scheduler, self.ranks) if self.ranks.tp == 0 else None
        )
        # SGLang's own _add_request_to_queue (captured by the around hook on first use), so
        # released requests are queued without passing through the plugin's hook again.
        self.enqueue: Callable[[Any], Any] | None = None
        logger.info("TokenDance scheduler ready (mode=%s)", cfg.mode)

    # ---- queueing -----------------------------------------------------------------------
    def intercept(self, req: Any) -> bool:
        """True if the request was taken (held or planned); False: SGLang queues it as usual.

        In mode off a hinted request keeps SGLang's path (no layout, no barrier, no cap): it
        only gets a record naming its round, so the accounting measures every mode per round.
        """
        if not self.cfg.enabled or state_of(req) is not None:
            return False
        if not self.cfg.active:
            st = parse_round(req)
            if st is not None:
                attach(req, st)
            return False
        try:
            st = parse_request(req)
        except ValueError as e:  # entry validated already; be safe, never crash the loop
            logger.warning("ignoring TokenDance hint of %s: %s", req.rid, e)
            return False
        if st is None:
            return False
        problem = self._duplicate(st.round_id, st.agent, req)
        if problem is not None:
            req.set_finish_with_abort(problem)  # SGLang answers it (400) from its queue
            return False
        attach(req, st)
        if self.cfg.mode == "pic":
            self.collector.plan_alone(req)
            self._queue([req])
            return True
        try:
            held = self.barrier.add(st.round_id, st.round_size, st.agent, req)
        except ValueError as e:  # the entry checks sizes first; never crash the loop
            st.layout, st.role = None, "alone"
            req.set_finish_with_abort(f"invalid TokenDance hint: {e}")
            return False
        if held and self.cfg.master_start == "arrival":
            # planned now, not when the round is whole: the barrier only counts it; it runs
            # at once (a master agent, or its masters exist) or waits in the collector for
            # the master agents it reads
            self.barrier.start(st.round_id, st.agent)
            self._queue(self.collector.admit(req))
        return True

    def held(self) -> int:
        """Requests held by TokenDance now (at the barrier or waiting for master agents)."""
        return self.barrier.held() + self.collector.waiting()

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
        self.acct.counters.retries += 1
        return None

    def _queue(self, reqs: list[Any]) -> None:
        for req in reqs:
            if self.enqueue is not None:
                self.enqueue(req)
            else:  # not reached in a server (requests arrive through the hook first)
                self.scheduler.waiting_queue.append(req)

    def shared_expired(self) -> list[str] | None:
        """The rounds to release on timeout, decided by TP rank 0 and shared with every TP
        rank (None with one TP rank: the barrier's own clock decides). Called by all TP ranks
        at the same point of the same iteration; whether a round is pending is the same on
        all of them (same requests, same order), so they all call the collective or none."""
        group = self.scheduler.tp_group if self.ranks.tp_size > 1 else None
        if group is None or not self.barrier.pending():
            return None
        from sglang.srt.utils.common import broadcast_pyobj

        mine = self.barrier.expired() if group.rank_in_group == 0 else []
        return list(broadcast_pyobj(mine, group.rank, group.cpu_group, src=group.ranks[0]))

    def poll(self) -> None:
        """Release complete / timed-out rounds and late arrivals."""
        counters = self.acct.counters
        for rel in self.barrier.poll(self.shared_expired()):
            if rel.reason == "late":
                counters.late_arrivals += len(rel.requests)
                for req in rel.requests:
                    self.collector.plan_alone(req)
                self._queue(rel.requests)
                continue
            if rel.reason == "timeout":
                counters.rounds_timed_out += 1
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
            st = state_of(req)
            if st is None or st.prefilled:
                continue
            if layout_of(req) is None and st.master_uses is None:
                continue
            st.prefilled = True
            ready += self.collector.on_prefill_done(req)
        self._queue(ready)

    def observe_batch(self, batch: Any) -> None:
        """Feed the accounting: KV held for running work (pool - free - evictable)."""
        sched = self.scheduler
        alloc = sched.token_to_kv_pool_allocator
        cache = sched.tree_cache
        used = int(alloc.size - alloc.available_size() - cache.evictable_size())
        queued = len(sched.waiting_queue)
        # SGLang marks the running batch full when a prompt did not fit (KV) or no request row
        # was left; with rows left, it was the KV
        blocked = bool(sched.running_batch.batch_is_full) and (
            sched.req_to_token_pool.available_size() > 0
        )
        self.acct.observe_batch(
            batch.reqs,
            batch.forward_mode.is_extend(),
            used,
            int(alloc.size),
            queued,
            kv_parts(cache, used),
            kv_blocked=blocked,
        )
        if self.metrics is not None:
            self.metrics.update(self, batch.forward_mode.is_extend())

    def abort(self, rid: str, abort_all: bool) -> None:
        def match(req: Any) -> bool:
            return abort_all or req.rid.startswith(rid)

        held = self.barrier.remove(match)
        res = self.collector.on_abort(rid, abort_all)
        # SGLang's own abort path answers the client for requests in its waiting queue.
        self.scheduler.waiting_queue.extend(held + res.dropped)
        self._queue(res.freed)


def kv_parts(cache: Any, used: int) -> KVParts:
    """Split ``used`` (pool - free - evictable) by holder; plain ints read off the cache.

    used = radix protected + master protected + mirror slots + request-owned slots, because
    the TokenDance cache's ``protected_size()`` subtracts what rows borrow (integrity.py)."""
    radix = int(getattr(cache, "protected_size_", 0) or 0)
    store = getattr(cache, "store", None)
    masters = int(store.protected_master_tokens) if store is not None else 0
    mirrors = int(store.mirror_tokens) if store is not None else 0
    rows = used - radix - masters - mirrors
    if rows < 0:  # the identity is broken (check_integrity names how); stats must not crash
        logger.warning("KV split off: used %d < radix %d + masters %d + mirrors %d",
                       used, radix, masters, mirrors)  # fmt: skip
        return KVParts(rows=used)
    return KVParts(rows=rows, mirrors=mirrors, masters=masters, radix=radix)


def _state(scheduler: Any) -> TokenDanceScheduler | None:
    return getattr(scheduler, STATE_ATTR, None)


# ---- hook functions (installed from the touch-point table) ------------------------------------
def after_init(result: Any, scheduler: Any, server_args: Any, *args: Any, **kw: Any) -> None:
    """``Scheduler.__init__`` (after): give the scheduler its TokenDance state."""
    cfg = get_config(server_args)
    if cfg.enabled:
        setattr(scheduler, STATE_ATTR, TokenDanceScheduler(scheduler, cfg))


def around_add(original: Any, scheduler: Any, req: Any, *args: Any, **kw: Any) -> Any:
    """``Scheduler._add_request_to_queue`` (around): hold hinted requests for their round."""
    td = _state(scheduler)
    if td is None:
        return original(scheduler, req, *args, **kw)
    if td.enqueue is None:
        td.enqueue = lambda r: original(scheduler, r)
    is_retracted = kw.get("is_retracted", args[0] if args else False)
    if not is_retracted and td.intercept(req):
        return None
    return original(scheduler, req, *args, **kw)


def before_next_batch(scheduler: Any, *args: Any, **kw: Any) -> None:
    """``Scheduler.get_next_batch_to_run`` (before): release rounds that are ready."""
    td = _state(scheduler)
    if td is not None:
        td.poll()


def before_result(scheduler: Any, batch: Any, *args: Any, **kw: Any) -> None:
    """``Scheduler.process_batch_result`` (before): masters, mirrors, watch, accounting."""
    td = _state(scheduler)
    if td is None or batch is None:
        return
    if batch.forward_mode.is_extend():
        td.after_prefill(batch)
    if td.watch is not None:
        td.watch.check(scheduler, batch)
    td.observe_batch(batch)


def around_abort(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kw: Any) -> Any:
    """``Scheduler.abort_request`` (around): hand held requests to SGLang's abort path."""
    td = _state(scheduler)
    if td is not None:
        td.abort(recv_req.rid or "", bool(recv_req.abort_all))
    return original(scheduler, recv_req, *args, **kw)
