"""One real CPU TokenDance server shared by test modules (replay, frontend, OpenAI, rounds,
gateway), started once through :mod:`server_pool`.

Modules share one TokenDance server (tiny Llama, ``--enable-tokendance``, mode tokendance,
default ratio 0.15 and round timeout :data:`ROUND_TIMEOUT_S`: longer than the product's 2 s
default so a loaded CI machine never splits a round the tests send at once) through
:func:`shared_server`: it starts on first use and a session finalizer stops it, pass or fail.
Round ids sent to it must differ between tests (the entry remembers a round's shared texts).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import server_pool

from sglang_tokendance.server import ServerProcess

ROUND_TIMEOUT_S = 6.0
# keep: tests of the shared server count mirrors (the default threshold frees every recomputed
# slot on the tiny random model, whose deviations are all below its eps)
SHARED_FLAGS = ["--enable-tokendance", "--tokendance-selection", "both", "--tokendance-mirror"]
SHARED_FLAGS += ["keep", "--tokendance-round-timeout-ms", str(int(ROUND_TIMEOUT_S * 1000))]
SHARED_FLAGS += ["--tokendance-master-policy", "author"]


def shared_spec(model: Path, copy: int = 0) -> server_pool.Spec:
    """The shared server's spec (``copy`` 1: a second server just like it)."""
    return server_pool.spec(model, SHARED_FLAGS, copy=copy)


def launch_shared_server(
    request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Launch the shared TokenDance server without waiting for it (nothing if it exists), so a
    module can start it together with its own servers; :func:`shared_server` waits."""
    server_pool.launch(request, tmp_path_factory, shared_spec(model))


def shared_process(
    request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """The shared TokenDance server's process (started now if needed)."""
    return server_pool.server(request, tmp_path_factory, shared_spec(model))


def shared_server(
    request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """URL of the shared TokenDance server (started now if needed, stopped at session end)."""
    return shared_process(request, model, tmp_path_factory).url


def test_shared_server_answers_with_tokendance_on(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import requests

    url = shared_server(request, tiny_llama, tmp_path_factory)
    body = requests.get(url + "/tokendance/stats", timeout=60).json()
    assert body["enabled"] is True and body["mode"] == "tokendance"
