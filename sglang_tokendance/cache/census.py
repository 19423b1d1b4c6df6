"""Slot census: who owns each KV slot, with precise reports of leaks and double ownership.

Ownership in SGLang is by convention (the allocator keeps no reference counts), so the only way
to catch a leak or a double free is to list every owner's slots and count. Owners are passed as
``(label, slots)`` chunks; labels appear verbatim in the reports so a failure names the culprit
(``"master 3"``, ``"mirror ('r1', 'a2', 3)"``, ``"radix node 17"``, ``"free list"`` ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

Chunk = tuple[str, torch.Tensor]


class IntegrityError(AssertionError):
    """An invariant of the TokenDance cache does not hold; the message names every violation."""


class Census(NamedTuple):
    """Result of :func:`slot_census`.

    Attributes:
        leaked: sorted slots in ``[1, size]`` that no chunk holds.
        multiply_owned: one line per slot held more than once, naming all its holders.
        out_of_range: one line per chunk holding slots outside ``[1, size]``.
    """

    leaked: list[int]
    multiply_owned: list[str]
    out_of_range: list[str]

    @property
    def ok(self) -> bool:
        return not (self.leaked or self.multiply_owned or self.out_of_range)

    def problems(self, limit: int = 16) -> list[str]:
        out = list(self.out_of_range)
        if self.leaked:
            out.append(f"{len(self.leaked)} leaked slot(s) owned by nobody: {self.leaked[:limit]}")
        out.extend(self.multiply_owned[:limit])
        if len(self.multiply_owned) > limit:
            out.append(f"... and {len(self.multiply_owned) - limit} more multiply-owned slots")
        return out


def _flatten(chunks: Sequence[Chunk]) -> torch.Tensor:
    """All slots of all chunks, int64 on CPU."""
    if not chunks:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([c.reshape(-1).to("cpu", torch.int64) for _, c in chunks])


def _owners(chunks: Sequence[Chunk]) -> torch.Tensor:
    """Per slot of :func:`_flatten`, the index of the chunk holding it (error path only)."""
    return torch.cat(
        [torch.full((c.numel(),), i, dtype=torch.int64) for i, (_, c) in enumerate(chunks)]
    )


def multiply_owned(chunks: Sequence[Chunk], limit: int = 16) -> list[str]:
    """Lines naming every holder of each slot that appears more than once across ``chunks``."""
    slots = _flatten(chunks)
    if slots.numel() < 2:
        return []
    ordered, _ = torch.sort(slots)
    dups = torch.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if dups.numel() == 0:
        return []
    owner = _owners(chunks)
    lines = []
    # Error path only: a loop over the (few, capped) duplicated slots, not over tokens.
    for value in dups[:limit].tolist():
        holders = [chunks[i][0] for i in owner[slots == value].tolist()]
        lines.append(f"slot {value} is owned {len(holders)} times: by {', '.join(holders)}")
    if dups.numel() > limit:
        lines.append(f"... {dups.numel() - limit} more multiply-owned slots")
    return lines


def slot_census(size: int, chunks: Sequence[Chunk]) -> Census:
    """Count every slot of a pool of ``size`` usable slots (``1..size``; slot 0 is padding).

    Args:
        size: the allocator's ``size``.
        chunks: every owner's slots, the free list included.
    """
    out_of_range = []
    for label, t in chunks:
        if t.numel() == 0:
            continue
        bad = t[(t < 1) | (t > size)]
        if bad.numel():
            out_of_range.append(f"{label} holds slots outside [1, {size}]: {bad.tolist()[:8]}")
    slots = _flatten(chunks)
    in_range = slots[(slots >= 1) & (slots <= size)]
    counts = torch.bincount(in_range, minlength=size + 1)
    leaked = (torch.nonzero(counts[1:] == 0).reshape(-1) + 1).tolist()
    doubled = multiply_owned(chunks) if bool((counts > 1).any()) else []
    return Census(leaked, doubled, out_of_range)
