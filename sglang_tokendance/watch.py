"""The integrity watch: a full slot census after every batch, for soaks and debugging (opt-in).

``TOKENDANCE_CHECK_EVERY_BATCH=1`` in the server's environment runs
:meth:`TokenDanceRadixCache.check_integrity` after every forward (after the collector has
promoted masters and attached mirrors, before SGLang releases finished requests), with the
slots of every running request counted as theirs. It costs a pass over the pool per batch, so
it is off by default; the stats route reports ``watch`` (checks run, failures, the first
failure's message), which is how the soak tests prove no step of a long run broke an invariant.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

ENV = "TOKENDANCE_CHECK_EVERY_BATCH"


@dataclass(slots=True)
class IntegrityWatch:
    """Counts per-batch census runs and failures; keeps the first failure's message."""

    checks: int = 0
    failures: int = 0
    first_failure: str | None = None

    @staticmethod
    def enabled() -> bool:
        return os.environ.get(ENV, "") not in ("", "0")

    def check(self, scheduler: Any, batch: Any) -> None:
        """Census of the pool with the batch's and the running batch's requests."""
        cache = scheduler.tree_cache
        reqs: dict[str, Any] = {}
        for req in [*batch.reqs, *getattr(scheduler.running_batch, "reqs", [])]:
            if req.kv.req_pool_idx is not None and req.kv.holds_kv:
                reqs[req.rid] = req
        owned = [
            cache.row_owned_slots(
                r.kv.req_pool_idx, r.kv.cache_protected_len, r.kv.kv_allocated_len
            )
            for r in reqs.values()
        ]
        self.checks += 1
        try:
            cache.check_integrity(owned)
        except AssertionError as e:
            self.failures += 1
            if self.first_failure is None:
                self.first_failure = f"batch {self.checks} ({batch.forward_mode.name}): {e}"
                logger.error("TokenDance integrity watch: %s", self.first_failure)

    def to_dict(self) -> dict[str, Any]:
        return {"checks": self.checks, "failures": self.failures, "first": self.first_failure}
