"""How far an agent's recomputed K/V moved from the master's (``--tokendance-mirror threshold``).

A reuse agent recomputes a few tokens of each shared segment in its own context; their KV is
its diff against the master. Where a recomputed token's K/V came out (nearly) equal to the
master's, the diff stores nothing the master does not: ``threshold`` keeps a token's slot only
if, in some layer, its K or V differs from the master's by more than ``eps``, relative::

    dev(t) = max over layers l, X in {K, V} of |X_l[mine(t)] - X'_l[ref(t)]| / |X'_l[ref(t)]|

where ``mine(t)`` is the agent's recomputed slot of token ``t``, ``ref(t)`` the master's slot
of the same token and ``X'`` the master's value moved to the mirror's position: K is stored
after RoPE at the master's slot position, so it is rotated by ``slot_pos[mine] -
slot_pos[ref]`` (:func:`.rope.rotate_by_delta`'s rotation); V carries no position. Norms
run over all heads of the layer. Layer 0's K/V depend on the token and its position only,
so there the difference is float rounding; the context shows from layer 1 on. The scale of
``dev`` is the model's (per-token scale, trained model, GA rounds: median 0.32-0.56; the
tiny random-weight model: all under 0.32).

The :class:`MirrorJudge` rides on the request pool's ``PoolState`` like the probe board: the
collector (scheduler side) asks it, the batch hooks bind it to the model runner's KV pool and
RoPE on the first forward (the model-runner side, where the tensors live).

``--tokendance-mirror-scale layer`` divides instead by the mean norm, in that layer, of the
master rows being compared (the row's recomputed tokens)::

    dev(t) = max over l, X of |X_l[mine(t)] - X'_l[ref(t)]| / mean_t' |X'_l[ref(t')]|

An error in a key moves the logit ``q . k`` by ``q . dk`` and an error in a value moves the
output by ``p * dv``: what reaches attention is the absolute change, which ``token`` inflates
for tokens whose own K/V is small.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from sglang_tokendance.accounting import MIRROR_DEV_EDGES
from sglang_tokendance.attention.rope import RopeParams, apply_rotation, delta_cos_sin
from sglang_tokendance.attention.rope_source import rope_params_from_model
from sglang_tokendance.config import MIRROR_SCALES
from sglang_tokendance.state import pool_state

logger = logging.getLogger(__name__)

EPS_NORM = 1e-6  # floor of a norm in a relative difference (an all-zero master row)


def kv_deviation(
    k_layers: Sequence[torch.Tensor],
    v_layers: Sequence[torch.Tensor],
    mirror_slots: torch.Tensor,
    master_slots: torch.Tensor,
    delta: torch.Tensor,
    rope: RopeParams,
    scale: str = "token",
) -> torch.Tensor:
    """Relative K/V deviation of mirror slots from their master slots, max over layers.

    Args:
        k_layers, v_layers: per layer, ``[num_slots, Hkv, D]`` key / value buffers (keys
            stored after RoPE at their slot positions).
        mirror_slots, master_slots: ``[n]`` slot ids, pairwise (token t's recomputed slot and
            the master's slot of the same token).
        delta: ``[n]`` position deltas ``slot_pos[mirror] - slot_pos[master]``.
        rope: the model's RoPE (the rotation that moves a master key to the mirror position).
        scale: ``token`` (each difference over its own master row's norm) or ``layer`` (over
            the mean norm of the compared master rows in that layer).

    Returns:
        float32 ``[n]``: the largest relative difference over layers and over K and V.
    """
    if scale not in MIRROR_SCALES:
        raise ValueError(f"mirror scale must be one of {MIRROR_SCALES}, got {scale!r}")
    n = int(mirror_slots.numel())
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)
    device = k_layers[0].device
    mine, master = mirror_slots.to(device, torch.int64), master_slots.to(device, torch.int64)
    cos, sin = delta_cos_sin(delta.to(device), rope.inv_freq)  # once for every layer
    out = torch.zeros(n, dtype=torch.float32, device=device)
    for k_buf, v_buf in zip(k_layers, v_layers, strict=True):  # layers, never tokens
        k_ref = apply_rotation(k_buf[master].float(), cos, sin, rope).flatten(1)
        k_own = k_buf[mine].float().flatten(1)
        v_ref, v_own = v_buf[master].float().flatten(1), v_buf[mine].float().flatten(1)
        for own, ref in ((k_own, k_ref), (v_own, v_ref)):
            den = ref.norm(dim=1)
            if scale == "layer":
                den = den.mean()
            rel = (own - ref).norm(dim=1) / den.clamp_min(EPS_NORM)
            torch.maximum(out, rel, out=out)
    return out.cpu()


def bin_counts(dev: torch.Tensor) -> list[int]:
    """Counts of ``dev`` per bin of :data:`~sglang_tokendance.accounting.MIRROR_DEV_EDGES`
    (``len(edges) + 1`` bins: below the first edge, between edges, at or above the last)."""
    edges = torch.tensor(MIRROR_DEV_EDGES, dtype=torch.float32)
    idx = torch.bucketize(dev.float().cpu(), edges, right=True)
    return torch.bincount(idx, minlength=len(MIRROR_DEV_EDGES) + 1).tolist()


class MirrorJudge:
    """Measures mirror deviation against the live KV pool (bound on the first forward)."""

    def __init__(self) -> None:
        self.kv_pool: Any = None
        self.rope: RopeParams | None = None
        self.positions: Any = None  # the PositionTable (slot positions)

    @property
    def bound(self) -> bool:
        return self.kv_pool is not None

    def bind(self, model_runner: Any) -> None:
        """Take the model runner's KV pool, its RoPE and the shared position table."""
        pool = model_runner.token_to_kv_pool
        self.rope = rope_params_from_model(model_runner.model).to(pool.device)
        self.positions = pool_state(model_runner.req_to_token_pool).positions
        self.kv_pool = pool
        logger.info("TokenDance mirror threshold: judge bound to the KV pool")

    def deviation(
        self, mirror_slots: torch.Tensor, master_slots: torch.Tensor, scale: str = "token"
    ) -> torch.Tensor:
        """``dev(t)`` (see the module docstring) of each (mirror slot, master slot) pair,
        relative to each master row's norm (``token``) or to their mean (``layer``).

        Raises:
            RuntimeError: before the first forward bound the judge (never on the serving
                path: a mirror exists only after a forward).
        """
        if not self.bound or self.rope is None or self.positions is None:
            raise RuntimeError("the mirror judge is not bound to a KV pool yet")
        pool = self.kv_pool
        layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
        slot_pos = self.positions.slot_pos
        dev = slot_pos.device
        delta = slot_pos[mirror_slots.to(dev, torch.int64)].to(torch.int64) - slot_pos[
            master_slots.to(dev, torch.int64)
        ].to(torch.int64)
        return kv_deviation(
            [pool.get_key_buffer(i) for i in layers],
            [pool.get_value_buffer(i) for i in layers],
            mirror_slots,
            master_slots,
            delta,
            self.rope,
            scale,
        )


def get_mirror_judge(req_to_token_pool: object) -> MirrorJudge:
    """The judge on ``req_to_token_pool``'s ``PoolState`` (created on first use)."""
    st = pool_state(req_to_token_pool)
    if st.judge is None:
        st.judge = MirrorJudge()
    return st.judge


def bind_judge(model_runner: Any) -> None:
    """Bind the pool's judge, if the collector asked for one, to the model runner (once)."""
    st = pool_state(model_runner.req_to_token_pool)
    if st.judge is not None and not st.judge.bound:
        st.judge.bind(model_runner)
