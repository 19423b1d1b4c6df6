"""TokenDanceRadixCache: SGLang's RadixCache plus masters and mirrors in the same KV budget.

For a request without a TokenDance plan nothing changes: every override below falls through to
RadixCache unless the store holds something or the request's row has a claim / layout.

Budget. The scheduler admits work against ``available + evictable`` and checks, when idle, that
``available + evictable + protected == pool size``. So the store's tokens are added in:

    evictable_size() = radix evictable + masters that are unpinned and unmirrored
    protected_size() = radix protected + pinned/mirrored masters + mirror slots
                       - slots that running rows hold but do not own (claimed ranges, already
                         counted by SGLang as the requests' own "uncached" tokens)

Eviction. One LRU order over radix leaves and evictable masters. The radix tree stamps
``time.monotonic()`` into ``TreeNode.last_access_time``; the store stamps the same clock into
``AllGatherNode.last_access`` (forced strictly increasing among masters). One heap over both
then pops the least recently used of either kind. Only the LRU policy is supported, because the
other policies' priorities (hit counts, creation times) have no master counterpart.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    EvictResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from ..positions import PositionTable, get_position_table
from ..state import layout_of, state_of
from . import row_admission
from .authored import AuthoredHit, AuthoredIndex, publish_output
from .collector_side import CollectorSide
from .eviction import evict_lru
from .integrity import kv_bytes_per_token
from .ledger import RoundLedger
from .nodes import HashFn, token_hash
from .rows import RowTable
from .store import SegmentStore, TokenIds

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)

RowListener = Callable[[int], None]

PAGE_SIZE_ERROR = (
    "TokenDance requires --page-size 1 (got {}): masters and mirrors address single KV slots"
)

__all__ = ["TokenDanceRadixCache", "kv_bytes_per_token", "make_tree_cache"]


class TokenDanceRadixCache(CollectorSide, RadixCache):
    """RadixCache that also stores shared segments once (masters) with per-agent diffs (mirrors).

    Args:
        params: SGLang's cache parameters (page size 1, LRU eviction).
        hash_fn: content hash for segments (tests inject a colliding one).
        row_listeners: called with a row index when its request is released (the attention
            side drops the row's unread deviation probes; handed in so the cache never imports
            the attention package).

    Raises:
        ValueError: for page size != 1 or a non-LRU eviction policy.
    """

    def __init__(
        self,
        params: CacheInitParams,
        *,
        hash_fn: HashFn = token_hash,
        row_listeners: Sequence[RowListener] = (),
    ) -> None:
        if params.page_size != 1:
            raise ValueError(PAGE_SIZE_ERROR.format(params.page_size))
        if params.eviction_policy.lower() != "lru":
            raise ValueError(
                f"TokenDance requires --radix-eviction-policy lru (got "
                f"{params.eviction_policy!r}): masters have no hit counts or priorities"
            )
        # Built before RadixCache.__init__, which calls self.reset().
        self.store = SegmentStore(self._free_slots, hash_fn=hash_fn, clock=time.monotonic)
        self.rows = RowTable()
        self.row_listeners = list(row_listeners)
        self.ledger = RoundLedger()
        self.authored = AuthoredIndex()
        # Set by the collector (master policy "author"): a finished TokenDance request's output
        # KV becomes a master instead of being freed.
        self.publish_outputs = False
        super().__init__(params)
        self.positions: PositionTable | None = None
        if params.req_to_token_pool is not None and params.token_to_kv_pool_allocator is not None:
            self.positions = get_position_table(
                params.req_to_token_pool, params.token_to_kv_pool_allocator.get_kvcache()
            )

    def _free_slots(self, slots: torch.Tensor) -> None:
        self.token_to_kv_pool_allocator.free(slots)

    # ---- RadixCache overrides (plain requests fall through unchanged) -----------------------
    def reset(self) -> None:
        super().reset()
        # Only called when fully idle, right before the allocator is cleared wholesale: forget,
        # do not free (freeing into a list about to be rebuilt would duplicate slots).
        self.store.clear()
        self.rows.clear()
        self.ledger.clear()
        self.authored.clear()
        positions = getattr(self, "positions", None)
        if positions is not None:
            for row in list(positions.laid_out_rows):
                positions.clear_layout(row)

    def evictable_size(self) -> int:
        return self.evictable_size_ + self.store.evictable_tokens

    def protected_size(self) -> int:
        return self.protected_size_ + self.store.protected_tokens - self.rows.borrowed_tokens

    def evict(self, params: EvictParams) -> EvictResult:
        """Evict radix leaves and evictable masters together, least recently used first."""
        if self.disable or not self.store.evictable_tokens:
            return super().evict(params)
        return evict_lru(self, params.num_tokens)

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """Laid-out requests: match the private prefix and lay out the row (row_admission.py)."""
        lay = layout_of(params.req)
        if lay is None or self.disable:
            st = state_of(params.req)
            cap = st.insert_cap if st is not None else None
            if cap is not None and len(params.key) > cap:
                # A master agent computes its shared segments itself and hands their slots to
                # the store: the tree may give it its private prefix only, never a slot inside
                # a segment (that slot would then have two owners).
                params = dataclasses.replace(params, key=params.key[:cap])
            return super().match_prefix(params)
        return row_admission.match_laid_out(self, super().match_prefix, params, lay)

    def prefix_device_indices(self, req: Req) -> torch.Tensor:
        lay = layout_of(req)
        if lay is None or lay.row_pos is None:
            return super().prefix_device_indices(req)
        return row_admission.prefix_indices_laid_out(self, req, lay)

    def on_rows_allocated(self, reqs: list[Req]) -> None:
        """Called after ``prepare_for_extend``: record layouts and claims of new rows."""
        row_admission.on_rows_allocated(self, reqs)

    def checkpoint(self, req: Req, *, up_to: int) -> None:
        """Insert only the true-order prefix of a laid-out row (DESIGN invariant)."""
        st = state_of(req)
        if self.publish_outputs and req.finished() and st is not None:
            publish_output(self, req, up_to, st.agent)
        limit = self._insert_limit(req.kv.req_pool_idx)
        # A TokenDance request publishes at most its true-order private prefix: a chunked
        # prefill's intermediate checkpoint must not hand shared-segment slots to the tree
        # before they become masters or mirrors.
        cap = st.insert_cap if st is not None else None
        if cap is not None:
            limit = cap if limit is None else min(limit, cap)
        if limit is not None:
            up_to = max(min(up_to, limit), req.kv.cache_protected_len)
        super().checkpoint(req, up_to=up_to)
        lay = layout_of(req)
        if lay is not None and req.finished():
            row_admission.insert_true_prefix(self, req, lay)

    def find_authored(self, token_ids: TokenIds) -> AuthoredHit | None:
        """An authored master whose tokens are a sub-span of ``token_ids`` (authored.py)."""
        return self.authored.find(token_ids)

    def free_kv_row(self, kv: Any, ranges: list[tuple[int, int]]) -> None:
        """Free the row ranges, skipping claimed (master / mirror) entries."""
        claim = self.rows.get(kv.req_pool_idx)
        if claim is not None and claim.foreign:
            ranges = [
                r for a, b in sorted(ranges) for r in self.rows.own_ranges(kv.req_pool_idx, a, b)
            ]
            if not ranges:
                return
        super().free_kv_row(kv, ranges)

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        """Free the row's mirrors, unpin the masters it pinned, forget its claim and layout.

        SGLang has already freed the row's own slots (``free_kv_row``, which skipped the
        claimed ranges); the mirror slots among those ranges go back here, so a mirror never
        outlives the request that made it (nothing reads an agent's diff after its request).
        """
        row = req.kv.req_pool_idx
        self.release_row(row)
        row_admission.release_unadmitted(self, req)
        super().on_release(req, checkpointed=checkpointed)

    def _insert_limit(self, row: int | None) -> int | None:
        """Row entries past this index are not in true token order / not the request's own."""
        if row is None:
            return None
        claim = self.rows.get(row)
        limit = claim.first_foreign if claim is not None else None
        if self.positions is not None and self.positions.has_layout(row):
            n = int(self.positions.layout_len[row])
            pos = self.positions.req_to_pos[row, :n].to(torch.int64)
            moved = torch.nonzero(pos != torch.arange(n, device=pos.device))
            first_moved = int(moved[0, 0]) if moved.numel() else n
            limit = first_moved if limit is None else min(limit, first_moved)
        return limit


def make_tree_cache(
    ctx: TreeCacheBuildContext, row_listeners: Sequence[RowListener] = ()
) -> TokenDanceRadixCache:
    """Factory for ``register_radix_cache_backend("tokendance", make_tree_cache)``.

    Raises:
        ValueError: for page size != 1 or features TokenDance does not support.
    """
    if ctx.params.page_size != 1:
        raise ValueError(PAGE_SIZE_ERROR.format(ctx.params.page_size))
    unsupported = [
        (ctx.disable_radix_cache, "--disable-radix-cache (masters live in the radix budget)"),
        (ctx.enable_hierarchical_cache, "--enable-hierarchical-cache"),
        (ctx.is_hybrid_swa, "sliding-window (hybrid SWA) models"),
        (ctx.is_hybrid_ssm, "Mamba / SSM hybrid models"),
        (ctx.is_dsa, "DSA sparse-attention models"),
    ]
    for flag, what in unsupported:
        if flag:
            raise ValueError(f"the tokendance radix cache backend does not support {what}")
    cache = TokenDanceRadixCache(ctx.params, row_listeners=row_listeners)
    logger.info("TokenDance radix cache: page size 1, LRU over radix leaves and masters")
    return cache
