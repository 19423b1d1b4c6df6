"""A small HTTP client for round tests: sends a trace round's requests concurrently."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from sglang_tokendance.hints import build_request
from sglang_tokendance.trace import Trace, TraceRequest


def segments_of(req: TraceRequest) -> list[tuple[str, str | None, str]]:
    return [(s.type, s.id, s.text) for s in req.segments]


def generate(url: str, body: dict[str, Any], timeout: float = 300) -> requests.Response:
    return requests.post(url + "/generate", json=body, timeout=timeout)


def round_bodies(
    reqs: list[TraceRequest], round_id: str, hints: bool, max_tokens: int
) -> list[dict[str, Any]]:
    bodies = []
    for r in reqs:
        text, env = build_request(segments_of(r), round_id, len(reqs), r.agent)
        body: dict[str, Any] = {
            "text": text,
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        }
        if hints:
            body["kv_hints"] = env
        bodies.append(body)
    return bodies


def run_round(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=len(bodies)) as ex:
        resps = list(ex.map(lambda b: generate(url, b), bodies))
    for r in resps:
        assert r.status_code == 200, r.text
    return [r.json() for r in resps]


def run_trace(
    url: str, trace: Trace, hints: bool, max_tokens: int = 4, prefix: str = "t"
) -> list[list[dict[str, Any]]]:
    """Open-loop replay of every round; returns the responses per round (agent order)."""
    out = []
    for rnd, reqs in trace.rounds().items():
        out.append(run_round(url, round_bodies(reqs, f"{prefix}{rnd}", hints, max_tokens)))
    return out


def stats(url: str, settle_s: float = 10.0) -> dict[str, Any]:
    """GET /tokendance/stats; retried until the server is idle enough to check integrity."""
    deadline = time.monotonic() + settle_s
    while True:
        r = requests.get(url + "/tokendance/stats", timeout=60)
        r.raise_for_status()
        body = r.json()
        if body.get("integrity") != "busy" or time.monotonic() > deadline:
            return body
        time.sleep(0.1)
