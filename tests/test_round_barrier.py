"""The round barrier (pure bookkeeping, fake clock)."""

from __future__ import annotations

import pytest

from sglang_tokendance.rounds import RoundBarrier


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_round_is_released_when_whole() -> None:
    b: RoundBarrier[str] = RoundBarrier(1.0, Clock())
    b.add("r1", 3, "a", "A")
    b.add("r1", 3, "b", "B")
    assert b.poll() == []
    b.add("r1", 3, "c", "C")
    (rel,) = b.poll()
    assert (rel.round_id, rel.requests, rel.reason) == ("r1", ["A", "B", "C"], "complete")
    assert b.held() == 0


def test_round_missing_an_agent_runs_after_the_timeout() -> None:
    clock = Clock()
    b: RoundBarrier[str] = RoundBarrier(2.0, clock)
    b.add("r1", 3, "a", "A")
    b.add("r1", 3, "b", "B")
    clock.t = 1.9
    assert b.poll() == []
    clock.t = 2.0
    (rel,) = b.poll()
    assert rel.reason == "timeout" and rel.requests == ["A", "B"] and rel.waited_s == 2.0


def test_late_arrival_is_released_at_once_not_held_again() -> None:
    clock = Clock()
    b: RoundBarrier[str] = RoundBarrier(1.0, clock)
    b.add("r1", 2, "a", "A")
    clock.t = 5.0
    assert [r.reason for r in b.poll()] == ["timeout"]
    b.add("r1", 2, "b", "B")
    (rel,) = b.poll()
    assert rel.reason == "late" and rel.requests == ["B"]


def test_aborted_agent_shrinks_its_round() -> None:
    b: RoundBarrier[str] = RoundBarrier(100.0, Clock())
    b.add("r1", 3, "a", "A")
    b.add("r1", 3, "b", "B")
    assert b.remove(lambda r: r == "B") == ["B"]
    b.add("r1", 3, "c", "C")
    (rel,) = b.poll()
    assert rel.reason == "complete" and rel.requests == ["A", "C"]


def test_round_size_mismatch_and_duplicate_agent_are_refused() -> None:
    b: RoundBarrier[str] = RoundBarrier(1.0, Clock())
    b.add("r1", 2, "a", "A")
    with pytest.raises(ValueError, match="round_size 2, request says 3"):
        b.add("r1", 3, "b", "B")
    with pytest.raises(ValueError, match="already has a request waiting"):
        b.add("r1", 2, "a", "A2")


def test_rounds_are_independent() -> None:
    b: RoundBarrier[str] = RoundBarrier(1.0, Clock())
    b.add("r1", 2, "a", "A1")
    b.add("r2", 1, "a", "A2")
    (rel,) = b.poll()
    assert rel.round_id == "r2"
    assert b.held() == 1


def test_a_started_member_counts_for_its_round_but_is_not_released_again() -> None:
    b: RoundBarrier[str] = RoundBarrier(100.0, Clock())
    assert b.add("r1", 3, "a", "A") is True
    b.start("r1", "a")  # queued by the caller (an early master agent)
    b.add("r1", 3, "b", "B")
    assert b.held() == 1 and b.poll() == []
    assert b.add("r1", 3, "a", "A2") is False  # its retry runs at once, as a late arrival
    assert [(r.reason, r.requests) for r in b.poll()] == [("late", ["A2"])]
    assert b.remove(lambda r: r == "A") == []  # SGLang aborts it; the round shrinks
    b.add("r1", 3, "c", "C")
    (rel,) = b.poll()
    assert (rel.reason, rel.requests) == ("complete", ["B", "C"])
    assert b.add("r1", 3, "d", "D") is False  # late


def test_a_round_whose_members_all_started_releases_with_no_requests() -> None:
    b: RoundBarrier[str] = RoundBarrier(100.0, Clock())
    b.add("r1", 1, "a", "A")
    b.start("r1", "a")
    (rel,) = b.poll()
    assert (rel.round_id, rel.requests, rel.reason) == ("r1", [], "complete")
    assert b.held() == 0
