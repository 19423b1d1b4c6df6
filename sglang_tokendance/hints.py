"""TokenDance hints: the versioned ``kv_hints`` payload and the text-separator form.

A request of an All-Gather round says which round it belongs to, the round's size, its agent
id, and how its prompt splits into segments. Structured clients send SGLang's ``kv_hints``
envelope with one action::

    {"protocol_version": "1", "message_id": "<any>",
     "actions": [{"action_id": "<any>", "action_type": "tokendance.allgather",
                  "action_version": "1",
                  "payload": {"round": "r3", "round_size": 8, "agent": "alice",
                              "segments": [{"type": "private", "start": 0, "end": 120},
                                           {"type": "shared", "id": "r2/bob",
                                            "start": 120, "end": 310}, ...],
                              "group": "sim-7"}}]}

``start``/``end`` are character offsets into the prompt text; the spans must tile it exactly,
in order. ``group`` (optional) is the routing key: the simulation or session the round belongs
to. Every round of one group goes to the same place (the same DP rank inside a server, the same
worker behind SGLang's gateway ``smg``), so a round is seen whole and round r+1 finds round r's
masters. Without it the group is derived from the round id (``routing.default_group``). Clients
also send it as the HTTP header ``X-SMG-Routing-Key`` (``routing.routing_headers``), which the
gateway's ``consistent_hashing`` policy reads. Text-only clients (OpenAI-style) instead put
separators in the prompt (see :mod:`.hints_text`). Either way the server tokenizes every
segment on its own, so equal shared text gives equal token ids wherever it sits.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ACTION_TYPE = "tokendance.allgather"
ACTION_VERSION = "1"
PROTOCOL_VERSION = "1"
SEGMENT_TYPES = ("private", "shared")


@dataclass(slots=True, frozen=True)
class SegmentSpan:
    """One segment of a prompt: character span, and after tokenization its token span."""

    type: str
    start: int
    end: int
    id: str | None = None
    tok_start: int = -1
    tok_end: int = -1


@dataclass(slots=True, frozen=True)
class AgentHint:
    """The validated TokenDance hint of one request."""

    round: str
    round_size: int
    agent: str
    segments: tuple[SegmentSpan, ...]
    group: str | None = None

    def to_payload(self) -> dict[str, Any]:
        segs = []
        for s in self.segments:
            d: dict[str, Any] = {"type": s.type, "start": s.start, "end": s.end}
            if s.id is not None:
                d["id"] = s.id
            if s.tok_end >= 0:
                d["tok_start"], d["tok_end"] = s.tok_start, s.tok_end
            segs.append(d)
        out: dict[str, Any] = {
            "round": self.round,
            "round_size": self.round_size,
            "agent": self.agent,
            "segments": segs,
        }
        if self.group is not None:
            out["group"] = self.group
        return out


class HintError(ValueError):
    """A malformed TokenDance hint (the request is refused with a 400-class error)."""


def require_hint(cond: bool, msg: str) -> None:
    """Raise :class:`HintError` with ``msg`` unless ``cond`` holds."""
    if not cond:
        raise HintError(f"invalid TokenDance hint: {msg}")


def _is_int(value: Any) -> bool:
    """A JSON integer (``true``/``false`` are ints to Python, not to a client)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_payload(payload: Any, text_len: int | None) -> AgentHint:
    """Validate a ``tokendance.allgather`` payload.

    Args:
        payload: the action's payload (JSON object).
        text_len: length of the prompt text the spans refer to (None: skip the tiling check).

    Raises:
        HintError: naming the first problem found.
    """
    require_hint(isinstance(payload, dict), "payload must be an object")
    rnd = payload.get("round")
    require_hint(
        isinstance(rnd, (str, int)) and not isinstance(rnd, bool) and str(rnd) != "",
        "'round' must be a non-empty string or an integer",
    )
    size = payload.get("round_size")
    require_hint(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1,
        f"'round_size' must be an integer >= 1, got {size!r}",
    )
    agent = payload.get("agent")
    require_hint(isinstance(agent, str) and agent != "", "'agent' must be a non-empty string")
    group = payload.get("group")
    require_hint(
        group is None or (isinstance(group, str) and group != ""),
        f"'group' must be a non-empty string when given, got {group!r}",
    )
    segs = payload.get("segments")
    require_hint(isinstance(segs, list) and len(segs) > 0, "'segments' must be a non-empty list")
    out: list[SegmentSpan] = []
    pos = 0
    for i, s in enumerate(segs):
        require_hint(isinstance(s, dict), f"segment {i} must be an object")
        typ = s.get("type")
        require_hint(typ in SEGMENT_TYPES, f"segment {i}: unknown type {typ!r} (private|shared)")
        start, end = s.get("start"), s.get("end")
        require_hint(
            _is_int(start) and _is_int(end),
            f"segment {i}: 'start' and 'end' must be integers, got {start!r} and {end!r}",
        )
        require_hint(
            start == pos,
            f"segment {i}: starts at {start}, expected {pos} (spans must tile the text in order)",
        )
        require_hint(end > start, f"segment {i}: empty or reversed span [{start}, {end})")
        if text_len is not None:
            require_hint(
                end <= text_len,
                f"segment {i}: span [{start}, {end}) out of range (text has {text_len} characters)",
            )
        sid = s.get("id")
        if typ == "shared":
            require_hint(isinstance(sid, str) and sid != "", f"segment {i}: shared needs an 'id'")
        ts, te = s.get("tok_start", -1), s.get("tok_end", -1)
        require_hint(_is_int(ts) and _is_int(te), f"segment {i}: bad token span")
        out.append(SegmentSpan(typ, start, end, sid if typ == "shared" else None, ts, te))
        pos = end
    if text_len is not None:
        require_hint(pos == text_len, f"spans end at {pos} but the text has {text_len} characters")
    return AgentHint(str(rnd), size, agent, tuple(out), group)


