"""benchmarks/storage_accounting.py: cache numbers equal the arithmetic; every slot returns."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "storage_accounting.py"


def test_storage_benchmark_matches_the_arithmetic(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("storage_accounting", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "storage.json"
    args = ["--agents", "4", "--segments", "3", "--seg-len", "10", "--out", str(out)]
    assert module.main(args) == 0
    result = json.loads(out.read_text())
    # k = ceil(0.15 * 10) = 2; dense = 4 * 3 * 10; stored = 3 * 10 + 4 * 3 * 2.
    assert result["expected"] == {"dense_tokens": 120, "stored_tokens": 54, "ratio": 120 / 54}
    assert result["stats"]["mirror_tokens"] == 24 and result["matches_expected"]
    assert result["kv_bytes_per_token"] == 2 * 2 * (64 + 64) * 2
    assert result["release"]["free_slots_after"] == result["release"]["pool_slots"] == 54 + 64
