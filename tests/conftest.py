"""Shared fixtures: the tiny models and real SGLang servers that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sglang_tokendance.models import build
from sglang_tokendance.server import ServerProcess


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return build("tiny", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    return build("tiny", "qwen2")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers inside a test; every one is stopped at teardown, pass or fail."""
    started: list[ServerProcess] = []

    def _start(model: Path, extra: list[str] | None = None) -> ServerProcess:
        srv = ServerProcess(model, extra, log_path=tmp_path / f"server{len(started)}.log")
        started.append(srv)
        return srv.start()

    yield _start
    for srv in started:
        srv.stop()
