"""Smoke test of the benchmarks: storage.main() on a tiny configuration against a real server.

It borrows the shared TokenDance test server (tiny Llama, mode tokendance, ratio 0.15; see
test_replay_shared.py) through the benchmark's ServerPool, so no extra server starts when other
modules already started it. ``--no-flush`` leaves the shared server's cache alone. Only the JSON
keys and shapes are checked, no timings.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from test_replay_shared import shared_server

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import common, storage  # noqa: E402

pytestmark = pytest.mark.server


def test_storage_main_writes_its_json_markdown_and_plot(
    request: pytest.FixtureRequest,
    tiny_llama: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    url = shared_server(request, tiny_llama, tmp_path_factory)
    argv = [
        "--modes",
        "tokendance",
        "--workloads",
        "generative_agents",
        "--agents",
        "2",
        "--ratios",
        "0.15",
        "--rounds",
        "2",
        "--private-words",
        "30",
        "--shared-words",
        "10",
        "--max-tokens",
        "4",
        "--model",
        "tiny",
        "--server-args",
        "",
        "--no-flush",
        "--out",
        str(tmp_path),
    ]
    with common.ServerPool(tmp_path / "logs", max_alive=1) as pool:
        pool.register(pool.key(tiny_llama, "tokendance", 0.15, ()), url)
        assert storage.main(argv, pool=pool) == 0
        assert pool.started == []  # nothing was started: the shared server was used
    data = json.loads((tmp_path / "storage.json").read_text())
    for key in (
        "benchmark",
        "definition",
        "config",
        "servers",
        "runs",
        "comparisons",
        "headline",
        "machine",
        "wall_s",
    ):
        assert key in data, key
    assert data["benchmark"] == "storage" and "peak non-evictable" in data["definition"]
    assert data["config"]["selection"] == "both"  # the shared server's flag
    (run,) = data["runs"]
    assert (run["mode"], run["ratio"], run["agents"]) == ("tokendance", 0.15, 2)
    assert run["errors"] == 0
    for key in (
        "kv_bytes_per_agent",
        "dense_kv_bytes_per_agent",
        "kv_tokens_peak",
        "kv_bytes_per_token",
        "prefill_tokens_computed",
        "store_last_round",
    ):
        assert key in run, key
    assert run["kv_bytes_per_agent"] > 0 and run["kv_bytes_per_token"] > 0
    assert run["round_id"].endswith("r2")
    assert (tmp_path / "storage.md").read_text().startswith("Definition:")
    assert (tmp_path / "storage.png").stat().st_size > 0


def test_round_latency_metrics_and_paired_ratios() -> None:
    """round_latency's per-run numbers and its off/tokendance ratios, on records (no server)."""
    from benchmarks import round_latency as rl
    from sglang_tokendance.replay.runner import ReplayResult, RequestRecord, RoundRecord

    def result(lat: list[float], ttft: float) -> ReplayResult:
        rounds = [
            RoundRecord(i + 1, x, [RequestRecord(i + 1, "a", completion_tokens=11, ttft_ms=ttft,
                                                 latency_ms=ttft + 100.0)])
            for i, x in enumerate(lat)
        ]  # fmt: skip
        return ReplayResult(rounds, 1.0, None, None, [])

    off = rl.run_metrics(result([100.0, 300.0, 200.0], 50.0))
    td = rl.run_metrics(result([50.0, 150.0, 100.0], 25.0))
    assert off["round_ms_p50"] == 200.0 and off["round_ms_p90"] == 300.0
    assert off["decode_tok_s"] == 100.0  # 10 tokens after the first in 100 ms
    # every agent had its first token at 50 ms; the rest of each round is decode
    assert off["all_first_ms_p50"] == 50.0 and off["tail_ms_p50"] == 150.0
    runs = [
        dict(r, case="c", repeat=0) for r in (dict(off, mode="off"), dict(td, mode="tokendance"))
    ]
    s = rl.summarize(runs, ["off", "tokendance"])
    assert s["c"]["ratios"]["round_ms_p50:off/tokendance"]["median"] == 2.0
    assert s["c"]["ratios"]["ttft_ms_p50:off/tokendance"]["median"] == 2.0
    # a variant arm is paired with tokendance the same way
    slow = rl.run_metrics(result([75.0, 225.0, 150.0], 25.0))
    s = rl.summarize(
        [*runs, dict(slow, mode="release", case="c", repeat=0)], ["off", "tokendance", "release"]
    )
    assert s["c"]["ratios"]["round_ms_p50:release/tokendance"]["median"] == 1.5
    args = rl.build_parser().parse_args(["--variant", "release=--tokendance-master-start release"])
    assert rl.variants(args) == {"release": ["--tokendance-master-start", "release"]}
    assert rl.arms(args) == ["off", "tokendance", "release"]
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        rl.variants(rl.build_parser().parse_args(["--variant", "off=--x"]))


