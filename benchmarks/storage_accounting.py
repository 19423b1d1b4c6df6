"""Storage accounting of diff-aware storage on SGLang's real KV pool (CPU, no model).

One All-Gather round: ``agents`` agents each read ``segments`` shared segments of ``seg_len``
tokens. Each segment is stored once (a master) and every agent keeps a mirror of it whose diff
is the collective recompute set, ``k = ceil(ratio * seg_len)`` tokens. Compared with every
agent keeping its own dense copy::

    dense  = agents * segments * seg_len
    stored = segments * seg_len + agents * segments * k
    ratio  = dense / stored

The benchmark builds the real pools (ReqToTokenPool, MHATokenToKVPool, TokenToKVPoolAllocator),
runs the round through TokenDanceRadixCache, checks the cache's numbers against the arithmetic
and the slot census, releases everything, and writes JSON.

    python benchmarks/storage_accounting.py --out runs/storage.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def build_cache(size: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """A TokenDanceRadixCache over freshly built SGLang pools of ``size`` slots."""
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from sglang_tokendance.cache.radix import TokenDanceRadixCache

    req_pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    kv_pool = MHATokenToKVPool(
        size=size,
        page_size=1,
        dtype=dtype,
        head_num=kv_heads,
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
        page_size=1,
    )
    return TokenDanceRadixCache(params), kv_pool, allocator


def run(args: argparse.Namespace) -> dict:
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    from sglang_tokendance.cache.radix import kv_bytes_per_token

    gen = torch.Generator().manual_seed(args.seed)
    k = math.ceil(args.recompute_ratio * args.seg_len)
    dense = args.agents * args.segments * args.seg_len
    stored = args.segments * args.seg_len + args.agents * args.segments * k
    size = stored + args.headroom
    dtype = getattr(torch, args.dtype)
    cache, kv_pool, allocator = build_cache(size, args.layers, args.kv_heads, args.head_dim, dtype)
    per_token = kv_bytes_per_token(kv_pool)

    t0 = time.perf_counter()
    for _ in range(args.segments):
        ids = torch.randint(0, 32000, (args.seg_len,), generator=gen)
        # The master's keys were rotated where its author wrote them: anywhere in a prompt.
        start = int(torch.randint(0, 4096, (1,), generator=gen))
        node, inserted = cache.insert_segment(
            ids, allocator.alloc(args.seg_len), torch.arange(start, start + args.seg_len)
        )
        assert inserted, "segment token ids collided; change --seed"
        # Collective selection: one recompute set per segment, shared by every agent.
        recompute = torch.randperm(args.seg_len, generator=gen)[:k].sort().values
        for a in range(args.agents):
            cache.attach_mirror("round0", f"agent{a}", node, recompute, allocator.alloc(k))
    build_s = time.perf_counter() - t0
    cache.check_integrity()
    stats = cache.stats(kv_bytes_per_token=per_token, round_id="round0")
    expected_ratio = dense / stored
    ok = (
        stats["dense_equiv_tokens"] == dense
        and stats["stored_tokens"] == stored
        and math.isclose(stats["compression_ratio"], expected_ratio)
    )

    freed = cache.release_mirrors(round_id="round0")
    evicted = cache.evict(EvictParams(num_tokens=size)).num_tokens_evicted
    cache.check_integrity()
    return {
        "config": {k_: str(v) if isinstance(v, Path) else v for k_, v in vars(args).items()}
        | {"recompute_tokens_per_segment": k, "pool_slots": size},
        "kv_bytes_per_token": per_token,
        "stats": stats,
        "expected": {"dense_tokens": dense, "stored_tokens": stored, "ratio": expected_ratio},
        "matches_expected": ok,
        "release": {
            "mirror_slots_freed": freed,
            "master_slots_evicted": evicted,
            "free_slots_after": allocator.available_size(),
            "pool_slots": size,
        },
        "build_seconds": build_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--segments", type=int, default=16)
    p.add_argument("--seg-len", type=int, default=64)
    p.add_argument("--recompute-ratio", type=float, default=0.15)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--headroom", type=int, default=64, help="free pool slots beyond the need")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    result = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    s, e = result["stats"], result["expected"]
    for name, value in s.items():
        print(f"  {name:24s} {value}")
    print(
        f"storage: {args.agents} agents x {args.segments} segments x {args.seg_len} tokens, "
        f"{args.recompute_ratio:.0%} recompute: dense {s['dense_equiv_tokens']} tok, stored "
        f"{s['stored_tokens']} tok, compression {s['compression_ratio']:.3f}x (expected "
        f"{e['ratio']:.3f}x), {s['saved_bytes'] / 2**20:.1f} MiB saved, "
        f"{'OK' if result['matches_expected'] else 'MISMATCH'}"
    )
    return 0 if result["matches_expected"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
