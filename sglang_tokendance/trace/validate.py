"""Validation of trace files: every violation is collected with its 1-based line number.

:func:`validate_trace` lists all problems of a file; :func:`parse_trace_file` also returns the
parsed :class:`Trace` when there are none (``read_trace`` raises the first problem).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from sglang_tokendance.trace.format import (
    FORMAT,
    HEADER_KEYS,
    REQUEST_KEYS,
    SEGMENT_KEYS,
    SEGMENT_TYPES,
    VERSION,
    Segment,
    Trace,
    TraceError,
    TraceHeader,
    TraceRequest,
)

_MISSING = object()


class ParseResult(NamedTuple):
    """A parsed trace (None when any error was found) and every error found, in line order."""

    trace: Trace | None
    errors: list[TraceError]


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[TraceError] = []
        self.agents: set[str] | None = None
        self.rounds: int | None = None
        self.seen: dict[tuple[int, str], int] = {}  # (round, agent) -> line
        # (round, id) -> (digest of the text, line): a digest, so a streamed file's texts are
        # not all kept in memory
        self.shared: dict[tuple[int, str], tuple[bytes, int]] = {}

    def err(self, line: int, msg: str) -> None:
        self.errors.append(TraceError(self.file, line, msg))

    def field(self, obj: dict[str, Any], key: str, kind: str, line: int, what: str) -> Any:
        """obj[key] if present and of ``kind`` (str/int/list/number), else report and None."""
        v = obj.get(key, _MISSING)
        if v is _MISSING:
            self.err(line, f"{what} field {key!r} is missing")
            return None
        ok = {
            "str": isinstance(v, str),
            "int": _is_int(v),
            "list": isinstance(v, list),
            "number": (_is_int(v) or isinstance(v, float)),
        }[kind]
        if not ok:
            want = {"str": "a string", "int": "an integer", "list": "an array"}.get(
                kind, "a number"
            )
            self.err(line, f"{what} field {key!r} must be {want}, got {_json_type(v)}")
            return None
        return v

    def header(self, obj: Any, line: int) -> TraceHeader | None:
        if not isinstance(obj, dict):
            self.err(line, f"header must be a JSON object, got {_json_type(obj)}")
            return None
        if "format" not in obj:
            hint = " (the first line looks like a request)" if "round" in obj else ""
            self.err(line, f"header missing: line 1 has no 'format' field{hint}")
            return None
        ok = True
        fmt = self.field(obj, "format", "str", line, "header")
        if fmt is not None and fmt != FORMAT:
            self.err(line, f"header format is {fmt!r}, expected {FORMAT!r}")
            ok = False
        version = self.field(obj, "version", "int", line, "header")
        if version is not None and version != VERSION:
            self.err(line, f"unsupported trace version {version} (this reader knows {VERSION})")
            ok = False
        workload = self.field(obj, "workload", "str", line, "header")
        source = self.field(obj, "source", "str", line, "header")
        agents = self.field(obj, "agents", "list", line, "header")
        if agents is not None:
            if not agents or not all(isinstance(a, str) and a for a in agents):
                self.err(line, "header field 'agents' must be a non-empty array of strings")
            elif len(set(agents)) != len(agents):
                dup = sorted(a for a, n in Counter(agents).items() if n > 1)
                self.err(line, f"header field 'agents' lists {', '.join(map(repr, dup))} twice")
            else:
                self.agents = set(agents)
        rounds = self.field(obj, "rounds", "int", line, "header")
        if rounds is not None and rounds < 1:
            self.err(line, f"header field 'rounds' must be at least 1, got {rounds}")
        elif rounds is not None:
            self.rounds = rounds
        group = obj.get("group")
        if group is not None and not (isinstance(group, str) and group):
            self.err(line, f"header field 'group' must be a non-empty string, got {group!r}")
            ok = False
        if not ok or None in (fmt, version, workload, source, self.agents, self.rounds):
            return None
        extra = {k: v for k, v in obj.items() if k not in HEADER_KEYS}
        return TraceHeader(
            format=fmt, version=version, workload=workload, agents=list(agents),
            rounds=rounds, source=source, group=group, extra=extra,
        )  # fmt: skip

    def segment(self, obj: Any, line: int, idx: int, rnd: int | None) -> Segment | None:
        what = f"segment {idx}"
        if not isinstance(obj, dict):
            self.err(line, f"{what} must be a JSON object, got {_json_type(obj)}")
            return None
        stype = self.field(obj, "type", "str", line, what)
        text = self.field(obj, "text", "str", line, what)
        if stype is not None and stype not in SEGMENT_TYPES:
            self.err(line, f"{what}: unknown type {stype!r} (expected 'private' or 'shared')")
            stype = None
        sid = obj.get("id")
        if "id" in obj and not isinstance(sid, str):
            self.err(line, f"{what} field 'id' must be a string, got {_json_type(sid)}")
            sid = None
        elif stype == "shared" and not sid:
            self.err(line, f"{what}: shared segment has no 'id'")
        src = obj.get("source")
        if "source" in obj and not isinstance(src, str):
            self.err(line, f"{what} field 'source' must be a string, got {_json_type(src)}")
            src = None
        if stype == "shared" and sid and text is not None and rnd is not None:
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
            first = self.shared.setdefault((rnd, sid), (digest.digest(), line))
            if first[0] != digest.digest():
                where = "earlier in this line" if first[1] == line else f"on line {first[1]}"
                self.err(
                    line,
                    f"{what}: shared id {sid!r} has different text than {where} "
                    f"(round {rnd}, lines {first[1]} and {line})",
                )
        if stype is None or text is None:
            return None
        extra = {k: v for k, v in obj.items() if k not in SEGMENT_KEYS}
        return Segment(stype, text, sid, src, extra)  # type: ignore[arg-type]

    def request(self, obj: Any, line: int) -> TraceRequest | None:
        if not isinstance(obj, dict):
            self.err(line, f"request must be a JSON object, got {_json_type(obj)}")
            return None
        n_err = len(self.errors)
        rnd = self.field(obj, "round", "int", line, "request")
        if rnd is not None and self.rounds is not None and not 1 <= rnd <= self.rounds:
            self.err(line, f"round {rnd} out of range 1..{self.rounds}")
        agent = self.field(obj, "agent", "str", line, "request")
        if agent is not None and self.agents is not None and agent not in self.agents:
            self.err(line, f"agent {agent!r} is not in the header's agents")
        if rnd is not None and agent is not None:
            first = self.seen.setdefault((rnd, agent), line)
            if first != line:
                self.err(
                    line, f"agent {agent!r} appears twice in round {rnd} (first on line {first})"
                )
        segs = self.field(obj, "segments", "list", line, "request")
        parsed: list[Segment | None] = []
        if segs is not None and not segs:
            self.err(line, "request field 'segments' must not be empty")
        for i, s in enumerate(segs or [], start=1):
            parsed.append(self.segment(s, line, i, rnd))
        max_tokens = self.field(obj, "max_tokens", "int", line, "request")
        if max_tokens is not None and max_tokens < 1:
            self.err(line, f"max_tokens must be a positive integer, got {max_tokens}")
        output = None
        if "output" in obj:
            output = self.field(obj, "output", "str", line, "request")
        arrival = None
        if "arrival_s" in obj:
            arrival = self.field(obj, "arrival_s", "number", line, "request")
            if arrival is not None and not (math.isfinite(arrival) and arrival >= 0):
                self.err(line, f"arrival_s must be a finite number >= 0, got {arrival}")
        if len(self.errors) != n_err:
            return None
        extra = {k: v for k, v in obj.items() if k not in REQUEST_KEYS}
        return TraceRequest(rnd, agent, parsed, max_tokens, output, arrival, extra)  # type: ignore[arg-type]


class TraceSummary(NamedTuple):
    """What ``validate`` prints for a valid file (no trace kept)."""

    requests: int
    rounds: int
    agents: int


def _parse_lines(
    lines: Iterable[bytes], file: str, keep: bool
) -> tuple[ParseResult, TraceSummary | None]:
    """Parse JSON Lines one line at a time; with ``keep`` False only counts the requests."""
    chk = _Checker(file)
    header: TraceHeader | None = None
    requests: list[TraceRequest] = []
    count = 0
    offset = 0  # byte offset of the current line in the file
    n = 0
    for n, raw in enumerate(lines, start=1):
        line_start, offset = offset, offset + len(raw)
        raw = raw.rstrip(b"\n")
        if not raw.strip():
            chk.err(n, "empty line")
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            chk.err(
                n,
                f"not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {line_start + e.start} of "
                f"the file (column {e.start + 1} of the line)",
            )
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            chk.err(n, f"not valid JSON: {e.msg} (column {e.colno})")
            continue
        if n == 1:
            header = chk.header(obj, n)
        else:
            req = chk.request(obj, n)
            if req is not None:
                count += 1
                if keep:
                    requests.append(req)
    if n == 0:
        return ParseResult(None, [TraceError(file, 1, "empty file: expected a trace header")]), None
    errors = sorted(chk.errors, key=lambda e: e.line or 0)
    if errors or header is None:
        return ParseResult(None, errors), None
    summary = TraceSummary(count, header.rounds, len(header.agents))
    return ParseResult(Trace(header, requests) if keep else None, []), summary


def parse_trace_bytes(data: bytes, file: str = "<trace>") -> ParseResult:
    """Parse JSON Lines trace bytes, collecting every violation; ``file`` names it in errors."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return _parse_lines(lines, file, keep=True)[0]


def _stream(path: str | Path, keep: bool) -> tuple[ParseResult, TraceSummary | None]:
    try:
        with open(path, "rb") as f:  # line by line: a large trace is never read whole
            return _parse_lines(f, str(path), keep)
    except OSError as e:
        err = TraceError(str(path), None, f"cannot read: {e.strerror or e}")
        return ParseResult(None, [err]), None


def parse_trace_file(path: str | Path) -> ParseResult:
    """Parse a trace file, collecting every violation (an unreadable file is one error)."""
    return _stream(path, keep=True)[0]


def summarize_trace_file(path: str | Path) -> tuple[list[TraceError], TraceSummary | None]:
    """Validate a trace file in one streaming pass, keeping no requests: its errors, and its
    summary when it is valid."""
    result, summary = _stream(path, keep=False)
    return result.errors, summary


def validate_trace(path: str | Path) -> list[TraceError]:
    """Every violation in the trace file at ``path``, in line order (empty list if valid)."""
    return summarize_trace_file(path)[0]
