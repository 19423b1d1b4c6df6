"""The narrow interface the KV Collector plans against (a Protocol, so tests can fake it).

:class:`~.radix.TokenDanceRadixCache` implements it; the collector never reaches into pools or
the store, and the unit tests of its round logic use a small fake.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from .authored import AuthoredHit
from .nodes import AllGatherNode, Mirror
from .rows import Range
from .store import SegmentInsert


class CollectorCache(Protocol):
    """What the collector asks of the cache."""

    publish_outputs: bool  # author policy: finished outputs become masters

    def lookup_segment(self, token_ids: Sequence[int]) -> AllGatherNode | None: ...

    def insert_segment(
        self, token_ids: Sequence[int], slots: torch.Tensor, slot_positions: torch.Tensor
    ) -> SegmentInsert: ...

    def find_authored(self, token_ids: Sequence[int]) -> AuthoredHit | None: ...

    def attach_mirror(
        self,
        round_id: str,
        agent: str,
        node: AllGatherNode,
        indices: torch.Tensor | Sequence[int],
        slots: torch.Tensor | Sequence[int],
        *,
        req_pool_idx: int | None = None,
        at: int = 0,
    ) -> Mirror: ...

    def claim_row_ranges(self, req_pool_idx: int, ranges: Iterable[Range]) -> None: ...

    def pin_segment(self, node: AllGatherNode, req_pool_idx: int | None = None) -> None: ...

    def release_match_pins(self, req: Any) -> None: ...

    def copy_slots(self, slots: torch.Tensor) -> torch.Tensor | None: ...

    def row_slots(self, req_pool_idx: int, index: torch.Tensor) -> torch.Tensor: ...

    def repoint_row(
        self,
        req_pool_idx: int,
        index: torch.Tensor,
        master_slots: torch.Tensor,
        nodes: Sequence[AllGatherNode],
        round_id: str,
        *,
        no_diff: Sequence[AllGatherNode] = (),
    ) -> int: ...
