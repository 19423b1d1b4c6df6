"""Record what a multi-agent application sent and got back as a tokendance-trace (v1).

A :class:`TraceRecorder` collects one request per agent per round (its segments, max_tokens
and the output the server produced) and writes them as a valid trace. The frontend example
(``examples/frontend_agents.py --record FILE``) uses it; any client can::

    rec = TraceRecorder(workload="town_chat", source="examples/frontend_agents.py")
    rec.add(1, "alice", [("private", None, "You are Alice."), ("shared", "r0/bob", "\\nBob: hi")],
            max_tokens=16, output="\\nAlice: hello")
    rec.write("run.jsonl")

Segments may be given as :class:`~sglang_tokendance.trace.Segment` objects, as
``(type, id, text)`` or ``(type, id, text, source)`` tuples, or as trace-format dicts. A shared
segment without an explicit source gets the agent named after the ``/`` of an id such as
``r3/bob`` when that agent is known. Adding is thread-safe (frontend programs run agents in
threads).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang_tokendance.trace.format import Segment, Trace, TraceHeader, TraceRequest, write_trace

logger = logging.getLogger(__name__)

SegmentLike = Segment | Sequence[Any] | Mapping[str, Any]


def to_segment(seg: SegmentLike) -> Segment:
    """Normalize one segment given as a Segment, a tuple or a dict.

    Raises:
        ValueError: for a shape that is none of those.
    """
    if isinstance(seg, Segment):
        return Segment(seg.type, seg.text, seg.id, seg.source, dict(seg.extra))
    if isinstance(seg, Mapping):
        extra = {k: v for k, v in seg.items() if k not in ("type", "id", "source", "text")}
        return Segment(seg["type"], seg["text"], seg.get("id"), seg.get("source"), extra)
    if isinstance(seg, Sequence) and not isinstance(seg, str) and len(seg) in (3, 4):
        source = seg[3] if len(seg) == 4 else None
        return Segment(seg[0], seg[2], seg[1], source)
    raise ValueError(f"cannot read a segment from {seg!r}: use (type, id, text[, source])")


@dataclass(slots=True)
class TraceRecorder:
    """Collects requests and writes them as a trace.

    Args:
        workload: the header's workload name.
        source: where the trace came from (the header's ``source``).
        agents: the header's agent list; default: agents in order of first appearance.
        header_extra: extra header fields (e.g. the run's parameters).
    """

    workload: str
    source: str
    agents: list[str] | None = None
    header_extra: dict[str, Any] = field(default_factory=dict)
    requests: list[TraceRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(
        self,
        round: int,
        agent: str,
        segments: Iterable[SegmentLike],
        max_tokens: int,
        output: str | None = None,
        arrival_s: float | None = None,
        **extra: Any,
    ) -> TraceRequest:
        """Record one agent's request of one round (1-based) and the output it got back.

        Empty segments are dropped (they contribute nothing to the prompt). Extra keyword
        arguments are kept as extra fields of the request line.
        """
        segs = [to_segment(s) for s in segments]
        segs = [s for s in segs if s.text]
        req = TraceRequest(round, agent, segs, max_tokens, output, arrival_s, dict(extra))
        with self._lock:
            self.requests.append(req)
        return req

    def _agents(self) -> list[str]:
        if self.agents is not None:
            return list(self.agents)
        seen: dict[str, None] = {}
        for r in self.requests:
            seen.setdefault(r.agent, None)
        return list(seen)

    def to_trace(self) -> Trace:
        """The trace recorded so far: requests sorted by round (stable within a round),
        shared sources filled from ids where missing."""
        with self._lock:
            reqs = sorted(self.requests, key=lambda r: r.round)
        agents = self._agents()
        known = set(agents)
        for req in reqs:
            for seg in req.segments:
                if seg.type == "shared" and seg.source is None and seg.id and "/" in seg.id:
                    src = seg.id.rsplit("/", 1)[1]
                    if src in known:
                        seg.source = src
        rounds = max((r.round for r in reqs), default=1)
        header = TraceHeader(
            workload=self.workload,
            agents=agents,
            rounds=rounds,
            source=self.source,
            extra=dict(self.header_extra),
        )
        return Trace(header, reqs)

    def write(self, path: str | Path) -> Trace:
        """Validate and write the trace to ``path``; returns it.

        Raises:
            TraceError: naming the first problem (nothing is written then).
        """
        trace = self.to_trace()
        write_trace(path, trace)
        logger.info(
            "recorded %d requests in %d rounds to %s",
            len(trace.requests),
            trace.header.rounds,
            path,
        )
        return trace
