"""Workload generators: deterministic, valid, All-Gather structure, lengths, CLI."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_tokendance.trace import (
    Trace,
    generate,
    generative_agents,
    loads_trace,
    read_trace,
    resolve_workload,
    validate_trace,
    write_trace,
)

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ["generative_agents", "agent_society"]


def _check_allgather(trace: Trace) -> None:
    """Round r shares round r-1's outputs (ids r<r-1>/<agent>); every agent once per round."""
    agents = trace.header.agents
    outputs: dict[tuple[int, str], str] = {}
    for rnd, reqs in trace.rounds().items():
        assert sorted(r.agent for r in reqs) == sorted(agents)
        for req in reqs:
            shared = req.shared_segments()
            assert sorted(s.source or "" for s in shared) == sorted(agents)
            for seg in shared:
                assert seg.id == f"r{rnd - 1}/{seg.source}"
                assert seg.text.startswith("\n") and seg.text == seg.text.rstrip()
                if rnd > 1:
                    assert seg.text == outputs[(rnd - 1, seg.source or "")]
            assert req.segments[0].type == "private" and req.segments[-1].type == "private"
            assert req.output is not None and req.output.startswith("\n")
            outputs[(rnd, req.agent)] = req.output
    first = {s.id: s.text for r in trace.rounds()[1] for s in r.shared_segments()}
    assert sorted(first) == sorted(f"r0/{a}" for a in agents)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_generator_is_deterministic_for_a_seed(workload: str) -> None:
    a = generate(workload, agents=5, rounds=3, seed=11).to_bytes()
    assert generate(workload, agents=5, rounds=3, seed=11).to_bytes() == a
    assert generate(workload, agents=5, rounds=3, seed=12).to_bytes() != a


def test_generator_names_are_pinned_for_seed_zero() -> None:
    trace = generative_agents(agents=3, rounds=1, seed=0)
    assert trace.header.agents == ["hiroshi_yilmaz", "umar_obrien", "wendell_haddad"]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_generated_trace_is_valid_and_follows_allgather(workload: str, tmp_path: Path) -> None:
    trace = generate(workload, agents=8, rounds=4, seed=5)
    path = tmp_path / "g.jsonl"
    write_trace(path, trace)
    assert validate_trace(path) == []
    assert read_trace(path) == trace
    _check_allgather(trace)
    h = trace.header
    assert (h.workload, h.rounds, len(h.agents)) == (workload, 4, 8)
    assert h.source == f"generator:{workload} seed=5"
    assert h.extra["generator"]["seed"] == 5
    assert len(trace.requests) == 32
    assert {r.max_tokens for r in trace.requests} == {32}
    assert all(r.arrival_s is None for r in trace.requests)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_shuffle_gives_every_agent_its_own_order(workload: str) -> None:
    trace = generate(workload, agents=6, rounds=3, seed=2)
    for reqs in trace.rounds().values():
        orders = [tuple(s.source for s in r.shared_segments()) for r in reqs]
        assert len(set(orders)) == len(orders)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_no_shuffle_uses_header_order_for_everyone(workload: str) -> None:
    trace = generate(workload, agents=6, rounds=3, seed=2, shuffle=False)
    for req in trace.requests:
        assert [s.source for s in req.shared_segments()] == trace.header.agents


def test_two_agents_shuffled_orders_still_differ() -> None:
    trace = generative_agents(agents=2, rounds=5, seed=9)
    for reqs in trace.rounds().values():
        assert {tuple(s.source for s in r.shared_segments()) for r in reqs} == {
            tuple(trace.header.agents),
            tuple(reversed(trace.header.agents)),
        }


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize(("private_words", "shared_words"), [(300, 40), (600, 25)])
def test_lengths_follow_the_word_parameters(
    workload: str, private_words: int, shared_words: int
) -> None:
    trace = generate(
        workload, agents=8, rounds=4, seed=1, private_words=private_words, shared_words=shared_words
    )
    prefix = [len(r.segments[0].text.split()) for r in trace.requests]
    utter = [len((r.output or "").split()) - 2 for r in trace.requests]  # minus the name
    assert abs(statistics.mean(prefix) - private_words) <= 0.15 * private_words
    assert abs(statistics.mean(utter) - shared_words) <= 0.15 * shared_words
    assert min(utter) >= 0.5 * shared_words and max(utter) <= 1.6 * shared_words


