"""Closed-loop fidelity: round r+1 built from what the server generated in round r.

The master policy ``author`` reuses the KV an agent produced while generating its output as the
master of the next round's segment that quotes it. That only happens in closed loop (the next
round's shared segments are the server's own outputs), so open-loop fidelity cannot see it.
Here, per tokendance server:

1. round r (hinted, greedy) on the tokendance server: its outputs;
2. round r+1 rebuilt from them (``replay.runner.closed_loop_segments``, as the replayer's
   ``--closed-loop`` does), sent hinted to the tokendance server (passes A and B, each after
   replaying round r again from a flushed cache, so the authored KV is there);
3. the same round r+1 prompts, without hints, to the mode-off server: the reference.

Both servers see byte-identical round r+1 prompts, so the comparison isolates the reuse.
"""

from __future__ import annotations

from typing import Any

from benchmarks import common


def next_round_trace(trace: Any, rnd: int, generated: dict[str, str]) -> Any:
    """A one-round trace: round ``rnd + 1`` with round ``rnd``'s outputs replaced."""
    from sglang_tokendance.replay.runner import closed_loop_segments
    from sglang_tokendance.trace.format import Trace, TraceRequest

    rounds = trace.rounds()
    recorded = {r.agent: r.output for r in rounds[rnd]}
    reqs = [
        TraceRequest(r.round, r.agent, closed_loop_segments(r, generated, recorded), r.max_tokens)
        for r in rounds[rnd + 1]
    ]
    return Trace(trace.header, reqs)


def logprob_fields(k: int) -> dict[str, Any]:
    """Request fields for every output token's top-``k`` logprobs (no prompt logprobs; ``k``
    0: none). Pass A reads the first token's; pass B the decode steps', which read what the
    mirror policy left."""
    if k <= 0:
        return {}
    return {"return_logprob": True, "top_logprobs_num": k, "logprob_start_len": -1}


def _generate_round(url: str, trace: Any, rnd: int, g: int) -> dict[str, str]:
    res = common.run_rounds(
        url, trace, common.run_prefix("cl"), [rnd], max_new_tokens=g, stream=False
    )
    return {r.agent: r.text for r in res[0][1] if r.ok}


def collect(a: list, b: list) -> dict[tuple, dict]:
    """Pass A and B replies (``run_rounds`` results, same requests) -> per (round, agent):
    first-token logprobs (A), greedy ids and every output token's top logprobs (B, when it
    asked for them), cache hits of both."""
    out: dict[tuple, dict] = {}
    for (_, reps_a), (_, reps_b) in zip(a, b, strict=True):
        for ra, rb in zip(reps_a, reps_b, strict=True):
            out[(ra.round, ra.agent)] = {
                "error": ra.error or rb.error,
                "top": {int(t[1]): float(t[0]) for t in (ra.first_top_logprobs or [])},
                "first": ra.output_ids[0] if ra.output_ids else None,
                "ids": rb.output_ids,
                "steps": [
                    {int(t[1]): float(t[0]) for t in (step or [])}
                    for step in (rb.step_top_logprobs or [])
                ],
                "cached_a": ra.cached_tokens,
                "cached_b": rb.cached_tokens,
                "prompt_tokens": ra.prompt_tokens,
            }
    return out


def closed_passes(
    td_url: str, off_url: str, trace: Any, rnd: int, k: int, g: int, kd: int | None = None
) -> tuple[dict[tuple, dict], dict[tuple, dict], dict[str, Any]]:
    """(reference, tokendance, info) results of round ``rnd + 1`` in closed loop.

    ``k``: top logprobs of pass A; ``kd``: of pass B's output tokens (None: ``k``, 0: none).
    ``info`` has the tokendance server's authored-master counters for the run.
    """
    extra = logprob_fields(k)
    extra_b = logprob_fields(k if kd is None else kd)
    common.flush_cache(td_url)
    before = common.get_stats(td_url)
    generated = _generate_round(td_url, trace, rnd, g)
    after_r1 = common.get_stats(td_url)
    nxt = next_round_trace(trace, rnd, generated)
    r2 = [rnd + 1]
    a = common.run_rounds(
        td_url, nxt, common.run_prefix("cla"), r2, max_new_tokens=1, extra=extra, stream=False
    )
    mid = common.get_stats(td_url)
    common.flush_cache(td_url)
    _generate_round(td_url, trace, rnd, g)
    b = common.run_rounds(
        td_url, nxt, common.run_prefix("clb"), r2, max_new_tokens=g, extra=extra_b, stream=False
    )
    common.flush_cache(off_url)
    ra = common.run_rounds(
        off_url,
        nxt,
        common.run_prefix("cra"),
        r2,
        hints=False,
        max_new_tokens=1,
        extra=extra,
        stream=False,
    )
    common.flush_cache(off_url)
    rb = common.run_rounds(
        off_url,
        nxt,
        common.run_prefix("crb"),
        r2,
        hints=False,
        max_new_tokens=g,
        extra=extra_b,
        stream=False,
    )
    segs = sum(len({s.id for s in r.shared_segments()}) for r in nxt.rounds()[rnd + 1][:1])
    info = {
        "round": rnd + 1,
        "author_masters_used": mid.get("author_masters_used", 0)
        - before.get("author_masters_used", 0),
        "masters_created": mid.get("masters_created", 0) - before.get("masters_created", 0),
        "masters_created_next_round": mid.get("masters_created", 0)
        - after_r1.get("masters_created", 0),
        "shared_segments_per_request": segs,
    }
    return collect(ra, rb), collect(a, b), info


def closed_steps(
    td_url: str, off_url: str, trace: Any, rounds: list[int], k: int, g: int, kd: int | None = None
) -> tuple[dict[tuple, dict], dict[tuple, dict], dict[str, Any]]:
    """:func:`closed_passes` for each consecutive pair of ``rounds`` (r -> r + 1), merged.

    Each step is one closed-loop round (its prompts quote the server's own round-r outputs), so
    N steps of an A-agent trace give N x A compared requests; the counters are summed and
    ``round`` names the rounds compared.
    """
    ref: dict[tuple, dict] = {}
    td: dict[tuple, dict] = {}
    info: dict[str, Any] = {}
    steps = [r for r in rounds[:-1] if r + 1 in rounds] or rounds[:1]
    for rnd in steps:
        ref_c, td_c, step = closed_passes(td_url, off_url, trace, rnd, k, g, kd)
        ref.update(ref_c)
        td.update(td_c)
        for key, val in step.items():
            if key not in ("round", "shared_segments_per_request"):
                info[key] = info.get(key, 0) + val
        info.setdefault("shared_segments_per_request", step["shared_segments_per_request"])
    info["round"] = ", ".join(str(r + 1) for r in steps)
    return ref, td, info
