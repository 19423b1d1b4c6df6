"""Opt-in batch timer for SGLang servers started by the benchmarks (a diagnostic, not a metric).

Put this folder on ``PYTHONPATH`` and set ``TD_TIME_BATCHES=DIR``: every scheduler process then
appends one line per forward to ``DIR/batches-<pid>.txt``::

    <unix time> <E|D> <requests> <extend tokens> <ms in run_batch> <roles, comma-separated>

after a header line ``# mode=<tokendance mode> master_start=<arrival|release>``. Roles are the
TokenDance records' (``master``, ``reuse``, ``alone``; ``-`` for a request without one).
``benchmarks/batch_times.py DIR`` summarizes. It wraps ``Scheduler.run_batch`` once the
scheduler module is imported; without the variable nothing is patched.
"""

from __future__ import annotations

import builtins
import os
import sys
import time
from typing import Any

_orig_import = builtins.__import__
_done = [False]


def _roles(batch: Any) -> str:
    out = []
    for req in batch.reqs:
        st = getattr(req, "tokendance", None)
        out.append(str(getattr(st, "role", "-")) if st is not None else "-")
    return ",".join(out)


def _patch(folder: str) -> bool:
    mod = sys.modules.get("sglang.srt.managers.scheduler")
    cls = getattr(mod, "Scheduler", None)
    if cls is None or not hasattr(cls, "run_batch"):
        return False
    if getattr(cls, "_td_batch_timer", False):
        return True
    orig = cls.run_batch
    state: dict[str, Any] = {}

    def run_batch(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = orig(self, batch, *args, **kwargs)
        ms = (time.perf_counter() - t0) * 1e3
        out = state.get("out")
        if out is None:
            os.makedirs(folder, exist_ok=True)
            out = state["out"] = open(  # noqa: SIM115 (one file for the process's life)
                os.path.join(folder, f"batches-{os.getpid()}.txt"), "a", buffering=1
            )
            from sglang_tokendance.config import get_config

            cfg = get_config(self.server_args)
            mode = cfg.mode if cfg.enabled else "stock"
            out.write(f"# mode={mode} master_start={cfg.master_start}\n")
        extend = batch.forward_mode.is_extend()
        tokens = sum(batch.extend_lens) if extend and batch.extend_lens else 0
        out.write(
            f"{time.time():.4f} {'E' if extend else 'D'} {len(batch.reqs)} {tokens} {ms:.2f} "
            f"{_roles(batch)}\n"
        )
        return result

    cls.run_batch = run_batch
    cls._td_batch_timer = True
    return True


def _import(name: str, *args: Any, **kwargs: Any) -> Any:
    module = _orig_import(name, *args, **kwargs)
    if not _done[0] and "sglang.srt.managers.scheduler" in sys.modules:
        _done[0] = _patch(os.environ["TD_TIME_BATCHES"])
    return module


if os.environ.get("TD_TIME_BATCHES"):
    builtins.__import__ = _import
