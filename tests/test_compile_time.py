"""benchmarks/compile_time.py: both block layouts compile and the JSON holds what README quotes."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compile_time  # noqa: E402


def test_compile_time_reports_both_layouts(tmp_path):
    out = tmp_path / "ct.json"
    result = compile_time.main(["--config", "configs/compile_time.py:tiny", "--config.depths=(1,)",
                                f"--config.out={out}"])
    assert json.loads(out.read_text()) == result
    (row,) = result["depths"]
    assert row["depth"] == 1
    for layout in ("unrolled", "scanned"):
        assert row[layout]["lower_s"] > 0 and row[layout]["compile_s"] > 0
    total = lambda layout: row[layout]["lower_s"] + row[layout]["compile_s"]  # noqa: E731
    assert abs(row["unrolled_over_scanned"] - total("unrolled") / total("scanned")) < 0.02
    assert result["command"].startswith("python benchmarks/compile_time.py")
