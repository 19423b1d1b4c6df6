"""The collector's side of :class:`~.radix.TokenDanceRadixCache` (a mixin, split out for size).

Everything the KV Collector asks of the cache (:class:`~.api.CollectorCache`): masters in and
out of the store, mirrors, pins, row claims and repointing, statistics and the integrity check.
The SGLang overrides (match, checkpoint, release, eviction, budget) stay in ``radix.py``; the
state below is the radix cache's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..positions import PositionTable
from . import row_admission
from .integrity import cache_problems
from .ledger import RoundLedger
from .nodes import AllGatherNode, Mirror
from .rows import Range, RowClaim, RowTable, index_runs
from .store import IntegrityError, SegmentInsert, SegmentStore, TokenIds

if TYPE_CHECKING:
    from collections.abc import Callable

    from sglang.srt.managers.schedule_batch import Req


class CollectorSide:
    """The narrow API for the KV Collector; mixed into the radix cache, whose state it uses."""

    store: SegmentStore
    rows: RowTable
    ledger: RoundLedger
    positions: PositionTable | None
    row_listeners: list[Callable[[int], None]]
    req_to_token_pool: Any
    token_to_kv_pool_allocator: Any
    evictable_size_: int
    protected_size_: int

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
        return _with_bytes(out, kv_bytes_per_token)

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
        return _with_bytes(out, kv_bytes_per_token)

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


def _with_bytes(out: dict[str, Any], kv_bytes_per_token: int | None) -> dict[str, Any]:
    """``out`` with the store's token totals also in bytes, given the bytes per token."""
    if kv_bytes_per_token is not None:
        for name in ("master", "mirror", "dense_equiv", "stored"):
            out[f"{name}_bytes"] = int(out[f"{name}_tokens"]) * kv_bytes_per_token
        out["saved_bytes"] = out["dense_equiv_bytes"] - out["stored_bytes"]
    return out
