"""A hinted request's TokenDance record, read from its ``kv_hints`` (scheduler side)."""

from __future__ import annotations

from typing import Any

from sglang_tokendance.cache.row_plan import RowLayout, SharedUse
from sglang_tokendance.hints import find_action, parse_payload
from sglang_tokendance.state import RequestState


def parse_request(req: Any) -> RequestState | None:
    """The request's record from its hint (token spans set by the entry), or None.

    Raises:
        HintError: a malformed hint (the entry validated it already).
    """
    payload = find_action(getattr(req, "kv_hints", None))
    if payload is None:
        return None
    hint = parse_payload(payload, None)
    ids = list(req.origin_input_ids)
    shared = [
        SharedUse(s.id, s.tok_start, s.tok_end)
        for s in hint.segments
        if s.type == "shared" and s.tok_end > s.tok_start
    ]
    if any(s.tok_start < 0 or s.tok_end > len(ids) for s in hint.segments):
        raise ValueError("TokenDance hint has no token spans (entry hook not active?)")
    prefix_len = shared[0].start if shared else len(ids)
    layout = RowLayout(hint.round, hint.agent, ids, prefix_len, shared)
    return RequestState(hint.agent, hint.round, hint.round_size, layout=layout)


def parse_round(req: Any) -> RequestState | None:
    """Mode off: a record naming the request's round and agent only (no layout, so SGLang
    runs it as ever), or None for no hint or an unreadable one."""
    try:
        payload = find_action(getattr(req, "kv_hints", None))
        if payload is None:
            return None
        hint = parse_payload(payload, None)
    except ValueError:
        return None
    return RequestState(hint.agent, hint.round, hint.round_size, role="alone")
