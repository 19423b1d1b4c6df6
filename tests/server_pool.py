"""Real CPU servers shared by test modules: one per spec, started on first use, stopped at the
end of the session (pass or fail).

A server start costs about 50 CPU-seconds on 2 cores (three processes import SGLang), nearly
all of the suite's time, so modules that need a server with the same model, flags and
environment share one. A shared server has served other modules' requests before: tests on it
use fresh round ids and judge counters as differences (``stats`` before and after), never as
absolute values. A module launches its shared servers together with its own
(:func:`launch`, then :func:`url` waits), so the starts overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from sglang_tokendance.server import ServerProcess


class Spec(NamedTuple):
    """One shared server: model, launch flags, extra environment; ``copy`` tells apart
    servers that are otherwise the same (two workers behind a gateway)."""

    model: Path
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    copy: int = 0


def spec(
    model: Path, flags: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
    copy: int = 0,
) -> Spec:  # fmt: skip
    return Spec(Path(model), tuple(flags), tuple(sorted((env or {}).items())), copy)


_servers: dict[Spec, ServerProcess] = {}
_ready: set[Spec] = set()


def launch(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, *specs: Spec
) -> None:
    """Launch the servers of ``specs`` that are not running yet, without waiting for them."""
    for s in specs:
        if s in _servers:
            continue
        log = tmp_path_factory.mktemp("pooled-server") / "server.log"
        srv = ServerProcess(s.model, list(s.flags), log_path=log, env=dict(s.env) or None)
        request.session.addfinalizer(srv.stop)
        _servers[s] = srv.launch()


def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, s: Spec
) -> ServerProcess:
    """The shared server of ``s``, ready (launched now if needed)."""
    launch(request, tmp_path_factory, s)
    srv = _servers[s]
    if s not in _ready:
        try:
            srv.wait_ready()
        except BaseException:
            del _servers[s]  # it was stopped; a later module may try again
            raise
        _ready.add(s)
    return srv


def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, s: Spec) -> str:
    """URL of the shared server of ``s`` (launched and waited for if needed)."""
    return server(request, tmp_path_factory, s).url


# Specs more than one module starts.
OFF = ["--enable-tokendance", "--tokendance-mode", "off"]  # hinted requests run stock
# tokendance at ratio 1.0 (outputs must equal mode off's), deviation selection, author masters
TD_FULL = ["--enable-tokendance", "--tokendance-recompute-ratio", "1.0"]
TD_FULL += ["--tokendance-selection", "deviation", "--tokendance-master-policy", "author"]


def delta(after: dict, before: dict, *keys: str) -> dict[str, int]:
    """Counters of a shared server's ``/tokendance/stats`` as differences."""
    return {k: after[k] - before[k] for k in keys}


def flush(url: str) -> None:
    """Empty a shared server's cache so another module's masters cannot serve this test's
    segments (the benchmarks' ``flush_cache``: it retries while requests run)."""
    from benchmarks.common import flush_cache

    flush_cache(url)
