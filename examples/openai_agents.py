"""One All-Gather round of N agents through the OpenAI-compatible API, with TokenDance hints.

Every agent's prompt: its persona (private), every agent's observation (shared segments
``r0/<agent>``, in an order of its own) and its instruction (private). The N requests go out
together with the ``openai`` client; the hint travels as an extra body field::

    client.completions.create(..., extra_body={"kv_hints": envelope},
                              extra_headers={"X-SMG-Routing-Key": group})

    python examples/openai_agents.py --url URL [--agents 4] [--route completions|chat|separator]
        [--round-id oa1] [--group G] [--max-tokens 16]

``--route chat`` sends persona as the system message and the rest as the user message (the
hint's spans then cover the joined message texts); ``--route separator`` sends the hint inside
the prompt text (``hints_text.build_separated``) for clients that can send nothing but text. The
server must run with ``--enable-tokendance`` and the plugin's OpenAI hooks.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import openai
import requests

from sglang_tokendance.config import DEFAULT_SEPARATOR
from sglang_tokendance.hints import build_request
from sglang_tokendance.hints_text import build_separated
from sglang_tokendance.routing import ROUTING_HEADER, default_group, routing_headers

NAMES = ["Amara Okafor", "Bastian Lindqvist", "Chiara Nakamura", "Dmitri Haddad", "Elena Moreau"]
NAMES += ["Farid Castillo", "Greta Patel", "Hiroshi Brennan", "Imani Silva", "Jonas Yilmaz"]
SEEN = ["fixing a bicycle", "reading by the river", "carrying groceries", "painting a fence"]
Seg = tuple[str, str | None, str]


def agent_id(name: str) -> str:
    return name.lower().replace(" ", "_")


def agent_parts(names: list[str], i: int) -> tuple[list[Seg], list[Seg]]:
    """(system segments, user segments) of agent ``i``: persona | observations + instruction."""
    ids = [agent_id(n) for n in names]
    system = [("private", None, f"You are {names[i]}, a resident of Maple Hollow.\n")]
    user: list[Seg] = [("private", None, "Here is what you observe around town:")]
    order = list(range(i, len(names))) + list(range(i))  # own order: shared text moves around
    for j in order:
        user.append(("shared", f"r0/{ids[j]}", f"\n{names[j]} is {SEEN[j % len(SEEN)]}."))
    user.append(("private", None, f"\n\nWhat does {names[i]} say to everyone?\n{names[i]}:"))
    return system, user


async def one(
    client: openai.AsyncOpenAI, model: str, names: list[str], i: int, args: argparse.Namespace
) -> tuple[str, Any]:
    system, user = agent_parts(names, i)
    agent, n = agent_id(names[i]), len(names)
    common: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "temperature": 0}
    if args.route == "separator":
        prompt = build_separated(system + user, args.round_id, n, agent, args.separator, args.group)
        group = args.group or default_group(args.round_id)
        common["extra_headers"] = {ROUTING_HEADER: group}  # the gateway's routing key
        r = await client.completions.create(prompt=prompt, **common)
        return r.choices[0].text, r.usage
    text, env = build_request(system + user, args.round_id, n, agent, group=args.group)
    common["extra_headers"] = routing_headers(env)  # X-SMG-Routing-Key for the gateway
    if args.route == "completions":
        r = await client.completions.create(prompt=text, extra_body={"kv_hints": env}, **common)
        return r.choices[0].text, r.usage
    messages = [
        {"role": "system", "content": "".join(t for _, _, t in system)},
        {"role": "user", "content": "".join(t for _, _, t in user)},
    ]
    r = await client.chat.completions.create(
        messages=messages, extra_body={"kv_hints": env}, **common
    )
    return r.choices[0].message.content or "", r.usage


async def run(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="EMPTY")
    model = (await client.models.list()).data[0].id
    names = NAMES[: args.agents]
    results = await asyncio.gather(*(one(client, model, names, i, args) for i in range(len(names))))
    await client.close()
    print(f"round {args.round_id} via /v1/{'completions' if args.route != 'chat' else 'chat'}")
    for name, (text, usage) in zip(names, results, strict=True):
        print(f"  {name}: {text.strip()!r} (prompt tokens {usage.prompt_tokens})")
    stats = requests.get(base + "/tokendance/stats", timeout=30)
    if stats.status_code == 200:
        rounds = {r.get("round"): r for r in stats.json().get("per_round") or []}
        seen = rounds.get(args.round_id)
        agents = seen.get("agents") if seen else 0
        print(f"server: round {args.round_id} seen with {agents} hinted agents")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="SGLang server URL")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--route", choices=("completions", "chat", "separator"), default="completions")
    ap.add_argument("--round-id", default="oa1", help="the round id sent in the hints")
    ap.add_argument("--group", default=None, help="routing key (default: from the round id)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--separator", default=DEFAULT_SEPARATOR, help="for --route separator")
    args = ap.parse_args(argv)
    if not 2 <= args.agents <= len(NAMES):
        ap.error(f"--agents must be in 2..{len(NAMES)}")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
