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
from collections.abc import Callable, Iterable, Sequence
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
from .eviction import evict_lru
from .integrity import cache_problems, kv_bytes_per_token
from .ledger import RoundLedger
from .nodes import AllGatherNode, HashFn, Mirror, token_hash
from .rows import Range, RowClaim, RowTable, index_runs
from .store import IntegrityError, SegmentInsert, SegmentStore, TokenIds

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)

RowListener = Callable[[int], None]

PAGE_SIZE_ERROR = (
    "TokenDance requires --page-size 1 (got {}): masters and mirrors address single KV slots"
)

__all__ = ["TokenDanceRadixCache", "kv_bytes_per_token", "make_tree_cache"]


class TokenDanceRadixCache(RadixCache):
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
        if old is not None and self.rows.owns_mirror(old.key):
            raise ValueError(f"{old!r} belongs to a running request; it cannot be replaced")
        mirror = self.store.attach_mirror(round_id, agent, node, indices, slots, at)
        if req_pool_idx is not None:
            self.rows.add_mirror(req_pool_idx, mirror.key)
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

    def release_match_pins(self, req: Req) -> None:
        """pic: the prefill is done, so the masters its dense copy came from may be evicted."""
        row_admission.release_unadmitted(self, req)

    def copy_slots(self, slots: torch.Tensor) -> torch.Tensor | None:
        """Fresh slots holding a copy of ``slots``' KV, or None without room (pic masters)."""
        return row_admission.copy_to_new_slots(self, slots)

    def pin_segment(self, node: AllGatherNode, req_pool_idx: int | None = None) -> None:
        """Protect ``node`` while a request reads it; with ``req_pool_idx`` the pin is undone
        automatically when that row's request is released (``on_release``)."""
        self.store.pin(node)
        if req_pool_idx is not None:
            self.rows.pin(req_pool_idx, node)

    def unpin_segment(self, node: AllGatherNode) -> None:
        """Undo a :meth:`pin_segment` made without a row."""
        self.store.unpin(node)

    def claim_row_ranges(self, req_pool_idx: int, ranges: Iterable[Range]) -> None:
        """Mark row ranges whose slots the request does not own (a master's, a mirror's, or a
        radix node's inserted out of band): its release will not free them and ``checkpoint``
        will not insert past the first of them. Ranges must lie in
        ``[cache_protected_len, kv_allocated_len)`` of the row's request (SGLang counts that
        span as the request's own; ``protected_size`` subtracts the claimed part)."""
        self.rows.claim(req_pool_idx, ranges)

    def release_row(self, req_pool_idx: int | None) -> None:
        """Drop a row's claim and pins and clear its layout (``on_release`` calls this)."""
        if req_pool_idx is None:
            return
        claim = self.rows.pop(req_pool_idx)
        if claim is not None:
            self.store.release_mirror_keys(claim.mirrors)
            for node in claim.pinned:
                self.store.unpin(node)
        if self.positions is not None and self.positions.has_layout(req_pool_idx):
            self.positions.clear_layout(req_pool_idx)
        for listener in self.row_listeners:
            listener(req_pool_idx)

    def row_claims(self) -> dict[int, RowClaim]:
        """The claims of running rows, by ``req_pool_idx`` (a copy of the table)."""
        return self.rows.claims()

    @property
    def borrowed_tokens(self) -> int:
        """Row entries of running requests that are claimed (owned by masters or mirrors)."""
        return self.rows.borrowed_tokens

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

    def row_slots(self, req_pool_idx: int, index: torch.Tensor) -> torch.Tensor:
        """The KV slots at ``index`` (row entries) of a running row, as a new int64 tensor."""
        return self.req_to_token_pool.req_to_token[req_pool_idx][index].to(torch.int64).clone()

    def repoint_row(
        self,
        req_pool_idx: int,
        index: torch.Tensor,
        master_slots: torch.Tensor,
        nodes: Sequence[AllGatherNode],
        round_id: str,
        *,
        no_diff: Sequence[AllGatherNode] = (),
    ) -> int:
        """Point a running row's entries ``index`` at ``master_slots`` (slots of ``nodes``'
        masters) and free the slots they held (``--tokendance-mirror drop``, and ``threshold``
        for the slots close to the master's); returns slots freed. One call per row: the
        entries of every segment the row drops at once.

        ``no_diff``: the views to count in the round ledger as ones with no diff (a view that
        also keeps a mirror is counted when the mirror is attached).

        The entries must be the request's own (fresh) slots. They become claimed (foreign) and
        the row pins every node of ``nodes``, so releasing the request frees neither a master
        nor anything twice; the row's true positions stay, so attention rotates the master's
        keys by the difference, as for any reused entry.
        """
        idx = index.to(torch.int64)
        table = self.req_to_token_pool.req_to_token
        old = table[req_pool_idx, idx].to(torch.int64).clone()
        table[req_pool_idx, idx] = master_slots.to(device=table.device, dtype=table.dtype)
        if self.positions is not None:
            self.positions.row_changed(req_pool_idx)
        for node in nodes:
            self.pin_segment(node, req_pool_idx)
        self.claim_row_ranges(req_pool_idx, index_runs(torch.sort(idx).values))
        self.token_to_kv_pool_allocator.free(old.to(self.token_to_kv_pool_allocator.device))
        for node in no_diff:
            self.ledger.record_use(round_id, node, 0)  # a view of the master with no diff
        return int(old.numel())

    def row_owned_slots(self, req_pool_idx: int, start: int, end: int) -> torch.Tensor:
        """Slots of ``row[start:end]`` that the row's request owns (claimed ranges removed)."""
        row = self.req_to_token_pool.req_to_token[req_pool_idx]
        ranges = self.rows.own_ranges(req_pool_idx, start, end)
        parts = [row[a:b].to(torch.int64) for a, b in ranges]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


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
