"""Install the CPU stand-ins into the current Python environment (a ``.pth`` file).

``python -m sglang_tokendance.cpu.install`` writes ``sglang_tokendance_cpu.pth`` into the
environment's site-packages, so every interpreter there (``python -m sglang.launch_server``
included) gets the stand-ins without any path set by hand. ``--uninstall`` removes it.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

PTH_NAME = "sglang_tokendance_cpu.pth"
PTH_LINE = "import sglang_tokendance.cpu.bootstrap\n"


def pth_path() -> Path:
    """Where the ``.pth`` file goes: the purelib site-packages of this interpreter."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uninstall", action="store_true", help="remove the .pth file")
    args = parser.parse_args(argv)
    path = pth_path()
    if args.uninstall:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
        return 0
    if not path.exists() or path.read_text() != PTH_LINE:
        path.write_text(PTH_LINE)
    print(f"installed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
