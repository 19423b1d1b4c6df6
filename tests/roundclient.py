"""A small HTTP client for round tests: sends a trace round's requests concurrently."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import requests

from sglang_tokendance.hints import build_request
from sglang_tokendance.routing import routing_headers
from sglang_tokendance.trace import Trace, TraceRequest, generative_agents


def segments_of(req: TraceRequest) -> list[tuple[str, str | None, str]]:
    return [(s.type, s.id, s.text) for s in req.segments]


def generate(url: str, body: dict[str, Any], timeout: float = 300) -> requests.Response:
    headers = routing_headers(body.get("kv_hints"))  # X-SMG-Routing-Key, as clients send it
    return requests.post(url + "/generate", json=body, timeout=timeout, headers=headers)


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


class Simulation(NamedTuple):
    """What :func:`simulate` sent and got: responses and distinct shared segments per round."""

    responses: list[list[dict[str, Any]]]
    segments: list[int]


def simulate(
    url: str, group: str, rounds: int, agents: int = 3, seed: int = 1, max_tokens: int = 10
) -> Simulation:
    """A closed-loop simulation: round 1 from a generated trace, then every round's shared
    segments wrap the previous round's generated texts ("\nname: text\n", in a rotated
    order per agent). Round ids ``<group>/r<N>``, hint group ``group``. ``max_tokens`` of 10
    lets the author policy find an output again inside its re-tokenized wrapper."""
    reqs = generative_agents(agents=agents, rounds=1, seed=seed, private_words=20).rounds()[1]
    sp = {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    out: list[list[dict[str, Any]]] = []
    segments: list[int] = []
    said: dict[str, str] = {}
    for n in range(1, rounds + 1):
        bodies, ids = [], set()
        for i, r in enumerate(reqs):
            if n == 1:
                segs = segments_of(r)
            else:
                order = [reqs[(i + j) % len(reqs)].agent for j in range(len(reqs))]
                segs = [("private", None, f"You are {r.agent}. Earlier today:")]
                segs += [("shared", f"{group}/r{n - 1}/{a}", said[a]) for a in order]
                segs.append(("private", None, f" {r.agent} replies:"))
            text, env = build_request(segs, f"{group}/r{n}", len(reqs), r.agent, group=group)
            bodies.append({"text": text, "kv_hints": env, "sampling_params": sp})
            ids.update(sid for typ, sid, _ in segs if typ == "shared")
        segments.append(len(ids))
        res = run_round(url, bodies)
        said = {r.agent: f"\n{r.agent}: {o['text']}\n" for r, o in zip(reqs, res, strict=True)}
        out.append(res)
    return Simulation(out, segments)


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
