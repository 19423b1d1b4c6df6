"""Replay a trace round by round against a server; open or closed loop.

Each round's requests go out concurrently (at most ``concurrency`` in flight; default all of
them, after each request's ``arrival_s`` if the trace has one), the round is awaited, then the
next one starts. In mode ``tokendance`` and ``pic`` every request carries the TokenDance hint
(``kv_hints``, round id ``r<N>``, round_size = requests in the round, the agent id). In mode
``off`` the same hints go only to a server whose ``/tokendance/stats`` says mode off: it acts on
none (stock path, same prompt text) and only records each request's round, so its KV per agent
is measured per round like the other modes'; any other server (stock SGLang, a tokendance or
pic server) gets plain prompts. The server checks that a round's shared ids keep one text, for
as long as it remembers the round: replaying again against the same server with other texts
(closed loop) needs another ``round_prefix`` (round ids ``<prefix>r<N>``).

Closed loop (``closed_loop=True``): before round r+1 is sent, every shared segment whose id is
``r<r>/<src>`` (an output of agent ``src`` in round r) is rebuilt from the text ``g`` the server
generated for ``src`` in round r:

1. the recorded output ``o`` of (r, ``src``) gives the wrapper: if ``o`` starts with a speaker
   header (optional whitespace, a name without ``:`` or newline, then ``": "``, e.g. the GA
   trace's ``"\\n<Full Name>: "``), the new output is ``header + g.strip()``; otherwise it is
   ``g`` unchanged;
2. if ``o`` occurs in the segment text, its first occurrence is replaced by the new output
   (text the trace put around the output stays); otherwise the whole segment becomes the new
   output.

The same new text is used wherever that id appears in round r+1, so shared segments stay
byte-identical across agents. Private segments (e.g. an agent's memory of what it said) and
round 1 are sent as recorded. A segment that becomes empty is dropped. If ``src`` has no
generated output for round r (failed request) the recorded text is kept.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
from tqdm import tqdm

from sglang_tokendance.hints import build_request
from sglang_tokendance.replay.client import (
    ServerError,
    fetch_server_info,
    fetch_stats,
    generate,
    make_session,
)
from sglang_tokendance.routing import routing_headers
from sglang_tokendance.trace.format import Segment, Trace, TraceRequest

logger = logging.getLogger(__name__)

MODES = ("tokendance", "pic", "off")
_HEADER = re.compile(r"^\s*[^\n:]{1,120}: ")


@dataclass(slots=True)
class ReplayOptions:
    """How to replay: mode, loop, concurrency, round limit, timeouts, progress bars."""

    mode: str = "tokendance"
    closed_loop: bool = False
    concurrency: int | None = None
    max_rounds: int | None = None
    timeout_s: float = 1800.0
    honor_arrival: bool = True
    progress: bool = True
    round_prefix: str = ""
    # The routing key (hint ``group`` and X-SMG-Routing-Key header); None: the trace header's
    # ``group``, else the server derives it from the round ids (routing.default_group).
    group: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")


@dataclass(slots=True)
class SentRequest:
    """What was sent for one agent in one round (the prompt, its segments and the hint)."""

    round: int
    agent: str
    text: str
    segments: list[Segment]
    kv_hints: dict[str, Any] | None
    max_tokens: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class RequestRecord:
    """The outcome of one request (token counts from SGLang's meta_info)."""

    round: int
    agent: str
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class RoundRecord:
    """One replayed round: its wall latency and its requests in trace order."""

    round: int
    latency_ms: float
    requests: list[RequestRecord] = field(default_factory=list)


class ReplayResult(NamedTuple):
    """Everything a replay measured (see :mod:`sglang_tokendance.replay.report`)."""

    rounds: list[RoundRecord]
    wall_s: float
    stats: dict[str, Any] | None
    server_info: dict[str, Any] | None
    sent: list[SentRequest]


def new_output(recorded: str | None, generated: str) -> str:
    """The closed-loop output text: ``generated`` in the recorded output's speaker wrapper."""
    m = _HEADER.match(recorded or "")
    return m.group(0) + generated.strip() if m else generated


def closed_loop_segments(
    req: TraceRequest,
    generated: dict[str, str],
    recorded: dict[str, str | None],
) -> list[Segment]:
    """``req``'s segments with the previous round's outputs replaced (see the module doc).

    Args:
        req: a request of round r+1.
        generated: agent -> text the server generated in round r.
        recorded: agent -> recorded output of round r (None if the trace has none).
    """
    prev = req.round - 1
    out: list[Segment] = []
    for seg in req.segments:
        src = seg.source or (seg.id.rsplit("/", 1)[-1] if seg.id else None)
        if seg.type != "shared" or seg.id != f"r{prev}/{src}" or src not in generated:
            out.append(seg)
            continue
        new = new_output(recorded.get(src), generated[src])
        rec = recorded.get(src)
        text = seg.text.replace(rec, new, 1) if rec and rec in seg.text else new
        if text:
            out.append(Segment(seg.type, text, seg.id, seg.source, dict(seg.extra)))
    return out


def build_sent(
    req: TraceRequest,
    segments: list[Segment],
    mode: str,
    size: int,
    prefix: str = "",
    group: str | None = None,
    off_hints: bool = False,
) -> SentRequest:
    """The prompt text (and hint unless mode is off; round id ``<prefix>r<N>``) of a request,
    with its routing header (every mode: the gateway routes mode off the same way).
    ``off_hints``: mode off keeps the hint too (for a mode-off server, which only records it)."""
    triples = [(s.type, s.id, s.text) for s in segments]
    round_id = f"{prefix}r{req.round}"
    text, hints = build_request(triples, round_id, size, req.agent, group=group)
    headers = routing_headers(hints)
    if mode == "off" and not off_hints:
        hints = None
    return SentRequest(req.round, req.agent, text, segments, hints, req.max_tokens, headers)


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    sent: SentRequest,
    delay_s: float,
    sem: asyncio.Semaphore,
    bar: tqdm | None,
) -> RequestRecord:
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    rec = RequestRecord(sent.round, sent.agent)
    async with sem:
        try:
            res = await generate(
                session, url, sent.text, sent.kv_hints, sent.max_tokens, headers=sent.headers
            )
        except (TimeoutError, ServerError, aiohttp.ClientError, OSError, ValueError) as e:
            rec.error = f"{type(e).__name__}: {e}"
            logger.error("round %d agent %s failed: %s", sent.round, sent.agent, rec.error)
        else:
            rec.text = res.text
            rec.prompt_tokens, rec.cached_tokens = res.prompt_tokens, res.cached_tokens
            rec.completion_tokens = res.completion_tokens
            rec.ttft_ms = None if res.ttft_s is None else res.ttft_s * 1000.0
            rec.latency_ms = res.latency_s * 1000.0
    if bar is not None:
        bar.update(1)
    return rec


