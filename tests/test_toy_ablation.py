"""benchmarks/toy_ablation.py's bookkeeping: the learning-rate choice, mean +- std over seeds, the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "toy_ablation", Path(__file__).resolve().parents[1] / "benchmarks" / "toy_ablation.py")
toy_ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_ablation)


def _cells(seen, para, pres, fid=50.0):
    return {"erasure_rate_seen": seen, "erasure_rate_paraphrase": para, "preservation": pres, "toy_fid": fid}


def test_learning_rate_search_balances_erasure_and_preservation():
    tries = {3e-4: _cells(0.70, 0.66, 0.95), 1e-3: _cells(0.80, 0.78, 0.86), 3e-3: _cells(1.0, 1.0, 0.30)}
    # scores: 1.63, 1.65, 1.30: the middle rate; erasing everything at any cost loses
    assert toy_ablation.choose_learning_rate(tries) == 1e-3
    tied = {1e-3: _cells(0.5, 0.5, 0.9), 3e-4: _cells(0.5, 0.5, 0.9)}
    assert toy_ablation.choose_learning_rate(tied) == 3e-4


def test_summary_is_mean_and_sample_std_over_seeds():
    summary = toy_ablation.summarise([_cells(0.5, 0.6, 0.9, 40.0), _cells(0.7, 0.6, 0.8, 60.0)])
    assert summary["erasure_rate_seen"]["mean"] == pytest.approx(0.6)
    assert summary["erasure_rate_seen"]["std"] == pytest.approx(0.1414213, rel=1e-5)   # ddof 1
    assert summary["erasure_rate_paraphrase"]["std"] == 0.0
    assert summary["toy_fid"] == {"mean": 50.0, "std": pytest.approx(14.142135, rel=1e-6), "n": 2}
    assert toy_ablation.summarise([_cells(0.5, 0.6, 0.9)])["preservation"]["std"] == 0.0


def test_table_has_a_row_per_variant_with_its_learning_rate_and_spread():
    per_seed = [_cells(0.5, 0.6, 0.9, 40.0), _cells(0.7, 0.6, 0.8, 60.0)]
    data = {"variants": {
        "no erasure": {"learning_rate": None, "summary": toy_ablation.summarise(per_seed), "asr": 0.8},
        "S-VARE alpha 0.25": {"learning_rate": 3e-4, "summary": toy_ablation.summarise(per_seed), "asr": 0.25}}}
    header, rows = toy_ablation.table_rows(data)
    assert header[-1].startswith("ASR") and len(rows) == 2
    assert rows[0][:3] == ["no erasure", "-", "0.600 +- 0.141"]
    assert rows[1][1] == "0.0003" and rows[1][5] == "50.0 +- 14.1" and rows[1][6] == "0.250"
