"""The routing key of a round: its group, its default, and where it sends a request.

A round is shared only where its masters are, so every round of one simulation must reach the
same DP rank (inside a server) and the same worker (behind SGLang's gateway ``smg``). The hint's
optional ``group`` names the simulation; :func:`default_group` derives one from the round id
when it is absent. The server pins a hinted request to DP rank :func:`stable_rank`; clients
send the group as the ``X-SMG-Routing-Key`` header (:func:`routing_headers`), which the
gateway's ``consistent_hashing`` policy reads.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sglang_tokendance.hints import AgentHint, find_action

ROUTING_HEADER = "X-SMG-Routing-Key"
_GROUP_SEPARATORS = "/:"
_ROUND_NUMBER_TAIL = "0123456789-_. "


def default_group(round_id: str | int) -> str:
    """The routing group of a round that names none: its simulation, read off the round id.

    The rule: the part before the last ``/`` or ``:`` if the id has one (``"sim-7/r3"`` ->
    ``"sim-7"``); otherwise the id without its trailing round number (digits and ``-_. ``:
    ``"t3"`` -> ``"t"``, ``"debate-12"`` -> ``"debate"``); an id that is only a number is its
    own group (``"3"`` -> ``"3"``). So the rounds of one simulation share a group by default
    as long as their ids differ only in the trailing number; send ``group`` explicitly where
    they do not.
    """
    rid = str(round_id)
    cut = max(rid.rfind(c) for c in _GROUP_SEPARATORS)
    if cut > 0:
        return rid[:cut]
    stem = rid.rstrip(_ROUND_NUMBER_TAIL)
    return stem or rid


def group_of(hint: AgentHint) -> str:
    """The hint's routing group: its ``group``, or :func:`default_group` of its round."""
    return hint.group if hint.group is not None else default_group(hint.round)


def stable_rank(group: str, n: int) -> int:
    """The rank in ``[0, n)`` a group is pinned to (a hash stable across processes and runs)."""
    digest = hashlib.sha1(group.encode()).digest()
    return int.from_bytes(digest[:8], "big") % max(1, n)


def routing_headers(kv_hints: dict[str, Any] | None) -> dict[str, str]:
    """The ``X-SMG-Routing-Key`` header for a request with these hints ({} without a hint)."""
    if not kv_hints:
        return {}
    payload = find_action(kv_hints)
    if not isinstance(payload, dict) or "round" not in payload:
        return {}
    group = payload.get("group")
    return {ROUTING_HEADER: str(group) if group else default_group(payload["round"])}
