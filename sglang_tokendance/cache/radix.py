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
import heapq
import logging
import time
from collections.abc import Iterable, Sequence
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

from ..attention.deviation import get_probe_board
from ..positions import PositionTable, get_position_table
from . import laid_out
from .authored import AuthoredHit, AuthoredIndex
from .integrity import cache_problems, kv_bytes_per_token
from .ledger import RoundLedger
from .nodes import AllGatherNode, HashFn, Mirror, token_hash
from .rows import Range, RowClaim, subtract_ranges
from .store import IntegrityError, SegmentInsert, SegmentStore, TokenIds

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)

INSERT_CAP_ATTR = "tokendance_insert_cap"
AGENT_ATTR = "tokendance_agent"

PAGE_SIZE_ERROR = (
    "TokenDance requires --page-size 1 (got {}): masters and mirrors address single KV slots"
)

__all__ = ["TokenDanceRadixCache", "kv_bytes_per_token", "make_tree_cache"]


class TokenDanceRadixCache(RadixCache):
    """RadixCache that also stores shared segments once (masters) with per-agent diffs (mirrors).

    Args:
        params: SGLang's cache parameters (page size 1, LRU eviction).
        hash_fn: content hash for segments (tests inject a colliding one).

    Raises:
        ValueError: for page size != 1 or a non-LRU eviction policy.
    """

    def __init__(self, params: CacheInitParams, *, hash_fn: HashFn = token_hash) -> None:
        if params.page_size != 1:
            raise ValueError(PAGE_SIZE_ERROR.format(params.page_size))
        if params.eviction_policy.lower() != "lru":
            raise ValueError(
                f"TokenDance requires --radix-eviction-policy lru (got "
                f"{params.eviction_policy!r}): masters have no hit counts or priorities"
            )
        # Built before RadixCache.__init__, which calls self.reset().
        self.store = SegmentStore(self._free_slots, hash_fn=hash_fn, clock=time.monotonic)
        self._rows: dict[int, RowClaim] = {}
        self._borrowed_tokens = 0
        self.ledger = RoundLedger()
        self.authored = AuthoredIndex()
        # Set by the collector (master policy "author"): a finished TokenDance request's output
        # KV becomes a master instead of being freed.
        self.publish_outputs = False
        self.pic_copies_skipped = 0  # pic mode: dense copies not made for lack of free slots
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
        self._rows.clear()
        self._borrowed_tokens = 0
        self.ledger.clear()
        self.authored.clear()
        positions = getattr(self, "positions", None)
        if positions is not None:
            for row in list(positions.laid_out_rows):
                positions.clear_layout(row)

    def evictable_size(self) -> int:
        return self.evictable_size_ + self.store.evictable_tokens

    def protected_size(self) -> int:
        return self.protected_size_ + self.store.protected_tokens - self._borrowed_tokens

    def evict(self, params: EvictParams) -> EvictResult:
        """Evict radix leaves and evictable masters together, least recently used first."""
        masters = self.store.evictable_nodes()
        if self.disable or not masters:
            return super().evict(params)
        start_time = time.perf_counter()
        # Entries: (LRU timestamp, unique sequence number to break ties, node of either kind).
        heap: list[tuple[float, int, Any]] = [
            (self.eviction_strategy.get_priority(n), i, n)
            for i, n in enumerate(self.evictable_leaves)
        ]
        heap += [(m.last_access, len(heap) + i, m) for i, m in enumerate(masters)]
        heapq.heapify(heap)
        seq = len(heap)
        num_evicted = 0
        while num_evicted < params.num_tokens and heap:
            _, _, x = heapq.heappop(heap)
            if isinstance(x, AllGatherNode):
                num_evicted += self.store.evict_node(x)
                continue
            # Same steps as RadixCache.evict for a leaf.
            self.token_to_kv_pool_allocator.free_segment(x.value, start_pos=0)
            num_evicted += len(x.value)
            self._delete_leaf(x)
            if len(x.parent.children) == 0 and x.parent.lock_ref == 0:
                heapq.heappush(heap, (self.eviction_strategy.get_priority(x.parent), seq, x.parent))
                seq += 1
            self.kv_events.record_remove(x)
        self.update_eviction_metrics(num_evicted, start_time)
        return EvictResult(num_tokens_evicted=num_evicted)

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """Laid-out requests: match the private prefix and lay out the row (laid_out.py)."""
        lay = laid_out.layout_of(params.req)
        if lay is None or self.disable:
            cap = getattr(params.req, INSERT_CAP_ATTR, None) if params.req is not None else None
            if cap is not None and len(params.key) > cap:
                # A master agent computes its shared segments itself and hands their slots to
                # the store: the tree may give it its private prefix only, never a slot inside
                # a segment (that slot would then have two owners).
                params = dataclasses.replace(params, key=params.key[:cap])
            return super().match_prefix(params)
        return laid_out.match_laid_out(self, super().match_prefix, params, lay)

    def prefix_device_indices(self, req: Req) -> torch.Tensor:
        lay = laid_out.layout_of(req)
        if lay is None or lay.row_pos is None:
            return super().prefix_device_indices(req)
        return laid_out.prefix_indices_laid_out(self, req, lay)

    def on_rows_allocated(self, reqs: list[Req]) -> None:
        """Called after ``prepare_for_extend``: record layouts and claims of new rows."""
        laid_out.on_rows_allocated(self, reqs)

    def checkpoint(self, req: Req, *, up_to: int) -> None:
        """Insert only the true-order prefix of a laid-out row (DESIGN invariant)."""
        if self.publish_outputs and req.finished() and getattr(req, AGENT_ATTR, None):
            self.publish_output(req, up_to)
        limit = self._insert_limit(req.kv.req_pool_idx)
        # A TokenDance request publishes at most its true-order private prefix: a chunked
        # prefill's intermediate checkpoint must not hand shared-segment slots to the tree
        # before they become masters or mirrors.
        cap = getattr(req, INSERT_CAP_ATTR, None)
        if cap is not None:
            limit = cap if limit is None else min(limit, cap)
        if limit is not None:
            up_to = max(min(up_to, limit), req.kv.cache_protected_len)
        super().checkpoint(req, up_to=up_to)
        lay = laid_out.layout_of(req)
        if lay is not None and req.finished():
            laid_out.insert_true_prefix(self, req, lay)

    def publish_output(self, req: Req, up_to: int) -> AllGatherNode | None:
        """Make a finished request's output KV (row ``[n, up_to)``) a master (author policy).

        The slots are claimed in the row, so releasing the request hands them to the store
        instead of the allocator. Returns the new master, or None (too short, or an equal
        master exists: the request then frees its own copy as usual).
        """
        row, n = req.kv.req_pool_idx, len(req.origin_input_ids)
        m = min(up_to - n, len(req.output_ids))
        if row is None or m < 4 or n < req.kv.cache_protected_len:
            return None
        slots = self.req_to_token_pool.req_to_token[row, n : n + m].to(torch.int64).clone()
        if self.positions is not None:
            pos = self.positions.slot_pos[slots].to(torch.int32).cpu()
        else:
            pos = torch.arange(n, n + m, dtype=torch.int32)
        res = self.store.insert(tuple(int(t) for t in req.output_ids[:m]), slots.cpu(), pos)
        if not res.inserted:
            return None
        res.node.authored_by = getattr(req, AGENT_ATTR)[0]
        self.claim_row_ranges(row, [(n, n + m)])
        self.authored.add(res.node)
        return res.node

    def find_authored(self, token_ids: TokenIds) -> AuthoredHit | None:
        """An authored master whose tokens are a sub-span of ``token_ids`` (authored.py)."""
        return self.authored.find(token_ids)

    def free_kv_row(self, kv: Any, ranges: list[tuple[int, int]]) -> None:
        """Free the row ranges, skipping claimed (master / mirror) entries."""
        claim = self._rows.get(kv.req_pool_idx)
        if claim is not None and claim.foreign:
            ranges = subtract_ranges(sorted(ranges), claim.foreign)
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
        laid_out.release_unadmitted(self, req)
        super().on_release(req, checkpointed=checkpointed)

    def _insert_limit(self, row: int | None) -> int | None:
        """Row entries past this index are not in true token order / not the request's own."""
        if row is None:
            return None
        claim = self._rows.get(row)
        limit = claim.first_foreign if claim is not None else None
        if self.positions is not None and self.positions.has_layout(row):
            n = int(self.positions.layout_len[row])
            pos = self.positions.req_to_pos[row, :n].to(torch.int64)
            moved = torch.nonzero(pos != torch.arange(n, device=pos.device))
            first_moved = int(moved[0, 0]) if moved.numel() else n
            limit = first_moved if limit is None else min(limit, first_moved)
        return limit

    # ---- narrow API for the KV Collector ----------------------------------------------------
    def lookup_segment(self, token_ids: TokenIds) -> AllGatherNode | None:
        """The master holding exactly ``token_ids`` (hash, then verified), or None."""
        return self.store.lookup(token_ids)

    def insert_segment(
        self, token_ids: TokenIds, slots: torch.Tensor, slot_positions: torch.Tensor
    ) -> SegmentInsert:
        """Store a master; with ``inserted=False`` an equal one exists and ``slots`` stay yours.

        If ``slots`` come from a running request's row, also :meth:`claim_row_ranges` them.
        """
        return self.store.insert(token_ids, slots, slot_positions)

    def attach_mirror(
        self,
        round_id: str,
        agent: str,
        node: AllGatherNode,
        indices: torch.Tensor | Sequence[int],
        slots: torch.Tensor | Sequence[int],
        *,
        req_pool_idx: int | None = None,
        at: int = 0,
    ) -> Mirror:
        """Give ``agent`` a mirror of ``node`` in ``round_id``; the cache takes ``slots``.

        Args:
            req_pool_idx: the row of the request whose prefill computed ``slots``: the mirror
                is then freed when that request is released (the serving path always passes
                it). Without it the mirror lives until :meth:`release_mirrors` or eviction.
            at: where the segment starts in the agent's prompt (one mirror per occurrence).

        A previous row-less mirror with the same key is replaced (and freed). If ``slots`` come
        from a running request's row, also :meth:`claim_row_ranges` them.

        Raises:
            ValueError: if a running row's mirror already has this key (replacing it would free
                slots under that request), or as :meth:`SegmentStore.attach_mirror`.
        """
        old = self.store.get_mirror(round_id, agent, node, at)
        if old is not None and any(old.key in c.mirrors for c in self._rows.values()):
            raise ValueError(f"{old!r} belongs to a running request; it cannot be replaced")
        mirror = self.store.attach_mirror(round_id, agent, node, indices, slots, at)
        if req_pool_idx is not None:
            self._rows.setdefault(req_pool_idx, RowClaim()).mirrors.append(mirror.key)
        self.ledger.record(mirror)
        return mirror

    def get_mirror(
        self, round_id: str, agent: str, node: AllGatherNode, at: int = 0
    ) -> Mirror | None:
        return self.store.get_mirror(round_id, agent, node, at)

    def resolve_mirror(
        self, round_id: str, agent: str, node: AllGatherNode, at: int = 0
    ) -> torch.Tensor:
        """The agent's ``L`` slots for the segment. Raises KeyError without a mirror."""
        return self.store.resolve(round_id, agent, node, at)

    def round_stats(self, round_id: str, kv_bytes_per_token: int | None = None) -> dict[str, Any]:
        """What ``round_id``'s mirrors stored at their fullest (the ledger: mirrors are freed
        with their requests), with bytes given the bytes per token."""
        out: dict[str, Any] = self.ledger.stats(round_id)
        if kv_bytes_per_token is not None:
            for name in ("master", "mirror", "dense_equiv", "stored"):
                out[f"{name}_bytes"] = int(out[f"{name}_tokens"]) * kv_bytes_per_token
            out["saved_bytes"] = out["dense_equiv_bytes"] - out["stored_bytes"]
        return out

    def release_mirrors(self, agent: str | None = None, round_id: str | None = None) -> int:
        """Free the matching mirrors (None matches all); returns slots freed."""
        return self.store.release_mirrors(agent=agent, round_id=round_id)

    def pin_segment(self, node: AllGatherNode, req_pool_idx: int | None = None) -> None:
        """Protect ``node`` while a request reads it; with ``req_pool_idx`` the pin is undone
        automatically when that row's request is released (``on_release``)."""
        self.store.pin(node)
        if req_pool_idx is not None:
            self._rows.setdefault(req_pool_idx, RowClaim()).pinned.append(node)

    def unpin_segment(self, node: AllGatherNode) -> None:
        """Undo a :meth:`pin_segment` made without a row."""
        self.store.unpin(node)

    def claim_row_ranges(self, req_pool_idx: int, ranges: Iterable[Range]) -> None:
        """Mark row ranges whose slots the request does not own (a master's, a mirror's, or a
        radix node's inserted out of band): its release will not free them and ``checkpoint``
        will not insert past the first of them. Ranges must lie in
        ``[cache_protected_len, kv_allocated_len)`` of the row's request (SGLang counts that
        span as the request's own; ``protected_size`` subtracts the claimed part)."""
        self._borrowed_tokens += self._rows.setdefault(req_pool_idx, RowClaim()).add(ranges)

    def release_row(self, req_pool_idx: int | None) -> None:
        """Drop a row's claim and pins and clear its layout (``on_release`` calls this)."""
        if req_pool_idx is None:
            return
        claim = self._rows.pop(req_pool_idx, None)
        if claim is not None:
            self._borrowed_tokens -= claim.foreign_tokens
            self.store.release_mirror_keys(claim.mirrors)
            for node in claim.pinned:
                self.store.unpin(node)
        if self.positions is not None and self.positions.has_layout(req_pool_idx):
            self.positions.clear_layout(req_pool_idx)
        get_probe_board(self.req_to_token_pool).pop(req_pool_idx)  # unread probes die here

    def row_claims(self) -> dict[int, RowClaim]:
        """The claims of running rows, by ``req_pool_idx`` (a copy of the table)."""
        return dict(self._rows)

    @property
    def borrowed_tokens(self) -> int:
        """Row entries of running requests that are claimed (owned by masters or mirrors)."""
        return self._borrowed_tokens

    def evict_segment(self, node: AllGatherNode) -> int:
        """Evict one master now, with its mirrors; returns slots freed. Raises if pinned."""
        return self.store.evict_node(node)

    def stats(
        self, kv_bytes_per_token: int | None = None, round_id: str | None = None
    ) -> dict[str, float | int | None]:
        """Store statistics (whole store, or one round's view), radix sizes and, given the
        bytes per token, the same totals in bytes."""
        out = self.store.stats(round_id)
        out.update(
            radix_evictable_tokens=self.evictable_size_, radix_protected_tokens=self.protected_size_
        )
        if kv_bytes_per_token is not None:
            for name in ("master", "mirror", "dense_equiv", "stored"):
                out[f"{name}_bytes"] = int(out[f"{name}_tokens"]) * kv_bytes_per_token
            out["saved_bytes"] = out["dense_equiv_bytes"] - out["stored_bytes"]
        return out

    def check_integrity(
        self, request_owned: Iterable[torch.Tensor] = (), *, idle: bool = False
    ) -> None:
        """Check the store, the radix sizes and a census of every slot of the real allocator.

        Args:
            request_owned: slots running requests own (their rows minus tree-owned prefix and
                claimed ranges; see ``row_owned_slots``). Call outside allocator free groups.
            idle: no request is running or held: then nothing may be protected (no row claims,
                pins, serving-path mirrors or radix locks), since nothing could read it.

        Raises:
            IntegrityError: naming leaked and double-owned slots and any other broken invariant.
        """
        problems = cache_problems(self, list(request_owned), idle=idle)
        if problems:
            raise IntegrityError("TokenDanceRadixCache integrity:\n  " + "\n  ".join(problems))

    def row_owned_slots(self, req_pool_idx: int, start: int, end: int) -> torch.Tensor:
        """Slots of ``row[start:end]`` that the row's request owns (claimed ranges removed)."""
        row = self.req_to_token_pool.req_to_token[req_pool_idx]
        claim = self._rows.get(req_pool_idx)
        ranges = [(start, end)] if claim is None else subtract_ranges([(start, end)], claim.foreign)
        parts = [row[a:b].to(torch.int64) for a, b in ranges]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def make_tree_cache(ctx: TreeCacheBuildContext) -> TokenDanceRadixCache:
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
    cache = TokenDanceRadixCache(ctx.params)
    logger.info("TokenDance radix cache: page size 1, LRU over radix leaves and masters")
    return cache
