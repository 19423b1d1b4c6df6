"""Several TokenDance servers behind SGLang's gateway ``smg`` (PyPI ``smg``), one URL.

A round is shared only where its masters are, and round r+1 reuses round r's outputs only on
the server that produced them, so every round of a simulation must reach the same worker. The
gateway's ``consistent_hashing`` policy does that from the ``X-SMG-Routing-Key`` header, which
every client of this project sends (the hint's group, :func:`routing.routing_headers`); the
``kv_hints`` body field passes through unchanged. ``GatewayProcess`` runs::

    smg launch --host H --port P --worker-urls URL... --policy consistent_hashing

in its own process group, waits until it answers, and always stops it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import requests

from sglang_tokendance.server import free_port

logger = logging.getLogger(__name__)

POLICY = "consistent_hashing"


def smg_executable() -> str:
    """The ``smg`` command of this environment (beside its python), else the one on PATH.

    Raises:
        RuntimeError: if smg is not installed (``pip install smg``; scripts/setup.sh does).
    """
    here = Path(sys.executable).parent / "smg"
    found = str(here) if here.exists() else shutil.which("smg")
    if found is None:
        raise RuntimeError("SGLang's gateway `smg` is not installed: pip install smg==1.13.0")
    return found


def gateway_command(worker_urls: list[str], port: int, metrics_port: int) -> list[str]:
    """``smg launch`` argv for ``worker_urls`` behind 127.0.0.1:``port``."""
    return [
        smg_executable(), "launch", "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *worker_urls, "--policy", POLICY,
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--log-level", "warn",
    ]  # fmt: skip


class GatewayProcess:
    """The real ``smg`` gateway in a subprocess; a context manager that always stops it.

    Args:
        worker_urls: the SGLang servers (already answering).
        log_path: where its output goes.
        startup_timeout_s: how long to wait for it to route a request.
    """

    def __init__(
        self, worker_urls: list[str], log_path: str | Path, startup_timeout_s: float = 120.0
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = gateway_command(list(worker_urls), self.port, free_port())
        self.expected_workers = len(worker_urls)
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        """Start smg and wait until it has registered every worker (``GET /workers``) and
        says it is ready (``GET /readiness``): its /health answers before the workers are in,
        and a request sent then gets "No worker available".

        Raises:
            RuntimeError: if it exits or does not answer in time (log tail included).
        """
        logger.info("starting: %s", " ".join(self.argv))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"smg exited with code {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.ready():
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"smg did not answer in {self.startup_timeout_s}s:\n{self.tail()}")

    def ready(self) -> bool:
        """Every worker registered and the gateway ready to route."""
        workers = requests.get(self.url + "/workers", timeout=10).json()
        if int(workers.get("total") or 0) < self.expected_workers:
            return False
        return requests.get(self.url + "/readiness", timeout=10).status_code == 200

    def stop(self) -> None:
        """Stop its process group (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=10)
                break
            except (ProcessLookupError, PermissionError):
                break
            except subprocess.TimeoutExpired:
                continue
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def tail(self, n: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-n:])

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
