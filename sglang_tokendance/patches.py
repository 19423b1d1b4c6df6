"""The touch-point table: what of SGLang the plugin depends on, read from ``patches/``.

``patches/sglang-<version>/touchpoints.toml`` lists every hook, registry entry, subclass,
private name, public name read outside a hook, in-place rewrite and record the plugin has in
SGLang (see the file's header).
:func:`install_hooks` registers the table's hooks with SGLang's HookRegistry (the only place
the package calls ``HookRegistry.register``) and :func:`check_names` verifies, at startup, that
every target exists in the installed SGLang.
"""

from __future__ import annotations

import importlib
import pkgutil
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from sglang_tokendance import SGLANG_VERSION

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("hook", "registry", "subclass", "private", "public", "rewrite", "attribute", "fix")


class TouchPoint(NamedTuple):
    """One row of the table."""

    kind: str
    target: str
    name: str | None = None
    type: str | None = None  # hooks: before | after | around
    handler: str | None = None  # hooks: "module:function"
    used_in: str | None = None
    check: str = "resolve"
    upstream: str | None = None
    why: str | None = None
    record: str | None = None


def table_path(version: str = SGLANG_VERSION) -> Path:
    return ROOT / "patches" / f"sglang-{version}" / "touchpoints.toml"


def load_table(version: str = SGLANG_VERSION) -> list[TouchPoint]:
    """The table for ``version``.

    Raises:
        RuntimeError: if the table is missing (the plugin runs from a checkout: pip install -e).
    """
    path = table_path(version)
    if not path.is_file():
        raise RuntimeError(
            f"sglang-tokendance needs its touch-point table {path} (install the plugin from a "
            "checkout with `pip install -e .`)"
        )
    data = tomllib.loads(path.read_text())
    if data.get("sglang") != version:
        raise RuntimeError(f"{path} is for SGLang {data.get('sglang')!r}, not {version}")
    rows = []
    for kind in KINDS:
        for entry in data.get(kind, []):
            fields = {k: v for k, v in entry.items() if k in TouchPoint._fields}
            rows.append(TouchPoint(kind=kind, **fields))
    return rows


def _exists(tp: TouchPoint) -> bool:
    if tp.check == "source":
        module = importlib.import_module(tp.target.rsplit(".", 1)[0])
        source = Path(module.__file__ or "").read_text()
        return bool(tp.name) and tp.name in source
    try:
        pkgutil.resolve_name(tp.target)
    except (ImportError, AttributeError):
        return False
    return True


def check_names(table: list[TouchPoint]) -> None:
    """Raise RuntimeError naming the SGLang version if any target of the table is missing."""
    import sglang

    missing = [tp.target for tp in table if not _exists(tp)]
    if missing:
        raise RuntimeError(
            f"sglang-tokendance supports SGLang {SGLANG_VERSION}, but the installed SGLang "
            f"{getattr(sglang, '__version__', '?')} lacks: {', '.join(missing)}. "
            f"Install sglang=={SGLANG_VERSION}."
        )


def resolve_handler(spec: str) -> Any:
    """``"module:function"`` -> the function."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def install_hooks(table: list[TouchPoint]) -> int:
    """Register every hook of the table with SGLang's HookRegistry; returns how many."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hooks = [tp for tp in table if tp.kind == "hook"]
    for tp in hooks:
        assert tp.handler and tp.type, f"hook {tp.target} needs a handler and a type"
        HookRegistry.register(tp.target, resolve_handler(tp.handler), HookType[tp.type.upper()])
    return len(hooks)
