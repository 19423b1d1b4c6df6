"""SegmentStore: masters and mirrors of shared segments, with exact ownership and accounting.

The store owns the slots of its masters and mirrors and gives them back through ``free_fn`` (the
KV allocator's ``free``); it knows nothing else of SGLang. Each master is in one of two states,
and the store keeps the token totals of both up to date on every change, so the radix cache can
add them to its own ``evictable_size()`` / ``protected_size()`` in O(1)::

    evictable  : pin_count == 0 and no mirrors      -> may be evicted (LRU by last_access)
    protected  : pinned by a running request, or read through by at least one mirror

Mirror slots are always protected; they go when released or when their master is evicted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from .audit import segment_stats, store_problems
from .census import Chunk, IntegrityError, multiply_owned
from .mirror_ops import MirrorOps
from .nodes import (
    AllGatherNode,
    HashFn,
    Mirror,
    MirrorKey,
    SegmentId,
    as_slot_tensor,
    token_hash,
)

logger = logging.getLogger(__name__)

FreeFn = Callable[[torch.Tensor], None]
TokenIds = Sequence[int] | torch.Tensor

__all__ = ["IntegrityError", "SegmentInsert", "SegmentStore"]


class SegmentInsert(NamedTuple):
    """Result of :meth:`SegmentStore.insert`: the node, and whether the given slots went into it
    (``False``: an equal segment existed, the caller still owns the slots it passed)."""

    node: AllGatherNode
    inserted: bool


def _as_tokens(token_ids: TokenIds) -> tuple[int, ...]:
    # tolist() / tuple() run in C: no per-token Python loop on the lookup path.
    tokens = tuple(token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)
    if not tokens:
        raise ValueError("a segment needs at least one token")
    return tokens


class SegmentStore(MirrorOps):
    """Masters (all-gather nodes) found by content hash, and per-(round, agent) mirrors.

    Args:
        free_fn: gives slots back to the KV allocator (called once per release/eviction).
        hash_fn: content hash of a token-id tuple; collisions are tolerated (buckets).
        clock: timestamp source for ``last_access``. The radix cache passes ``time.monotonic``,
            the clock its own tree nodes use, so masters and radix leaves share one LRU order.
    """

    def __init__(
        self,
        free_fn: FreeFn,
        *,
        hash_fn: HashFn = token_hash,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = free_fn
        self._hash = hash_fn
        self._clock = clock
        self._last_time = -math.inf
        self._next_id = 0
        self._buckets: dict[int, list[AllGatherNode]] = {}
        self._nodes: dict[SegmentId, AllGatherNode] = {}
        self._mirrors: dict[MirrorKey, Mirror] = {}
        self._evictable: set[AllGatherNode] = set()  # identity-hashed (eq=False)
        self.evictions = 0
        self.evicted_tokens = 0
        self.evictable_tokens = 0  # master tokens of evictable nodes
        self.protected_master_tokens = 0  # master tokens of pinned or mirrored nodes
        self.mirror_tokens = 0  # slots held by mirrors

    # ---- bookkeeping ------------------------------------------------------------------------
    @property
    def protected_tokens(self) -> int:
        return self.protected_master_tokens + self.mirror_tokens

    def _now(self) -> float:
        # The radix tree stamps time.monotonic() directly; we read the same clock but force
        # strict increase among masters, so equal readings never make LRU order ambiguous.
        t = self._clock()
        if t <= self._last_time:
            t = math.nextafter(self._last_time, math.inf)
        self._last_time = t
        return t

    def touch(self, node: AllGatherNode) -> None:
        node.last_access = self._now()

    def _leave(self, node: AllGatherNode) -> None:
        """Remove ``node``'s master tokens from the totals (call before changing its state)."""
        if node.evictable:
            self.evictable_tokens -= node.length
            self._evictable.discard(node)
        elif not node.evicted:
            self.protected_master_tokens -= node.length

    def _enter(self, node: AllGatherNode) -> None:
        """Add ``node``'s master tokens back according to its new state."""
        if node.evictable:
            self.evictable_tokens += node.length
            self._evictable.add(node)
        elif not node.evicted:
            self.protected_master_tokens += node.length

    def _check_live(self, node: AllGatherNode) -> None:
        if node.evicted or self._nodes.get(node.node_id) is not node:
            raise ValueError(f"{node!r} is not a live node of this store")

    # ---- segments ---------------------------------------------------------------------------
    def _find(self, h: int, tokens: tuple[int, ...]) -> AllGatherNode | None:
        for node in self._buckets.get(h, ()):
            if node.token_ids == tokens:  # verify: a hash hit alone never aliases
                return node
        return None

    def lookup(self, token_ids: TokenIds) -> AllGatherNode | None:
        """The live node holding exactly ``token_ids`` (refreshing its last access), or None."""
        tokens = _as_tokens(token_ids)
        node = self._find(self._hash(tokens), tokens)
        if node is not None:
            self.touch(node)
        return node

    def insert(
        self, token_ids: TokenIds, slots: torch.Tensor, slot_positions: torch.Tensor
    ) -> SegmentInsert:
        """Store a master for ``token_ids`` unless an equal segment exists.

        Args:
            token_ids: the segment's token ids (length ``L`` >= 1).
            slots: ``L`` KV slots holding its KV; the store takes them only if ``inserted``.
            slot_positions: ``L`` positions the keys in ``slots`` were rotated at.

        Raises:
            ValueError: on length mismatches or slot 0 (SGLang's padding slot).
        """
        tokens = _as_tokens(token_ids)
        h = self._hash(tokens)
        existing = self._find(h, tokens)
        if existing is not None:
            self.touch(existing)
            return SegmentInsert(existing, False)
        owned = as_slot_tensor(slots, "slots")
        pos = torch.as_tensor(slot_positions).reshape(-1).to(torch.int32, copy=True)
        if owned.numel() != len(tokens) or pos.numel() != len(tokens):
            raise ValueError(
                f"segment of {len(tokens)} tokens got {owned.numel()} slots and "
                f"{pos.numel()} slot positions"
            )
        if int(owned.min()) < 1:
            raise ValueError("slot 0 is SGLang's padding slot and cannot hold a master")
        node = AllGatherNode(SegmentId(self._next_id), tokens, h, owned, pos)
        self._next_id += 1
        self._buckets.setdefault(h, []).append(node)
        self._nodes[node.node_id] = node
        self._enter(node)
        self.touch(node)
        return SegmentInsert(node, True)

    def nodes(self) -> Iterator[AllGatherNode]:
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, node_id: SegmentId) -> AllGatherNode | None:
        return self._nodes.get(node_id)

    # ---- pins and eviction ------------------------------------------------------------------
    def pin(self, node: AllGatherNode) -> None:
        """A running request reads ``node``'s master slots: keep it (protected)."""
        self._check_live(node)
        self._leave(node)
        node.pin_count += 1
        self._enter(node)
        self.touch(node)

    def unpin(self, node: AllGatherNode) -> None:
        """Undo one :meth:`pin`. Raises ValueError if ``node`` is not pinned."""
        self._check_live(node)
        if node.pin_count <= 0:
            raise ValueError(f"unpin of {node!r}, which is not pinned")
        self._leave(node)
        node.pin_count -= 1
        self._enter(node)
        self.touch(node)

    def evictable_nodes(self) -> list[AllGatherNode]:
        """Unpinned, unmirrored masters, least recently used first."""
        return sorted(self._evictable, key=lambda n: n.last_access)

    def evict_node(self, node: AllGatherNode) -> int:
        """Free ``node``'s master slots and the slots of all its mirrors.

        Returns:
            the number of slots freed.

        Raises:
            ValueError: if ``node`` is pinned (a running request reads it) or not live.
        """
        self._check_live(node)
        if node.pin_count:
            raise ValueError(f"cannot evict {node!r}: pinned by {node.pin_count} request(s)")
        mirror_slots = [self._drop_mirror(m) for m in list(node.mirrors.values())]
        self._leave(node)
        self._unlink(node)
        self.evictions += 1
        self.evicted_tokens += node.length
        return self._free_all([node.master_slots, *mirror_slots])

    def _unlink(self, node: AllGatherNode) -> None:
        bucket = self._buckets[node.content_hash]
        bucket.remove(node)
        if not bucket:
            del self._buckets[node.content_hash]
        del self._nodes[node.node_id]
        node.evicted = True

    def clear(self) -> None:
        """Forget everything WITHOUT freeing (the allocator was cleared wholesale)."""
        for node in self._nodes.values():
            node.evicted = True
        self._buckets.clear()
        self._nodes.clear()
        self._mirrors.clear()
        self._evictable.clear()
        self.evictable_tokens = self.protected_master_tokens = self.mirror_tokens = 0

    # ---- reporting --------------------------------------------------------------------------
    def totals(self) -> tuple[int, int, int]:
        """The running totals (evictable master, protected master, mirror tokens)."""
        return self.evictable_tokens, self.protected_master_tokens, self.mirror_tokens

    def stats(self, round_id: str | None = None) -> dict[str, float | int | None]:
        """Storage totals; with ``round_id``, the view of that round's mirrors only."""
        mirrors = [
            m for m in self._mirrors.values() if round_id is None or m.key.round_id == round_id
        ]
        nodes = list(self._nodes.values()) if round_id is None else list({m.node for m in mirrors})
        out = segment_stats(nodes, mirrors)
        out.update(
            evictions=self.evictions,
            evicted_tokens=self.evicted_tokens,
            evictable_tokens=self.evictable_tokens,
            protected_tokens=self.protected_tokens,
        )
        return out

    def owned_chunks(self) -> list[Chunk]:
        """Every slot the store owns, as labelled chunks for a census."""
        chunks: list[Chunk] = [
            (f"master {n.node_id}", n.master_slots) for n in self._nodes.values()
        ]
        chunks += [(f"mirror {tuple(k)}", m.slots) for k, m in self._mirrors.items()]
        return chunks

    def integrity_problems(self) -> list[str]:
        """Every broken invariant of the store, one line each (empty when sound)."""
        problems = store_problems(
            self._hash, self._buckets, self._nodes, self._mirrors, self._evictable, self.totals()
        )
        problems += multiply_owned(self.owned_chunks())
        return problems

    def check_integrity(self) -> None:
        """Raise :class:`IntegrityError` naming every broken invariant of the store."""
        problems = self.integrity_problems()
        if problems:
            raise IntegrityError("SegmentStore integrity:\n  " + "\n  ".join(problems))
