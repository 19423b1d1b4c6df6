"""Trace replayer: send a tokendance-trace to an SGLang server round by round (HTTP only) and
report prefill work, KV size and latency. CLI: ``python -m sglang_tokendance.replay``."""

from __future__ import annotations

from sglang_tokendance.replay.report import build_report, compare, percentiles, summary
from sglang_tokendance.replay.runner import (
    MODES,
    ReplayOptions,
    ReplayResult,
    RequestRecord,
    RoundRecord,
    SentRequest,
    closed_loop_segments,
    new_output,
    replay,
    replay_async,
)

__all__ = [
    "MODES",
    "ReplayOptions",
    "ReplayResult",
    "RequestRecord",
    "RoundRecord",
    "SentRequest",
    "build_report",
    "closed_loop_segments",
    "compare",
    "new_output",
    "percentiles",
    "replay",
    "replay_async",
    "summary",
]
