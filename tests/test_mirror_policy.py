"""``--tokendance-mirror drop|threshold`` on the real CPU server, against ``keep``.

drop frees every recomputed slot after the agent's prefill; threshold frees those whose K/V
stayed within eps of the master's (rotated to the same position): eps 0 keeps every slot (=
keep), a huge eps frees every one (= drop), an eps inside the measured deviations keeps some.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from roundclient import round_bodies, run_round, stats
from test_replay_shared import ROUND_TIMEOUT_S, launch_shared_server, shared_server

from sglang_tokendance.server import ServerProcess, start_all
from sglang_tokendance.trace import generative_agents
from sglang_tokendance.watch import ENV as WATCH_ENV

TRACE = generative_agents(agents=6, rounds=2, seed=11, private_words=30, shared_words=30)


def _server(model: Path, log: Path, mirror: list[str]) -> ServerProcess:
    flags = ["--enable-tokendance", "--tokendance-mirror", *mirror]
    flags += ["--tokendance-round-timeout-ms", str(int(ROUND_TIMEOUT_S * 1000))]
    return ServerProcess(model, flags, log_path=log, env={WATCH_ENV: "1"})


def _splitting_eps(hist: dict[str, Any]) -> float:
    """The histogram edge that splits the measured deviations most evenly, with some on each
    side (the median bin's upper edge can lie above every value when the median bin is the
    top one)."""
    counts, edges, n = hist["counts"], hist["edges"], hist["n"]
    best: tuple[int, float] | None = None
    below = 0
    for i, edge in enumerate(edges):
        below += counts[i]  # values under edges[i]: freed at eps = edge
        if 0 < below < n and (best is None or abs(n - 2 * below) < best[0]):
            best = (abs(n - 2 * below), edge)
    assert best is not None, f"every deviation fell in one bin: {counts}"
    return best[1]


def _replay(url: str, name: str) -> tuple[dict[str, Any], list[list[int]]]:
    """The trace's rounds on ``url``: (stats after it, greedy output ids of the last round)."""
    outs: list[list[int]] = []
    for rnd, reqs in TRACE.rounds().items():
        out = run_round(url, round_bodies(reqs, f"mirror-{name}-{rnd}", True, 6))
        assert all(len(o["output_ids"]) == 6 for o in out)
        outs = [o["output_ids"] for o in out]
    s = stats(url)
    assert s["integrity"] == "ok", s["integrity"]
    return s, outs


@pytest.fixture(scope="module")
def mirror_urls(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """drop, threshold at eps 0 and at a huge eps, and the shared keep server, started together
    (a start is mostly CPU-bound imports; each server keeps its own history, so bit-exact
    comparisons stay valid)."""
    mirrors = {
        "drop": ["drop"],
        "eps0": ["threshold", "--tokendance-mirror-eps", "0.0"],
        "huge": ["threshold", "--tokendance-mirror-eps", "1e9"],
    }
    servers = {
        name: _server(tiny_llama, tmp_path_factory.mktemp(f"mirror-{name}") / "server.log", m)
        for name, m in mirrors.items()
    }
    launch_shared_server(request, tiny_llama, tmp_path_factory)  # keep, waited for in views
    start_all(servers.values())
    try:
        yield {name: srv.url for name, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()


@pytest.fixture(scope="module")
def drop_url(mirror_urls: dict[str, str]) -> str:
    return mirror_urls["drop"]


@pytest.fixture(scope="module")
def views(
    drop_url: str,
    request: pytest.FixtureRequest,
    tiny_llama: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[dict[str, Any], list[list[int]]]]:
    keep_url = shared_server(request, tiny_llama, tmp_path_factory)  # --tokendance-mirror keep
    return {"keep": _replay(keep_url, "keep"), "drop": _replay(drop_url, "drop")}


def test_drop_keeps_no_diff_and_the_census_holds_after_every_batch(
    views: dict[str, Any], drop_url: str
) -> None:
    keep, drop = views["keep"][0]["store_last_round"], views["drop"][0]["store_last_round"]
    # the same round, the same views of the same masters: only the diff differs
    assert drop["mirrors"] == keep["mirrors"] > 0
    assert drop["dense_equiv_tokens"] == keep["dense_equiv_tokens"]
    assert keep["mirror_tokens"] > 0 and drop["mirror_tokens"] == 0
    assert drop["compression_ratio"] > keep["compression_ratio"]
    watch = stats(drop_url)["watch"]
    assert watch["checks"] > 0 and watch["failures"] == 0, watch["first"]


def test_threshold_spans_keep_to_drop_by_eps(
    views: dict[str, Any],
    mirror_urls: dict[str, str],
    tiny_llama: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    keep, keep_ids = views["keep"][0]["store_last_round"], views["keep"][1]
    drop = views["drop"][0]["store_last_round"]
    got: dict[str, dict[str, Any]] = {}
    median: float | None = None
    for name in ("eps0", "huge", "mid"):
        if name == "mid":  # an eps inside the deviations the eps-0 server measured
            assert median is not None
            log = tmp_path_factory.mktemp("mirror-mid") / "server.log"
            with _server(
                tiny_llama, log, ["threshold", "--tokendance-mirror-eps", str(median)]
            ) as srv:
                s, ids = _replay(srv.url, name)
        else:
            s, ids = _replay(mirror_urls[name], name)
        assert s["watch"]["checks"] > 0 and s["watch"]["failures"] == 0, s["watch"]["first"]
        got[name] = s["store_last_round"] | {"kept": s["mirror_slots_kept"]}
        got[name]["freed"] = s["mirror_slots_freed"]
        if name == "eps0":
            hist = s["mirror_deviation"]
            assert hist["n"] == s["mirror_slots_kept"] > 0 and s["mirror_slots_freed"] == 0
            median = _splitting_eps(hist)
            # every slot kept: the very prefill keep does, so every agent's first token (from
            # prefill, which attends row by row) is keep's; later tokens come from shared
            # decode, whose float rounding depends on the batch and this server's history
            assert [o[0] for o in ids] == [o[0] for o in keep_ids]
    e0, huge, mid = got["eps0"], got["huge"], got["mid"]
    for view in (e0, huge, mid):  # the same views of the same masters as keep and drop
        assert view["mirrors"] == keep["mirrors"] == drop["mirrors"]
        assert view["dense_equiv_tokens"] == keep["dense_equiv_tokens"]
    assert e0["mirror_tokens"] == keep["mirror_tokens"] > 0
    assert huge["mirror_tokens"] == drop["mirror_tokens"] == 0 and huge["kept"] == 0
    assert huge["freed"] == e0["kept"]
    assert 0 < mid["mirror_tokens"] < keep["mirror_tokens"]
    assert mid["kept"] + mid["freed"] == e0["kept"]
    assert e0["compression_ratio"] < mid["compression_ratio"] < huge["compression_ratio"]
