"""A sweep's results: one row per run, kept in `results.jsonl`, and the tables and plot made from them.

    record_run(sweep_dir, {"name": "church-fce-lr3e-4-s0", "concept": "church", "stack": "0",
                           "grid": {"train.erase_loss": "fce", "train.learning_rate": 3e-4, "seed": 0},
                           "metrics": {"erasure_rate_seen_after": 0.9, "preservation_after": 0.8},
                           "wall_time_s": 41.2, "steps": 200})
    write_tables(sweep_dir, read_rows(sweep_dir), planned=24)

writes, in `sweep_dir`:
* `results.jsonl`: one JSON object per run; recording a run again replaces its row (re-runs and resumed sweeps
  never duplicate one). A failed run has `"metrics": {}` and an `"error"` message.
* `results.csv`: one line per run: name, concept, stack, every grid field (its own column), every metric, wall
  time, steps (and error, when a run failed).
* `report.md` and `figures/pareto.png`: a table per concept and erasure vs preservation, one panel per
  concept, one colour and marker per method (the grid's `method` or erase-loss label), each concept's
  Pareto front ringed, joined and named.

Pure functions of the rows; only process 0 should call the writers (the caller's business).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from varejax.eval.report import markdown_table, scatter_plot
from varejax.paths import PathLike, as_path, write_text_atomic

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
REPORT_MD = "report.md"
PARETO_PNG = "figures/pareto.png"
# The grid field that names the method: the plot gives each of its values a colour and a marker.
# The grid label that names the method (a "method" axis of dicts, or an erase-loss axis), first found wins.
METHOD_FIELDS = ("method", "erase_loss", "train.erase_loss")
# Metrics shown in report.md's tables when a row has them (results.csv has every metric).
TABLE_METRICS = ("erasure_rate_seen_after", "erasure_rate_paraphrase_after", "preservation_after", "toy_fid")


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON: numpy scalars and arrays as Python numbers and lists, tuples as lists, and
    non-finite floats as null (the file stays strict JSON that any reader accepts)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_rows(sweep_dir: PathLike) -> list[dict]:
    """The rows of `sweep_dir/results.jsonl` in the order runs were first recorded ([] when there is none yet).

    Should the file hold one name twice (an append by hand), the last row of that name wins.
    """
    path = as_path(sweep_dir) / RESULTS_JSONL
    if not path.exists():
        return []
    rows: dict[str, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON row ({e})") from e
        rows[row["name"]] = row
    return list(rows.values())


def record_run(sweep_dir: PathLike, row: Mapping[str, Any]) -> None:
    """Adds one run's row to `sweep_dir/results.jsonl`, replacing (in place) an earlier row of the same "name".

    The row holds "name", "concept", "stack", "grid" (field -> value), "metrics" (name -> float), "wall_time_s",
    "steps", and "error" for a failed run. The file is rewritten atomically: a reader sees it before or after.
    """
    if not isinstance(row.get("name"), str) or not row["name"]:
        raise ValueError(f"a sweep row needs a non-empty string 'name', got {row.get('name')!r}")
    rows = {r["name"]: r for r in read_rows(sweep_dir)}
    rows[row["name"]] = _jsonable(row)
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows.values())
    sweep_dir = as_path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_dir / RESULTS_JSONL, text)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points that no other point dominates, both coordinates to maximise.

    q dominates p when q >= p in both coordinates and q > p in at least one. So equal points do not dominate
    each other: every copy of a front point is on the front; a point tied with a front point in one coordinate
    and worse in the other is not. Points with a NaN or None coordinate are neither on the front nor dominate.
    """
    finite = [i for i, (x, y) in enumerate(points)
              if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    # Sweep from the largest x down; a point survives when its y beats every y seen at a strictly larger x and
    # is the largest y at its own x.
    order = sorted(finite, key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y, k = [], -math.inf, 0
    while k < len(order):
        x = points[order[k]][0]
        same_x = [i for i in order[k:] if points[i][0] == x]
        top_y = points[same_x[0]][1]
        if top_y > best_y:
            front += [i for i in same_x if points[i][1] == top_y]
            best_y = top_y
        k += len(same_x)
    return sorted(front)


def _metric(row: Mapping[str, Any], name: str) -> float | None:
    value = (row.get("metrics") or {}).get(name)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(_jsonable(value))
    return str(value)


def _md_cell(value: Any, decimals: int | None = None) -> str:
    """A table cell: floats with `decimals` (metrics) or in short form (grid values), '-' for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.{decimals}f}" if decimals is not None else f"{value:g}"
    elif isinstance(value, list | tuple | dict):
        text = json.dumps(_jsonable(value))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _union(rows: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    return sorted({field for row in rows for field in (row.get(key) or {})})


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    grid_fields, metric_names = _union(rows, "grid"), _union(rows, "metrics")
    fixed, last = ["name", "concept", "stack"], ["wall_time_s", "steps", "error"]
    # A grid field or metric named like another column gets a "grid." or "metric." prefix: one name, one column.
    grid_columns = [f if f not in {*fixed, *last} else f"grid.{f}" for f in grid_fields]
    metric_columns = [m if m not in {*fixed, *grid_columns, *last} else f"metric.{m}" for m in metric_names]
    with_error = any(row.get("error") for row in rows)
    header = [*fixed, *grid_columns, *metric_columns, "wall_time_s", "steps", *(["error"] if with_error else [])]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        grid, metrics = row.get("grid") or {}, row.get("metrics") or {}
        writer.writerow([_csv_cell(row.get(k)) for k in fixed] + [_csv_cell(grid.get(f)) for f in grid_fields]
                        + [_csv_cell(metrics.get(m)) for m in metric_names]
                        + [_csv_cell(row.get("wall_time_s")), _csv_cell(row.get("steps"))]
                        # The error on one line, so that each run stays one line of the file.
                        + ([" ".join(_csv_cell(row.get("error")).split())] if with_error else []))
    return buffer.getvalue()


def _varying_fields(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The grid fields whose values differ between `rows` (or are missing from some)."""
    fields = _union(rows, "grid")
    return [f for f in fields if len({json.dumps(_jsonable((r.get("grid") or {}).get(f))) for r in rows}) > 1]


def _concept_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], on_front: set[str]) -> str:
    rows = sorted(rows, key=lambda r: r["name"])
    fields = _varying_fields(rows)
    metrics = [m for m in metrics if any(m in (r.get("metrics") or {}) for r in rows)]
    failed = any(r.get("error") for r in rows)
    header = ["run", *fields, *metrics, "time (s)", *(["status"] if failed else [])]
    table = []
    for row in rows:
        name = f"**{row['name']}**" if row["name"] in on_front else row["name"]
        wall_time = row.get("wall_time_s")
        cells = [name, *(_md_cell((row.get("grid") or {}).get(f)) for f in fields),
                 *(_md_cell(_metric(row, m), 3) for m in metrics),
                 _md_cell(f"{wall_time:.0f}" if isinstance(wall_time, int | float) else None)]
        if failed:
            error = str(row.get("error") or "").strip().splitlines()
            cells.append(_md_cell(f"failed: {error[0][:80]}" if error else "ok"))
        table.append(cells)
    return markdown_table(header, table)


