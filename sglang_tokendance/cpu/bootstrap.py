"""Import-time CPU stand-ins for SGLang 0.5.23, loaded from a ``.pth`` file.

SGLang on a CPU-only machine needs two things PyPI cannot give it:

- ``sgl_kernel``: its CPU build is not published; the wheels hold only CUDA code. When no real
  ``sgl_kernel`` is importable and CUDA is absent, :class:`_StandinFinder` serves
  :mod:`sglang_tokendance.cpu.sgl_kernel_standin` under that name.
- ``torchvision``: PyPI's wheel registers meta kernels for ``torchvision::nms``/``qnms`` whose
  schemas only its CUDA build defines. Before torchvision is first imported we define those two
  schemas (nothing else), so the import succeeds on CPU torch.

This module must stay cheap: it runs at every interpreter start in the environment. It imports
neither torch nor sglang; the work happens lazily, on the first import of the two names.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

_DISABLE_ENV = "TOKENDANCE_NO_CPU_STANDINS"


def _cuda_present() -> bool:
    """True when an NVIDIA driver is visible; then the stand-ins stay out of the way."""
    if os.environ.get("TOKENDANCE_FORCE_CPU_STANDINS") == "1":
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


class _StandinFinder(importlib.abc.MetaPathFinder):
    """Serves the ``sgl_kernel`` stand-in and pre-defines torchvision's op schemas."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname == "sgl_kernel":
            if self._real_spec(fullname) is not None:
                return None
            return importlib.util.spec_from_loader(fullname, _StandinLoader(), origin="standin")
        if fullname == "torchvision":
            _define_torchvision_schemas()
        return None

    def _real_spec(self, fullname: str) -> importlib.machinery.ModuleSpec | None:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, None)
            if spec is not None:
                return spec
        return None


class _StandinLoader(importlib.abc.Loader):
    def create_module(self, spec):  # noqa: ANN001
        return None

    def exec_module(self, module: ModuleType) -> None:
        from sglang_tokendance.cpu import sgl_kernel_standin

        module.__dict__.update(
            {k: v for k, v in sgl_kernel_standin.__dict__.items() if not k.startswith("__")}
        )
        module.__getattr__ = sgl_kernel_standin.__getattr__  # type: ignore[attr-defined]
        module.__doc__ = sgl_kernel_standin.__doc__
        module.__version__ = sgl_kernel_standin.__version__  # type: ignore[attr-defined]
        module.__path__ = []  # a package, so `from sgl_kernel.x import y` fails clearly


_schemas_defined = False


def _define_torchvision_schemas() -> None:
    global _schemas_defined
    if _schemas_defined:
        return
    _schemas_defined = True
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: F841 - kept alive below
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        name = schema.split("(")[0]
        if not hasattr(torch.ops.torchvision, name) or not _has_schema(name):
            try:
                lib.define(schema)
            except RuntimeError:  # already defined by a real build
                pass
    _KEEP.append(lib)


def _has_schema(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name).default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


_KEEP: list[object] = []


def install() -> None:
    """Put the finder on ``sys.meta_path`` (idempotent; no-op with a GPU or when disabled)."""
    if os.environ.get(_DISABLE_ENV) == "1" or _cuda_present():
        return
    if any(isinstance(f, _StandinFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _StandinFinder())


install()
