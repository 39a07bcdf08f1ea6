"""`varejax compare DIR... [--out DIR] [--names a,b,...]`: eval runs of one task side by side.

    varejax compare runs/eval_church_base runs/eval_church_svare runs/eval_church_esd --names base,S-VARE,ESD

Reads each DIR's results.json (`varejax eval`), and writes in --out (default: the first DIR):

* compare.md / compare.html: a table with a row per metric ("<scorer>/<metric>", every number of the
  summaries) and a column per run, then the settings that differ between the runs;
* figures/compare_bars.png: a bar chart per metric (a bar per run);
* figures/compare_scatter.png: erasure against preservation (a point per run) where the runs have both
  (metrics named `erasure_rate` and `preservation` / `attribute_accuracy` / `clip_score`).

Every DIR must hold a results.json of the same task; anything else is a one-line error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from varejax.errors import UserError
from varejax.eval.report import Page, bar_chart, scatter_plot
from varejax.eval.run import RESULTS_FILE, flat_metrics
from varejax.paths import as_path

# Figures plotted against erasure, in order of preference (the first one every run has).
PRESERVATION_METRICS = ("preservation", "attribute_accuracy", "clip_score", "accuracy")


def read_results(folder: str) -> dict[str, Any]:
    """results.json of an eval workdir (a one-line UserError when it is missing or not one)."""
    path = as_path(folder) / RESULTS_FILE
    if not path.exists():
        raise UserError(f"{folder}: no {RESULTS_FILE} (run `varejax eval --workdir {folder}` first)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON ({err})") from None
    if "summary" not in results or "task" not in results:
        raise UserError(f"{path}: not a `varejax eval` results file (no task / summary)")
    return results


def run_names(dirs: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """Column names: `names` (one per DIR), else each folder's name (made unique by a suffix)."""
    if names:
        if len(names) != len(dirs):
            raise UserError(f"--names gives {len(names)} names for {len(dirs)} folders")
        return list(names)
    out: list[str] = []
    for d in dirs:
        base = os.path.basename(os.path.normpath(str(d))) or str(d)
        name, k = base, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out.append(name)
    return out


def metric_table(runs: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(metric names in first-seen order, {metric: {run: value}}) over every run's summaries."""
    table: dict[str, dict[str, float]] = {}
    for run, results in runs.items():
        for metric, value in flat_metrics(results["summary"]).items():
            table.setdefault(metric, {})[run] = value
    return list(table), table


def _differing_settings(runs: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Rows (setting, value per run) of the settings that differ between runs (models, deltas, sampling, ...)."""
    flat = {run: _flatten(results.get("settings", {})) for run, results in runs.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    rows = []
    for key in keys:
        if key.startswith(("config/", "seeds", "command")):  # the config repeats the settings; seeds are long
            continue
        values = [flat[run].get(key, "") for run in runs]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            rows.append([key, *[str(v)[:80] for v in values]])
    return rows


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix.rstrip("/"): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}/"))
    return out


def _scatter_axes(metrics: Sequence[str], table: Mapping[str, Mapping[str, float]], runs: Sequence[str]
                  ) -> list[tuple[str, str]]:
    """(x, y) metric pairs for the scatter plot: each scorer's erasure rate against its preservation figure."""
    pairs = []
    for x in metrics:
        if not x.endswith("erasure_rate") or len(table[x]) != len(runs):
            continue
        scorer = x.rsplit("/", 1)[0] if "/" in x else ""
        for name in PRESERVATION_METRICS:
            y = f"{scorer}/{name}" if scorer else name
            if y in table and len(table[y]) == len(runs):
                pairs.append((x, y))
                break
    return pairs


def compare(dirs: Sequence[str], out: str | os.PathLike | None = None, names: Sequence[str] | None = None):
    """Writes compare.md / compare.html and figures/compare_*.png (module doc) in `out`; returns `out`."""
    if len(dirs) < 2:
        raise UserError("give at least two eval workdirs to compare")
    columns = run_names(dirs, names)
    runs = {name: read_results(d) for name, d in zip(columns, dirs, strict=True)}
    tasks = {name: r["task"] for name, r in runs.items()}
    if len(set(tasks.values())) > 1:
        listed = ", ".join(f"{d} is {t!r}" for d, t in zip(dirs, tasks.values(), strict=True))
        raise UserError(f"the runs are of different tasks ({listed}); compare runs of one task")
    out = as_path(out or dirs[0])
    (out / "figures").mkdir(parents=True, exist_ok=True)
    metrics, table = metric_table(runs)
    task = next(iter(tasks.values()))

    page = Page(f"varejax compare: {task}")
    page.text("Runs: " + "; ".join(f"{name} = {d}" for name, d in zip(columns, dirs, strict=True)))
    page.table(["metric", *columns], [[m, *[table[m].get(c, "") for c in columns]] for m in metrics])
    shown = {m: table[m] for m in metrics if m != "n" and not m.endswith("/n")}
    if shown:
        bar_chart(shown, out / "figures" / "compare_bars.png")
        page.heading("Every metric")
        page.image("figures/compare_bars.png", "a bar per run for every metric")
    pairs = _scatter_axes(metrics, table, columns)
    if pairs:
        panels = {f"{y} vs {x}": {run: [(table[x][run], table[y][run])] for run in columns} for x, y in pairs}
        scatter_plot(panels, out / "figures" / "compare_scatter.png", x_label="erasure rate", y_label="preservation")
        page.heading("Erasure against preservation")
        page.image("figures/compare_scatter.png", "a point per run")
    differing = _differing_settings(runs)
    if differing:
        page.heading("Settings that differ")
        page.table(["setting", *columns], differing)
    page.write(out, "compare")
    return out
