"""The round barrier: hold a round's hinted requests until the round is whole (or times out).

Pure bookkeeping, no SGLang or tensors: the scheduler hooks (``scheduler.py``) feed it requests
and poll it once per scheduler iteration. A round is released when all ``round_size`` agents
are in, or when ``timeout_s`` has passed since its first request arrived (then it runs with the
agents present). Requests that arrive for a round already released ("late arrivals") are
released at once, never held again. An aborted request leaves its round, and the round's
expected size shrinks by one, so one missing agent never blocks the others.

A member may also be *started* (:meth:`RoundBarrier.start`): it counts toward its round being
whole but is no longer held, because the collector already queued it (an early master agent,
whose full prefill need not wait for the rest of the round). A release lists only the requests
still held.

Under tensor parallelism every TP rank runs its own barrier over the same requests in the same
order, but their clocks differ: the caller then asks one rank for :meth:`RoundBarrier.expired`
and passes that list to every rank's :meth:`RoundBarrier.poll`, so the timeout is decided once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")

MAX_RELEASED_MEMORY = 1024


@dataclass(slots=True)
class PendingRound(Generic[T]):
    """A round still collecting its agents."""

    round_id: str
    size: int
    first_arrival: float
    members: dict[str, T] = field(default_factory=dict)  # agent -> request
    started: set[str] = field(default_factory=set)  # members already queued (not held)
    aborted: int = 0

    def held(self) -> list[T]:
        """The members still held, in arrival order."""
        return [r for a, r in self.members.items() if a not in self.started]


class Release(NamedTuple, Generic[T]):
    """One released round: its id, its held requests (arrival order; started members are not
    listed, so a round whose every member started releases with none), and why."""

    round_id: str
    requests: list[T]
    reason: str  # "complete" | "timeout" | "late"
    waited_s: float


class RoundBarrier(Generic[T]):
    """Holds hinted requests per round.

    Args:
        timeout_s: how long a round waits for missing agents after its first arrival.
        clock: monotonic clock (tests inject a fake one).
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"round timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = timeout_s
        self.clock = clock
        self._pending: OrderedDict[str, PendingRound[T]] = OrderedDict()
        self._released: OrderedDict[str, None] = OrderedDict()
        self._late: list[T] = []

    def add(self, round_id: str, size: int, agent: str, req: T) -> bool:
        """Hold ``req`` for its round (or queue it for immediate release if the round ran).

        Returns:
            True if ``req`` is held for a pending round, False if it is a late arrival.

        Raises:
            ValueError: if the round's size differs from earlier requests', or ``agent`` is
                already waiting in this round.
        """
        if round_id in self._released:
            self._late.append(req)
            return False
        rnd = self._pending.get(round_id)
        if rnd is None:
            rnd = PendingRound(round_id, size, self.clock())
            self._pending[round_id] = rnd
        if size != rnd.size:
            raise ValueError(f"round {round_id!r} has round_size {rnd.size}, request says {size}")
        if agent in rnd.started:  # a retry of a started member (the caller saw it finish)
            self._late.append(req)
            return False
        if agent in rnd.members:
            raise ValueError(f"agent {agent!r} already has a request waiting in round {round_id!r}")
        rnd.members[agent] = req
        return True

    def start(self, round_id: str, agent: str) -> None:
        """Mark ``agent``'s held request of a pending round as queued by the caller: it still
        counts toward the round being whole, but no release lists it."""
        rnd = self._pending[round_id]
        assert agent in rnd.members, f"agent {agent!r} is not waiting in round {round_id!r}"
        rnd.started.add(agent)

    def remove(self, pred: Callable[[T], bool]) -> list[T]:
        """Drop members matching ``pred`` (aborts); their rounds expect one fewer agent.
        Returns the dropped requests that were held (started ones are SGLang's to abort)."""
        dropped: list[T] = []
        for rnd in self._pending.values():
            for agent, req in list(rnd.members.items()):
                if pred(req):
                    del rnd.members[agent]
                    rnd.aborted += 1
                    if agent in rnd.started:
                        rnd.started.discard(agent)
                    else:
                        dropped.append(req)
        kept = [r for r in self._late if not pred(r)]
        dropped += [r for r in self._late if pred(r)]
        self._late = kept
        return dropped

    def expired(self) -> list[str]:
        """Pending rounds whose timeout has passed by this barrier's clock (oldest first)."""
        now = self.clock()
        return [r for r, p in self._pending.items() if now - p.first_arrival >= self.timeout_s]

    def poll(self, expired: Collection[str] | None = None) -> list[Release[T]]:
        """Rounds ready to run now (complete or timed out), and late arrivals.

        Args:
            expired: the rounds to release on timeout (decided elsewhere: tensor parallel
                ranks share rank 0's :meth:`expired`); None: this barrier's own clock decides.
        """
        now = self.clock()
        timed_out = set(self.expired() if expired is None else expired)
        out: list[Release[T]] = []
        if self._late:
            out.append(Release("", self._late, "late", 0.0))
            self._late = []
        for round_id in list(self._pending):
            rnd = self._pending[round_id]
            waited = now - rnd.first_arrival
            expected = rnd.size - rnd.aborted
            if len(rnd.members) >= expected:
                reason = "complete"
            elif round_id in timed_out:
                reason = "timeout"
            else:
                continue
            del self._pending[round_id]
            self._released[round_id] = None
            while len(self._released) > MAX_RELEASED_MEMORY:
                self._released.popitem(last=False)
            if rnd.members:
                out.append(Release(round_id, rnd.held(), reason, waited))
        return out

    def pending(self) -> int:
        """Number of rounds still collecting agents."""
        return len(self._pending)

    def held(self) -> int:
        """Number of requests currently held."""
        return sum(len(r.members) - len(r.started) for r in self._pending.values()) + len(
            self._late
        )

    def next_deadline(self) -> float | None:
        """When the oldest pending round times out (clock units), or None."""
        if not self._pending:
            return None
        return min(r.first_arrival for r in self._pending.values()) + self.timeout_s
