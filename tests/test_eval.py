"""Evaluation metrics and report drawing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from varejax.eval.metrics import attribute_accuracy, erasure_rate, frechet_distance
from varejax.eval.report import labelled_grid, line_plot, markdown_table, text_table


def test_erasure_rate_and_accuracy():
    assert erasure_rate([True, False, False, False]) == 0.75
    predicted = {"shape": np.array([0, 1, 2]), "colour": np.array([3, 3, 3])}
    wanted = [{"shape": 0, "colour": 3}, {"shape": 2, "colour": None}, {"shape": 2, "colour": 1}]
    assert attribute_accuracy(predicted, wanted) == pytest.approx(3 / 5)
    assert attribute_accuracy(predicted, wanted, ["shape"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        erasure_rate([])


def test_frechet_distance_matches_closed_form():
    rng = np.random.RandomState(0)
    a = rng.randn(4000, 3)
    b = rng.randn(4000, 3) * 2 + 1
    # Gaussians N(0, I) and N(1, 4I): |mu|^2 = 3, tr(I + 4I - 2*2I) = 3 -> 6.
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    x, y = rng.randn(50, 4), rng.randn(60, 4) @ rng.randn(4, 4)
    ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_report_drawing(tmp_path):
    path = line_plot({"erase": [(1, 0.7), (2, 0.3), (3, float("nan"))], "pre": [(1, 0.1)]}, tmp_path / "p.png",
                     title="losses")
    from PIL import Image
    assert Image.open(path).size == (720, 360)
    grid = labelled_grid(np.zeros((3, 8, 8, 3), np.uint8), ["a", "b", "c"], 2, tmp_path / "g.png")
    assert Image.open(grid).size == (32, 2 * (16 + 14))
    assert markdown_table(["a", "b"], [[1, 0.5]]) == "| a | b |\n|---|---|\n| 1 | 0.500 |"
    assert text_table(["name", "v"], [["x", 1.0]]).splitlines()[2].startswith("x ")
