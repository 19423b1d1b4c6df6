"""All-gather nodes (masters) and mirrors: the records of diff-aware storage.

A shared segment of length ``L`` is stored once as a *master*: ``L`` ordinary KV pool slots plus
the position each slot's K was rotated at. An agent's *mirror* of that segment overrides a few
token indices (the recompute set, the same for every agent of the segment in a round) with the
agent's own slots::

    token index i:    0    1    2    3    4    5    6    7
    master_slots:    [m0,  m1,  m2,  m3,  m4,  m5,  m6,  m7]
    mirror.indices:        1,             4,   5             (sorted, unique, in [0, L))
    mirror.slots:         [a1,            a4,  a5]
    resolve(mirror): [m0,  a1,  m2,  m3,  a4,  a5,  m6,  m7]

Only ``mirror.slots`` is the agent's private KV (the diff); everything else is read from the
master in place, so an agent's view costs ``len(indices)`` slots instead of ``L``.

Nothing here touches SGLang: these are plain records; :mod:`.store` owns their life cycle.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, NewType

import torch

SegmentId = NewType("SegmentId", int)
"""Identifier of an all-gather node, unique for the lifetime of a store (never reused)."""

HashFn = Callable[[tuple[int, ...]], int]
"""Content hash of a segment's token ids. Injectable so tests can force collisions."""


def token_hash(token_ids: tuple[int, ...]) -> int:
    """Default content hash: 64-bit BLAKE2b of the token ids as signed 64-bit integers.

    Stable across processes (unlike ``hash()``), so hashes may be logged and compared.
    """
    digest = hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class MirrorKey(NamedTuple):
    """Identity of a mirror: one agent's view of one segment in one round, at one place.

    ``at`` is where the segment starts in the agent's prompt (true token position): the same
    master may occur twice in one prompt (two agents said the same thing), and each occurrence
    was recomputed in its own context, so each has its own mirror.
    """

    round_id: str
    agent: str
    node_id: SegmentId
    at: int = 0


@dataclass(slots=True, eq=False)
class AllGatherNode:
    """The cache's record of a shared segment (identity semantics: ``eq=False``).

    Attributes:
        node_id: unique id within the store.
        token_ids: the segment's token ids.
        content_hash: ``hash_fn(token_ids)``; a hit is always verified against ``token_ids``.
        master_slots: int64 ``[L]`` KV pool slots of the master copy (owned by the store).
        master_pos: int32 ``[L]`` slot positions: the position each master K was rotated at.
        mirrors: the mirrors of this segment, by key (the node's mirror references).
        pin_count: running requests whose rows read the master slots.
        last_access: last-access timestamp, on the radix tree's clock (see ``SegmentStore``).
        evicted: set once the master slots are freed; the record must not be used after.
        deviation: float ``[L]`` per-token deviation scores measured when the master was
            computed (``selection.py``), or None.
        authored_by: the agent whose decode-time KV this master is (author policy), or None.
        author_uses: the (round, segment id) pairs this authored master served, so the
            ``author_masters_used`` counter counts segments served, not lookups (late arrivals
            of a timed-out round look the same segment up again).
    """

    node_id: SegmentId
    token_ids: tuple[int, ...]
    content_hash: int
    master_slots: torch.Tensor
    master_pos: torch.Tensor
    mirrors: dict[MirrorKey, Mirror] = field(default_factory=dict)
    pin_count: int = 0
    last_access: float = 0.0
    evicted: bool = False
    deviation: torch.Tensor | None = None
    authored_by: str | None = None
    author_uses: set[tuple[str, str]] = field(default_factory=set)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def evictable(self) -> bool:
        """Whether eviction may take this master: nobody runs on it and no mirror refers to it."""
        return not self.evicted and self.pin_count == 0 and not self.mirrors

    def __repr__(self) -> str:
        return (
            f"AllGatherNode(id={self.node_id}, len={self.length}, pins={self.pin_count}, "
            f"mirrors={len(self.mirrors)}, evicted={self.evicted})"
        )


@dataclass(slots=True, eq=False)
class Mirror:
    """One agent's view of a segment: master slots except at ``indices``.

    Attributes:
        key: (round id, agent, node id).
        node: the master this mirror reads through.
        indices: int64 sorted unique token indices within the segment (the recompute set).
        slots: int64 slots the agent owns for those indices, ``slots[k]`` for ``indices[k]``.
    """

    key: MirrorKey
    node: AllGatherNode
    indices: torch.Tensor
    slots: torch.Tensor

    @property
    def num_slots(self) -> int:
        return int(self.slots.numel())

    def __repr__(self) -> str:
        return f"Mirror({self.key}, diff={self.num_slots}/{self.node.length})"


def resolve(mirror: Mirror) -> torch.Tensor:
    """The agent's full slot list for the segment (a new int64 tensor of length ``L``).

    One scatter: ``out = master_slots; out[indices] = slots`` (see the module sketch).
    """
    out = mirror.node.master_slots.clone()
    if mirror.indices.numel():
        out[mirror.indices] = mirror.slots
    return out


def check_sorted_unique(indices: torch.Tensor, length: int, what: str) -> str | None:
    """Return a problem description if ``indices`` is not 1-D int64 sorted unique in range."""
    if indices.dim() != 1 or indices.dtype != torch.int64:
        return f"{what}: expected 1-D int64, got shape {tuple(indices.shape)} {indices.dtype}"
    if indices.numel() == 0:
        return None
    if int(indices[0]) < 0 or int(indices[-1]) >= length:
        return f"{what}: indices must lie in [0, {length}), got {indices.tolist()[:8]}..."
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        return f"{what}: indices must be sorted and unique, got {indices.tolist()[:16]}"
    return None


def as_slot_tensor(values: torch.Tensor | Sequence[int], what: str) -> torch.Tensor:
    """Copy ``values`` into a fresh 1-D int64 CPU-or-device tensor the store may own.

    Raises:
        ValueError: if ``values`` is not one-dimensional.
    """
    t = torch.as_tensor(values)
    if t.dim() != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.to(torch.int64, copy=True)
