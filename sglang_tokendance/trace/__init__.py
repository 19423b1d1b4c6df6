"""Multi-agent trace format v1 (tokendance-trace): records, reader/writer, validation and
workload generators. Pure Python; no SGLang import. CLI: ``python -m sglang_tokendance.trace``."""

from __future__ import annotations

from sglang_tokendance.trace.format import (
    FORMAT,
    VERSION,
    RoundStats,
    Segment,
    SegmentType,
    Trace,
    TraceError,
    TraceHeader,
    TraceRequest,
    loads_trace,
    read_trace,
    round_stats,
    write_trace,
)
from sglang_tokendance.trace.generators import (
    agent_society,
    generate,
    generative_agents,
    resolve_workload,
)
from sglang_tokendance.trace.validate import (
    ParseResult,
    parse_trace_bytes,
    parse_trace_file,
    validate_trace,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "ParseResult",
    "RoundStats",
    "Segment",
    "SegmentType",
    "Trace",
    "TraceError",
    "TraceHeader",
    "TraceRequest",
    "agent_society",
    "generate",
    "generative_agents",
    "loads_trace",
    "parse_trace_bytes",
    "parse_trace_file",
    "read_trace",
    "resolve_workload",
    "round_stats",
    "validate_trace",
    "write_trace",
]
