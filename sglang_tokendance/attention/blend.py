"""pic mode = CacheBlend: a per-request token subset in the model's layer loop.

A pic row is in true order and every prompt token past its radix hit is an ordinary extend
token (SGLang allocated and admitted all of them: the dense copy). Per forward, for the reused
tokens (those inside a shared segment that has a master, :attr:`RowLayout.blend_src`)::

    before layer 0   seed: slot <- master K rotated to the token's true position, master V,
                     for layers check..L-1 (earlier layers are overwritten by the forward anyway)
    layers 0..check  every extend token runs, in the request's own context (attends to its
                     cached prefix and to the others), writing fresh K/V
    at check         deviation d_t = sum over heads, dims of (K_fresh - K_seed)^2, taken at the
                     KV write, before the fresh K replaces the seed (TaggedAttention.forward)
    after check      per request, its ceil(ratio * reused) tokens of largest d_t stay, with
                     every non-reused token and the last token of each request (the logits
                     processor reads it); hidden, residual, positions, out_cache_loc and the
                     extend lengths shrink to them. Dropped tokens keep the seed in later layers.

Batches with no pic row never reach :func:`blend_forward`: SGLang's model forward runs as is.
LMCache's blender (check layer 1, ratio 0.15) selects the same way; it compares over the whole
prompt, this over the reused tokens only (the others are recomputed anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from sglang_tokendance.attention.rope import RopeParams, rotate_by_delta


@dataclass(slots=True)
class BlendPlan:
    """One forward's pic work (built from the batch's layouts, read by every layer).

    Attributes:
        tok: int64 [R]: flat indices (forward token order) of the reused tokens.
        src: int64 [R]: the master slot each one is seeded from.
        req_of: int64 [R]: batch index of each one's request.
        quota: int64 [B]: tokens each request recomputes past the check layer.
        ext_lens: extend tokens per request (host).
        rids: request id per batch index (for the per-request record of picks).
        check_layer: the layer whose K deviation decides.
        dev: float32 [R], filled at the check layer.
    """

    tok: torch.Tensor
    src: torch.Tensor
    req_of: torch.Tensor
    quota: torch.Tensor
    ext_lens: list[int]
    rids: list[str]
    check_layer: int
    dev: torch.Tensor | None = None
    picks: dict[str, torch.Tensor] = field(default_factory=dict)


def build_plan(
    srcs: list[torch.Tensor | None],
    ext_lens: list[int],
    rids: list[str],
    ratio: float,
    check_layer: int,
    device: torch.device | str,
) -> BlendPlan | None:
    """The plan of a batch from each request's seed sources over its extend tokens
    (``srcs[b]``: int64 [ext_lens[b]], master slot or -1; None: not a pic row), or None when no
    token is reused. One pass over the batch's requests per forward (as SGLang's own
    ``prepare_for_extend``), then tensors."""
    offs = [0]
    for e in ext_lens:
        offs.append(offs[-1] + e)
    toks, slots, owners, quota = [], [], [], []
    for b, s in enumerate(srcs):
        n = 0
        if s is not None:
            hit = torch.nonzero(s >= 0).flatten()
            n = int(hit.numel())
            toks.append(hit + offs[b])
            slots.append(s[hit])
            owners.append(torch.full((n,), b, dtype=torch.int64))
        quota.append(math.ceil(ratio * n))
    if not toks or sum(int(t.numel()) for t in toks) == 0:
        return None
    dev = torch.device(device)
    return BlendPlan(
        torch.cat(toks).to(dev),
        torch.cat(slots).to(dev),
        torch.cat(owners).to(dev),
        torch.tensor(quota, dtype=torch.int64, device=dev),
        list(ext_lens),
        list(rids),
        check_layer,
    )


def seed_kv(
    plan: BlendPlan,
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    out_cache_loc: torch.Tensor,
    positions: torch.Tensor,
    slot_pos: torch.Tensor,
    rope: RopeParams,
    first_layer: int,
) -> None:
    """The dense copy: each reused token's slot gets its master's V and K rotated from the
    master's slot position to the token's true position, in layers ``first_layer..``; one
    batched gather and rotation per layer."""
    dst = out_cache_loc[plan.tok].long()
    delta = positions[plan.tok].long() - slot_pos[plan.src].long()
    for k_buf, v_buf in zip(k_buffers[first_layer:], v_buffers[first_layer:], strict=True):
        k = k_buf[plan.src]
        k_buf[dst] = rotate_by_delta(k.float(), delta, rope).to(k_buf.dtype)
        v_buf[dst] = v_buf[plan.src]


def key_deviation(k_fresh: torch.Tensor, k_seed: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance per token over heads and dims (``[R, H, D]`` -> ``[R]``)."""
    d = k_fresh.float() - k_seed.float()
    return d.mul(d).flatten(1).sum(1)


def select_per_request(
    dev: torch.Tensor, req_of: torch.Tensor, quota: torch.Tensor
) -> torch.Tensor:
    """Bool [R]: the ``quota[req_of[t]]`` tokens of largest ``dev`` within each request.

    Vectorized: sort by deviation (descending, ties to the earlier token), then stably by
    request; a token's rank in its request is its index minus its group's first index::

        req_of  [0 0 0 1 1]   dev [1 5 3 2 7]   quota [2 1]
        order   t1 t2 t0 | t4 t3       ranks 0 1 2 | 0 1      chosen t1 t2, t4
    """
    r = int(dev.numel())
    if r == 0:
        return torch.zeros(0, dtype=torch.bool, device=dev.device)
    by_dev = torch.sort(dev, descending=True, stable=True).indices
    by_req = by_dev[torch.sort(req_of[by_dev], stable=True).indices]
    groups = req_of[by_req]
    first = torch.searchsorted(groups, groups, right=False)
    rank = torch.arange(r, device=dev.device) - first
    chosen = torch.zeros(r, dtype=torch.bool, device=dev.device)
    chosen[by_req] = rank < quota[groups]
    return chosen


class Narrowed(NamedTuple):
    """The tokens that continue past the check layer."""

    keep: torch.Tensor  # int64 [K]: flat indices kept
    ext_lens: list[int]  # kept tokens per request
    all_kept: bool


def kept_tokens(plan: BlendPlan, chosen: torch.Tensor, num_tokens: int) -> Narrowed:
    """Every token but the reused ones not ``chosen``; each request's last token always."""
    dev = plan.tok.device
    mask = torch.ones(num_tokens, dtype=torch.bool, device=dev)
    mask[plan.tok[~chosen]] = False
    lens = torch.tensor(plan.ext_lens, dtype=torch.int64, device=dev)
    last = torch.cumsum(lens, 0) - 1
    mask[last[lens > 0]] = True
    keep = torch.nonzero(mask).flatten()
    owner = torch.repeat_interleave(torch.arange(len(plan.ext_lens), device=dev), lens)
    per = torch.bincount(owner[keep], minlength=len(plan.ext_lens))
    return Narrowed(keep, per.tolist(), int(keep.numel()) == num_tokens)


def record_picks(plan: BlendPlan, chosen: torch.Tensor, positions: torch.Tensor) -> None:
    """``plan.picks[rid]``: true positions this forward recomputed for each pic request
    (``tok`` is in batch order, so one split gives every request's share)."""
    pos = positions[plan.tok[chosen]].long().cpu()
    counts = torch.bincount(plan.req_of[chosen], minlength=len(plan.rids)).tolist()
    parts = torch.split(pos, counts)
    plan.picks = {rid: p for rid, p, n in zip(plan.rids, parts, counts, strict=True) if n}
