"""The touch-point table (patches/sglang-0.5.23) against SGLang and against the code."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sglang

from sglang_tokendance import SGLANG_VERSION, patches

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sglang_tokendance"
PATCH_DIR = ROOT / "patches" / f"sglang-{SGLANG_VERSION}"
# Where the package may set attributes on objects it does not own, and why.
SETATTR_SITES = {
    "state.py": 2,  # the one record on a Req and on a ReqToTokenPool
    "scheduler.py": 1,  # the Scheduler's TokenDanceScheduler
    "plugin.py": 1,  # the config on ServerArgs
    "openai_compat.py": 1,  # the raw body's kv_hints on Starlette's request.state
}


def sources() -> dict[str, str]:
    return {
        str(p.relative_to(PKG)): p.read_text()
        for p in PKG.rglob("*.py")
        if "models" not in p.parts and "trace" not in p.parts
    }


def test_every_target_of_the_table_exists_in_the_installed_sglang() -> None:
    table = patches.load_table()
    assert {tp.kind for tp in table} == set(patches.KINDS)
    patches.check_names(table)  # raises naming what is missing


def test_a_missing_name_fails_loudly_naming_the_version() -> None:
    bogus = patches.TouchPoint("hook", "sglang.srt.managers.scheduler.Scheduler.no_such_method")
    with pytest.raises(RuntimeError, match=r"supports SGLang 0\.5\.23.*no_such_method"):
        patches.check_names([bogus])


def test_hooks_are_installed_only_from_the_table() -> None:
    table = patches.load_table()
    for tp in table:
        if tp.kind == "hook":
            assert tp.type in ("before", "after", "around"), tp
            assert callable(patches.resolve_handler(tp.handler)), tp.handler
    callers = [name for name, text in sources().items() if "HookRegistry.register(" in text]
    assert callers == ["patches.py"]
    # every module-level hook function the package defines is in the table
    handlers = {tp.handler for tp in table if tp.kind == "hook"}
    for name, text in sources().items():
        module = "sglang_tokendance." + name[:-3].replace("/", ".")
        for fn in re.findall(r"^(?:async )?def ((?:after|around|before)_\w+)\(", text, re.M):
            if fn in ("after_prefill",):
                continue
            assert f"{module}:{fn}" in handlers, f"{module}:{fn} is not in the table"


def test_every_named_touch_point_occurs_where_the_table_says() -> None:
    texts = sources()
    for tp in patches.load_table():
        if tp.used_in is None:
            continue
        rel = str(Path(tp.used_in).relative_to("sglang_tokendance"))
        assert rel in texts, f"{tp.used_in} does not exist"
        needle = tp.name or tp.target.rsplit(".", 1)[-1]
        assert needle.split(".")[0] in texts[rel], f"{needle} not used in {tp.used_in}"
        if tp.upstream is not None:
            assert (PATCH_DIR / tp.upstream).is_file(), tp.upstream


def test_tokendance_state_rides_on_sglang_objects_in_one_record_each() -> None:
    found = {
        name: len(re.findall(r"\bsetattr\(", text))
        for name, text in sources().items()
        if "setattr(" in text
    }
    assert found == SETATTR_SITES
    banned = r"\breq\.tokendance_\w+|\breq\._tokendance\w*|getattr\(req, \"tokendance_"
    offenders = [n for n, t in sources().items() if re.search(banned, t)]
    assert offenders == []


def _imports(name: str, text: str) -> set[str]:
    """Package modules ``name`` imports (anywhere but under ``if TYPE_CHECKING``)."""
    pkg = "sglang_tokendance." + name[:-3].replace("/", ".").removesuffix(".__init__")
    tree = ast.parse(text)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                up = parts[: len(parts) - node.level + (1 if name.endswith("__init__.py") else 0)]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("sglang_tokendance"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    out.add(
                        sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else base
                    )
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sglang_tokendance")}
    return out - {pkg}


def test_the_package_has_no_import_circle() -> None:
    graph = {
        "sglang_tokendance." + n[:-3].replace("/", ".").removesuffix(".__init__"): _imports(n, t)
        for n, t in sources().items()
    }
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(mod) :], mod]))
        if mod in done:
            return
        for dep in sorted(graph.get(mod, ())):
            visit(dep, [*path, mod])
        done.add(mod)

    for mod in sorted(graph):
        visit(mod, [])


def test_the_upstream_diffs_apply_to_the_pinned_sglang(tmp_path: Path) -> None:
    site = Path(sglang.__file__).resolve().parent.parent
    diffs = sorted(PATCH_DIR.glob("*.diff"))
    assert len(diffs) >= 3
    for diff in diffs:
        for rel in re.findall(r"^\+\+\+ b/(\S+)", diff.read_text(), re.M):
            dst = tmp_path / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(site / rel, dst)
        # git apply works outside a repository and git is on every machine that cloned us
        res = subprocess.run(
            ["git", "apply", "--check", "-p1", str(diff)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, f"{diff.name}: {res.stdout}{res.stderr}"
