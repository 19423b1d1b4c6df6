"""The environment of a server on CPU: thread binding when it runs several dp / tp ranks.

SGLang's CPU path asserts one NUMA node per rank unless ``SGLANG_CPU_OMP_THREADS_BIND`` says
which cores each rank uses; these machines have one node, so for dp x tp > 1 the cores are
split between the ranks here (unless the user has set the variable).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
_SIZE_FLAGS = {"--dp-size": "dp", "--dp": "dp", "--tp-size": "tp", "--tp": "tp"}


def world_size(argv: list[str]) -> int:
    """dp x tp of a launch_server argv (1 when neither flag is given)."""
    sizes = {"dp": 1, "tp": 1}
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in _SIZE_FLAGS:
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else "1"
            sizes[_SIZE_FLAGS[flag]] = int(value)
    return sizes["dp"] * sizes["tp"]


def cpu_threads_bind(world: int, cpus: list[int]) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``world`` ranks: the cores split into ``world``
    contiguous groups, ``"0|1"`` for 2 ranks on 2 cores (ranks share cores when there are
    more ranks than cores)."""
    cpus = sorted(cpus)
    if world > len(cpus):
        return "|".join(str(cpus[r % len(cpus)]) for r in range(world))
    groups = []
    for r in range(world):
        part = cpus[r * len(cpus) // world : (r + 1) * len(cpus) // world]
        groups.append(str(part[0]) if len(part) == 1 else f"{part[0]}-{part[-1]}")
    return "|".join(groups)


def server_env(argv: list[str] | None = None) -> dict[str, str]:
    """The server's environment. With dp x tp > 1 it sets ``SGLANG_CPU_OMP_THREADS_BIND``
    unless the user has: SGLang's CPU path otherwise asserts one NUMA node per rank, and these
    machines have one."""
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.pop("TRITON_INTERPRET", None)  # a test-process setting; the server runs torch code
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    world = world_size(argv or [])
    if world > 1 and not env.get(BIND_ENV):
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        env[BIND_ENV] = cpu_threads_bind(world, cpus or list(range(os.cpu_count() or 1)))
        logger.info("%s=%s (%d ranks)", BIND_ENV, env[BIND_ENV], world)
    return env
