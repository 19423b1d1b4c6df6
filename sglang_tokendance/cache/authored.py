"""Authored masters: the KV an agent produced while generating its output (round-spanning reuse).

In an All-Gather round, round r's outputs are round r+1's shared segments. The author's decode
already computed KV for those tokens, in the author's own context: with the ``author`` master
policy the cache keeps it when the author's request finishes (a master, no copy) and the next
round reuses it instead of computing a fresh master.

Applications wrap an output in their own text ("Isabella: <output>\\n") and tokenize the next
prompt from text, so the generated ids are looked up as a *sub-span* of the new segment, with up
to :data:`MAX_TRIM` tokens trimmed at either end (byte-level BPE may merge an output's first or
last token with the wrapper differently). The wrapper's tokens are then computed fresh::

    segment tokens:   [ I  s  a  :  t1 t2 t3 ... tk  \\n ]
    authored node:          [ t0' t1 t2 t3 ... tk ]           generated ids (KV in the pool)
    hit:              seg_offset=4, node_offset=1, length=k   -> tokens t1..tk reuse the node
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .nodes import AllGatherNode

MAX_TRIM = 2  # tokens an output may lose at either end when re-tokenized inside a segment
MIN_LENGTH = 4  # shorter outputs are not worth a master
MAX_ENTRIES = 4096  # newest authored masters searched (older ones are still exact-matchable)


class AuthoredHit(NamedTuple):
    """Where an authored master's tokens sit inside a segment."""

    node: AllGatherNode
    node_offset: int  # first reused token of the node
    seg_offset: int  # where that token sits in the segment
    length: int  # tokens reused


def _find_aligned(hay: bytes, needle: bytes, width: int = 4) -> int:
    """Index (in tokens) of the first ``width``-aligned occurrence of ``needle``, or -1."""
    start = hay.find(needle)
    while start >= 0 and start % width:
        start = hay.find(needle, start + 1)
    return -1 if start < 0 else start // width


class AuthoredIndex:
    """The newest authored masters, searched by sub-span (newest first)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._nodes: deque[AllGatherNode] = deque(maxlen=max_entries)

    def add(self, node: AllGatherNode) -> None:
        self._nodes.append(node)

    def __len__(self) -> int:
        return sum(1 for n in self._nodes if not n.evicted)

    def clear(self) -> None:
        self._nodes.clear()

    def find(self, token_ids: Sequence[int]) -> AuthoredHit | None:
        """The longest authored sub-span of ``token_ids`` (newest node first), or None.

        A node matches when its ids, less at most :data:`MAX_TRIM` at each end and keeping at
        least half of them (and :data:`MIN_LENGTH`), occur contiguously in ``token_ids``; failing
        that, when the longest run of its ids that all occur in ``token_ids`` does (same rule):
        one output token re-encoded differently mid-span then costs only the shorter side.
        """
        if len(token_ids) < MIN_LENGTH:
            return None
        hay = np.asarray(token_ids, dtype=np.int32).tobytes()
        live = [n for n in self._nodes if not n.evicted]
        if len(live) != len(self._nodes):
            self._nodes = deque(live, maxlen=self._nodes.maxlen)
        trims = sorted(
            ((a, b) for a in range(MAX_TRIM + 1) for b in range(MAX_TRIM + 1)),
            key=lambda t: t[0] + t[1],
        )
        for node in reversed(live):
            ids = np.asarray(node.token_ids, dtype=np.int32)
            need = max(MIN_LENGTH, (len(ids) + 1) // 2)
            hit = _find_trimmed(hay, ids, 0, len(ids), need, len(token_ids), trims)
            if hit is not None:
                return AuthoredHit(node, *hit)
        # None found whole: a token the segment lacks may have broken an output mid-span (a
        # byte-level token that is not UTF-8 alone re-encodes as others); try each output's
        # longest run of ids the segment has. A run of at least half the output holds one of
        # its middle ids, so a set lookup skips the outputs that cannot match.
        present = set(token_ids)
        for node in reversed(live):
            toks = node.token_ids
            if toks[len(toks) // 2] not in present and toks[(len(toks) - 1) // 2] not in present:
                continue
            need = max(MIN_LENGTH, (len(toks) + 1) // 2)
            mask = [t in present for t in toks]
            if sum(mask) < need:
                continue
            ids = np.asarray(toks, dtype=np.int32)
            start, stop = _longest_run(np.asarray(mask))
            if need <= stop - start < len(ids):
                hit = _find_trimmed(hay, ids, start, stop, need, len(token_ids), trims)
                if hit is not None:
                    return AuthoredHit(node, *hit)
        return None


def _find_trimmed(
    hay: bytes,
    ids: np.ndarray,
    start: int,
    stop: int,
    need: int,
    limit: int,
    trims: list[tuple[int, int]],
) -> tuple[int, int, int] | None:
    """(node offset, segment offset, length) of ``ids[start:stop]`` less at most
    :data:`MAX_TRIM` at each end, in ``hay``; at least ``need`` tokens, at most ``limit``."""
    for a, b in trims:
        length = stop - start - a - b
        if length < need or length > limit:
            continue
        at = _find_aligned(hay, ids[start + a : stop - b].tobytes())
        if at >= 0:
            return start + a, at, length
    return None


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    """``[start, stop)`` of the longest run of True in ``mask`` (the first one on ties)::

    mask  F T T F T T T F      -> (4, 7)
    """
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return 0, 0
    i = int(np.argmax(stops - starts))
    return int(starts[i]), int(stops[i])


def publish_output(cache: Any, req: Any, up_to: int, agent: str) -> AllGatherNode | None:
    """Make a finished request's output KV (row ``[n, up_to)``) an authored master.

    ``cache`` is the TokenDanceRadixCache. The slots are claimed in the row, so releasing the
    request hands them to the store instead of the allocator. Returns the new master, or None
    (too short, the tree already owns part of it, or an equal master exists: the request then
    frees its own copy as usual).
    """
    row, n = req.kv.req_pool_idx, len(req.origin_input_ids)
    m = min(up_to - n, len(req.output_ids))
    if row is None or m < MIN_LENGTH or n < req.kv.cache_protected_len:
        return None
    slots = cache.req_to_token_pool.req_to_token[row, n : n + m].to(torch.int64).clone()
    if cache.positions is not None:
        pos = cache.positions.slot_pos[slots].to(torch.int32).cpu()
    else:
        pos = torch.arange(n, n + m, dtype=torch.int32)
    res = cache.store.insert(tuple(int(t) for t in req.output_ids[:m]), slots.cpu(), pos)
    if not res.inserted:
        return None
    res.node.authored_by = agent
    cache.claim_row_ranges(row, [(n, n + m)])
    cache.authored.add(res.node)
    return res.node
