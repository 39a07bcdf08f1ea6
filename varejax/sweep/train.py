"""The training loop of a stack: R erase runs, one vmapped step (varejax.sweep.stack), one checkpoint.

Mirrors `varejax.erase.trainer.train` run by run: run r's batch k is its own `TrajectoryBatches[k]`
(its pairs, its seed), its PRNG key of step k is `fold_in(key(seed_r), k)`, its metrics go to its own
`metrics.jsonl`. The stacked trainable parameters and optimiser states are checkpointed together (orbax,
by name) every `checkpoint_every` steps of the first run's config, so a killed sweep resumes the stack
where it stopped. A non-finite loss in any run stops the stack (the last good checkpoint is kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def _place(tree: Any, specs: Any, mesh) -> Any:
    """Host arrays every process holds in full -> global arrays laid out as `specs` (multi-host safe)."""
    from jax.sharding import NamedSharding, PartitionSpec

    def one(x, spec):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    return jax.tree.map(one, tree, specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def stack_identity(configs: Sequence[Any], setups: Sequence[Any]) -> dict[str, Any]:
    """What a stack's checkpoints continue: the shared base model and each run's `checkpoint_identity`
    (its pairs, trajectory settings, trainable set, mode, seed, batch) under its name."""
    from varejax.erase.trainer import checkpoint_identity, svare_config

    runs = []
    for config, setup in zip(configs, setups, strict=True):
        run = checkpoint_identity(config, setup, svare_config(config))
        run.pop("model")  # shared: compared once, with the fingerprint's tolerance
        runs.append({"run": setup.workdir.name, **run})
    return {"model": setups[0].model_fingerprint(), "runs": runs}


def train_stack(configs: Sequence[Any], setups: Sequence[Any], files: Sequence[Sequence[Any]],
                checkpoint_dir: Any) -> list[Any]:
    """Trains the runs of one stack together; returns each run's final full parameters.

    Args:
      configs: each run's erase config (they differ only in per-run fields: see runner.PER_RUN_FIELDS).
      setups: each run's `ErasureSetup` (the same preloaded base model, mesh and rules).
      files: each run's trajectory files.
      checkpoint_dir: where the stacked state is checkpointed.

    Raises:
      RunIdentityError: the stack's checkpoints continue another base model or other runs.
    """
    from tqdm import tqdm

    from varejax.erase import identity, optim
    from varejax.erase.checkpoints import Checkpoints
    from varejax.erase.data import TrajectoryBatches, text_length
    from varejax.erase.trainer import UPDATES, MetricsLog, check_finite, svare_config
    from varejax.parallel import sharding_context
    from varejax.parallel.distributed import is_main_process
    from varejax.sweep import stack

    first, run0 = configs[0], setups[0]
    scfgs = [svare_config(c) for c in configs]
    mesh, rules, schedule = run0.mesh, run0.rules, run0.schedule
    train_cfg = run0.cfg.replace(cond_drop_rate=float(first.train.cond_drop_rate),
                                 drop_path_rate=float(first.train.drop_path_rate), remat=bool(first.train.remat))
    frozen = run0.params  # the preloaded base: shared by every run, never donated
    text_len = max(text_length(f) for f in files)
    global_batch = int(first.train.batch_size)
    # Every process loads every run's whole batch (small next to the model); `_place` keeps its share.
    batches = [TrajectoryBatches(f, global_batch, int(c.seed), text_len) for f, c in zip(files, configs, strict=True)]
    seeds = np.asarray([int(c.seed) for c in configs], np.uint32)
    numerics = stack.stack_numerics(scfgs)
    step_fn = stack.stacked_step(UPDATES[first.train.mode], donate=True)
    total, every = int(first.train.steps), int(first.train.checkpoint_every)
    with sharding_context(mesh, rules):
        train_state, opt_state = stack.init_stack(frozen, scfgs)
    checkpoints = Checkpoints(checkpoint_dir)
    logs = [MetricsLog(s.workdir, enabled=is_main_process()) for s in setups]
    start = 0
    try:
        latest = checkpoints.latest_step()
        identity.check_or_record(checkpoints.directory, stack_identity(configs, setups), "stacked checkpoints",
                                 has_state=latest is not None)
        if latest is not None:
            state = checkpoints.restore(latest, {"params": train_state, "opt_state": opt_state})
            train_state, opt_state, start = state["params"], state["opt_state"], latest
            for log in logs:
                log.truncate_after(latest)
        progress = tqdm(range(start, total), desc=f"S-VARE x{len(configs)}", unit="step", initial=start,
                        total=total, disable=not is_main_process())
        for step in progress:
            with sharding_context(mesh, rules):
                batch = stack.stack_batches([b[step] for b in batches], text_len)
                batch = _place(batch, stack.batch_stack_specs(batch, mesh, rules), mesh)
                keys = jax.vmap(lambda s, k=step: jax.random.fold_in(jax.random.key(s), k))(seeds)
                train_state, opt_state, metrics = step_fn(frozen, train_state, opt_state, batch, keys, numerics,
                                                          cfg=train_cfg, schedule=schedule, scfg=scfgs[0])
            metrics = jax.device_get(metrics)
            for r, log in enumerate(logs):
                values = stack.run_metrics(metrics, r)
                check_finite(values, step, checkpoints, run=setups[r].workdir.name)  # the whole stack stops
                log.write(step + 1, values)
            progress.set_postfix(erase=f"{float(np.mean(metrics['loss_erase'])):.4f}")
            done = step + 1
            if done % every == 0 or done == total:
                checkpoints.save(done, {"params": train_state, "opt_state": opt_state})
    finally:
        checkpoints.close()
        for log in logs:
            log.close()
    return [optim.merge_trainable(frozen, stack.unstack(train_state, r)) for r in range(len(configs))]
