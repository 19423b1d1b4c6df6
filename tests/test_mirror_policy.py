"""``--tokendance-mirror drop`` on the real CPU server: recomputed slots freed after prefill."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from roundclient import round_bodies, run_round, stats
from test_replay_shared import ROUND_TIMEOUT_S, shared_server

from sglang_tokendance.server import ServerProcess
from sglang_tokendance.trace import generative_agents
from sglang_tokendance.watch import ENV as WATCH_ENV


@pytest.fixture(scope="module")
def drop_url(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("mirror-drop") / "server.log"
    flags = ["--enable-tokendance", "--tokendance-mirror", "drop"]
    flags += ["--tokendance-round-timeout-ms", str(int(ROUND_TIMEOUT_S * 1000))]
    with ServerProcess(tiny_llama, flags, log_path=log, env={WATCH_ENV: "1"}) as srv:
        yield srv.url


def test_drop_keeps_no_diff_and_the_census_holds_after_every_batch(
    drop_url: str,
    request: pytest.FixtureRequest,
    tiny_llama: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    keep_url = shared_server(request, tiny_llama, tmp_path_factory)  # --tokendance-mirror keep
    trace = generative_agents(agents=6, rounds=2, seed=11, private_words=30, shared_words=30)
    views = {}
    for name, url in (("keep", keep_url), ("drop", drop_url)):
        for rnd, reqs in trace.rounds().items():
            out = run_round(url, round_bodies(reqs, f"mirror-{name}-{rnd}", True, 6))
            assert all(len(o["output_ids"]) == 6 for o in out)
        s = stats(url)
        assert s["integrity"] == "ok", s["integrity"]
        views[name] = s["store_last_round"]
    keep, drop = views["keep"], views["drop"]
    # the same round, the same views of the same masters: only the diff differs
    assert drop["mirrors"] == keep["mirrors"] > 0
    assert drop["dense_equiv_tokens"] == keep["dense_equiv_tokens"]
    assert keep["mirror_tokens"] > 0 and drop["mirror_tokens"] == 0
    assert drop["compression_ratio"] > keep["compression_ratio"]
    watch = stats(drop_url)["watch"]
    assert watch["checks"] > 0 and watch["failures"] == 0, watch["first"]
