"""The batch timer's summary (benchmarks/batch_times.py): pure file parsing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import batch_times  # noqa: E402

LINES = """# mode=tokendance master_start=arrival
1.0 E 1 581 15.00 master
2.0 E 3 1202 16.00 reuse,reuse,reuse
3.0 D 4 0 3.00 master,reuse,reuse,reuse
4.0 E 1 581 9.00 master
5.0 E 1 581 11.00 master
6.0 E 2 40 1.00 -,-
"""


def test_summary_groups_prefill_batches_by_role_and_size(tmp_path: Path) -> None:
    (tmp_path / "batches-7.txt").write_text(LINES)
    out = batch_times.main([str(tmp_path), "--min-batches", "1"])
    (server,) = out["servers"]
    assert server["server"] == "mode=tokendance master_start=arrival"
    assert server["prefill"] == {
        "masterx1": {
            "batches": 3,
            "ms_p50": 11.0,
            "ms_min": 9.0,
            "ms_max": 15.0,
            "tokens_p50": 581,
        },
        "plainx2": {"batches": 1, "ms_p50": 1.0, "ms_min": 1.0, "ms_max": 1.0, "tokens_p50": 40},
        "reusex3": {
            "batches": 1,
            "ms_p50": 16.0,
            "ms_min": 16.0,
            "ms_max": 16.0,
            "tokens_p50": 1202,
        },
    }  # the decode line is not a prefill


def test_an_empty_folder_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="TD_TIME_BATCHES"):
        batch_times.main([str(tmp_path)])
