"""Pure-torch stand-in for the CPU ops of ``sgl_kernel`` that plain generation calls.

Served as ``sgl_kernel`` by :mod:`sglang_tokendance.cpu.bootstrap` on machines without CUDA,
where the real CPU build is unavailable. Any other name imports fine (SGLang imports many names
at module load) but raises a clear ``NotImplementedError`` when called.
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch

__version__ = "0.0.0+tokendance-cpu-standin"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write ``req_to_token[row, start:end]`` = the next slice of ``out_cache_loc`` per request.

    The slices of ``out_cache_loc`` are consumed in request order (SGLang's CPU kernel contract).
    """
    del pool_len
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    pos = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[pos : pos + n].to(req_to_token.dtype)
        pos += n


class _Missing:
    """A named placeholder: importable, but calling it explains what is missing."""

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.__qualname__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            f"sgl_kernel.{self.__name__} is not available: this is sglang-tokendance's CPU "
            "stand-in for sgl_kernel, which implements only the ops plain CPU generation needs "
            "(assign_req_to_token_pool_cpu). Install the real sgl-kernel for this feature."
        )

    def __getattr__(self, item: str) -> _Missing:
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self.__name__}.{item}")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing(name)