def find_action(envelope: Any) -> dict[str, Any] | None:
    """The payload of the ``tokendance.allgather`` action in a kv_hints envelope, if any.

    Raises:
        HintError: if the envelope or the action has an unsupported version.
    """
    if envelope is None:
        return None
    if isinstance(envelope, dict):
        actions, protocol = envelope.get("actions"), envelope.get("protocol_version")
    else:
        actions, protocol = envelope.actions, envelope.protocol_version
    for a in actions or []:
        atype = a.get("action_type") if isinstance(a, dict) else a.action_type
        if atype != ACTION_TYPE:
            continue
        require_hint(
            str(protocol) == PROTOCOL_VERSION,
            f"kv_hints protocol_version {protocol!r} not supported (expected {PROTOCOL_VERSION!r})",
        )
        version = a.get("action_version") if isinstance(a, dict) else a.action_version
        require_hint(
            str(version) == ACTION_VERSION,
            f"action_version {version!r} not supported (expected {ACTION_VERSION!r})",
        )
        return a.get("payload") if isinstance(a, dict) else a.payload
    return None


def tokenize_segments(
    encode: Callable[[str, bool], list[int]], text: str, hint: AgentHint
) -> tuple[list[int], AgentHint]:
    """Tokenize each segment on its own and concatenate.

    Args:
        encode: ``encode(text, add_special_tokens)`` of the server's tokenizer. Special tokens
            (a BOS) are added to the first segment only, as for the whole prompt.
        text: the prompt.
        hint: the validated hint (character spans).

    Returns:
        The input ids and the hint with token spans filled in.
    """
    ids: list[int] = []
    segs = []
    for i, s in enumerate(hint.segments):
        part = encode(text[s.start : s.end], i == 0)
        segs.append(SegmentSpan(s.type, s.start, s.end, s.id, len(ids), len(ids) + len(part)))
        ids.extend(part)
    for s in segs:
        require_hint(s.tok_end > s.tok_start, f"segment [{s.start}, {s.end}) tokenizes to nothing")
    return ids, AgentHint(hint.round, hint.round_size, hint.agent, tuple(segs), hint.group)


# ---- client side ------------------------------------------------------------------------------
def build_request(
    segments: Sequence[tuple[str, str | None, str]],
    round_id: str | int,
    round_size: int,
    agent: str,
    group: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Build the prompt text and the kv_hints envelope for one agent's request.

    Args:
        segments: ``(type, id, text)`` per segment, in prompt order (id None for private).
        round_id, round_size, agent: the round this request belongs to.
        group: the routing key (the simulation); None: ``routing.default_group`` of the round id
            (the payload then carries no ``group``, and the server derives the same).

    Returns:
        ``(text, kv_hints)``: pass them as ``text`` and ``kv_hints`` to /generate (or as
        ``prompt`` and the extra body field ``kv_hints`` to the OpenAI routes), with
        ``routing.routing_headers(kv_hints)`` as HTTP headers.
    """
    spans, pos, parts = [], 0, []
    for typ, sid, seg_text in segments:
        if not seg_text:
            continue
        d: dict[str, Any] = {"type": typ, "start": pos, "end": pos + len(seg_text)}
        if typ == "shared":
            d["id"] = sid
        spans.append(d)
        parts.append(seg_text)
        pos += len(seg_text)
    payload: dict[str, Any] = {
        "round": str(round_id),
        "round_size": round_size,
        "agent": agent,
        "segments": spans,
    }
    if group is not None:
        payload["group"] = group
    text = "".join(parts)
    parse_payload(payload, len(text))  # fail early on the client
    envelope = {
        "protocol_version": PROTOCOL_VERSION,
        "message_id": uuid.uuid4().hex,
        "actions": [
            {
                "action_id": "allgather",
                "action_type": ACTION_TYPE,
                "action_version": ACTION_VERSION,
                "payload": payload,
            }
        ],
    }
    return text, envelope
