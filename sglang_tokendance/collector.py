"""The KV Collector: once per round and segment, decide masters and recompute sets; lay out
every agent's row.

Round lifecycle (tokendance mode, ``--tokendance-master-start arrival``, the default)::

    an agent of round r arrives (admit; the barrier only counts it)
      each shared segment it holds is
        being computed by a master agent of round r -> the agent waits for that agent
        a master in the cache, or an authored output -> reused
        nobody's yet                                 -> the agent becomes its master agent:
                                                        an ordinary full prefill, now (phase A)
      an agent that waits for nobody gets a RowLayout and runs now (phase B)
    after each prefill forward (on_prefill_done):
      master agent: its segment rows become masters (slots handed to the cache, no copy);
                    the agents waiting only for it get layouts and run
      reuse agent:  its recomputed slots become its mirrors (the diff)

With ``release`` the barrier holds every agent until the round is whole (or times out), then
``start_round`` makes the same choices for the whole round at once: the first agent holding a
missing segment is its master agent, the others wait for all the round's master agents.

Recompute sets are collective: chosen once per (round, segment) and shared by all agents
(:mod:`.selection`: leading tokens, or by deviation scores that the master agent's forward
measured at the check layer). With the ``author`` master policy a segment that contains an
agent's previous output reuses that output's decode-time KV as its master (no master agent).
In ``pic`` mode (CacheBlend, the per-request baseline) there is no round: each request plans
alone against the masters that exist (:meth:`Collector.plan_alone`); its row stays in true order,
every prompt token is an ordinary extend token (the dense copy, admitted by SGLang), and the
attention side seeds the reused tokens with the masters' KV and picks the tokens to recompute
in the request's own context (:mod:`.attention.blend`). A pic master is a copy of the first
request's segment KV, so no request ever references master slots.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from sglang_tokendance.accounting import Counters
from sglang_tokendance.cache.api import CollectorCache
from sglang_tokendance.cache.row_plan import SharedUse
from sglang_tokendance.config import TokenDanceConfig
from sglang_tokendance.mirror_policy import MirrorJudgeLike, MirrorPolicy
from sglang_tokendance.promotion import Promoter
from sglang_tokendance.round_state import AbortResult, RoundState, narrow
from sglang_tokendance.selection import select_recompute
from sglang_tokendance.state import layout_of, state_of

logger = logging.getLogger(__name__)


class Collector:
    """Plans rounds against the cache's narrow interface (no scheduler import here).

    Args:
        cfg: the server's TokenDance options.
        cache: the tree cache (:class:`~.cache.api.CollectorCache`).
        probes: the probe board the attention backend fills (``pop(row)`` after a prefill).
        counters: where decisions are counted (the scheduler's accounting).
        judge: measures recomputed K/V against the master's (``--tokendance-mirror
            threshold``; :class:`~.attention.mirror_deviation.MirrorJudge`). Without one,
            threshold keeps every slot.
    """

    def __init__(
        self,
        cfg: TokenDanceConfig,
        cache: CollectorCache,
        probes: Any,
        counters: Counters,
        judge: MirrorJudgeLike | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.rounds: dict[str, RoundState] = {}
        self.counters = counters
        cache.publish_outputs = cfg.master_policy == "author" and cfg.active
        self.probes = probes
        mirrors = MirrorPolicy(cfg, cache, counters, judge)
        self.promoter = Promoter(cache, counters, mirrors, cfg.mode)

    def admit(self, req: Any) -> list[Any]:
        """``--tokendance-master-start arrival``: plan an agent when it arrives, not when its
        round is whole. Returns the requests to queue now: ``[req]``, or ``[]`` while it
        waits for a master agent of its round.

        Each shared segment of the agent is, in this order: being computed by a master agent
        of the round (the agent waits for that one agent, not for the round); a master in the
        cache; an authored output (looked up once per segment and round); or nobody's yet,
        and then the agent becomes its master agent and runs a full prefill at once. The
        choices are those :meth:`start_round` makes for a whole round (the first agent holding
        a missing segment computes it; recompute sets once per segment and round), made as
        agents arrive, so a round's agents do not wait for its slowest arrival.
        """
        t0 = time.perf_counter()
        lay = layout_of(req)
        state = self.rounds.get(lay.round_id)
        if state is None:
            state = self.rounds[lay.round_id] = RoundState(lay.round_id, {})
        computes, needs = [], set()
        for use in lay.shared:
            toks = tuple(lay.true_ids[use.start : use.end])
            state.seg_tokens.setdefault(use.seg_id, toks)
            owner = state.claimed.get(use.seg_id)
            if owner in state.masters_pending:
                needs.add(owner)
            elif use.seg_id in state.hits:
                narrow(use, state.hits[use.seg_id])
            elif owner is None and self.cache.lookup_segment(toks) is None:
                hit = self._authored(toks, (lay.round_id, use.seg_id))
                if hit is not None:
                    state.hits[use.seg_id], state.nodes[use.seg_id] = hit, hit.node
                    narrow(use, hit)
                else:
                    computes.append(use)
        now: list[Any] = []
        if computes:  # phase A for these segments: a full prefill in this agent's context
            self._make_master_agent(req, computes, lay.prefix_len)
            state.masters_pending.add(req.rid)
            state.claimed.update((u.seg_id, req.rid) for u in computes)
            self.counters.early_master_agents += 1
            now.append(req)
        elif needs:
            state.waiting.append((req, needs))
        else:
            now += self._lay_out(state, [req])
        self.counters.collector_s += time.perf_counter() - t0
        return now

    def start_round(self, round_id: str, reqs: list[Any], waited_s: float) -> list[Any]:
        """Plan a released round (``reqs``: its held requests, none when every agent was
        admitted at arrival); returns the requests to queue now (the rest wait)."""
        t0 = time.perf_counter()
        self.counters.rounds += 1
        if reqs:  # someone waited at the barrier (with arrival, nobody does)
            self.counters.barrier_wait_s += waited_s
        state = self.rounds.pop(round_id, None) or RoundState(round_id, {})
        state.released = True
        if not reqs:  # arrival: everything was planned as it came
            if not state.idle():
                self.rounds[round_id] = state
            self.counters.collector_s += time.perf_counter() - t0
            return []
        layouts = [(req, layout_of(req)) for req in reqs]
        seg_tokens: dict[str, tuple[int, ...]] = {}
        for _, lay in layouts:
            for use in lay.shared:
                seg_tokens.setdefault(use.seg_id, tuple(lay.true_ids[use.start : use.end]))
        state.seg_tokens = seg_tokens
        missing = {s for s, t in seg_tokens.items() if self.cache.lookup_segment(t) is None}
        for seg_id in sorted(missing):
            hit = self._authored(seg_tokens[seg_id], (round_id, seg_id))
            if hit is not None:
                state.nodes[seg_id] = hit.node
                missing.discard(seg_id)
                for _, lay in layouts:
                    for use in lay.shared:
                        if use.seg_id == seg_id:
                            narrow(use, hit)
        now: list[Any] = []
        for req, lay in layouts:
            computes = [u for u in lay.shared if u.seg_id in missing]
            if computes:
                # Phase A: full prefill in this agent's context; its rows become the masters.
                self._make_master_agent(req, computes, lay.prefix_len)
                missing -= {u.seg_id for u in computes}
                state.masters_pending.add(req.rid)
                now.append(req)
            else:
                state.waiting.append((req, set()))
        for _, needs in state.waiting:  # the round's waiting agents wait for all its masters
            needs |= state.masters_pending
        self.rounds[round_id] = state
        now += self._release_ready(state)
        self.counters.collector_s += time.perf_counter() - t0
        return now

    def _make_master_agent(self, req: Any, computes: list[SharedUse], insert_cap: int) -> None:
        st = state_of(req)
        st.role, st.layout, st.master_uses, st.insert_cap = "master", None, computes, insert_cap
        if self.cfg.selection != "leading":
            st.probes = [(u.seg_id, u.start, u.end) for u in computes]

    def _authored(self, toks: tuple[int, ...], use: tuple[str, str]) -> Any:
        """An authored master for segment ``use`` = (round, segment id), or None."""
        if self.cfg.master_policy != "author":
            return None
        hit = self.cache.find_authored(toks)
        if hit is not None and use not in hit.node.author_uses:
            hit.node.author_uses.add(use)
            self.counters.author_masters_used += 1
        return hit

    def _recompute(self, use: SharedUse) -> torch.Tensor:
        """The recompute set of ``use``'s span (deviation scores come with its master)."""
        scores = None
        node = use.node
        if node is not None and node.deviation is not None:
            scores = node.deviation[use.node_offset : use.node_offset + use.end - use.start]
            self.counters.deviation_selections += self.cfg.selection != "leading"
        chosen = select_recompute(
            use.end - use.start, self.cfg.recompute_ratio, self.cfg.selection, scores
        )
        if chosen.numel() and int(chosen[-1]) != chosen.numel() - 1:
            self.counters.nonleading_selections += 1
        return chosen

    def _lay_out(self, state: RoundState, reqs: list[Any]) -> list[Any]:
        """Give ``reqs`` their row layouts against the round's masters (reuse agents)."""
        for req in reqs:
            lay = layout_of(req)
            for use in lay.shared:
                use.node = state.nodes.get(use.seg_id) or self.cache.lookup_segment(
                    state.seg_tokens[use.seg_id]
                )
                if use.seg_id not in state.recompute:  # once per segment: collective
                    state.recompute[use.seg_id] = self._recompute(use)
                use.recompute = state.recompute[use.seg_id]
            state_of(req).role = "reuse"
        return reqs

    def _release_ready(self, state: RoundState) -> list[Any]:
        """Lay out the waiting agents whose master agents are all done; forget an idle
        released round."""
        ready = [req for req, needs in state.waiting if not needs]
        state.waiting = [(req, needs) for req, needs in state.waiting if needs]
        out = self._lay_out(state, ready)
        if state.released and state.idle():
            self.rounds.pop(state.round_id, None)
        return out

    def plan_alone(self, req: Any) -> None:
        """pic mode / late arrivals: plan one request against whatever masters exist."""
        lay = layout_of(req)
        pic = self.cfg.mode == "pic"
        for use in lay.shared:
            toks = tuple(lay.true_ids[use.start : use.end])
            use.node = self.cache.lookup_segment(toks)
            if use.node is None:
                hit = self._authored(toks, (lay.round_id, use.seg_id))
                if hit is not None:
                    narrow(use, hit)
            if not pic:
                use.recompute = self._recompute(use)
        lay.blend = pic
        state_of(req).role = "reuse"
        missing = [u for u in lay.shared if u.node is None]
        if not pic and missing and len(missing) == len(lay.shared):
            self._make_master_agent(req, missing, lay.prefix_len)

    # ---- after a prefill forward ------------------------------------------------------------
    def on_prefill_done(self, req: Any) -> list[Any]:
        """Promote masters / attach mirrors; returns requests now free to run."""
        st = state_of(req)
        authored = st.master_uses if st is not None else None
        if authored:
            st.master_uses = None
            probes = self.probes.pop(req.kv.req_pool_idx)
            self.promoter.promote(req, authored, None, probes)
            return self._master_done(req)
        lay = layout_of(req)
        if lay is not None and lay.blend:
            self.promoter.blend_done(req, lay)
        elif lay is not None:
            self.promoter.reuse_done(req, lay)
        return []

    def _master_done(self, req: Any) -> list[Any]:
        for state in list(self.rounds.values()):
            if req.rid in state.masters_pending:
                state.masters_pending.discard(req.rid)
                for _, needs in state.waiting:
                    needs.discard(req.rid)
                return self._release_ready(state)
        return []

    def waiting(self) -> int:
        """Requests waiting for master agents now."""
        return sum(len(st.waiting) for st in self.rounds.values())

    def on_abort(self, rid_prefix: str, abort_all: bool) -> AbortResult:
        """Aborted waiting agents are handed back (for SGLang's abort path to answer); an
        aborted master agent must not block its round: the agents waiting for it run
        (computing its segments in their own rows), and later arrivals compute them anew."""
        freed: list[Any] = []
        dropped: list[Any] = []
        for state in list(self.rounds.values()):

            def match(rid: str) -> bool:
                return abort_all or rid.startswith(rid_prefix)

            dropped += [req for req, _ in state.waiting if match(req.rid)]
            state.waiting = [(req, n) for req, n in state.waiting if not match(req.rid)]
            gone = {r for r in state.masters_pending if match(r)}
            state.masters_pending -= gone
            state.claimed = {s: r for s, r in state.claimed.items() if r not in gone}
            for _, needs in state.waiting:
                needs -= gone
            freed += self._release_ready(state)
            if state.idle() and not state.released:
                self.rounds.pop(state.round_id, None)
        return AbortResult(freed, dropped)
