"""Whole-cache checks against SGLang's real allocator, and KV bytes per token of a real pool.

The census behind :meth:`TokenDanceRadixCache.check_integrity`: every slot in ``[1, size]`` must
be exactly one of

    free (allocator free list)  |  a radix node's value  |  a master  |  a mirror  |  request-owned

and the cache's size counters must agree with what the census finds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .census import Chunk, slot_census

if TYPE_CHECKING:
    from .radix import TokenDanceRadixCache


def kv_bytes_per_token(kv_pool: Any) -> int:
    """Bytes of K and V for one token across all layers of an ``MHATokenToKVPool``.

    ``layer_num x head_num x (head_dim + v_head_dim) x element size of the stored dtype``
    (fp8 caches store uint8, so ``store_dtype`` rather than ``dtype``).

    Raises:
        ValueError: for pools without separate K/V heads (MLA and other layouts).
    """
    names = ("layer_num", "head_num", "head_dim", "v_head_dim", "store_dtype")
    missing = [n for n in names if not hasattr(kv_pool, n)]
    if missing:
        raise ValueError(
            f"{type(kv_pool).__name__} is not an MHA KV pool (missing {', '.join(missing)}); "
            "TokenDance accounts KV bytes for MHATokenToKVPool"
        )
    itemsize = torch.empty((), dtype=kv_pool.store_dtype).element_size()
    per_layer = kv_pool.head_num * (kv_pool.head_dim + kv_pool.v_head_dim) * itemsize
    return int(kv_pool.layer_num * per_layer)


def _radix_chunks(cache: TokenDanceRadixCache) -> tuple[list[Chunk], list[str]]:
    """Labelled radix node values, and problems with the tree's size counters."""
    chunks: list[Chunk] = []
    problems: list[str] = []
    evictable = protected = 0
    stack = list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.value is None:
            continue
        if len(node.value) != len(node.key):
            problems.append(
                f"radix node {node.id}: {len(node.value)} slots for {len(node.key)} keys"
            )
        chunks.append((f"radix node {node.id}", node.value))
        if node.lock_ref > 0:
            protected += len(node.key)
        else:
            evictable += len(node.key)
    if (evictable, protected) != (cache.evictable_size_, cache.protected_size_):
        problems.append(
            f"radix sizes (evictable, protected) = ({cache.evictable_size_}, "
            f"{cache.protected_size_}), recomputed from the tree = ({evictable}, {protected})"
        )
    return chunks, problems


def _row_problems(cache: TokenDanceRadixCache, held: torch.Tensor) -> list[str]:
    """Claimed row ranges must point at slots a master, mirror or radix node holds; row pins
    must be real pins."""
    problems = []
    pins: dict[int, int] = {}
    for row, claim in cache.row_claims().items():
        table = cache.req_to_token_pool.req_to_token[row]
        for start, end in claim.foreign:
            slots = table[start:end].to(torch.int64).cpu()
            stray = slots[~torch.isin(slots, held)]
            if stray.numel():
                problems.append(
                    f"row {row} claims [{start}, {end}) but slots {stray.tolist()[:8]} belong to "
                    "no master, mirror or radix node (freed under a running request?)"
                )
        for node in claim.pinned:
            pins[id(node)] = pins.get(id(node), 0) + 1
            if node.evicted:
                problems.append(f"row {row} pins {node!r}, which was evicted")
    for node in cache.store.nodes():
        if pins.get(id(node), 0) > node.pin_count:
            problems.append(f"rows hold {pins[id(node)]} pins of {node!r}")
    claimed = sum(c.foreign_tokens for c in cache.row_claims().values())
    if claimed != cache.borrowed_tokens:
        problems.append(f"borrowed-token counter {cache.borrowed_tokens} != claimed {claimed}")
    return problems


def _row_mirror_problems(cache: TokenDanceRadixCache) -> list[str]:
    """A row's mirrors must exist (a mirror only goes with its row or its master's eviction,
    and a running row pins the master it mirrors)."""
    out = []
    for row, claim in cache.row_claims().items():
        gone = [k for k in claim.mirrors if cache.store.get_mirror_by_key(k) is None]
        if gone:
            out.append(f"row {row} lists mirrors that are gone: {gone[:4]}")
    return out


def idle_problems(cache: TokenDanceRadixCache) -> list[str]:
    """With no request running or held, nothing can read protected KV: any is a leak."""
    out = []
    claims = cache.row_claims()
    if claims:
        out.append(f"idle, yet rows {sorted(claims)[:8]} still hold claims (released requests?)")
    row_mirrors = list(cache.store.mirrors())
    if row_mirrors:
        slots = sum(m.num_slots for m in row_mirrors)
        out.append(
            f"idle, yet {len(row_mirrors)} mirrors ({slots} slots) are held, e.g. "
            f"{row_mirrors[0].key}: no running request can read them (leaked diffs)"
        )
    pinned = [n for n in cache.store.nodes() if n.pin_count]
    if pinned:
        out.append(f"idle, yet {len(pinned)} masters are pinned, e.g. {pinned[0]!r}")
    if cache.protected_size_:
        out.append(f"idle, yet the radix tree protects {cache.protected_size_} tokens")
    return out


def cache_problems(
    cache: TokenDanceRadixCache, request_owned: list[torch.Tensor], *, idle: bool = False
) -> list[str]:
    """Every broken invariant of ``cache`` with the allocator and the running requests
    (and, when ``idle``, anything still protected: see :func:`idle_problems`)."""
    allocator = cache.token_to_kv_pool_allocator
    problems = cache.store.integrity_problems()
    problems += _row_mirror_problems(cache)
    if idle:
        problems += idle_problems(cache)
    radix_chunks, radix_problems = _radix_chunks(cache)
    problems += radix_problems
    store_chunks = cache.store.owned_chunks()
    free = allocator.get_all_free_pages()
    chunks: list[Chunk] = [("free list", free)] if free is not None else []
    chunks += radix_chunks + store_chunks
    chunks += [(f"request-owned #{i}", t.reshape(-1)) for i, t in enumerate(request_owned)]
    census = slot_census(allocator.size, chunks)
    problems += census.problems()
    held = [t.reshape(-1).cpu() for _, t in store_chunks + radix_chunks]
    held_slots = torch.cat(held) if held else torch.empty(0, dtype=torch.int64)
    problems += _row_problems(cache, held_slots)
    owned = sum(int(t.numel()) for t in request_owned)
    accounted = (
        allocator.available_size()
        + cache.evictable_size()
        + cache.protected_size()
        + cache.borrowed_tokens
        + owned
    )
    if accounted != allocator.size:
        problems.append(
            f"available {allocator.available_size()} + evictable {cache.evictable_size()} + "
            f"protected {cache.protected_size()} + borrowed {cache.borrowed_tokens} + "
            f"request-owned {owned} = {accounted} != pool size {allocator.size}"
        )
    return problems
