"""The collector's per-round record and the small results it hands back (pure data)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from sglang_tokendance.cache.row_plan import SharedUse


class AbortResult(NamedTuple):
    """What an abort changed: requests now free to run, and waiting requests it dropped."""

    freed: list[Any]
    dropped: list[Any]


@dataclass(slots=True)
class RoundState:
    """The collector's record of one released round."""

    round_id: str
    seg_tokens: dict[str, tuple[int, ...]]
    recompute: dict[str, torch.Tensor] = field(default_factory=dict)
    nodes: dict[str, Any] = field(default_factory=dict)  # seg_id -> authored master
    masters_pending: set[str] = field(default_factory=set)  # rids of master agents
    # reqs waiting for masters, each with the master agents (rids) it still waits for
    waiting: list[tuple[Any, set[str]]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    released: bool = False  # the barrier released the round (start_round ran)
    claimed: dict[str, str] = field(default_factory=dict)  # seg_id -> its master agent's rid
    hits: dict[str, Any] = field(default_factory=dict)  # seg_id -> authored hit (arrival)

    def idle(self) -> bool:
        """Nothing of the round runs as a master agent and nothing waits."""
        return not self.masters_pending and not self.waiting


def narrow(use: SharedUse, hit: Any) -> None:
    """Shrink ``use`` to the span an authored master covers; the wrapper tokens go fresh."""
    use.start += hit.seg_offset
    use.end = use.start + hit.length
    use.node = hit.node
    use.node_offset = hit.node_offset
