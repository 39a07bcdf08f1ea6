"""Measured errors of the parity tests, written to a JSON file that README's tables are rendered from.

A test calls `check(name, measured, bound)`: it asserts `measured <= bound` and records both (or
`check_elementwise(name, errors, bounds)` for a bound per element: it records the worst ratio against 1). With
`VAREJAX_MEASURED=path.json` set, the session writes every record there at its end (tests/conftest.py), e.g.

    VAREJAX_MEASURED=/tmp/parity.json python -m pytest -q -m parity
    python benchmarks/readme_figures.py --collect parity=/tmp/parity.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

_RECORDS: dict[str, dict[str, float | str]] = {}


def _record(name: str, measured: float, bound: float, what: str, **extra: float) -> None:
    """Keeps the largest `measured` (with its bound) over repeats of `name`, and each `extra` field's largest."""
    previous = _RECORDS.get(name, {})
    record = dict(previous)
    if not previous or measured > previous["measured"]:
        record.update(measured=measured, bound=bound, what=what)
    for key, value in extra.items():
        record[key] = max(value, previous.get(key, value))
    _RECORDS[name] = record


def check(name: str, measured: float, bound: float, what: str = "max abs error") -> None:
    """Asserts measured <= bound (both finite) and records the pair under `name` (the largest over repeats)."""
    measured, bound = float(measured), float(bound)
    assert measured == measured, f"{name}: measured error is NaN"
    assert measured <= bound, f"{name}: {what} {measured:.3g} exceeds the bound {bound:.3g}"
    _record(name, measured, bound, what)


def check_elementwise(name: str, errors, bounds, what: str = "max abs error / its element's bound") -> None:
    """Asserts errors <= bounds element by element (broadcast) and records the worst ratio errors / bounds
    against the bound 1.0 (an element with a zero bound and a zero error counts as 0), and the largest error
    as `max_error`."""
    errors, bounds = np.broadcast_arrays(np.asarray(errors, np.float64), np.asarray(bounds, np.float64))
    assert not np.isnan(errors).any(), f"{name}: an error is NaN"
    over = errors > bounds
    ratios = np.divide(errors, bounds, out=np.where(over, np.inf, 0.0), where=bounds > 0)
    worst = float(ratios.max()) if ratios.size else 0.0
    assert not over.any(), f"{name}: {int(over.sum())} of {over.size} elements exceed their bound (worst {worst:.3g}x)"
    _record(name, min(worst, 1.0), 1.0, what, max_error=float(errors.max()) if errors.size else 0.0)


def write_if_requested(**context) -> Path | None:
    """Writes the records to $VAREJAX_MEASURED (if set), with the pytest command and `context` (e.g. the XLA
    optimisation level and whether every test passed); returns the path written."""
    target = os.environ.get("VAREJAX_MEASURED")
    if not target:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m pytest " + " ".join(sys.argv[1:])
    record = {"command": command, **context, "checks": dict(sorted(_RECORDS.items()))}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