def write_tables(sweep_dir: PathLike, rows: Sequence[Mapping[str, Any]], *, planned: int | None = None,
                 erasure_metric: str = "erasure_rate_seen_after",
                 preservation_metric: str = "preservation_after") -> None:
    """Writes `results.csv`, `report.md` and `figures/pareto.png` (when a run has both metrics) in `sweep_dir`.

    Args:
      rows: the sweep's rows (`read_rows`); failed runs (an "error", no metrics) are listed as failed.
      planned: how many runs the sweep's grid holds, for "n of N runs finished"; None when unknown.
      erasure_metric, preservation_metric: the plot's x and y (both to maximise) and the Pareto front's.
    """
    sweep_dir = as_path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_dir / RESULTS_CSV, _csv_text(rows))

    concepts: dict[str, list[Mapping[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (str(r.get("concept") or ""), r["name"])):
        concepts.setdefault(str(row.get("concept") or "(no concept)"), []).append(row)
    failed = sum(1 for row in rows if row.get("error"))
    finished = f"{len(rows)} of {planned} planned runs" if planned is not None else f"{len(rows)} runs"
    lines = ["# Sweep results", "", f"{finished} finished ({failed} failed).", ""]

    # Each concept's front separately: erasure rates of different concepts do not trade against each other.
    fronts: dict[str, list[Mapping[str, Any]]] = {}
    for concept, members in concepts.items():
        plotted = [r for r in members if _metric(r, erasure_metric) is not None
                   and _metric(r, preservation_metric) is not None]
        points = [(_metric(r, erasure_metric), _metric(r, preservation_metric)) for r in plotted]
        fronts[concept] = [plotted[i] for i in pareto_front(points)]
    if any(fronts.values()):
        xy = lambda r: (_metric(r, erasure_metric), _metric(r, preservation_metric))
        method = next((f for f in METHOD_FIELDS if any(f in (r.get("grid") or {}) for r in rows)), None)
        panels = {}
        for concept, members in concepts.items():
            panels[concept] = {}
            for row in members:
                series = str((row.get("grid") or {}).get(method)) if method else concept
                if None not in xy(row):
                    panels[concept].setdefault(series, []).append(xy(row))
        (sweep_dir / PARETO_PNG).parent.mkdir(parents=True, exist_ok=True)
        scatter_plot(panels, sweep_dir / PARETO_PNG, x_label=f"erasure: {erasure_metric}",
                     y_label=f"preservation: {preservation_metric}",
                     fronts={c: [xy(r) for r in front] for c, front in fronts.items()})
        lines += ["## Erasure vs preservation", "", "![erasure vs preservation](figures/pareto.png)", "",
                  f"Pareto front (highest {erasure_metric} and {preservation_metric}; bold in the tables below):",
                  ""]
        lines += [f"- {concept}: " + ", ".join(sorted(r["name"] for r in front))
                  for concept, front in fronts.items() if front]
        lines.append("")

    metrics = list(dict.fromkeys([erasure_metric, *TABLE_METRICS, preservation_metric]))
    for concept, members in concepts.items():
        on_front = {r["name"] for r in fronts[concept]}
        lines += [f"## {concept}", "", _concept_table(members, metrics, on_front), ""]
    write_text_atomic(sweep_dir / REPORT_MD, "\n".join(lines))
