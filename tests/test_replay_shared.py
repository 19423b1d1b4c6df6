"""One real CPU server shared by the client tests (replay, frontend, OpenAI), started once.

Every server start costs 15-30 s on 2 cores, so the client test modules share one TokenDance
server (tiny Llama, ``--enable-tokendance``, mode tokendance) through :func:`shared_server`: it
starts on first use and is stopped by a session finalizer, pass or fail. Until plugin.register()
installs ``openai_compat.install_hooks``, the server is launched through a bootstrap that
installs them before SGLang loads its plugins (the same HookRegistry path the plugin uses).
Round ids sent to it must differ between tests (the server remembers a round's shared texts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_tokendance.server import ServerProcess

BOOT = (
    "from sglang_tokendance.openai_compat import install_hooks; install_hooks(); import runpy; "
    "runpy.run_module('sglang.launch_server', run_name='__main__', alter_sys=True)"
)
_servers: dict[str, ServerProcess] = {}


def with_openai_hooks(srv: ServerProcess) -> ServerProcess:
    """``srv`` launched through the bootstrap that installs the OpenAI-route hooks."""
    i = srv.argv.index("-m")
    srv.argv[i : i + 2] = ["-c", BOOT]
    return srv


def shared_server(
    request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """URL of the shared TokenDance server (started now if needed, stopped at session end)."""
    srv = _servers.get("td")
    if srv is None:
        log = tmp_path_factory.mktemp("shared-server") / "server.log"
        srv = with_openai_hooks(ServerProcess(model, ["--enable-tokendance"], log_path=log))
        request.session.addfinalizer(srv.stop)
        srv.start()
        _servers["td"] = srv
    return srv.url


def test_bootstrap_replaces_the_module_launch(tiny_llama: Path) -> None:
    srv = with_openai_hooks(ServerProcess(tiny_llama, ["--enable-tokendance"]))
    assert srv.argv[1:3] == ["-c", BOOT] and "--enable-tokendance" in srv.argv
