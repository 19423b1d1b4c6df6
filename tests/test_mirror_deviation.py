"""``kv_deviation`` on tiny tensors: the relative K/V difference the threshold policy uses."""

from __future__ import annotations

import pytest
import torch

from sglang_tokendance.accounting import MIRROR_DEV_EDGES, deviation_histogram
from sglang_tokendance.attention.mirror_deviation import bin_counts, kv_deviation
from sglang_tokendance.attention.rope import RopeParams, rotate_by_delta

ROPE = RopeParams.default(10000.0, head_dim=8)


def _pool(seed: int, slots: int = 12, layers: int = 3) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(slots, 2, 8, generator=g) for _ in range(layers)]
    v = [torch.randn(slots, 2, 8, generator=g) for _ in range(layers)]
    return k, v


def test_a_master_key_rotated_to_the_mirror_position_has_no_deviation() -> None:
    k, v = _pool(0)
    master, mine = torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9])
    delta = torch.tensor([5, -2, 40])
    for kb, vb in zip(k, v, strict=True):  # the mirror holds the master's K/V moved by delta
        kb[mine] = rotate_by_delta(kb[master], delta, ROPE)
        vb[mine] = vb[master]
    dev = kv_deviation(k, v, mine, master, delta, ROPE)
    assert dev.shape == (3,) and float(dev.max()) < 1e-5
    # without the rotation the same keys differ: the comparison is position-aware
    wrong = kv_deviation(k, v, mine, master, torch.zeros(3, dtype=torch.int64), ROPE)
    assert float(wrong.min()) > 1e-2


def test_the_deviation_is_the_largest_relative_change_over_layers_and_k_v() -> None:
    k, v = _pool(1)
    master, mine = torch.tensor([1, 2]), torch.tensor([5, 6])
    zero = torch.zeros(2, dtype=torch.int64)
    for kb, vb in zip(k, v, strict=True):
        kb[mine], vb[mine] = kb[master], vb[master]
    v[2][6] = v[2][2] * 1.3  # token 2: V of the last layer 30% off
    k[1][5] = k[1][1] * 0.9  # token 1: K of layer 1 10% off
    dev = kv_deviation(k, v, mine, master, zero, ROPE)
    assert torch.allclose(dev, torch.tensor([0.1, 0.3]), atol=1e-5)


def test_the_layer_scale_divides_by_the_mean_master_norm_of_the_layer() -> None:
    """Two tokens moved by the same absolute amount: ``token`` scores the small one higher,
    ``layer`` scores them the same (the mean master norm of that layer is the denominator)."""
    k = [torch.zeros(8, 1, 8) for _ in range(2)]
    v = [torch.zeros(8, 1, 8) for _ in range(2)]
    master, mine = torch.tensor([0, 1]), torch.tensor([4, 5])
    zero = torch.zeros(2, dtype=torch.int64)
    for layer in range(2):
        v[layer][0, 0, 0], v[layer][1, 0, 0] = 1.0, 3.0  # master norms 1 and 3: mean 2
        v[layer][mine] = v[layer][master]
        k[layer][master, 0, 1] = 2.0  # keys of norm 2, equal in the mirror
        k[layer][mine] = k[layer][master]
    v[1][4, 0, 2] = 0.5  # token 0's V in layer 1 off by 0.5 (absolute)
    v[1][5, 0, 2] = 0.5  # token 1's likewise
    by_token = kv_deviation(k, v, mine, master, zero, ROPE)
    by_layer = kv_deviation(k, v, mine, master, zero, ROPE, scale="layer")
    assert torch.allclose(by_token, torch.tensor([0.5, 0.5 / 3]), atol=1e-6)
    assert torch.allclose(by_layer, torch.tensor([0.25, 0.25]), atol=1e-6)
    with pytest.raises(ValueError, match="mirror scale must be one of"):
        kv_deviation(k, v, mine, master, zero, ROPE, scale="head")


def test_deviation_histogram_counts_and_median() -> None:
    dev = torch.tensor([1e-5, 0.02, 0.03, 0.04, 5.0, 1e3])
    counts = bin_counts(dev)
    assert len(counts) == len(MIRROR_DEV_EDGES) + 1 and sum(counts) == 6
    assert counts[0] == 1 and counts[-1] == 1  # below 1e-4, at or above 1e2
    h = deviation_histogram(counts)
    assert h is not None and h["n"] == 6
    assert 0.03 < h["median_upper"] <= 0.06  # the bin [0.0316, 0.0562) holds the median
    assert deviation_histogram([0] * len(counts)) is None
