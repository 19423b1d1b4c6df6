"""Accounting: per-round peaks, prompt counts and the full-pool flag (plain records)."""

from __future__ import annotations

from types import SimpleNamespace

from sglang_tokendance.accounting import Accounting, KVParts
from sglang_tokendance.state import RequestState, attach


def req(round_id: str, agent: str, prompt: int, cached: int) -> SimpleNamespace:
    r = SimpleNamespace(
        origin_input_ids=[0] * prompt,
        prefix_len=cached,
        sampling_params=SimpleNamespace(max_new_tokens=4),
    )
    attach(r, RequestState(agent, round_id, 2))
    return r


def test_rounds_are_counted_once_with_their_peak_and_saturation() -> None:
    acct = Accounting()
    a, b = req("r1", "a", 100, 10), req("r1", "b", 80, 0)
    acct.observe_batch([a, b], True, used_tokens=300, pool_tokens=1000)
    acct.observe_batch([a, b], False, used_tokens=500, pool_tokens=1000)  # decode: peak only
    (rec,) = acct.round_report(bytes_per_token=2)
    assert (rec["agents"], rec["prompt_tokens"], rec["prefill_tokens_computed"]) == (2, 180, 170)
    assert rec["kv_tokens_peak"] == 500 and rec["kv_bytes_per_agent"] == 500.0
    assert rec["min_free_tokens"] == 500 and rec["pool_saturated"] is False
    c = req("r2", "a", 50, 0)
    acct.observe_batch([c], True, used_tokens=995, pool_tokens=1000)  # 0.5% left: full
    assert acct.round_report(2)[-1]["pool_saturated"] is True
    assert acct.counters.requests == 3 and acct.last_round == "r2"


def test_a_round_whose_requests_sglang_refused_for_kv_is_saturated() -> None:
    """SGLang keeps decode room and admits prompts whole: requests wait with 10% free."""
    acct = Accounting()
    a = req("r1", "a", 100, 0)
    acct.observe_batch([a], True, used_tokens=900, pool_tokens=1000, queued=3)  # rows cap
    assert acct.round_report(2)[-1]["pool_saturated"] is False
    acct.observe_batch([a], False, used_tokens=900, pool_tokens=1000, queued=3, kv_blocked=True)
    assert acct.round_report(2)[-1]["pool_saturated"] is True
    b = req("r2", "b", 100, 0)
    acct.observe_batch([b], True, used_tokens=900, pool_tokens=1000, queued=0, kv_blocked=True)
    assert acct.round_report(2)[-1]["pool_saturated"] is False  # nobody waited


def test_requests_without_a_record_are_not_counted() -> None:
    acct = Accounting()
    plain = SimpleNamespace(origin_input_ids=[0] * 9, prefix_len=0)
    acct.observe_batch([plain], True, used_tokens=9, pool_tokens=100)
    assert acct.round_report(1) == [] and acct.peak_used_tokens == 9


def test_the_peak_keeps_who_held_it_overall_and_per_round() -> None:
    acct = Accounting()
    a = req("r1", "a", 100, 0)
    acct.observe_batch([a], True, 300, 1000, parts=KVParts(rows=200, mirrors=50, masters=50))
    acct.observe_batch([a], False, 250, 1000, parts=KVParts(rows=250))  # below the peak: kept
    b = req("r2", "b", 100, 0)
    acct.observe_batch([b], True, 400, 1000, parts=KVParts(rows=100, radix=300))
    r1, r2 = acct.round_report(bytes_per_token=1)
    assert r1["kv_peak_parts"] == {"rows": 200, "mirrors": 50, "masters": 50, "radix": 0}
    assert r2["kv_peak_parts"] == {"rows": 100, "mirrors": 0, "masters": 0, "radix": 300}
    assert acct.peak_parts == KVParts(rows=100, radix=300)
