"""Real SGLang pools on CPU for the cache tests (no mocks), and a minimal request life cycle.

``build_pools`` makes what SGLang's KV-cache configurator makes for page size 1: a
``ReqToTokenPool``, an ``MHATokenToKVPool`` and a ``TokenToKVPoolAllocator``, plus the
``CacheInitParams`` a tree cache is built from. ``start_request`` / ``finish_request`` drive a
real ``Req`` through match -> lock -> row allocation -> SGLang's own ``release_kv_cache``.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

from sglang_tokendance.cache.radix import TokenDanceRadixCache

_PUBLISHED = False


def publish_server_args() -> None:
    """Publish scheduler-role server args once (``release_kv_cache`` reads spec/serving)."""
    global _PUBLISHED
    if not _PUBLISHED:
        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", device="cpu"))
        _PUBLISHED = True


@dataclass
class Pools:
    req_to_token_pool: ReqToTokenPool
    kv_pool: MHATokenToKVPool
    allocator: TokenToKVPoolAllocator
    params: CacheInitParams


def build_pools(
    size: int = 64,
    rows: int = 4,
    context_len: int = 64,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 4,
    dtype: torch.dtype = torch.float32,
    page_size: int = 1,
) -> Pools:
    """The pools SGLang builds for a dense model at page size 1, tiny and on CPU."""
    req_pool = ReqToTokenPool(
        size=rows, max_context_len=context_len, device="cpu", enable_memory_saver=False
    )
    kv_pool = MHATokenToKVPool(
        size=size,
        page_size=1,
        dtype=dtype,
        head_num=heads,
        head_dim=head_dim,
        layer_num=layers,
        device="cpu",
        enable_memory_saver=False,
    )
    allocator = TokenToKVPoolAllocator(
        size, dtype=dtype, device="cpu", kvcache=kv_pool, need_sort=False
    )
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=req_pool,
        token_to_kv_pool_allocator=allocator,
        page_size=page_size,
    )
    return Pools(req_pool, kv_pool, allocator, params)


def td_cache(size: int = 64, **kwargs: object) -> tuple[TokenDanceRadixCache, Pools]:
    pools = build_pools(size=size)
    return TokenDanceRadixCache(pools.params, **kwargs), pools  # type: ignore[arg-type]


def plain_cache(size: int = 64) -> tuple[RadixCache, Pools]:
    pools = build_pools(size=size)
    return RadixCache(pools.params), pools


def rkey(ids: Sequence[int]) -> RadixKey:
    return RadixKey(array("q", ids))


def alloc(pools: Pools, n: int) -> torch.Tensor:
    out = pools.allocator.alloc(n)
    assert out is not None, f"pool exhausted allocating {n}"
    return out.clone()


def start_request(
    cache: RadixCache,
    pools: Pools,
    rid: str,
    ids: Sequence[int],
    *,
    reuse: tuple[int, torch.Tensor] | None = None,
) -> Req:
    """Admit a request the way the scheduler does: match, lock, take a row, allocate the rest.

    The row holds the matched prefix's tree slots then fresh slots; with ``reuse=(p, slots)``
    the match stops at ``p`` and ``row[p : p + len(slots)]`` holds the given (master) slots
    instead of fresh ones (a TokenDance layout). ``kv_committed_len == kv_allocated_len ==
    len(ids)``: prefill done, no decode yet.
    """
    publish_server_args()
    req = Req(rid, "", array("q", ids), SamplingParams(max_new_tokens=1))
    match_ids = ids if reuse is None else ids[: reuse[0]]
    match = cache.match_prefix(MatchPrefixParams(key=rkey(match_ids)))
    req.prefix_len = match.device_prefix_len
    req.last_node = match.last_device_node
    req.lock = cache.lock(req.last_node)
    assert pools.req_to_token_pool.alloc([req]) is not None
    parts = [cache.path_device_indices(req.last_node)[: req.prefix_len]]
    if reuse is None:
        parts.append(alloc(pools, len(ids) - req.prefix_len))
    else:
        at, slots = reuse
        parts += [alloc(pools, at - req.prefix_len), slots]
        parts.append(alloc(pools, len(ids) - at - len(slots)))
    row = torch.cat(parts)
    assert len(row) == len(ids)
    pools.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, len(ids))), row)
    req.kv.cache_protected_len = req.prefix_len
    req.kv.kv_committed_len = req.kv.kv_allocated_len = len(ids)
    req.fill_ids = array("q", ids)
    return req


def finish_request(cache: RadixCache, req: Req, *, checkpoint: bool = True) -> None:
    """SGLang's own release path: checkpoint -> free_kv_row -> unlock -> on_release -> free row."""
    req.finished_len = 0
    release_kv_cache(req, cache, checkpoint=checkpoint)


def row_slots(pools: Pools, req: Req) -> torch.Tensor:
    return pools.req_to_token_pool.req_to_token[req.kv.req_pool_idx, : req.kv.kv_allocated_len].to(
        torch.int64
    )


def uncached(req: Req) -> int:
    """What SGLang's pool invariant counts as the request's own tokens."""
    return req.kv.kv_allocated_len - req.kv.cache_protected_len
