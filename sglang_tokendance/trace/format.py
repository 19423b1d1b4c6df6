"""Records of the multi-agent trace format, version 1, and reading/writing them with orjson.

A trace is JSON Lines: a header line, then one request per line (one agent in one round). See
``workloads/README.md`` and the format contract for the field meanings. Readers keep unknown
fields in ``extra`` and write them back after the known fields, so a trace written in canonical
key order (the order :func:`write_trace` uses) round-trips byte for byte.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson

logger = logging.getLogger(__name__)

FORMAT = "tokendance-trace"
VERSION = 1
SEGMENT_TYPES: tuple[str, ...] = ("private", "shared")
SegmentType = Literal["private", "shared"]

HEADER_KEYS = ("format", "version", "workload", "agents", "rounds", "source", "group")
REQUEST_KEYS = ("round", "agent", "segments", "max_tokens", "output", "arrival_s")
SEGMENT_KEYS = ("type", "id", "source", "text")


class TraceError(ValueError):
    """A problem in a trace file, located by file and 1-based line (``FILE:LINE: problem``)."""

    def __init__(self, file: str | Path, line: int | None, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"

    def __reduce__(self) -> tuple[type[TraceError], tuple[str, int | None, str]]:
        return (type(self), (self.file, self.line, self.message))


def _merge_extra(d: dict[str, Any], extra: dict[str, Any], known: tuple[str, ...]) -> None:
    clash = [k for k in extra if k in known]
    if clash:
        raise ValueError(f"extra fields {clash} clash with the record's own fields")
    d.update(extra)


@dataclass(slots=True)
class Segment:
    """A span of a prompt: ``private`` to one agent, or ``shared`` (same text wherever its id is
    used in a round). ``source`` names the agent whose output a shared segment is."""

    type: SegmentType
    text: str
    id: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_shared(self) -> bool:
        """True for a shared segment."""
        return self.type == "shared"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this segment, in canonical key order (type, id, source, text)."""
        d: dict[str, Any] = {"type": self.type}
        if self.id is not None:
            d["id"] = self.id
        if self.source is not None:
            d["source"] = self.source
        d["text"] = self.text
        _merge_extra(d, self.extra, SEGMENT_KEYS)
        return d


@dataclass(slots=True, kw_only=True)
class TraceHeader:
    """Line 1 of a trace. Construct with keywords; ``format`` and ``version`` default to v1."""

    format: str = FORMAT
    version: int = VERSION
    workload: str
    agents: list[str]
    rounds: int
    source: str
    # The routing key of the whole simulation (optional; traces written before it validate):
    # the replayer sends it as the hint's ``group`` and the X-SMG-Routing-Key header.
    group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the header, in canonical key order."""
        d: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "workload": self.workload,
            "agents": list(self.agents),
            "rounds": self.rounds,
            "source": self.source,
        }
        if self.group is not None:
            d["group"] = self.group
        _merge_extra(d, self.extra, HEADER_KEYS)
        return d


@dataclass(slots=True)
class TraceRequest:
    """One agent's request in one round: the prompt is the segments' texts joined in order."""

    round: int
    agent: str
    segments: list[Segment]
    max_tokens: int
    output: str | None = None
    arrival_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def prompt(self) -> str:
        """The full prompt text: the concatenation of the segment texts, in order."""
        return "".join(s.text for s in self.segments)

    def shared_segments(self) -> list[Segment]:
        """The shared segments of this request, in prompt order."""
        return [s for s in self.segments if s.type == "shared"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this request, in canonical key order; None optionals are omitted."""
        d: dict[str, Any] = {
            "round": self.round,
            "agent": self.agent,
            "segments": [s.to_dict() for s in self.segments],
            "max_tokens": self.max_tokens,
        }
        if self.output is not None:
            d["output"] = self.output
        if self.arrival_s is not None:
            d["arrival_s"] = self.arrival_s
        _merge_extra(d, self.extra, REQUEST_KEYS)
        return d


@dataclass(slots=True)
class Trace:
    """A whole trace: the header and the requests in file order."""

    header: TraceHeader
    requests: list[TraceRequest]

    def rounds(self) -> dict[int, list[TraceRequest]]:
        """Requests grouped by round, keys ascending; every round 1..header.rounds is a key
        (empty list if no request). Within a round requests keep their file order."""
        out: dict[int, list[TraceRequest]] = {r: [] for r in range(1, self.header.rounds + 1)}
        for req in self.requests:
            out.setdefault(req.round, []).append(req)
        return dict(sorted(out.items()))

    @staticmethod
    def prompt(req: TraceRequest) -> str:
        """The full prompt text of ``req`` (its segment texts joined in order)."""
        return req.prompt()

    def to_bytes(self) -> bytes:
        """The trace as JSON Lines bytes (orjson, canonical key order, ``\\n`` after each line)."""
        lines = [orjson.dumps(self.header.to_dict())]
        lines.extend(orjson.dumps(r.to_dict()) for r in self.requests)
        return b"\n".join(lines) + b"\n"


def read_trace(path: str | Path) -> Trace:
    """Read and validate a trace file; raise the first :class:`TraceError` if it has any
    (``validate_trace`` lists them all). An unreadable file raises ``TraceError`` with no line."""
    from sglang_tokendance.trace.validate import parse_trace_file

    result = parse_trace_file(path)
    if result.errors or result.trace is None:
        raise result.errors[0]
    return result.trace


def loads_trace(data: bytes, file: str = "<trace>") -> Trace:
    """Parse and validate trace bytes; ``file`` names the source in errors."""
    from sglang_tokendance.trace.validate import parse_trace_bytes

    result = parse_trace_bytes(data, file)
    if result.errors or result.trace is None:
        raise result.errors[0]
    return result.trace


def write_trace(path: str | Path, trace: Trace, *, validate: bool = True) -> None:
    """Write ``trace`` as JSON Lines. With ``validate`` (the default) the bytes are checked
    first and the first problem is raised as :class:`TraceError` naming ``path``; nothing is
    written then."""
    data = trace.to_bytes()
    if validate:
        loads_trace(data, str(path))
    Path(path).write_bytes(data)
    logger.debug("wrote %s: %d requests", path, len(trace.requests))


class RoundStats(NamedTuple):
    """Character counts of one round (Python ``len`` of str, i.e. code points)."""

    round: int
    requests: int
    prompt_chars: int
    shared_chars: int
    private_chars: int
    unique_shared_chars: int

    @property
    def shared_share(self) -> float:
        """Fraction of prompt characters that sit in shared segments."""
        return self.shared_chars / self.prompt_chars if self.prompt_chars else 0.0


def round_stats(trace: Trace) -> list[RoundStats]:
    """Per-round counts; "unique shared" counts each shared id once per round."""
    out = []
    for rnd, reqs in trace.rounds().items():
        shared = private = 0
        unique: dict[str, int] = {}
        for req in reqs:
            for seg in req.segments:
                if seg.type == "shared":
                    shared += len(seg.text)
                    unique[seg.id or ""] = len(seg.text)
                else:
                    private += len(seg.text)
        out.append(
            RoundStats(rnd, len(reqs), shared + private, shared, private, sum(unique.values()))
        )
    return out