def test_capacity_quick_searches_under_a_given_slo(
    request: pytest.FixtureRequest,
    tiny_llama: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    from benchmarks import capacity

    url = shared_server(request, tiny_llama, tmp_path_factory)
    base = ["--quick", "--modes", "tokendance", "--workloads", "society", "--pool", "0"]
    base += ["--max-agents", "2", "--server-args", "", "--model", "tiny"]
    results = {}
    runs = {"ample": ["--slo-ms", "600000"], "impossible": ["--slo-ms", "1"], "pool": ["--no-slo"]}
    for name, flags in runs.items():
        out = tmp_path / name
        with common.ServerPool(tmp_path / "logs", max_alive=1) as pool:
            pool.register(pool.key(tiny_llama, "tokendance", 0.15, ()), url)
            assert capacity.main([*base, *flags, "--out", str(out)], pool=pool) == 0
            assert pool.started == []  # the shared server served every probe
        results[name] = json.loads((out / "capacity.json").read_text())
        assert (out / "capacity.png").stat().st_size > 0
        assert (out / "capacity.md").read_text().startswith("SLO:")
    ample = results["ample"]["workloads"]["society"]
    assert ample["slo_source"].startswith("given") and ample["reference"] is None
    td = ample["per_mode"]["tokendance"]
    assert td["capacity"] == 2 and td["capped"] and td["error"] is None
    assert [p["agents"] for p in td["probes"]] == [1, 2]
    assert all(p["served"] and p["retractions"] == 0 for p in td["probes"])
    assert all(len(p["round_latencies_ms"]) == 2 for p in td["probes"])  # every round judged
    assert td["resident_capacity"] == 2 and td["resident_capped"]  # the pool holds both
    # each probe carries the server's KV peak of each of its rounds (what the pool held)
    assert all(len(p["kv_tokens_peak"]) == 2 and min(p["kv_tokens_peak"]) > 0 for p in td["probes"])
    two = next(p for p in td["probes"] if p["agents"] == 2)
    one = next(p for p in td["probes"] if p["agents"] == 1)
    assert two["kv_tokens_peak"][1] > one["kv_tokens_peak"][1]
    # the report says what the limit probe computed (capped at 2: no failing probe above it)
    limit = capacity.at_limit(td)
    assert limit == {
        "served": {
            "agents": 2,
            "computed_tokens": two["prompt_tokens"] - two["cached_tokens"],
            "worst_ms": two["worst_round_ms"],
        },
        "first_fail": None,
    }
    assert limit["served"]["computed_tokens"] > 0
    md = (tmp_path / "ample" / "capacity.md").read_text()
    assert "- tokendance at its SLO limit, 2 agents: " in md
    # a 1 ms SLO: N=1 answers in full but misses the SLO (tried twice), so nothing is served;
    # residency has no latency condition, so the same server is still resident at N = 1, 2
    imp = results["impossible"]["workloads"]["society"]
    miss, res2 = imp["per_mode"]["tokendance"]["probes"]
    assert capacity.at_limit(imp["per_mode"]["tokendance"]) is None  # no limit: nothing served
    assert miss["all_ok"] and not miss["within_slo"] and len(miss["latency_tries_ms"]) == 2
    assert miss["resident"] and res2["agents"] == 2 and res2["resident"]
    assert res2["agents_waited"] == [0, 0] and "latency_tries_ms" not in res2
    assert imp["capacity"]["tokendance"] == 0 and imp["resident_capacity"]["tokendance"] == 2
    # --no-slo: no reference and no SLO search, the resident search alone
    pool_only = results["pool"]["workloads"]["society"]
    assert pool_only["slo_ms"] is None and pool_only["reference"] is None
    assert pool_only["capacity"]["tokendance"] is None and pool_only["ratios"] == {}
    assert pool_only["resident_capacity"]["tokendance"] == 2


def test_checkout_ab_refuses_a_base_that_is_not_a_checkout(tmp_path: Path) -> None:
    from benchmarks import checkout_ab

    args = checkout_ab.build_parser().parse_args(["--base", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="is not a checkout of this project"):
        checkout_ab.run(args)


def test_mirror_specs_pass_every_policy_but_the_default_explicitly() -> None:
    """The server's default policy is threshold, not keep: a ``keep`` row must ask for keep."""
    assert common.mirror_flags("default") == []
    assert common.mirror_flags("keep") == ["--tokendance-mirror", "keep"]
    assert common.mirror_flags("threshold:0.6") == [
        "--tokendance-mirror", "threshold", "--tokendance-mirror-eps", "0.6",
        "--tokendance-mirror-scale", "token",
    ]  # fmt: skip
    assert common.mirror_flags("threshold") == ["--tokendance-mirror", "threshold"]
    assert common.mirror_flags("threshold:0.3:layer")[-2:] == ["--tokendance-mirror-scale", "layer"]
    for bad in ("keep:0.5", "threshold:0.5:norm", "threshold::layer"):
        with pytest.raises(ValueError, match="default, keep, drop or threshold"):
            common.mirror_flags(bad)
    pool = common.ServerPool(Path("unused"))
    specs = [("default", "default"), ("keep", "keep"), ("threshold:0.6", "threshold 0.6")]
    specs.append(("threshold:0.3:layer", "threshold 0.3 layer"))
    for spec, name in specs:
        key = pool.key(Path("m"), "tokendance", 0.15, common.mirror_flags(spec))
        assert common.mirror_of_label(key.label()) == name


def test_decode_kl_compares_only_the_steps_that_follow_the_same_tokens() -> None:
    """Step 0 (the prefill's) is left out; steps up to the first differing index are compared."""
    from benchmarks import fidelity

    half = {0: math.log(0.5), 1: math.log(0.5)}
    skew = {0: math.log(0.9), 1: math.log(0.1)}
    kl_half_skew = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    ref = [skew, half, half, half, half]
    other = [half, skew, half, skew, skew]  # step 0 differs too: it must not count
    assert fidelity.decode_kl(ref, other, None) == pytest.approx(
        [kl_half_skew, 0.0, kl_half_skew, kl_half_skew]
    )
    assert fidelity.decode_kl(ref, other, 2) == pytest.approx([kl_half_skew, 0.0])
    assert fidelity.decode_kl(ref, other, 0) == []
    assert fidelity.decode_kl(ref, other[:2], None) == pytest.approx([kl_half_skew])

    r = {"error": None, "top": half, "first": 0, "ids": [0, 1, 1], "cached_a": 0, "steps": ref[:3]}
    o = dict(r, ids=[0, 1, 0], cached_a=9, steps=other[:3])
    row = fidelity.compare({(1, "a"): r}, {(1, "a"): o}, 3)["all"]
    assert (row["exact_match"], row["first_divergence_median"]) == (0.0, 2)
    assert row["kl_decode_mean"] == pytest.approx(kl_half_skew / 2, abs=1e-6)
    assert (row["kl_decode_n"], row["kl_decode_steps"]) == (1, 2)


def test_paired_vs_keep_counts_lost_and_gained_answers_and_the_decode_kl_ratio() -> None:
    from benchmarks import fidelity

    def req(key: str, exact: bool, kl: float | None) -> dict:
        return {"key": [1, key], "error": None, "exact": exact, "kl_decode": kl}

    keep = {"requests": [req("a", True, 1.0), req("b", False, 2.0), req("c", True, 1.0)]}
    row = {"requests": [req("a", False, 2.0), req("b", True, 2.0), req("c", True, None)]}
    p = fidelity.paired_vs_keep(row, keep)
    assert p is not None
    assert (p["n"], p["lost"], p["gained"]) == (2, 1, 1)
    assert p["kl_decode_ratio"] == pytest.approx(4.0 / 3.0, abs=1e-4)
    assert p["higher_share"] == 0.5
    lo, hi = p["kl_decode_ratio_ci95"]
    assert 1.0 <= lo <= p["kl_decode_ratio"] <= hi <= 2.0
    assert fidelity.paired_vs_keep(row, {"requests": []}) is None


def test_between_policy_lines_pair_the_open_loop_threshold_rows_head_to_head() -> None:
    from benchmarks import fidelity

    def row(mirror: str, kl: float, closed: bool = False) -> dict:
        label = f"tokendance[both]@0.15 ({mirror} mirrors)" + (" closed loop" if closed else "")
        reqs = [{"key": [1, "a"], "error": None, "exact": True, "kl_decode": kl}]
        head = {"label": label, "mode": "tokendance", "ratio": 0.15, "selection": "both"}
        return head | {"policy": None, "mirror": mirror, "closed_loop": closed, "requests": reqs}

    rows = [row("keep", 1.0), row("threshold 0.5", 2.0), row("threshold 0.6 layer", 3.0)]
    lines = fidelity.between_policy_lines({"rows": [*rows, row("threshold 0.5", 9.0, True)]})
    assert len(lines) == 1  # keep and the closed-loop row are left out
    assert lines[0].startswith("- threshold 0.6 layer / threshold 0.5 (")
    assert "decode KL x1.500 [1.500-1.500]" in lines[0]


def test_each_decode_steps_distribution_is_the_one_its_greedy_token_came_from(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """decode_kl compares step i's distributions as the ones output token i was drawn from:
    on the real server, pass B's per-step top-K has one full distribution per output token,
    and the greedy token is its argmax."""
    from benchmarks import fidelity_closed

    url = shared_server(request, tiny_llama, tmp_path_factory)
    vocab = common.vocab_size(tiny_llama)
    trace = common.make_trace(
        "generative_agents", agents=2, rounds=1, seed=7, private_words=30, shared_words=10,
        max_tokens=4,
    )  # fmt: skip
    res = common.run_rounds(
        url,
        trace,
        common.run_prefix("kd"),
        max_new_tokens=4,
        extra=fidelity_closed.logprob_fields(vocab),
        stream=False,
    )
    a, b = res[0][1]
    got = fidelity_closed.collect(res, res)
    for rep in (a, b):
        assert rep.ok, rep.error
        steps = got[(rep.round, rep.agent)]["steps"]
        assert len(steps) == len(rep.output_ids) >= 1
        for tok, dist in zip(rep.output_ids, steps, strict=True):
            assert len(dist) == vocab
            assert sum(math.exp(v) for v in dist.values()) == pytest.approx(1.0, abs=1e-3)
            assert tok == max(dist, key=dist.__getitem__)
