"""Row claims: which entries of a running request's ``req_to_token`` row are not its own.

SGLang frees a finished request's row by range: ``free_kv_row(kv, [(cache_protected_len,
owned_len)])`` (the tree owns ``[0, cache_protected_len)``, the request the rest). A TokenDance
row breaks that convention in two places::

    row index j:  0 ........ p-1 | p ........... p+m-1 | p+m ...... n-1 | n ... (decode)
    slots:        private prefix | master slots (store) | fresh tokens   | outputs
                  tree / request | FOREIGN: never freed | some handed to | request
                                 | by the request       | mirrors: FOREIGN

A claim lists the foreign ranges of a row (half-open, in row positions), so the release path
frees only the request's own slots; the masters the row pinned, so they are unpinned when the
request goes; and the mirrors its prefill made, so they are freed then. Ranges are merged on the
way in: a claim is a sorted list of disjoint ranges. :class:`RowTable` holds the claims of all
running rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .nodes import AllGatherNode, MirrorKey

Range = tuple[int, int]


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sort and merge half-open ranges (touching ones merge); empty ranges are dropped.

    Raises:
        ValueError: on a negative start or a range with ``end < start``.
    """
    out: list[Range] = []
    for start, end in sorted((int(s), int(e)) for s, e in ranges):
        if start < 0 or end < start:
            raise ValueError(f"bad row range [{start}, {end})")
        if start == end:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def index_runs(idx: torch.Tensor) -> list[Range]:
    """Sorted row indices -> half-open runs (a handful per segment: runs, not tokens).

    Example: ``[2, 3, 4, 7, 8]`` -> ``[(2, 5), (7, 9)]``.
    """
    if idx.numel() == 0:
        return []
    breaks = torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1
    starts = torch.cat([idx[:1], idx[breaks]]).tolist()
    ends = torch.cat([idx[breaks - 1] + 1, idx[-1:] + 1]).tolist()
    return list(zip(starts, ends, strict=True))


def subtract_ranges(ranges: Sequence[Range], holes: Sequence[Range]) -> list[Range]:
    """``ranges`` minus ``holes`` (both sorted disjoint half-open lists), sorted and disjoint.

    Example: ``[(0, 10)] - [(2, 4), (6, 7)] = [(0, 2), (4, 6), (7, 10)]``.
    """
    out: list[Range] = []
    for start, end in ranges:
        cur = start
        for h_start, h_end in holes:  # a handful of ranges per row: not a per-token loop
            if h_end <= cur or h_start >= end:
                continue
            if h_start > cur:
                out.append((cur, h_start))
            cur = max(cur, h_end)
            if cur >= end:
                break
        if cur < end:
            out.append((cur, end))
    return out


@dataclass(slots=True)
class RowClaim:
    """TokenDance's bookkeeping for one ``req_to_token`` row while its request runs.

    Attributes:
        foreign: sorted disjoint row ranges whose slots belong to masters or mirrors.
        pinned: masters pinned on behalf of the row (one entry per pin), unpinned at release.
        mirrors: keys of the mirrors made from the row's recomputed slots, freed at release.
    """

    foreign: list[Range] = field(default_factory=list)
    pinned: list[AllGatherNode] = field(default_factory=list)
    mirrors: list[MirrorKey] = field(default_factory=list)

    @property
    def foreign_tokens(self) -> int:
        return sum(end - start for start, end in self.foreign)

    @property
    def first_foreign(self) -> int | None:
        return self.foreign[0][0] if self.foreign else None

    def add(self, ranges: Iterable[Range]) -> int:
        """Merge ``ranges`` into ``foreign``; return how many tokens became foreign."""
        before = self.foreign_tokens
        self.foreign = merge_ranges([*self.foreign, *ranges])
        return self.foreign_tokens - before


class RowTable:
    """The claims of running rows, by ``req_pool_idx``, and the count of borrowed entries.

    ``borrowed_tokens`` (entries of running rows owned by masters, mirrors or radix nodes
    inserted out of band) is kept exact on every change: SGLang counts those entries as the
    requests' own, so the cache subtracts them from ``protected_size``.
    """

    def __init__(self) -> None:
        self._rows: dict[int, RowClaim] = {}
        self.borrowed_tokens = 0

    def claim(self, row: int, ranges: Iterable[Range]) -> None:
        """Mark ``ranges`` of ``row`` foreign (see ``TokenDanceRadixCache.claim_row_ranges``)."""
        self.borrowed_tokens += self._rows.setdefault(row, RowClaim()).add(ranges)

    def pin(self, row: int, node: AllGatherNode) -> None:
        """Record a pin of ``node`` made on behalf of ``row`` (undone at release)."""
        self._rows.setdefault(row, RowClaim()).pinned.append(node)

    def add_mirror(self, row: int, key: MirrorKey) -> None:
        """Record that ``row``'s request made the mirror ``key`` (freed at release)."""
        self._rows.setdefault(row, RowClaim()).mirrors.append(key)

    def owns_mirror(self, key: MirrorKey) -> bool:
        return any(key in c.mirrors for c in self._rows.values())

    def pop(self, row: int) -> RowClaim | None:
        """Forget ``row``'s claim (its request is released); the caller undoes pins/mirrors."""
        claim = self._rows.pop(row, None)
        if claim is not None:
            self.borrowed_tokens -= claim.foreign_tokens
        return claim

    def get(self, row: int | None) -> RowClaim | None:
        return self._rows.get(row) if row is not None else None

    def claims(self) -> dict[int, RowClaim]:
        """A copy of the table."""
        return dict(self._rows)

    def clear(self) -> None:
        self._rows.clear()
        self.borrowed_tokens = 0

    def own_ranges(self, row: int, start: int, end: int) -> list[Range]:
        """``[start, end)`` of ``row`` minus its foreign ranges."""
        claim = self._rows.get(row)
        return [(start, end)] if claim is None else subtract_ranges([(start, end)], claim.foreign)
