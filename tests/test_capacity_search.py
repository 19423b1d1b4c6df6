"""The capacity benchmark's pure parts: the search over N and the GA subset traces."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.capacity_probe import PairedSlo, TraceSpec, search  # noqa: E402


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 8, 13, 24, 25])
def test_search_finds_the_largest_served_n(limit: int) -> None:
    asked: list[int] = []

    def check(n: int) -> bool:
        asked.append(n)
        return n <= limit

    assert search(check, 25) == limit
    assert len(asked) == len(set(asked)) and len(asked) <= 10  # doubling + bisection


def test_ga_spec_takes_the_first_n_agents_with_their_real_prompts() -> None:
    spec = TraceSpec("ga", rounds=2, max_tokens=5, private_words=0, shared_words=0, seed=0)
    assert spec.max_agents() == 25
    full = spec.trace(25)
    small = spec.trace(3)
    assert small.header.agents == full.header.agents[:3] and small.header.rounds == 2
    rounds = small.rounds()
    assert sorted(rounds) == [1, 2] and all(len(r) == 3 for r in rounds.values())
    by_key = {(r.round, r.agent): r for r in full.requests}
    for r in small.requests:  # the same prompts as in the recorded 25-agent run
        assert r.prompt() == by_key[(r.round, r.agent)].prompt() and r.max_tokens == 5


def test_paired_slo_follows_the_reference_measured_before_each_probe() -> None:
    """The machine slows 3x after the first probe: the SLO follows within the window."""
    speeds = iter([100.0, 300.0, 300.0, 300.0])
    slo = PairedSlo(lambda: next(speeds), k=4.0, first=[100.0, 110.0, 90.0])
    assert slo.next() == 4.0 * 100.0  # median of 110, 90, 100
    assert slo.next() == 4.0 * 100.0  # median of 90, 100, 300
    assert slo.next() == 4.0 * 300.0  # median of 100, 300, 300
    assert slo.next() == 4.0 * 300.0
    assert slo.samples == [100.0, 110.0, 90.0, 100.0, 300.0, 300.0, 300.0]


def test_paired_slo_without_a_first_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one reference sample"):
        PairedSlo(lambda: 1.0, k=4.0, first=[])
