"""Start and stop the real SGLang server on CPU (embedded default for tests, demo, replayer).

``ServerProcess`` runs ``python -m sglang.launch_server`` in its own process group with the CPU
flags SGLang 0.5.23 needs, waits until it answers, and always kills the whole group on exit,
even when the caller fails. :func:`start_all` starts several at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import psutil
import requests

from sglang_tokendance.server_env import server_env

logger = logging.getLogger(__name__)

# Flags SGLang needs on a CPU-only machine (see sglang-0.5.23-notes.md); any can be overridden.
CPU_FLAGS: dict[str, str | None] = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--sampling-backend": "pytorch",
    "--cuda-graph-backend-decode": "disabled",
    "--cuda-graph-backend-prefill": "disabled",
    "--dtype": "float32",
    # SGLang sizes the pool as (free memory) - (1 - fraction) x (free memory before the model
    # loaded): at 0.05 a server that starts while others are loading got a 1,601-token pool.
    # --max-total-tokens caps the pool, so a generous fraction only lifts the ceiling.
    "--mem-fraction-static": "0.3",
    "--max-total-tokens": "65536",
    "--max-running-requests": "32",
    "--grammar-backend": "none",
    "--host": "127.0.0.1",
    # An idle scheduler otherwise busy-polls a core: on 2 cores, one idle test server halves
    # the speed of every other. Idle wake-ups are at most 1 s apart (a round timeout may fire
    # up to 1 s late while nothing else happens).
    "--sleep-on-idle": None,
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_command(model_path: str | Path, port: int, extra: list[str] | None = None) -> list[str]:
    """``launch_server`` argv: CPU defaults, then ``extra`` (whose flags override defaults)."""
    extra = list(extra or [])
    given = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path)]
    for flag, value in CPU_FLAGS.items():
        if flag in given:
            continue
        argv.append(flag)
        if value is not None:
            argv.append(value)
    if "--port" not in given:
        argv += ["--port", str(port)]
    return argv + extra


POLL_S = 0.2  # between /health_generate polls while a server starts
# in the server's log: uvicorn's bind error; SGLang's check of its own ports (it then exits)
PORT_TAKEN = ("address already in use", "Port is already in use")
PORT_RETRIES = 2  # relaunches on a new port when a port we chose was taken meanwhile


class ServerProcess:
    """A real SGLang server in a subprocess; a context manager that always stops it.

    Args:
        model_path: model directory (default: the tiny Llama, built if needed).
        extra_args: more ``launch_server`` flags (e.g. ``["--enable-tokendance"]``).
        port: port to listen on (default: a free one).
        log_path: where stdout/stderr go (default: a temp file); read it with :meth:`log`.
        startup_timeout_s: how long to wait for the server to answer.
        env: extra environment variables for the server (e.g. the integrity watch's).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        extra_args: list[str] | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 240.0,
        env: dict[str, str] | None = None,
    ) -> None:
        if model_path is None:
            from sglang_tokendance.models import build

            model_path = build("tiny", "llama")
        self.model_path = str(model_path)
        self._extra = list(extra_args or [])
        self._own_port = port is None  # a port we chose may be re-chosen (see wait_ready)
        self._use_port(port or free_port())
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="sglang-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.env = {**server_env(self.argv), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0
        self._launches = 0
        self._log_start = 0

    def _use_port(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.argv = build_command(self.model_path, port, self._extra)

    def launch(self) -> ServerProcess:
        """Start the server process without waiting for it (then :meth:`wait_ready`)."""
        logger.info("starting: %s", " ".join(self.argv))
        mode = "ab" if self._launches else "wb"  # a relaunch keeps the first try's log
        self._launches += 1
        log = open(self.log_path, mode)  # noqa: SIM115 - closed with the process in stop()
        self._log_start = log.tell()  # where this launch's output begins
        self._log_file = log
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self._deadline = time.monotonic() + self.startup_timeout_s
        return self

    def wait_ready(self) -> ServerProcess:
        """Wait until the launched server's /health_generate answers (``startup_timeout_s``
        from :meth:`launch`; it is asked at least once, however late this is called).

        The free port chosen at construction is only free at that moment: servers starting
        side by side pick ports of their own meanwhile (SGLang's internal ones too), and one may
        take ours before uvicorn binds it, 30-60 s later on 2 busy cores. The server then logs
        the bind error and never answers (nor exits); when the port was ours to choose, it is
        relaunched on a new one (:data:`PORT_RETRIES` times; :attr:`url` changes).

        Raises:
            RuntimeError: if the process exits or does not answer in time (log tail included);
                the server is stopped first.
        """
        assert self.proc is not None, "launch() first"
        retries = PORT_RETRIES if self._own_port else 0
        while True:
            exited = self.proc.poll() is not None
            if not exited:
                try:
                    if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
            if retries and any(m in self._log_end() for m in PORT_TAKEN):
                retries -= 1
                logger.warning("port %d was taken before the server bound it; relaunching "
                               "on another", self.port)  # fmt: skip
                self.stop()
                self._use_port(free_port())
                self.launch()
                continue
            if exited:
                self.stop()
                raise RuntimeError(
                    f"SGLang server exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() >= self._deadline:
                break
            time.sleep(POLL_S)
        self.stop()
        raise RuntimeError(
            f"SGLang server did not answer in {self.startup_timeout_s}s:\n{self.log_tail()}"
        )

    def start(self) -> ServerProcess:
        """Start the server and wait until /health_generate answers.

        Raises:
            RuntimeError: if the process exits or does not answer in time (log tail included).
        """
        return self.launch().wait_ready()

    def stop(self) -> None:
        """Kill the whole process group (launcher, scheduler, detokenizer) and reap it.

        SIGKILL at once: on SIGTERM SGLang drains for 5 s (and a SIGTERM that reaches the
        scheduler first makes the launcher sleep 5 s before its crash diagnostics), while a
        test or replay server holds nothing that outlives it.
        """
        if self.proc is None:
            return
        try:  # children (scheduler, detokenizer) share the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(self.proc.pid)
        if getattr(self, "_log_file", None) is not None:
            self._log_file.close()
            self._log_file = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _log_end(self, size: int = 4096) -> str:
        """The last ``size`` bytes this launch wrote to the log (cheap to read at every poll)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(self._log_start, f.seek(0, os.SEEK_END) - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _live_members(pgid: int) -> list[int]:
    """Pids of the group's processes that are not zombies."""
    live = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                live.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return live


def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    """Wait until every process of the killed group has exited: the launcher dies at once, but
    a scheduler in the middle of a forward may take a moment to go (zombies left to an init
    that does not reap them count as gone)."""
    deadline = time.monotonic() + timeout_s
    while (live := _live_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if live:
        logger.warning("processes %s of server group %d outlived SIGKILL", live, pgid)


def start_all(servers: Iterable[ServerProcess]) -> list[ServerProcess]:
    """Start ``servers`` concurrently: launch every process, then wait for each.

    Most of a start is CPU-bound imports in three processes per server, so on 2 cores N servers
    take about half the time of N one after another. If any fails to start, every one is
    stopped and the first error is raised.
    """
    servers = list(servers)
    try:
        for srv in servers:
            srv.launch()
        for srv in servers:
            srv.wait_ready()
    except BaseException:
        for srv in servers:
            srv.stop()
        raise
    return servers
