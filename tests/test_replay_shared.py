"""One real CPU server shared by test modules (replay, frontend, OpenAI, rounds), started once.

Every server start costs 15-30 s on 2 cores, so modules share one TokenDance server (tiny Llama,
``--enable-tokendance``, mode tokendance, default ratio 0.15 and round timeout
:data:`ROUND_TIMEOUT_S`: longer than the product's 2 s default so a loaded CI machine never
splits a round the tests send at once) through
:func:`shared_server`: it starts on first use and a session finalizer stops it, pass or fail.
Round ids sent to it must differ between tests (the entry remembers a round's shared texts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_tokendance.server import ServerProcess

_servers: dict[str, ServerProcess] = {}
_ready: set[str] = set()
ROUND_TIMEOUT_S = 6.0


def launch_shared_server(
    request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Launch the shared TokenDance server without waiting for it (nothing if it exists), so a
    module can start it together with its own servers; :func:`shared_server` waits."""
    if "td" in _servers:
        return
    log = tmp_path_factory.mktemp("shared-server") / "server.log"
    # keep: tests of the shared server count mirrors (the default threshold frees every
    # recomputed slot on the tiny random model, whose deviations are all below its eps)
    flags = ["--enable-tokendance", "--tokendance-selection", "both", "--tokendance-mirror"]
    flags += ["keep"]
    flags += ["--tokendance-round-timeout-ms", str(int(ROUND_TIMEOUT_S * 1000))]
    srv = ServerProcess(model, [*flags, "--tokendance-master-policy", "author"], log_path=log)
    request.session.addfinalizer(srv.stop)
    _servers["td"] = srv.launch()


def shared_server(
    request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """URL of the shared TokenDance server (started now if needed, stopped at session end)."""
    launch_shared_server(request, model, tmp_path_factory)
    srv = _servers["td"]
    if "td" not in _ready:
        srv.wait_ready()
        _ready.add("td")
    return srv.url


def test_shared_server_answers_with_tokendance_on(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import requests

    url = shared_server(request, tiny_llama, tmp_path_factory)
    body = requests.get(url + "/tokendance/stats", timeout=60).json()
    assert body["enabled"] is True and body["mode"] == "tokendance"
