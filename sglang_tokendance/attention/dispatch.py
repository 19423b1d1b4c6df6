"""Which attention code a batch runs: the user's SGLang backend, or the position-tagged path.

- A batch with no laid-out row runs the attention backend SGLang was started with (the user's
  ``--attention-backend``, or the one SGLang picks for the device): its kernels, its metadata,
  its CUDA graphs. TokenDance only records the positions of the slots it writes.
- A batch holding at least one laid-out row runs entirely on the position-tagged path: keys
  rotated by ``key_pos - slot_pos`` and masked by position. Its plain rows read identity
  positions (delta 0, causal by index): the same math as the stock kernel, up to float
  rounding. The batch is not split by row because stock backends build per-batch metadata
  (kv_indptr, FlashInfer plans, captured graphs) that a sub-batch would have to build again.
- Graph runners refuse laid-out batches (they replay kernels captured on stock batches), so
  those run eagerly.

No SGLang import: the decision is unit-tested with plain values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Literal

import torch

Path = Literal["triton", "torch"]


def resolve_path(choice: str, device: str, env: dict[str, str] | None = None) -> Path:
    """The position-tagged kernels for ``--tokendance-attention choice`` on ``device``.

    ``auto`` is triton on CUDA and torch elsewhere. ``triton`` off CUDA needs Triton's
    interpreter (``TRITON_INTERPRET=1``, for tests: slow but the same kernel code).

    Raises:
        ValueError: ``triton`` on a device without CUDA and without the interpreter, or an
            unknown choice.
    """
    env = os.environ if env is None else env
    on_cuda = str(device).startswith("cuda")
    if choice == "auto":
        return "triton" if on_cuda else "torch"
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not on_cuda and env.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"--tokendance-attention triton needs a CUDA device or TRITON_INTERPRET=1 "
                f"(Triton's interpreter, for tests); device is {device!r}: use auto or torch"
            )
        return "triton"
    raise ValueError(f"--tokendance-attention must be auto, triton or torch, got {choice!r}")


def batch_is_tagged(rows: Iterable[int], laid_out_rows: set[int], uniform: bool) -> bool:
    """True when the batch must take the position-tagged path (a laid-out row, or uniform)."""
    if uniform:
        return True
    return bool(laid_out_rows) and not laid_out_rows.isdisjoint(rows)


def host_list(cpu: Any, dev: torch.Tensor | None) -> list[int]:
    """Host copy of per-request integers, preferring SGLang's CPU mirror (no device sync)."""
    src = cpu if cpu is not None else dev
    if src is None:
        return []
    return [int(x) for x in (src.tolist() if isinstance(src, torch.Tensor) else src)]
