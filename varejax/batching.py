"""Padding for fixed shapes: full batches over a dataset, and variable-length rows padded with a mask.

Jitted functions compile once per input shape, so varejax pads instead of running ragged shapes:

* `padded_batches(n, batch)`: index batches of exactly `batch` over `range(n)`, the last one filled
  by repeating its final index; `map_padded(fn, n, batch)` runs `fn` on each and keeps only the
  real rows of its outputs (any pytree of arrays).
* `pad_rows(rows, length)`: rows [n_i, ...] -> padded [B, length, ...] (zeros past n_i) and the mask
  [B, length] int32 of the valid positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-int(n) // int(multiple)) * int(multiple)


def padded_batches(n: int, batch: int) -> Iterator[tuple[np.ndarray, int]]:
    """(indices [batch] int, how many of them are real) for consecutive batches over range(n).

    Every batch has exactly `batch` indices; the last one repeats its final real index to fill up, so a
    function of the batch sees one shape (one compilation) and repeated rows are well defined.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for start in range(0, n, batch):
        count = min(batch, n - start)
        idx = np.arange(start, start + batch)
        idx[count:] = start + count - 1
        yield idx, count


def map_padded(fn: Callable[[np.ndarray], Any], n: int, batch: int) -> Any:
    """`fn(indices)` over `padded_batches(n, batch)`; the real rows of its outputs concatenated as numpy.

    `fn` returns an array or any pytree of arrays with the batch as their first axis (e.g. a dict).
    """
    if n < 1:
        raise ValueError("map_padded needs at least one row")
    parts = [jax.tree.map(lambda x, k=count: np.asarray(x)[:k], fn(idx)) for idx, count in padded_batches(n, batch)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def pad_rows(rows: Sequence[np.ndarray], length: int | None = None, dtype: Any = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length rows [n_i, ...] -> (padded [B, length, ...] with zeros past n_i, mask [B, length] int32).

    Args:
      length: the padded length; the longest row's when None. A longer row is a ValueError.
      dtype: of the padded array; the first row's when None.
    """
    if not rows:
        raise ValueError("no rows to pad")
    lengths = [int(r.shape[0]) for r in rows]
    length = max(lengths) if length is None else int(length)
    if max(lengths) > length:
        raise ValueError(f"rows of lengths {lengths} do not fit the padded length {length}")
    first = np.asarray(rows[0])
    padded = np.zeros((len(rows), length) + first.shape[1:], dtype or first.dtype)
    for i, row in enumerate(rows):
        padded[i, :lengths[i]] = row
    mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return padded, mask
