"""TokenDance hints on SGLang's OpenAI-compatible routes (/v1/completions, /v1/chat/completions).

Clients send the same ``kv_hints`` envelope as for /generate, as an extra body field (with the
``openai`` client: ``extra_body={"kv_hints": envelope}``). SGLang 0.5.23's request models
(``CompletionRequest``, ``ChatCompletionRequest``) silently drop unknown fields, so the field is
read from the raw JSON body:

1. an AROUND hook on each route's ``handle_request`` (async) reads ``await raw_request.json()``
   (Starlette caches the body FastAPI already parsed) and keeps ``kv_hints`` in
   ``raw_request.state``;
2. an AFTER hook on ``_convert_to_internal_request`` puts it on the ``GenerateReqInput``
   (``kv_hints``), after checking the envelope (malformed: a 400, as on /generate).

Completions: the hint's character spans refer to the prompt string, as on /generate.
Chat: the spans refer to the concatenation of the messages' text contents, in order (what
``build_request`` returns for the joined contents). SGLang keeps only token ids for text chat
models, so the hook renders the template again (verified: it must encode to SGLang's ids), finds
each message's content in it and moves the spans there, template text becoming private
segments; the request is then sent as that text. A shared span that crosses a message
boundary, or a prompt that cannot be recovered as text, is a 400. Text-only clients can instead
use the separator form (``hints_text.build_separated``), which the entry hook parses on every route.

Every hook is a no-op unless the server runs with ``--enable-tokendance``.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang_tokendance.config import get_config
from sglang_tokendance.hints import ACTION_TYPE, HintError, find_action, parse_payload

logger = logging.getLogger(__name__)

FIELD = "kv_hints"
STATE_ATTR = "tokendance_kv_hints"


def _enabled(serving: Any) -> bool:
    tm = getattr(serving, "tokenizer_manager", None)
    return bool(tm is not None and get_config(tm.server_args).enabled)


async def around_handle_request(
    original: Any, serving: Any, request: Any, raw_request: Any = None, *args: Any, **kw: Any
) -> Any:
    """Keep the raw body's ``kv_hints`` in ``raw_request.state`` for the conversion hook."""
    if raw_request is not None and _enabled(serving):
        try:
            body = await raw_request.json()
        except Exception as e:  # noqa: BLE001 - an unreadable body is SGLang's to reject
            logger.debug("kv_hints: raw body unreadable: %s", e)
            body = None
        if isinstance(body, dict) and body.get(FIELD) is not None:
            setattr(raw_request.state, STATE_ATTR, body[FIELD])
    return await original(serving, request, raw_request, *args, **kw)


def _content_text(content: Any) -> str:
    """A message's text: the string, or its text parts joined (other parts contribute none)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        get = part.get if isinstance(part, dict) else lambda k, d=None, p=part: getattr(p, k, d)
        if get("type", "text") == "text":
            parts.append(get("text", "") or "")
    return "".join(parts)


def map_chat_spans(payload: dict[str, Any], contents: list[str], prompt: str) -> dict[str, Any]:
    """Move spans over the joined ``contents`` onto the rendered ``prompt`` (see module doc).

    Raises:
        HintError: if a content is not found in order, or a shared span crosses contents.
    """
    hint = parse_payload(payload, sum(len(c) for c in contents))
    offsets, cursor, base = [], 0, 0  # (joined start, joined end, prompt start) per content
    for c in contents:
        at = prompt.find(c, cursor) if c else cursor
        if at < 0:
            raise HintError(
                "invalid TokenDance hint: the chat template changed a message's "
                "text, so the hint's spans cannot be placed"
            )
        offsets.append((base, base + len(c), at))
        cursor, base = at + len(c), base + len(c)
    segs: list[dict[str, Any]] = []
    pos = 0

    def emit(typ: str, start: int, end: int, sid: str | None = None) -> None:
        nonlocal pos
        if start > pos:
            segs.append({"type": "private", "start": pos, "end": start})
        if end > start:
            segs.append({"type": typ, "start": start, "end": end, **({"id": sid} if sid else {})})
        pos = max(pos, end)

    for s in hint.segments:
        for j0, j1, at in offsets:
            lo, hi = max(s.start, j0), min(s.end, j1)
            if lo >= hi:
                continue
            if s.type == "shared" and (lo, hi) != (s.start, s.end):
                raise HintError(
                    f"invalid TokenDance hint: shared segment {s.id!r} crosses "
                    "a chat message boundary"
                )
            emit(s.type, at + lo - j0, at + hi - j0, s.id)
    emit("private", len(prompt), len(prompt))
    merged: list[dict[str, Any]] = []
    for seg in segs:  # join neighbouring private spans
        if merged and seg["type"] == merged[-1]["type"] == "private":
            merged[-1]["end"] = seg["end"]
        else:
            merged.append(seg)
    return {**hint.to_payload(), "segments": merged}


def _with_payload(envelope: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    actions = [
        {**a, "payload": payload} if a.get("action_type") == ACTION_TYPE else a
        for a in envelope.get("actions", [])
    ]
    return {**envelope, "actions": actions}


def render_chat(serving: Any, request: Any, adapted: Any) -> str:
    """The chat prompt as text, verified against the ids SGLang rendered for it.

    SGLang 0.5.23 keeps only token ids for text-only chat models, so the template is rendered
    again here from the messages' texts; the result is used only if it encodes to exactly the
    ids SGLang produced (with or without special tokens).

    Raises:
        HintError: if the text cannot be recovered exactly.
    """
    if isinstance(adapted.text, str):
        return adapted.text
    tok = serving.tokenizer_manager.tokenizer
    msgs = [
        {"role": m.role, "content": _content_text(getattr(m, "content", None))}
        for m in request.messages
    ]
    kwargs = dict(getattr(request, "chat_template_kwargs", None) or {})
    try:
        text = tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, return_dict=False, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - any template failure means: cannot place the hint
        raise HintError(f"invalid TokenDance hint: cannot render the chat prompt ({e})") from e
    ids = list(adapted.input_ids or [])
    if not isinstance(text, str) or ids not in (
        list(tok.encode(text, add_special_tokens=False)),
        list(tok.encode(text)),
    ):
        raise HintError(
            "invalid TokenDance hint: this chat request's prompt cannot be recovered as text "
            "(tools, media or a lossy template); send it to /v1/completions instead"
        )
    return text


def after_convert(result: Any, serving: Any, request: Any, raw_request: Any = None) -> Any:
    """Attach the kept ``kv_hints`` to the GenerateReqInput (chat: spans moved, see above)."""
    state = getattr(raw_request, "state", None)
    hints = getattr(state, STATE_ATTR, None) if state is not None else None
    if hints is None:
        return result
    from sglang.srt.managers.kv_hints import decode_kv_hints_envelope

    adapted, processed = result
    decode_kv_hints_envelope(hints)  # ValueError (-> 400) on a malformed envelope
    payload = find_action(hints)
    chat = hasattr(request, "messages")
    if payload is not None and chat:
        rendered = render_chat(serving, request, adapted)
        contents = [_content_text(getattr(m, "content", None)) for m in request.messages]
        hints = _with_payload(hints, map_chat_spans(payload, contents, rendered))
        # The entry hook tokenizes the hinted text segment by segment.
        adapted.text, adapted.input_ids = rendered, None
    elif payload is not None and not isinstance(adapted.text, str):
        raise HintError("invalid TokenDance hint: kv_hints needs one text prompt per request")
    adapted.kv_hints = hints
    logger.debug("kv_hints attached to a %s request", "chat" if chat else "completion")
    return adapted, processed
