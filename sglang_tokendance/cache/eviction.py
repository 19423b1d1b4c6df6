"""One LRU over radix leaves and evictable masters (the cache's ``evict``).

The radix tree stamps ``time.monotonic()`` into ``TreeNode.last_access_time``; the store stamps
the same clock into ``AllGatherNode.last_access``. One heap over both pops the least recently
used of either kind until enough tokens are freed. A leaf is evicted with the same steps as
``RadixCache.evict`` (free its slots, delete it, push its parent if that became a leaf);
``patches/sglang-0.5.23/public-evict-step.diff`` proposes that step as a public method.
"""

from __future__ import annotations

import heapq
import time
from typing import Any

from sglang.srt.mem_cache.base_prefix_cache import EvictResult

from .nodes import AllGatherNode


def evict_lru(cache: Any, num_tokens: int) -> EvictResult:
    """Free at least ``num_tokens`` (if that many are evictable) from ``cache``, LRU first."""
    start_time = time.perf_counter()
    # Entries: (LRU timestamp, unique sequence number to break ties, node of either kind).
    heap: list[tuple[float, int, Any]] = [
        (cache.eviction_strategy.get_priority(n), i, n)
        for i, n in enumerate(cache.evictable_leaves)
    ]
    heap += [(m.last_access, len(heap) + i, m) for i, m in enumerate(cache.store.evictable_nodes())]
    heapq.heapify(heap)
    seq = len(heap)
    num_evicted = 0
    while num_evicted < num_tokens and heap:
        _, _, x = heapq.heappop(heap)
        if isinstance(x, AllGatherNode):
            num_evicted += cache.store.evict_node(x)
            continue
        cache.token_to_kv_pool_allocator.free_segment(x.value, start_pos=0)
        num_evicted += len(x.value)
        cache._delete_leaf(x)
        if len(x.parent.children) == 0 and x.parent.lock_ref == 0:
            heapq.heappush(heap, (cache.eviction_strategy.get_priority(x.parent), seq, x.parent))
            seq += 1
        cache.kv_events.record_remove(x)
    cache.update_eviction_metrics(num_evicted, start_time)
    return EvictResult(num_tokens_evicted=num_evicted)
