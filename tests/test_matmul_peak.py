"""benchmarks/matmul_peak.py: shapes parsed strictly, and a tiny run writes every side and dtype per shape."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import matmul_peak  # noqa: E402


def test_shapes_are_parsed_strictly():
    assert matmul_peak.parse_shapes("1042x256x768, 8X8X8") == [(1042, 256, 768), (8, 8, 8)]
    for bad in ("8x8", "8x0x8", "8xax8", ","):
        with pytest.raises(ValueError):
            matmul_peak.parse_shapes(bad)


def test_a_tiny_run_writes_each_side_and_dtype(tmp_path):
    out = tmp_path / "peak.json"
    assert matmul_peak.main(["--shapes", "64x32x48", "--runs", "2", "--calls", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/matmul_peak.py --shapes 64x32x48")
    (row,) = result["rows"]
    assert row["shape"] == [64, 32, 48]
    sides = ["jax"] + (["torch"] if "torch" in result else [])
    for side in sides:
        for dtype in ("float32", "bfloat16"):
            cell = row[f"{side}_{dtype}"]
            assert 0 < cell["min"] <= cell["gflops"] <= cell["max"], (side, dtype, cell)
    assert set(result["cpu"]) == {"model", "avx512_bf16", "amx_bf16", "cores_seen_by_jax"}
