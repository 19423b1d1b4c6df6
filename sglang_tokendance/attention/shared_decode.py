"""Shared decode: the master keys of a batch read once for all rows, not once per row.

In a round every agent's row holds the same masters, each at its own offset: today's decode
(:func:`.batch_exec.decode_batch`) gathers and rotates every row's copy of every master key.
RoPE is a rotation, so ``q . R(d) k == R(-d) q . k``: instead of rotating a master's keys to
each row's positions, rotate each row's query back by that row's delta for the master, and the
master's keys are one tensor every row's query is multiplied with (a GEMM over the batch).

A plan splits each row's keys into two disjoint parts (every key counted exactly once)::

    shared tiles (keys held by >= 2 rows, T keys per tile, one delta per row and tile)
        master m0 (70 keys): tile 0 [m0 x 32] tile 1 [m0 x 32] tile 2 [m0 x 6, padding]
        master m1 (40 keys): tile 3 [m1 x 32] tile 4 [m1 x 8, padding]
        row b attends tile t's key i  iff  mask[b, t * T + i]
        row b's query for tile t is rotated by -delta[b, t]
    private keys (everything else: private prefix, kept mirror slots, fresh, decoded tokens,
        and any shared entry whose delta differs from its tile's): gathered and rotated per
        row as in :mod:`.batch_plan`; decode steps append here

Tiles come from the shared slots ordered by where the row holding the most of them holds them
(a key that row lacks, for its own mirror slot there, sits beside its master's neighbouring
key: :func:`_fill_gaps`), cut wherever a row holds two neighbours at different deltas (two
masters, or one master twice), where runs were not written at consecutive positions, and every
T keys; runs shorter than MIN_RUN stay private. The grouping is only about speed: an entry
whose delta is not its tile's stays private, so the result is the same attention whatever the
grouping. One softmax over both parts: their maxima and sums are joined, each part kept in its
matmul's layout. No SGLang import.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglang_tokendance.attention import batch_exec as bx
from sglang_tokendance.attention import batch_plan as bp
from sglang_tokendance.attention.rope import RopeParams, delta_cos_sin, full_width, swap_pairs

TILE = 32  # keys per shared tile (masters are cut into tiles; padding is masked)
MIN_SHARED = 0.25  # shared keys must be at least this share of the batch's keys, and ...
# ... the plan must be cheaper than the rows path: a tile key (rows x tile keys, a dense GEMM)
# costs about this fraction of a key a row gathers and rotates (benchmarks/decode_paths.py on
# 2 CPU cores, tiny-model heads: 0.03-0.04 us against 0.2 us)
TILE_KEY_COST = 0.2
MIN_RUN = 4  # shared runs shorter than this stay private keys
GAP = 64  # order codes of the anchor row's keys are this far apart (see _fill_gaps)


class SharedPlan(NamedTuple):
    """One decode batch's keys split into shared tiles and private keys (batch order)."""

    tile_slots: torch.Tensor  # int64 [NT * T]: the tiles' slots (0 for padding)
    mask: torch.Tensor  # bool [B, NT * T]: row b attends this tile key
    bias: torch.Tensor  # float32 [NT, 1, B, 1, T]: 0 where mask, -inf elsewhere
    q_rot: tuple[torch.Tensor, torch.Tensor]  # float32 [NT, 1, B, 1, D]: queries by -delta
    private: bp.BatchKeys  # the rest of every row's keys, compacted (decode appends here)
    shared_keys: int  # row entries served by the tiles
    tiles: int
    seq_lens: list[int]  # every row's whole key count (tiles + private), host side


