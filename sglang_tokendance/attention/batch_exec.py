"""The torch path's execution of a :class:`~.batch_plan.BatchKeys` plan: keys gathered and
rotated into a reused workspace by blocks of rows, then SDPA (decode: a block of rows per call;
extend: a row's queries by blocks over its position-sorted keys).

Why blocks of rows and a reused workspace (measured on 2 CPU cores, tiny model shapes, 64 rows
of 3.8k keys): gathering and rotating the whole batch at once makes ~60 MB temporaries that
leave the cache and are fresh mmap'd allocations (page faults): 54 ms a layer against 18 ms for
SGLang's torch_native per-request loop; gathered into a reused workspace in blocks sized to the
L2 cache, the same work is 18 ms. Decode attends a block of rows of one padded length in one
SDPA call (rows padded to a multiple of ``BUCKET``, not to the batch's longest: a row's output
then does not depend on what it is batched with); extend attends row by row (rows of an extend
differ a lot in length: one shape would pad up to twice the FLOPs).

An extend plan is built ``by_position``: each row's keys sorted by true position. A row's
positions are a permutation of ``0..seq_len-1``, so the keys a query at position p may see are
then exactly the row's first p + 1 columns, and a block of queries whose largest position is P
attends only ``P + 1`` keys instead of the whole row (:func:`extend_blocks`)::

    keys by position:  0 1 2 ........................................ n-1
    query block 0 (positions <= P0):  [0 .. P0]
    query block 1 (positions <= P1):  [0 ........ P1]
    query block 2 (the row's last):   [0 ................................ n-1]

A fresh prompt's queries are causal, so in blocks they cost about half the full product; a
reusing row's recomputed tokens are spread through the prompt and gain as much on their part.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_tokendance.attention.batch_plan import BatchKeys, bucket
from sglang_tokendance.attention.rope import RopeParams, swap_pairs

BLOCK_BYTES = 3 << 20  # K, V and the swap buffer of one block of rows: about one L2 cache
QUERY_BLOCKS = 8  # an extend row's queries attend in at most this many blocks ...
MIN_BLOCK_QUERIES = 64  # ... of at least this many queries (an SDPA call has a fixed cost)


class Workspace:
    """Reused buffers for the gathered K, V and swapped K of one block (grown on demand)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` rows shaped like ``like``'s rows (``[n, *like.shape[1:]]``)."""
        key = (name, like.dtype, like.device)
        buf = self._bufs.get(key)
        row = like[0].numel()
        if buf is None or buf.numel() < n * row:
            buf = self._bufs[key] = torch.empty(
                max(n, 1) * row, dtype=like.dtype, device=like.device
            )
        return buf[: n * row].view(n, *like.shape[1:])


def gather_block(
    ws: Workspace,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: BatchKeys,
    b0: int,
    b1: int,
    n: int,
    rope: RopeParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``b0:b1`` (their first ``n`` keys): ``[g, n, Hkv, D]`` keys rotated to their true
    positions, and values, in the workspace."""
    g = b1 - b0
    idx = plan.slots[b0:b1, :n].reshape(-1)
    k = torch.index_select(k_buffer, 0, idx, out=ws.get("k", k_buffer, g * n))
    v = torch.index_select(v_buffer, 0, idx, out=ws.get("v", v_buffer, g * n))
    k, v = k.view(g, n, *k.shape[1:]), v.view(g, n, *v.shape[1:])
    if plan.rot is not None and any(plan.moves[b0:b1]):
        c, s = plan.rot[0][b0:b1, :n], plan.rot[1][b0:b1, :n]
        if k.dtype != c.dtype:  # half-precision pools: rotate in float32
            kf = k.to(c.dtype)
            k.copy_(kf.mul_(c).addcmul_(swap_pairs(kf, rope), s))
        else:
            swapped = ws.get("swap", k_buffer, g * n).view_as(k)
            swap_pairs(k, rope, out=swapped)
            k.mul_(c).addcmul_(swapped, s)
    return k, v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """SDPA over ``[g, nq, H, D]`` queries and ``[g, n, Hkv, D]`` keys/values."""
    if not (q.dtype == k.dtype == v.dtype):
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)  # [g, nq, H, Dv]


def block_rows(plan: BatchKeys, k_buffer: torch.Tensor) -> int:
    """Rows per block: K, V and the swap buffer of a block fit in about ``BLOCK_BYTES``."""
    per_row = 3 * plan.width * k_buffer[0].numel() * k_buffer.element_size()
    return max(1, BLOCK_BYTES // max(per_row, 1))


def decode_groups(plan: BatchKeys, k_buffer: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(first, end, padded length)`` of each block of plan rows decode attends at once: rows
    of one padded length (adjacent in a sorted plan), at most ``block_rows`` of them."""
    most = block_rows(plan, k_buffer)
    pads = [min(bucket(s), plan.width) for s in plan.seq_lens]
    groups, i = [], 0
    while i < len(pads):
        j = i + 1
        while j < len(pads) and pads[j] == pads[i] and j - i < most:
            j += 1
        groups.append((i, j, pads[i]))
        i = j
    return groups


def decode_batch(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: BatchKeys,
    rope: RopeParams,
    scale: float,
    ws: Workspace | None = None,
    groups: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """Decode attention of one query per row (``q`` ``[B, H, D]``, batch order) -> ``[B, H, Dv]``.

    A row's positions are a permutation of ``0..seq_len-1`` and its query sits at ``seq_len-1``,
    so every valid key is visible: the mask only hides padding. Each row is padded to
    :func:`bucket` of its length, never to its batch's longest row: CPU SDPA gives a row the same
    bits whatever else is in the call, so a row's output does not depend on its batch.
    """
    ws = ws or Workspace()
    if plan.order is not None:
        q = q[plan.order]
    out = q.new_empty((q.shape[0], q.shape[1], v_buffer.shape[-1]))
    for b0, b1, n in groups or decode_groups(plan, k_buffer):
        k, v = gather_block(ws, k_buffer, v_buffer, plan, b0, b1, n, rope)
        mask = plan.valid[b0:b1, :n].view(b1 - b0, 1, 1, n)
        out[b0:b1] = _sdpa(q[b0:b1].unsqueeze(1), k, v, mask, scale).squeeze(1)
    if plan.order is not None:
        out[plan.order] = out.clone()
    return out


Block = tuple[int, int, int]  # (first query, end query, keys attended), row-relative


def extend_blocks(
    plan: BatchKeys, ext_lens: list[int], positions: torch.Tensor
) -> list[list[Block]]:
    """Each extend row's query blocks and how many of its keys each block attends.

    With a ``by_position`` plan a row's queries are cut into at most :data:`QUERY_BLOCKS`
    blocks of at least :data:`MIN_BLOCK_QUERIES`; a block attends the keys up to its largest
    query position (a prefix of the sorted row). Otherwise one block attends the whole row.
    Computed once per forward (every layer reads it); queries need not be in position order.
    """
    if not plan.by_position:
        return [[(0, e, n)] for e, n in zip(ext_lens, plan.seq_lens, strict=True)]
    cuts = []  # per row: its block boundaries
    for e in ext_lens:
        nb = max(1, min(QUERY_BLOCKS, e // MIN_BLOCK_QUERIES))
        cuts.append([e * i // nb for i in range(nb + 1)])
    spans = [(b, i, a, z) for b, row in enumerate(cuts) for i, (a, z) in enumerate(pairwise(row))]
    dev = plan.key_pos.device
    sizes = torch.tensor([z - a for _, _, a, z in spans], device=dev)
    block_of = torch.repeat_interleave(torch.arange(len(spans), device=dev), sizes)
    top = torch.full((len(spans),), -1, dtype=torch.int64, device=dev)  # largest query position
    top.scatter_reduce_(0, block_of, positions[: len(block_of)].to(dev, torch.int64), "amax")
    tops = torch.full((len(cuts), max(len(r) - 1 for r in cuts)), -1, dtype=torch.int64, device=dev)
    where = torch.tensor([[b, i] for b, i, _, _ in spans], device=dev).view(-1, 2)
    tops[where[:, 0], where[:, 1]] = top
    seen = torch.searchsorted(plan.key_pos, tops, right=True).tolist()  # keys <= each top
    out: list[list[Block]] = [[] for _ in cuts]
    for b, i, a, z in spans:
        if z > a:
            out[b].append((a, z, seen[b][i]))
    return out


def extend_rows(
    q: torch.Tensor,
    out: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: BatchKeys,
    ext_lens: list[int],
    positions: torch.Tensor,
    rope: RopeParams,
    scale: float,
    ws: Workspace | None = None,
    blocks: list[list[Block]] | None = None,
) -> None:
    """Extend attention of a batch, row by row: reads flat ``q`` ``[T, H, D]`` and writes
    ``out`` ``[T, H, Dv]``. Visibility is by position (``key_pos <= query_pos``), not by row
    index: a laid-out row holds its keys in any order. ``blocks``: from :func:`extend_blocks`
    (computed here when not given)."""
    ws = ws or Workspace()
    if blocks is None:
        blocks = extend_blocks(plan, ext_lens, positions)
    t = 0
    for b, (e, n) in enumerate(zip(ext_lens, plan.seq_lens, strict=True)):
        k, v = gather_block(ws, k_buffer, v_buffer, plan, b, b + 1, n, rope)
        qpos = positions[t : t + e].to(torch.int64)
        for q0, q1, m in blocks[b]:
            mask = plan.key_pos[b, :m].view(1, -1) <= qpos[q0:q1].view(-1, 1)
            res = _sdpa(
                q[t + q0 : t + q1].unsqueeze(0), k[:, :m], v[:, :m], mask.view(1, 1, -1, m), scale
            )
            out[t + q0 : t + q1] = res.squeeze(0).to(out.dtype)
        t += e
