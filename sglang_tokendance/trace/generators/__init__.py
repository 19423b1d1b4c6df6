"""Seeded workload generators that write valid All-Gather traces (no model needed: each
request's ``output`` holds a synthesized utterance, which is the next round's shared text)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sglang_tokendance.trace.format import Trace
from sglang_tokendance.trace.generators.common import GenParams
from sglang_tokendance.trace.generators.ga import generative_agents
from sglang_tokendance.trace.generators.society import agent_society

WORKLOADS: dict[str, Callable[..., Trace]] = {
    "generative_agents": generative_agents,
    "agent_society": agent_society,
}
ALIASES: dict[str, str] = {
    "ga": "generative_agents",
    "generative-agents": "generative_agents",
    "society": "agent_society",
    "agent-society": "agent_society",
}


def resolve_workload(name: str) -> str:
    """The canonical workload name for ``name`` or an alias; ValueError if unknown."""
    key = ALIASES.get(name, name)
    if key not in WORKLOADS:
        known = ", ".join([*WORKLOADS, *ALIASES])
        raise ValueError(f"unknown workload {name!r} (known: {known})")
    return key


def generate(workload: str, **params: Any) -> Trace:
    """Generate a trace of ``workload`` (name or alias) with the generator's keyword parameters:
    agents, rounds, seed, private_words, shared_words, shuffle, max_tokens, arrival_jitter_s."""
    return WORKLOADS[resolve_workload(workload)](**params)


__all__ = [
    "ALIASES",
    "WORKLOADS",
    "GenParams",
    "agent_society",
    "generate",
    "generative_agents",
    "resolve_workload",
]