def plan_shared(
    rows: torch.Tensor,
    seq_lens: list[int],
    tables: bp.Tables,
    rope: RopeParams,
    headroom: int = bp.DECODE_HEADROOM,
    tile: int = TILE,
) -> SharedPlan | None:
    """The shared plan of a decode batch, or None when too few keys are shared to gain.

    Vectorized: sorts and scatters over the batch's entries, no per-row Python loop.
    """
    slots, key_pos, delta, valid = bp.row_keys(rows, seq_lens, tables, max(seq_lens))
    nb, width = slots.shape
    if nb < 2:
        return None
    dev = slots.device
    uses = torch.bincount(slots[valid], minlength=int(tables.slot_pos.shape[0]))
    cand = valid & (uses[slots] >= 2)
    ncand = int(cand.sum())
    if ncand < MIN_SHARED * int(valid.sum()):
        return None
    b_e, j_e = cand.nonzero(as_tuple=True)
    s_e, d_e = slots[b_e, j_e], delta[b_e, j_e]
    uniq, u_e = torch.unique(s_e, return_inverse=True)
    nu = int(uniq.numel())
    # order the shared slots by where the row holding the most shared keys holds them (a
    # master agent or a drop row holds every key of its masters, in one run each), then the
    # next fullest row for the slots it does not hold
    fill = torch.zeros(nb, dtype=torch.int64, device=dev).index_add_(0, b_e, torch.ones_like(b_e))
    row_rank = torch.empty_like(fill)
    row_rank[torch.argsort(-fill, stable=True)] = torch.arange(nb, device=dev)
    span = (int(key_pos[valid].max()) + 1) * GAP
    code = row_rank[b_e] * span + key_pos[b_e, j_e] * GAP
    first = torch.full((nu,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, u_e, code, "amin")
    first = _fill_gaps(first, cand, slots, key_pos, delta, b_e, j_e, u_e, span)
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(nu, device=dev)
    r_e = rank[u_e]
    # each row's delta per shared slot (a slot held twice by a row keeps one: the other is
    # private, by the check below)
    none = torch.iinfo(torch.int64).min
    dm = torch.full((nb, nu), none, dtype=torch.int64, device=dev)
    dm[b_e, r_e] = d_e
    used = dm != none
    # runs: cut between neighbours some row holds at different deltas, or not written at
    # consecutive positions; runs shorter than MIN_RUN stay private (a tile for a few keys)
    pos_sorted = tables.slot_pos[uniq[order]].to(torch.int64)
    cut = torch.ones(nu, dtype=torch.bool, device=dev)
    if nu > 1:
        both = used[:, 1:] & used[:, :-1]
        apart = pos_sorted[1:] != pos_sorted[:-1] + 1
        cut[1:] = (both & (dm[:, 1:] != dm[:, :-1])).any(0) | apart
    seg = torch.cumsum(cut.to(torch.int64), 0) - 1
    starts = torch.nonzero(cut).flatten()
    seg_len = torch.diff(torch.cat([starts, starts.new_tensor([nu])]))
    long = seg_len[seg] >= MIN_RUN
    used &= long.view(1, -1)
    seg_len = seg_len.masked_fill(seg_len < MIN_RUN, 0)
    in_seg = torch.arange(nu, device=dev) - starts[seg]
    seg_tiles = -(-seg_len // tile)
    base = torch.cumsum(seg_tiles, 0) - seg_tiles
    tile_of = base[seg] + in_seg // tile  # (meaningless for slots of short runs: unused)
    col = tile_of * tile + in_seg % tile  # flat key index of each sorted shared slot
    nt = int(seg_tiles.sum())
    if nt == 0:
        return None
    tile_slots = torch.zeros(nt * tile, dtype=torch.int64, device=dev)
    tile_slots[col[long]] = uniq[order][long]
    tile_of = tile_of.clamp(max=nt - 1)
    col = col.clamp(max=nt * tile - 1)
    # one delta per (row, tile): the smallest the row holds there; other entries stay private
    tdel = torch.zeros((nb, nt), dtype=torch.int64, device=dev)
    tdel.scatter_reduce_(
        1, tile_of.view(1, -1).expand(nb, -1), dm.masked_fill(~used, 1 << 40), "amin",
        include_self=False,
    )  # fmt: skip
    coll = used & (dm == tdel[:, tile_of])
    served = int(coll.sum())
    total = int(valid.sum())
    if served < MIN_SHARED * total or TILE_KEY_COST * nb * nt * tile + total - served >= total:
        return None
    mask = torch.zeros((nb, nt * tile), dtype=torch.bool, device=dev)
    mask[:, col[long]] = coll[:, long]
    # entries served by a tile leave the private part
    shared_e = coll[b_e, r_e] & (dm[b_e, r_e] == d_e)
    private = valid.clone()
    private[b_e[shared_e], j_e[shared_e]] = False
    c, s = full_width(*delta_cos_sin(-tdel.t().reshape(-1), rope.inv_freq), rope)
    q_rot = (c.view(nt, 1, nb, 1, -1), s.view(nt, 1, nb, 1, -1))
    bias = torch.zeros((nb, nt, tile), dtype=torch.float32, device=dev)
    bias.masked_fill_(~mask.view(nb, nt, tile), float("-inf"))
    bias = bias.transpose(0, 1).reshape(nt, 1, nb, 1, tile)
    priv = _compact(slots, key_pos, delta, private, rope, headroom)
    return SharedPlan(tile_slots, mask, bias, q_rot, priv, served, nt, list(seq_lens))


def _fill_gaps(
    first: torch.Tensor,
    cand: torch.Tensor,
    slots: torch.Tensor,
    key_pos: torch.Tensor,
    delta: torch.Tensor,
    b_e: torch.Tensor,
    j_e: torch.Tensor,
    u_e: torch.Tensor,
    span: int,
) -> torch.Tensor:
    """Order keys the fullest row lacks (it holds a mirror slot there) beside their master.

    A master key the anchor row A replaced by its own mirror slot is first held by a later row
    B, so by B's code it would sort after all of A's keys: a run of its own, and a cut in A's
    run around it (its neighbours' positions are no longer consecutive). B holds it next to
    the master's previous (or next) key, at consecutive positions with the same delta; that
    neighbour has A's code, so the key takes the code one step after (before) it. Codes are
    ``GAP`` apart, so a gap of up to ``GAP / 2`` keys fills in order::

        A:  m0 m1 [A's mirror] m3        codes 0 . GAP . 2 GAP .. 3 GAP
        B:  m0 m1 m2           m3        m2 from B's row: code(m1) + 1 = GAP + 1

    A gap's key that every neighbour of it lacks keeps its own code.
    """
    nb, width = slots.shape
    u_of = torch.full((nb, width), -1, dtype=torch.int64, device=slots.device)
    u_of[b_e, j_e] = u_e
    # entries whose row neighbour is the same master's neighbouring key
    same = (
        cand[:, 1:] & cand[:, :-1]
        & (delta[:, 1:] == delta[:, :-1])
        & (key_pos[:, 1:] == key_pos[:, :-1] + 1)
    )  # fmt: skip
    bp_, jp = same.nonzero(as_tuple=True)  # entry (b, jp + 1) follows entry (b, jp)
    after, before = u_of[bp_, jp + 1], u_of[bp_, jp]
    # each link both ways: (key, its neighbour, the step from the neighbour's code)
    key = torch.cat([after, before])
    nbr = torch.cat([before, after])
    step = torch.cat([torch.ones_like(after), -torch.ones_like(before)])
    for _ in range(GAP // 2):
        proposal = first[nbr] + step
        better = first[nbr] // span < first[key] // span  # the neighbour's anchor row is fuller
        if not bool(better.any()):
            break
        first = first.scatter_reduce(0, key[better], proposal[better], "amin")
    return first


def _compact(
    slots: torch.Tensor,
    key_pos: torch.Tensor,
    delta: torch.Tensor,
    keep: torch.Tensor,
    rope: RopeParams,
    headroom: int,
) -> bp.BatchKeys:
    """The kept entries of each row moved to its front (stable), as a :class:`bp.BatchKeys`
    with room for ``headroom`` decode steps."""
    lens = keep.sum(1)
    width = max(1, bp.bucket(int(lens.max()) + headroom))
    perm = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    pad = max(0, width - slots.shape[1])
    take = perm[:, :width] if pad == 0 else torch.nn.functional.pad(perm, (0, pad))

    def pick(t: torch.Tensor, fill: int) -> torch.Tensor:
        out = t.gather(1, take.clamp(max=t.shape[1] - 1))
        j = torch.arange(width, device=t.device).view(1, -1)
        return out.masked_fill_(j >= lens.view(-1, 1), fill)

    p_slots, p_pos = pick(slots, 0), pick(key_pos, bp.BIG)
    p_delta = pick(delta, 0)
    valid = torch.arange(width, device=slots.device).view(1, -1) < lens.view(-1, 1)
    rot, moves = bp.key_rotation(p_delta, rope)
    return bp.BatchKeys(lens.tolist(), p_slots, p_pos, valid, rot, moves)


def append_step(plan: SharedPlan, new_slots: torch.Tensor) -> SharedPlan | None:
    """The plan one decode step later (the new tokens are private keys), or None to rebuild."""
    priv = bp.append_decode(plan.private, new_slots)
    if priv is None:
        return None
    return plan._replace(private=priv, seq_lens=[n + 1 for n in plan.seq_lens])


def shared_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: SharedPlan,
    rope: RopeParams,
    scale: float,
    ws: bx.Workspace | None = None,
) -> torch.Tensor:
    """Decode attention of one query per row (``q`` ``[B, H, D]``) -> ``[B, H, Dv]``.

    Shared tiles: one gather of their keys for the batch, each row's query rotated per tile,
    one batched matmul; private keys: gathered and rotated per row (:func:`bx.gather_block`). One
    softmax over both parts, each kept in the layout its matmul produced (no transposed copy
    of the scores): their maxima and sums are joined instead.
    """
    ws = ws or bx.Workspace()
    nb, heads, dim = q.shape
    hkv = k_buffer.shape[1]
    rep = heads // hkv
    dv = v_buffer.shape[-1]
    nt = plan.tiles
    tile = int(plan.tile_slots.numel()) // nt
    f32 = torch.float32
    kt = k_buffer.index_select(0, plan.tile_slots).to(f32).view(nt, tile, hkv, dim)
    vt = v_buffer.index_select(0, plan.tile_slots).to(f32).view(nt, tile, hkv, dv)
    # queries as [Hkv, B, rep, D], rotated back per tile: [NT, Hkv, B, rep, D]
    qh = q.to(f32).view(nb, hkv, rep, dim).transpose(0, 1).contiguous()
    c, s = plan.q_rot  # [NT, 1, B, 1, D]
    qr = qh * c
    qr.addcmul_(swap_pairs(qh, rope), s)
    s_sh = torch.matmul(qr.view(nt, hkv, nb * rep, dim), kt.permute(0, 2, 3, 1))
    s_sh = s_sh.view(nt, hkv, nb, rep, tile).mul_(scale).add_(plan.bias)  # [NT,Hkv,B,rep,T]
    priv = plan.private
    n = max(priv.seq_lens)
    kp, vp = bx.gather_block(ws, k_buffer, v_buffer, priv, 0, nb, n, rope)  # [B, n, Hkv, D]
    s_p = torch.matmul(qh.permute(1, 0, 2, 3), kp.to(f32).permute(0, 2, 3, 1))  # [B,Hkv,rep,n]
    s_p.mul_(scale).masked_fill_(~priv.valid[:, :n].view(nb, 1, 1, n), float("-inf"))
    top = torch.maximum(s_sh.amax(dim=(0, 4)), s_p.amax(dim=-1).transpose(0, 1))  # [Hkv,B,rep]
    s_sh.sub_(top.view(1, hkv, nb, rep, 1)).exp_()
    s_p.sub_(top.transpose(0, 1).unsqueeze(-1)).exp_()
    total = s_sh.sum(dim=(0, 4)) + s_p.sum(dim=-1).transpose(0, 1)  # [Hkv, B, rep]
    o_sh = torch.matmul(s_sh.view(nt, hkv, nb * rep, tile), vt.permute(0, 2, 1, 3)).sum(0)
    o_p = torch.matmul(s_p, vp.to(f32).permute(0, 2, 1, 3))  # [B, Hkv, rep, Dv]
    out = o_sh.view(hkv, nb, rep, dv).add_(o_p.transpose(0, 1)).div_(total.unsqueeze(-1))
    return out.transpose(0, 1).reshape(nb, heads, dv).to(q.dtype)
