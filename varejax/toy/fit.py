"""The one training loop of the toy world's stages (`train.py`): optimiser, batches, logging.

    tx = adamw(learning_rate=1e-3, warmup=50, steps=1000, weight_decay=1e-4)
    params, history = fit(loss_fn, params, tx, batches, steps=1000, log=print, label="oracle")

`loss_fn(params, batch, key) -> (loss, {metric name: scalar})`; `batches` yields what `loss_fn` takes as
`batch`. Every stage is a loss function and a batch stream; `fit` owns the step, the optimiser state and the
log lines, so a stage cannot drift from the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
from etils import epath

from varejax.paths import append_text


class Logger:
    """Prints and appends to a log file (WORKDIR/train.log)."""

    def __init__(self, path: epath.Path | None, quiet: bool = False):
        self.path, self.quiet = path, quiet
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if not self.quiet:
            print(line, flush=True)
        if self.path is not None:
            append_text(self.path, line + "\n")


def warmup_cosine(learning_rate: float, warmup: int, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to 5% of it at `steps`."""
    warmup = max(1, min(warmup, steps - 1)) if steps > 1 else 1
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                              end_value=learning_rate * 0.05)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and kernels only (ndim >= 2): not on norm scales or biases."""
    return jax.tree.map(lambda v: v.ndim >= 2, params)


def adamw(learning_rate: float, warmup: int, steps: int, weight_decay: float, b2: float = 0.99,
          clip: float = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping, then `optax.adamw` (b1 0.9, decoupled decay masked by `decay_mask`) on the
    `warmup_cosine` schedule. No torch parity is needed here, so this is plain optax."""
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(warmup_cosine(learning_rate, warmup, steps), b1=0.9, b2=b2,
                                   weight_decay=weight_decay, mask=decay_mask))


def shuffled_batches(rng: np.random.Generator, n: int, batch: int) -> Iterator[np.ndarray]:
    """Endless shuffled epochs of index batches (an epoch's tail shorter than `batch` is dropped)."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def fit(loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]], params: Any,
        tx: optax.GradientTransformation, batches: Iterator[Any], steps: int, *, key: jax.Array | None = None,
        first_step: int = 0, log: Callable[[str], None] = print, label: str = "train", log_every: int = 100
        ) -> tuple[Any, list[dict[str, float]]]:
    """Runs `steps` optimiser steps of `loss_fn` from `params` and a fresh `tx` state.

    Step i gets `jax.random.fold_in(key, first_step + i)` (`first_step` continues a key stream across
    calls). Every `log_every` steps and at the end, the metrics averaged since the last line are logged
    ("{label} step i/steps name value ...") and appended to the returned history as
    {"step": first_step + i, name: mean, ...}. Returns (params, history).
    """
    opt_state = tx.init(params)
    key = jax.random.key(0) if key is None else key

    @jax.jit
    def step(params, opt_state, batch, key):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    start, pending, history = time.time(), [], []
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, next(batches), jax.random.fold_in(key, first_step + i))
        pending.append(metrics)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            pending = jax.device_get(pending)
            means = {name: float(np.mean([m[name] for m in pending])) for name in pending[0]}
            history.append({"step": first_step + i + 1, **means})
            values = " ".join(f"{name} {value:.4f}" for name, value in means.items())
            log(f"{label} step {i + 1}/{steps} {values} ({time.time() - start:.0f}s)")
            pending = []
    return params, history