def test_max_tokens_and_arrival_jitter_are_applied() -> None:
    trace = generate("society", agents=4, rounds=2, seed=0, max_tokens=7, arrival_jitter_s=2.0)
    assert {r.max_tokens for r in trace.requests} == {7}
    arrivals = [r.arrival_s for r in trace.requests]
    assert all(a is not None and 0.0 <= a <= 2.0 for a in arrivals)
    assert len(set(arrivals)) > 1


def test_many_agents_get_distinct_ids_and_one_agent_works() -> None:
    trace = generative_agents(agents=40, rounds=1, seed=4)
    assert len(set(trace.header.agents)) == 40
    assert all(a.isascii() and a.replace("_", "").isalnum() for a in trace.header.agents)
    solo = generate("society", agents=1, rounds=2, seed=4)
    _check_allgather(solo)


def test_aliases_resolve_and_unknown_workloads_fail() -> None:
    assert resolve_workload("ga") == "generative_agents"
    assert resolve_workload("society") == "agent_society"
    ga = generate("ga", agents=3, rounds=2, seed=1).to_bytes()
    assert ga == generate("generative_agents", agents=3, rounds=2, seed=1).to_bytes()
    with pytest.raises(ValueError, match="unknown workload 'chat'"):
        generate("chat")


@pytest.mark.parametrize("bad", [{"agents": 0}, {"rounds": 0}, {"max_tokens": 0},
                                 {"shared_words": 0}, {"private_words": -1}])  # fmt: skip
def test_out_of_range_parameters_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        generate("ga", **bad)


@settings(max_examples=25, deadline=None)
@given(
    workload=st.sampled_from(WORKLOADS),
    agents=st.integers(1, 6),
    rounds=st.integers(1, 3),
    seed=st.integers(0, 2**32),
    shuffle=st.booleans(),
    private_words=st.integers(0, 400),
    shared_words=st.integers(1, 60),
)
def test_any_parameters_give_a_valid_allgather_trace(
    workload: str,
    agents: int,
    rounds: int,
    seed: int,
    shuffle: bool,
    private_words: int,
    shared_words: int,
) -> None:
    trace = generate(
        workload,
        agents=agents,
        rounds=rounds,
        seed=seed,
        shuffle=shuffle,
        private_words=private_words,
        shared_words=shared_words,
    )
    assert loads_trace(trace.to_bytes()) == trace
    _check_allgather(trace)


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sglang_tokendance.trace", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_generate_writes_a_valid_deterministic_trace(tmp_path: Path) -> None:
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    args = ["--agents", "4", "--rounds", "3", "--seed", "7", "--private-words", "200"]
    res = _cli(
        "generate", "society", *args, "--shared-words", "30", "--max-tokens", "24", "-o", out1
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{out1}: ok (12 requests, 3 rounds, 4 agents)"
    assert _cli("generate", "agent_society", *args, "--shared-words", "30", "--max-tokens", "24",
                "-o", out2).returncode == 0  # fmt: skip
    assert out1.read_bytes() == out2.read_bytes()
    trace = read_trace(out1)
    assert trace.header.workload == "agent_society"
    assert {r.max_tokens for r in trace.requests} == {24}
    assert _cli("validate", out1).returncode == 0


def test_cli_generate_no_shuffle_and_bad_workload(tmp_path: Path) -> None:
    out = tmp_path / "g.jsonl"
    res = _cli("generate", "ga", "--agents", "3", "--rounds", "2", "--no-shuffle", "-o", out)
    assert res.returncode == 0, res.stderr
    trace = read_trace(out)
    assert all(
        [s.source for s in r.shared_segments()] == trace.header.agents for r in trace.requests
    )
    assert _cli("generate", "chat", "-o", out).returncode == 2
    assert _cli("generate", "ga", "--agents", "0", "-o", tmp_path / "x.jsonl").returncode == 1