async def replay_async(
    trace: Trace,
    url: str,
    opts: ReplayOptions,
    on_request: Callable[[SentRequest], None] | None = None,
) -> ReplayResult:
    """Replay ``trace`` against the server at ``url`` (see the module doc)."""
    rounds = [(r, reqs) for r, reqs in trace.rounds().items() if reqs]
    if opts.max_rounds is not None:
        rounds = rounds[: opts.max_rounds]
    widest = max((len(reqs) for _, reqs in rounds), default=1)
    group = opts.group if opts.group is not None else trace.header.group
    sem = asyncio.Semaphore(opts.concurrency or widest)
    records: list[RoundRecord] = []
    all_sent: list[SentRequest] = []
    generated: dict[str, str] = {}
    recorded: dict[str, str | None] = {}
    async with make_session(opts.timeout_s, opts.concurrency or widest) as session:
        info = await fetch_server_info(session, url)
        off_hints = (
            opts.mode == "off" and ((await fetch_stats(session, url)) or {}).get("mode") == "off"
        )
        t_start = time.perf_counter()
        for rnd, reqs in rounds:
            sent = []
            for req in reqs:
                segs = req.segments
                if opts.closed_loop and generated:
                    segs = closed_loop_segments(req, generated, recorded)
                sent.append(
                    build_sent(req, segs, opts.mode, len(reqs), opts.round_prefix, group, off_hints)
                )
            for s in sent:
                if on_request is not None:
                    on_request(s)
            all_sent.extend(sent)
            bar = tqdm(total=len(sent), desc=f"round {rnd}", unit="req", disable=not opts.progress)
            t0 = time.perf_counter()
            tasks = [
                _one(session, url, s, (r.arrival_s or 0.0) if opts.honor_arrival else 0.0, sem, bar)
                for s, r in zip(sent, reqs, strict=True)
            ]
            done = await asyncio.gather(*tasks)
            bar.close()
            records.append(RoundRecord(rnd, (time.perf_counter() - t0) * 1000.0, list(done)))
            generated = {d.agent: d.text for d in done if d.error is None}
            recorded = {r.agent: r.output for r in reqs}
        wall = time.perf_counter() - t_start
        stats = await fetch_stats(session, url)
    return ReplayResult(records, wall, stats, info, all_sent)


def replay(
    trace: Trace,
    url: str,
    opts: ReplayOptions | None = None,
    on_request: Callable[[SentRequest], None] | None = None,
) -> ReplayResult:
    """Synchronous wrapper of :func:`replay_async`."""
    return asyncio.run(replay_async(trace, url, opts or ReplayOptions(), on_request))
