"""Shared fixtures: the tiny models and real SGLang servers that are always stopped."""

from __future__ import annotations

import os

# Triton kernels are tested in Triton's interpreter on CPU; this must precede any triton import
# (SGLang imports triton). Servers started by the tests do not inherit it (server_env drops it).
os.environ["TRITON_INTERPRET"] = "1"
# SGLang reads its CPU switch at import time; every test process is a CPU process.
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sglang_tokendance.models import build
from sglang_tokendance.server import ServerProcess


def _unused_model_modules(keep: tuple[str, ...] = ("llama", "qwen2")) -> str:
    """SGLang's model modules other than the tests' (comma-separated, for SGLang's own
    ``SGLANG_DISABLED_MODEL_ARCHS``): a server resolving its architecture imports every model
    module otherwise, about 2.7 s of each scheduler start on 2 cores. Tests only: a user's
    server keeps every architecture."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        return ""
    models = Path(spec.origin).parent / "srt" / "models"
    return ",".join(sorted(p.stem for p in models.glob("*.py") if p.stem not in keep))


os.environ.setdefault("SGLANG_DISABLED_MODEL_ARCHS", _unused_model_modules())


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
