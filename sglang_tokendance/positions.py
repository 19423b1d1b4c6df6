"""Position-tagged KV: the two position tables every TokenDance component shares.

SGLang stores K after RoPE and addresses KV through ``req_to_token[row, j] -> slot``. TokenDance
adds, beside the real pools:

- ``slot_pos[slot]``: the position at which the K in ``slot`` was rotated when written. The
  attention backend records it on every KV write (``slot_pos[out_cache_loc] = positions``).
- ``req_to_pos[row, j]``: the true prompt position of row entry ``j``. Only rows with a layout
  (``layout_len[row] > 0``) use it; for every other row the position of entry ``j`` is ``j``.
  Entries past ``layout_len[row]`` (decode tokens) are also at position ``j``.

A laid-out row (see DESIGN.md) looks like::

    row index j:  0 .......... p-1 | p ............ p+m-1 | p+m ........ n-1 | n ... (decode)
    holds:        private prefix   | reused master slots  | fresh tokens     | outputs
    req_to_pos:   0 .......... p-1 | scattered positions  | scattered        | j
    slot_pos:     = req_to_pos     | master's own writing | = req_to_pos     | = j
                                     position (delta != 0)

Positions of ``row[:layout_len]`` are a permutation of ``0..layout_len-1`` (checked by
:meth:`PositionTable.set_layout`), so decode needs no change: the next token sits at
``seq_len``. The attention backend rotates each key by ``req_to_pos - slot_pos`` and masks by
position. The table rides on SGLang's ``ReqToTokenPool`` (its ``PoolState`` record) so that the
tree cache, the batch hooks and the attention backend (all built from the same pools) find one
instance.
"""

from __future__ import annotations

import torch

from sglang_tokendance.state import pool_state


class PositionTable:
    """``slot_pos`` per KV slot and ``req_to_pos``/``layout_len`` per request row."""

    def __init__(self, num_rows: int, max_context_len: int, num_slots: int, device: str) -> None:
        """Args:
        num_rows: rows of ``req_to_token`` (including SGLang's padding row 0).
        max_context_len: columns of ``req_to_token``.
        num_slots: entries of the KV pool's buffers (``size + page_size``).
        device: where the model runs.
        """
        self.slot_pos = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.req_to_pos = torch.zeros((num_rows, max_context_len), dtype=torch.int32, device=device)
        self.layout_len = torch.zeros(num_rows, dtype=torch.int32, device=device)
        # Python mirror of layout_len != 0, so the hot path can skip tensors for plain batches.
        self.laid_out_rows: set[int] = set()
        # Bumped whenever a row's entries change other than by appending (a layout set or
        # cleared, entries repointed): attention's cached decode plans are valid while it holds.
        self.version = 0

    # ---- rows -------------------------------------------------------------------------------
    def set_layout(self, row: int, positions: torch.Tensor) -> None:
        """Give ``row`` the true positions of its first ``len(positions)`` entries.

        Raises:
            ValueError: if ``positions`` is not a permutation of ``0..len-1``.
        """
        n = int(positions.numel())
        if n == 0 or n > self.req_to_pos.shape[1]:
            raise ValueError(f"layout length {n} out of range for row {row}")
        pos = positions.to(torch.int64)
        seen = torch.zeros(n, dtype=torch.bool)
        if int(pos.min()) < 0 or int(pos.max()) >= n:
            raise ValueError(f"row {row}: layout positions must be a permutation of 0..{n - 1}")
        seen[pos.cpu()] = True
        if not bool(seen.all()):
            raise ValueError(f"row {row}: layout positions must be a permutation of 0..{n - 1}")
        self.req_to_pos[row, :n] = positions.to(self.req_to_pos.device, torch.int32)
        self.layout_len[row] = n
        self.laid_out_rows.add(row)
        self.version += 1

    def clear_layout(self, row: int) -> None:
        """Return ``row`` to the ordinary identity layout (call when the request releases it)."""
        if row in self.laid_out_rows:
            self.laid_out_rows.discard(row)
            self.layout_len[row] = 0
            self.version += 1

    def row_changed(self, row: int) -> None:
        """Note that ``row``'s slots were rewritten in place (e.g. repointed at a master)."""
        del row  # one counter for all rows: such rewrites happen once per request at most
        self.version += 1

    def has_layout(self, row: int) -> bool:
        return row in self.laid_out_rows

    def row_positions(self, row: int, seq_len: int) -> torch.Tensor:
        """True positions of ``row[:seq_len]`` (int64), identity for ordinary rows."""
        n = int(self.layout_len[row]) if row in self.laid_out_rows else 0
        ar = torch.arange(seq_len, dtype=torch.int64, device=self.req_to_pos.device)
        if n == 0:
            return ar
        m = min(n, seq_len)
        out = ar.clone()
        out[:m] = self.req_to_pos[row, :m].to(torch.int64)
        return out

    # ---- slots ------------------------------------------------------------------------------
    def record_write(self, out_cache_loc: torch.Tensor, positions: torch.Tensor) -> None:
        """Record that the K written at ``out_cache_loc`` was rotated at ``positions``."""
        self.slot_pos[out_cache_loc.long()] = positions.to(torch.int32)


def get_position_table(req_to_token_pool: object, kv_pool: object | None = None) -> PositionTable:
    """The table attached to ``req_to_token_pool`` (created on first use).

    Args:
        req_to_token_pool: SGLang's ``ReqToTokenPool`` (owner of the table).
        kv_pool: SGLang's KV pool (``MHATokenToKVPool``); needed on first use for the slot count.
    """
    st = pool_state(req_to_token_pool)
    table = st.positions
    if table is None:
        if kv_pool is None:
            raise ValueError("the position table is not created yet: pass the KV pool")
        rows, ctx = req_to_token_pool.req_to_token.shape  # type: ignore[attr-defined]
        num_slots = int(kv_pool.k_buffer[0].shape[0])  # type: ignore[attr-defined]
        device = str(req_to_token_pool.req_to_token.device)  # type: ignore[attr-defined]
        table = st.positions = PositionTable(rows, ctx, num_slots, device)
    return table
