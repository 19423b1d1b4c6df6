"""Diff-aware storage: masters (one KV copy per shared segment) and per-agent mirrors (diffs).

``nodes`` and ``store`` are plain data structures (no SGLang imports); ``radix`` plugs them into
SGLang's RadixCache (``from sglang_tokendance.cache.radix import make_tree_cache``), kept out of
this package's import so the store can be used and tested without loading SGLang.
"""

from __future__ import annotations

from .census import IntegrityError
from .nodes import AllGatherNode, Mirror, MirrorKey, SegmentId, resolve, token_hash
from .store import SegmentInsert, SegmentStore

__all__ = [
    "AllGatherNode",
    "IntegrityError",
    "Mirror",
    "MirrorKey",
    "SegmentId",
    "SegmentInsert",
    "SegmentStore",
    "resolve",
    "token_hash",
]
