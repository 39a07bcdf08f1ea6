"""A sweep's results: rows in results.jsonl, results.csv, report.md and the Pareto plot."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from varejax.sweep.results import pareto_front, read_rows, record_run, write_tables


def _row(name, concept, method, lr, seed, erasure, preservation, **extra):
    return {"name": name, "concept": concept, "stack": "0",
            "grid": {"train.erase_loss": method, "train.learning_rate": lr, "seed": seed},
            "metrics": {"erasure_rate_seen_after": erasure, "preservation_after": preservation, "toy_fid": 2.5},
            "wall_time_s": 10.0, "steps": 20, **extra}


ROWS = [
    _row("church-svare-s0", "church", "svare", 3e-4, 0, 0.9, 0.8),
    _row("church-svare-s1", "church", "svare", 3e-4, 1, 0.5, 0.95),
    _row("church-ce-s0", "church", "ce", 1e-4, 0, 0.4, 0.7),  # dominated by church-svare-s1
    _row("dog-svare-s0", "dog", "svare", 3e-4, 0, 0.6, 0.6),
    _row("dog-ce-s0", "dog", "ce", 1e-4, 0, 0.2, 0.9),
    {"name": "dog-ce-s1", "concept": "dog", "stack": "0", "metrics": {}, "wall_time_s": 1.5, "steps": 2,
     "grid": {"train.erase_loss": "ce", "train.learning_rate": 1e-4, "seed": 1},
     "error": "FloatingPointError: loss is nan | step 2\ntraceback ..."},
]


def test_record_replace_read_round_trip(tmp_path):
    sweep = tmp_path / "sweep"  # not there yet: record_run makes it
    assert read_rows(sweep) == []
    for row in ROWS:
        record_run(sweep, row)
    assert read_rows(sweep) == ROWS
    # A re-run replaces its row in place; numpy numbers and tuples come back as plain JSON values.
    redone = {**ROWS[1], "metrics": {"erasure_rate_seen_after": np.float32(0.75), "preservation_after": 0.5},
              "grid": {**ROWS[1]["grid"], "pair": ("a", "b")}}
    record_run(sweep, redone)
    record_run(sweep, redone)
    rows = read_rows(sweep)
    assert [r["name"] for r in rows] == [r["name"] for r in ROWS]
    assert rows[1]["metrics"] == {"erasure_rate_seen_after": 0.75, "preservation_after": 0.5}
    assert rows[1]["grid"]["pair"] == ["a", "b"]
    lines = (sweep / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(ROWS) and all(json.loads(line)["name"] for line in lines)
    # A non-finite metric is written as null (strict JSON), and a row needs a name.
    record_run(sweep, {**ROWS[0], "metrics": {"toy_fid": float("nan")}})
    assert read_rows(sweep)[0]["metrics"] == {"toy_fid": None}
    with pytest.raises(ValueError, match="name"):
        record_run(sweep, {"concept": "church"})


def test_csv_has_a_column_per_grid_field_and_metric(tmp_path):
    rows = [*ROWS[:2], {**ROWS[2], "grid": {**ROWS[2]["grid"], "trainable": ["blocks.0", "blocks.1"]}}, ROWS[-1]]
    write_tables(tmp_path, rows, planned=8)
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["name", "concept", "stack", "seed", "train.erase_loss", "train.learning_rate",
                              "trainable", "erasure_rate_seen_after", "preservation_after", "toy_fid",
                              "wall_time_s", "steps", "error"]
    assert [r["name"] for r in table] == [r["name"] for r in rows]
    first = table[0]
    assert (first["concept"], first["train.erase_loss"], first["seed"]) == ("church", "svare", "0")
    assert float(first["train.learning_rate"]) == 3e-4 and float(first["erasure_rate_seen_after"]) == 0.9
    assert first["trainable"] == "" and json.loads(table[2]["trainable"]) == ["blocks.0", "blocks.1"]
    failed = table[-1]
    assert failed["erasure_rate_seen_after"] == "" and failed["error"].startswith("FloatingPointError")
    assert "\n" not in failed["error"]
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1  # one line per run


def test_report_tables_front_and_plot(tmp_path):
    from PIL import Image

    write_tables(tmp_path, ROWS, planned=8)
    report = (tmp_path / "report.md").read_text()
    assert "6 of 8 planned runs finished (1 failed)" in report
    assert report.count("\n## church\n") == 1 and report.count("\n## dog\n") == 1
    church = report.split("\n## church\n")[1].split("\n## ")[0]
    dog = report.split("\n## dog\n")[1]
    assert church.count("| church-") == 1 and church.count("| **church-") == 2  # bold: on the front
    assert "| church-ce-s0 | 0 | ce | 0.0001 | 0.400 | 0.700 | 2.500 | 10 |" in church  # 3 decimals
    # The failed run is a row with empty metrics and its error's first line ('|' escaped).
    failed = next(line for line in dog.splitlines() if "dog-ce-s1" in line)
    assert "| - | - |" in failed and "failed: FloatingPointError: loss is nan \\| step 2" in failed
    assert "traceback" not in report
    assert "- church: church-svare-s0, church-svare-s1" in report
    assert "- dog: dog-ce-s0, dog-svare-s0" in report
    assert "![erasure vs preservation](figures/pareto.png)" in report
    # One 480 x 400 panel per concept, side by side.
    assert Image.open(tmp_path / "figures" / "pareto.png").size == (2 * 480, 400)


def test_report_without_metrics_or_plan(tmp_path):
    write_tables(tmp_path, [ROWS[-1]])
    report = (tmp_path / "report.md").read_text()
    assert "1 runs finished (1 failed)" in report and "dog-ce-s1" in report
    assert "pareto.png" not in report and not (tmp_path / "figures" / "pareto.png").exists()
    write_tables(tmp_path, [])
    assert "0 runs finished" in (tmp_path / "report.md").read_text()


def test_pareto_front():
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 0.5)]) == [0]
    # (0.4, 0.4) is dominated; the others trade one metric for the other.
    assert pareto_front([(0.9, 0.1), (0.4, 0.4), (0.5, 0.5), (0.1, 0.9)]) == [0, 2, 3]
    # Equal points are all on the front (neither dominates the other) ...
    assert pareto_front([(0.5, 0.5), (0.2, 0.2), (0.5, 0.5)]) == [0, 2]
    # ... but a tie in one metric and a loss in the other is dominated (in x and in y).
    assert pareto_front([(0.5, 0.5), (0.5, 0.4), (0.4, 0.5)]) == [0]
    assert pareto_front([(1.0, 0.2), (0.8, 0.2), (0.8, 0.9)]) == [0, 2]
    # Points with a missing or NaN coordinate are left out.
    assert pareto_front([(math.nan, 1.0), (0.1, 0.1), (None, 2.0)]) == [1]


def test_pareto_front_matches_the_definition():
    rng = np.random.RandomState(0)
    points = [tuple(p) for p in rng.randint(0, 5, size=(60, 2)).astype(float)]
    dominated = lambda p: any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)
    assert pareto_front(points) == [i for i, p in enumerate(points) if not dominated(p)]


def test_scatter_plot_and_ticks(tmp_path):
    from PIL import Image

    from varejax.eval.report import nice_ticks, scatter_plot

    ticks, decimals = nice_ticks(-0.06, 1.06)
    assert np.allclose(ticks, [0, 0.2, 0.4, 0.6, 0.8, 1.0]) and decimals == 1
    assert nice_ticks(3, 120) == ([20, 40, 60, 80, 100, 120], 0)
    panels = {f"c{i}": {"svare": [(0.1 * i, 0.5), (math.nan, 1.0)], "ce": []} for i in range(4)}
    path = scatter_plot(panels, tmp_path / "s.png", fronts={"c0": [(0.0, 0.5)]}, columns=3, panel_size=(300, 200))
    assert Image.open(path).size == (3 * 300, 2 * 200)
    with pytest.raises(ValueError):
        scatter_plot({}, tmp_path / "empty.png")
