"""Async HTTP client for SGLang's public routes: /generate (streamed), server info, stats.

Only public interfaces are used. ``/generate`` is called with ``stream: true`` so the time to the
first output token is measured on the client (the first SSE chunk that carries output tokens);
token counts (``prompt_tokens``, ``cached_tokens``, ``completion_tokens``) come from the final
chunk's ``meta_info``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import aiohttp
import orjson

logger = logging.getLogger(__name__)

STATS_PATH = "/tokendance/stats"


class ServerError(RuntimeError):
    """The server answered a request with an error status (message includes the body)."""

    def __init__(self, status: int, body: str, what: str = "/generate") -> None:
        self.status = status
        self.body = body
        super().__init__(f"{what} returned HTTP {status}: {body[:2000]}")


class GenerateResult(NamedTuple):
    """One finished /generate request."""

    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    meta_info: dict[str, Any]


def generate_payload(
    text: str,
    kv_hints: dict[str, Any] | None,
    max_new_tokens: int,
    *,
    stream: bool = True,
) -> dict[str, Any]:
    """The JSON body of a greedy /generate request (``kv_hints`` only when given)."""
    body: dict[str, Any] = {
        "text": text,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": int(max_new_tokens)},
        "stream": stream,
    }
    if kv_hints is not None:
        body["kv_hints"] = kv_hints
    return body


def _result(
    text: str, meta: dict[str, Any], ttft_s: float | None, latency_s: float
) -> GenerateResult:
    return GenerateResult(
        text=text,
        prompt_tokens=int(meta.get("prompt_tokens") or 0),
        cached_tokens=int(meta.get("cached_tokens") or 0),
        completion_tokens=int(meta.get("completion_tokens") or 0),
        ttft_s=ttft_s,
        latency_s=latency_s,
        meta_info=meta,
    )


async def generate(
    session: aiohttp.ClientSession,
    url: str,
    text: str,
    kv_hints: dict[str, Any] | None,
    max_new_tokens: int,
    *,
    stream: bool = True,
    headers: dict[str, str] | None = None,
) -> GenerateResult:
    """Send one request to ``url``/generate and wait for the whole answer (``headers``: e.g.
    the routing key, :func:`sglang_tokendance.routing.routing_headers`).

    Raises:
        ServerError: on a non-200 answer or an error object inside the stream.
    """
    body = generate_payload(text, kv_hints, max_new_tokens, stream=stream)
    t0 = time.perf_counter()
    async with session.post(url.rstrip("/") + "/generate", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise ServerError(resp.status, await resp.text())
        if not stream:
            obj = orjson.loads(await resp.read())
            return _result(obj["text"], obj.get("meta_info", {}), None, time.perf_counter() - t0)
        out, meta, ttft = "", {}, None
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = orjson.loads(data)
            if "error" in chunk:
                raise ServerError(200, data.decode(errors="replace"), "/generate stream")
            meta = chunk.get("meta_info", meta)
            ids = chunk.get("output_ids") or []
            if ttft is None and ids:
                ttft = time.perf_counter() - t0
            # Cumulative chunks (SGLang's default) carry all output ids so far; incremental
            # ones (--incremental-streaming-output) carry only the new ones.
            if len(ids) >= int(meta.get("completion_tokens") or 0):
                out = chunk.get("text", "")
            else:
                out += chunk.get("text", "")
        return _result(out, meta, ttft, time.perf_counter() - t0)


async def get_json(session: aiohttp.ClientSession, url: str, path: str) -> dict[str, Any] | None:
    """GET ``url``+``path`` as JSON; None when the route does not exist (404) or fails."""
    try:
        async with session.get(url.rstrip("/") + path) as resp:
            if resp.status != 200:
                logger.debug("GET %s: HTTP %d", path, resp.status)
                return None
            obj = orjson.loads(await resp.read())
    except (aiohttp.ClientError, orjson.JSONDecodeError) as e:
        logger.debug("GET %s failed: %s", path, e)
        return None
    return obj if isinstance(obj, dict) else None


async def fetch_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The TokenDance stats (``GET /tokendance/stats``), or None where the server lacks them."""
    return await get_json(session, url, STATS_PATH)


async def fetch_server_info(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """SGLang's ``/server_info`` (resolved server args plus live state), or None."""
    return await get_json(session, url, "/server_info")


# SGLang's HTTP server closes a keep-alive connection after 5 idle seconds
# (SGLANG_TIMEOUT_KEEP_ALIVE); aiohttp keeps one for 15 by default, so a request sent on a
# connection the server is closing that instant fails with "Server disconnected". Agents of a
# round finish seconds apart, so the next round meets such connections: drop them first.
KEEPALIVE_S = 2.0


def make_session(timeout_s: float, limit: int) -> aiohttp.ClientSession:
    """An aiohttp session with a total per-request timeout and a connection limit; idle
    connections are dropped before the server's keep-alive timeout (:data:`KEEPALIVE_S`)."""
    connector = aiohttp.TCPConnector(limit=max(1, limit), keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s), connector=connector
    )
