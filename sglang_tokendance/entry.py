"""Entry-side hint handling, in SGLang's TokenizerManager (the main server process).

For a request carrying a TokenDance hint (kv_hints action or the text-separator form) this:
1. validates the hint (a ``HintError``, a ValueError, becomes a 400 for that request only),
2. checks it against the other requests of its round seen so far (same round size, one text
   per shared id),
3. tokenizes each segment on its own, so equal shared text gives equal token ids wherever it
   sits, and hands SGLang the concatenated ``input_ids``,
4. rewrites the envelope's payload with the token spans, for the scheduler,
5. with ``--dp-size N`` (N > 1), pins the request to the DP rank of its group (a stable hash,
   :func:`routing.stable_rank`) through SGLang's ``routed_dp_rank``, so a round and the rounds
   after it run on one rank; a rank the client chose itself is kept. Hint-less requests keep
   SGLang's load balancing.

Requests without hints, and every request when TokenDance is off, pass through untouched.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sglang_tokendance.config import get_config
from sglang_tokendance.hints import (
    ACTION_TYPE,
    ACTION_VERSION,
    AgentHint,
    HintError,
    find_action,
    parse_payload,
    tokenize_segments,
)
from sglang_tokendance.hints_text import parse_separated
from sglang_tokendance.routing import group_of, stable_rank

logger = logging.getLogger(__name__)

MAX_TRACKED_ROUNDS = 256
ROUND_MEMORY_S = 120.0


class RoundRegistry:
    """What the entry has seen of recent rounds: their size and the text of each shared id.

    A round is forgotten ``ttl_s`` after its last request (or when more than ``capacity`` rounds
    are tracked), so a round id can be reused by a later run on a long-lived server.
    """

    def __init__(
        self,
        capacity: int = MAX_TRACKED_ROUNDS,
        ttl_s: float = ROUND_MEMORY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.clock = clock
        # round -> (size, group, shared id -> text digest)
        self._rounds: OrderedDict[str, tuple[int, str, dict[str, str]]] = OrderedDict()
        self._seen: dict[str, float] = {}

    def check(self, hint: AgentHint, text: str) -> None:
        """Raise HintError if ``hint`` contradicts earlier requests of its round."""
        now = self.clock()
        for rid in [r for r, t in self._seen.items() if now - t > self.ttl_s]:
            self._rounds.pop(rid, None)
            self._seen.pop(rid, None)
        size, group, texts = self._rounds.get(hint.round, (hint.round_size, group_of(hint), {}))
        if size != hint.round_size:
            raise HintError(
                f"invalid TokenDance hint: round {hint.round!r} has round_size {size}, "
                f"this request says {hint.round_size}"
            )
        if group != group_of(hint):
            raise HintError(
                f"invalid TokenDance hint: round {hint.round!r} has group {group!r}, this "
                f"request says {group_of(hint)!r} (a round routes as one group)"
            )
        new: dict[str, str] = {}
        for s in hint.segments:
            if s.id is None:
                continue
            digest = hashlib.sha1(text[s.start : s.end].encode()).hexdigest()
            seen = texts.get(s.id, new.get(s.id))
            if seen is not None and seen != digest:
                raise HintError(
                    f"invalid TokenDance hint: shared segment {s.id!r} has a different text "
                    f"than another request of round {hint.round!r}"
                )
            new[s.id] = digest
        texts.update(new)
        self._rounds[hint.round] = (size, group, texts)
        self._rounds.move_to_end(hint.round)
        self._seen[hint.round] = now
        while len(self._rounds) > self.capacity:
            old, _ = self._rounds.popitem(last=False)
            self._seen.pop(old, None)


def prepare_request(
    tm: Any, obj: Any, separator: str, registry: RoundRegistry, act: bool = True, dp_size: int = 1
) -> None:
    """Apply a TokenDance hint to ``obj`` (a GenerateReqInput) in place, if it has one.

    With ``act`` False (mode off) only the separator form is stripped to its plain text, so
    every mode sees the same prompt; the hint itself is ignored.

    Raises:
        HintError: malformed or inconsistent hint (SGLang answers 400).
    """
    from sglang.srt.managers.kv_hints import KvHintAction, KvHintsEnvelope

    text = obj.text if isinstance(obj.text, str) else None
    payload = find_action(obj.kv_hints)
    if payload is None and text is not None and text.startswith(separator):
        parsed = parse_separated(text, separator)
        if parsed is not None:
            text, payload = parsed
            obj.text = text
    if payload is None or not act:
        return
    if text is None or obj.input_ids is not None:
        raise HintError("invalid TokenDance hint: hinted requests must send the prompt as text")
    hint = parse_payload(payload, len(text))
    registry.check(hint, text)
    tokenizer = tm.tokenizer

    def encode(part: str, special: bool) -> list[int]:
        return list(tokenizer.encode(part, add_special_tokens=special))

    input_ids, hint = tokenize_segments(encode, text, hint)
    obj.input_ids = input_ids
    if dp_size > 1 and obj.routed_dp_rank is None:
        # SGLang's DP controller sends a request with routed_dp_rank straight to that rank.
        obj.routed_dp_rank = stable_rank(group_of(hint), dp_size)
    others = [
        a for a in (obj.kv_hints.actions if obj.kv_hints else []) if a.action_type != ACTION_TYPE
    ]
    action = KvHintAction(
        action_id="allgather",
        action_type=ACTION_TYPE,
        action_version=ACTION_VERSION,
        payload=hint.to_payload(),
    )
    obj.kv_hints = KvHintsEnvelope(
        protocol_version=obj.kv_hints.protocol_version if obj.kv_hints else "1",
        message_id=obj.kv_hints.message_id if obj.kv_hints else (obj.rid or "td"),
        actions=[*others, action],
    )


EMPTY_PROMPT = (
    "the prompt is empty after tokenization: send at least one token (this tokenizer adds no "
    "BOS token to empty text)"
)


def refuse_empty_prompt(tokenized: Any) -> None:
    """Raise ValueError (SGLang answers 400) for a text request that tokenized to nothing.

    SGLang 0.5.23's CPU path dies on a zero-token prefill (``cannot reshape tensor of 0
    elements`` in rotary_emb) when the tokenizer adds no BOS; the same guard is proposed
    upstream in ``patches/sglang-0.5.23/empty-prompt.diff``.
    """
    ids = getattr(tokenized, "input_ids", None)
    if ids is not None and len(ids) == 0 and not getattr(tokenized, "mm_inputs", None):
        raise ValueError(EMPTY_PROMPT)


KV_HINTS_SHAPE = (
    "kv_hints must be a JSON object (an envelope with protocol_version, message_id and "
    "actions), got {}"
)


def add_kv_hints_error_handler(app: Any) -> None:
    """Answer a malformed ``kv_hints`` field with one sentence instead of pydantic's dump.

    Wraps SGLang's ``RequestValidationError`` handler: errors that name ``kv_hints`` get a 400
    in SGLang's error shape; everything else goes to SGLang's handler unchanged.
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import ORJSONResponse

    original = app.exception_handlers.get(RequestValidationError)
    if getattr(original, "tokendance", False):
        return

    async def handler(request: Any, exc: RequestValidationError) -> Any:
        bad = [e for e in exc.errors() if "kv_hints" in tuple(e.get("loc", ()))]
        if not bad or original is None:
            return await original(request, exc)
        got = type(bad[0].get("input")).__name__
        kind = {"str": "a string", "list": "a list", "int": "a number", "float": "a number"}
        message = KV_HINTS_SHAPE.format(kind.get(got, got))
        body = {"object": "error", "message": message, "type": "Bad Request", "code": 400}
        return ORJSONResponse(status_code=400, content=body)

    handler.tokendance = True  # type: ignore[attr-defined]
    app.exception_handlers[RequestValidationError] = handler


REGISTRY = RoundRegistry()  # one per TokenizerManager process


async def around_tokenize(original: Any, tm: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
    """``TokenizerManager._tokenize_one_request`` (around): apply the hint, refuse empties."""
    cfg = get_config(tm.server_args)
    if cfg.enabled and type(obj).__name__ == "GenerateReqInput":
        dp_size = int(getattr(tm, "elastic_worker_count", 1) or 1)  # SGLang's DP ranks
        prepare_request(tm, obj, cfg.separator, REGISTRY, act=cfg.active, dp_size=dp_size)
    out = await original(tm, obj, *args, **kwargs)
    if cfg.enabled:
        refuse_empty_prompt(out)
    return out
