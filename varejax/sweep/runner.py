"""`varejax sweep`: many erasures from one config, shared work done once, one table at the end.

    varejax sweep --config configs/sweep_toy.py --workdir runs/sweep

Workdir layout:

    sweep.json                  the planned runs (name, grid labels) and how they were stacked
    shared/pairs/KEY/           toy world: the erasure pairs of a concept set, written once
    shared/trajectories/KEY/    VARE trajectories, prepared once per (pairs, prepare settings, model)
    shared/text_cache/          text features of every prompt (one encoder for the whole sweep)
    shared/identity.json        the base model's fingerprint (varejax.erase.identity)
    stacks/ID/checkpoints/      orbax: the stacked trainable parameters and optimiser states of a stack
    runs/NAME/                  a normal erase workdir: model/, delta.safetensors, metrics.jsonl,
                                results.json (written last: a run with results.json is finished)
    results.jsonl, results.csv  one row per finished run (name, grid labels, metrics, wall time, steps)
    summary.json                every row, and this start's wall time and stacks
    report.md, figures/         a table per concept and erasure vs preservation with the Pareto front

How runs share work: the frozen base model is loaded once; runs whose pairs and prepare settings agree
read one trajectory folder; runs that differ only in per-run numbers (seed, concept pairs, learning rate,
weight decay, clip, alpha, reg_lambda, summed_lambda) are trained together in stacks of up to
`stack_size` (`varejax.sweep.stack`: their trainable parameters and optimiser states stacked on a run
axis, one vmapped step); other differences (mode, erase loss, trainable set, steps, batch) start a new
stack. `stack_size = 1` trains the runs one after another with the ordinary trainer.

Restarts: a finished run (results.json present) is never redone; a stack resumes from its last
checkpoint; grid points added to the config run on the next start, alone or in new stacks. A start
with another base model than the finished runs' is refused (RunIdentityError), as is resuming a stack
or reusing trajectories made from other inputs (each folder keeps an identity.json).
Multi-host: every process runs the same loop (same stacks, same steps); process 0 writes the files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from varejax.paths import as_path, write_text_atomic
from varejax.sweep.grid import Run, expand

# Fields a run may change and still train in the same stack (everything else must agree).
PER_RUN_FIELDS = ("seed", "pairs", "max_pairs_per_concept", "toy", "prepare", "eval", "validation",
                  "train.alpha", "train.reg_lambda", "train.summed_lambda", "train.learning_rate",
                  "train.weight_decay", "train.max_grad_norm", "train.checkpoint_every")
# Fields that decide the VARE trajectories (with the pairs themselves).
PREPARE_FIELDS = ("prepare", "model", "numerics", "schedule", "h_div_w", "pn")


def digest(value: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _without(config_dict: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    out = copy.deepcopy(config_dict)
    for field in fields:
        *parents, last = field.split(".")
        node = out
        for part in parents:
            node = node.get(part, {})
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def stack_key(config: Any) -> str:
    """Runs with equal keys can train in one stack (their configs differ only in PER_RUN_FIELDS)."""
    return digest(_without(json.loads(config.to_json_best_effort()), PER_RUN_FIELDS))


def _prepare_key(config: Any, pairs: Sequence[Any]) -> str:
    settings = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k in PREPARE_FIELDS}
    settings["prepare"].pop("trajectory_dir", None)
    settings["prepare"].pop("batch_size", None)  # the batch a trajectory was sampled in changes nothing
    return digest({"settings": settings, "pairs": [p.to_dict() for p in pairs]})


def group_stacks(runs: Sequence[Run], stack_size: int) -> list[list[Run]]:
    """Runs in grid order, grouped by `stack_key` into stacks of at most `stack_size`."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(stack_key(run.config), []).append(run)
    stacks = []
    for members in groups.values():
        for i in range(0, len(members), max(1, stack_size)):
            stacks.append(members[i:i + max(1, stack_size)])
    return stacks


def stack_id(stack: Sequence[Run]) -> str:
    """A stack's folder name: stable for the same runs (a restart finds its checkpoints again)."""
    return digest(sorted(r.name for r in stack))


class Sweep:
    """One sweep in one workdir: the runs, the shared models and data, training and evaluation."""

    def __init__(self, sweep_config: Any, workdir: str, command: str = ""):
        from varejax.parallel.distributed import initialize

        initialize()
        self.config = sweep_config
        self.workdir = as_path(workdir)
        self.command = command
        self.runs = expand(sweep_config.base, sweep_config.grid)
        self.toy = "toy" in sweep_config.base
        self._benches: dict[str, Any] = {}
        self._models = None

    # ---- plan -----------------------------------------------------------------------------------

    def run_dir(self, run: Run):
        return self.workdir / "runs" / run.name

    def finished(self) -> set[str]:
        """Names of finished runs, as process 0 sees them (every process agrees)."""
        import jax

        done = np.asarray([(self.run_dir(r) / "results.json").exists() for r in self.runs], np.int32)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            done = np.asarray(multihost_utils.broadcast_one_to_all(done))
        return {r.name for r, d in zip(self.runs, done, strict=True) if d}

    def _check_base_model(self, has_results: bool) -> None:
        """Refuses (RunIdentityError) to add runs to finished ones of another base model: a sweep's table
        compares runs of one model. The base's fingerprint is kept in WORKDIR/shared/identity.json."""
        from varejax.erase import identity

        fingerprint = identity.params_fingerprint(self.models()[1])
        identity.check_or_record(self.workdir / "shared", {"model": fingerprint}, "finished runs' results",
                                 has_state=has_results)

    # ---- shared models, pairs, trajectories -----------------------------------------------------------

    def models(self):
        """(cfg, params, encode_text) of the frozen base, loaded once for the whole sweep."""
        if self._models is None:
            base = self.config.base
            if self.toy:
                from varejax.toy.assets import load_toy_pipeline

                self._pipeline = load_toy_pipeline(text_cache_dir=str(self.workdir / "shared" / "text_cache"),
                                                   **dict(base.numerics))
                self._models = (self._pipeline.infinity_cfg, self._pipeline.infinity_params,
                                self._pipeline.text_encoder.encode)
            else:
                from varejax.configlib import rules_tuple
                from varejax.erase.trainer import _load_models, checked_mesh

                mesh = checked_mesh(base)
                self._models = _load_models(base, self.workdir / "shared", mesh, rules_tuple(base.mesh.rules))
        return self._models

    def resolved(self, run: Run, config_dir: str | None = None):
        """The run's config with its pair files and its (shared) trajectory folder filled in."""
        from varejax.erase.trainer import load_pairs

        config = copy.deepcopy(run.config)
        config.unlock()
        if self.toy:
            from varejax.toy.job import write_pair_files

            key = digest({"toy": json.loads(config.toy.to_json_best_effort())})
            folder = self.workdir / "shared" / "pairs" / key
            folder.mkdir(parents=True, exist_ok=True)
            write_pair_files(config, folder)  # also sets config.schedule to the toy schedule
        pairs = load_pairs(config, config_dir)
        config.prepare.trajectory_dir = str(self.workdir / "shared" / "trajectories" / _prepare_key(config, pairs))
        return config.lock()

    # ---- the whole sweep ----------------------------------------------------------------------------

    def run(self, config_dir: str | None = None, verbose: bool = True) -> list[dict[str, Any]]:
        from varejax.parallel.distributed import is_main_process
        from varejax.sweep import results

        start = time.time()
        done = self.finished()
        self._check_base_model(has_results=bool(done))
        todo = [r for r in self.runs if r.name not in done]
        stack_size = int(self.config.stack_size)
        stacks = group_stacks(todo, stack_size)
        if is_main_process():
            self.workdir.mkdir(parents=True, exist_ok=True)
            plan = {"runs": [{"name": r.name, "grid": r.grid} for r in self.runs],
                    "stacks": [{"id": stack_id(s), "runs": [r.name for r in s]} for s in stacks],
                    "finished_before_this_start": sorted(done), "stack_size": stack_size,
                    "command": self.command}
            write_text_atomic(self.workdir / "sweep.json", json.dumps(plan, indent=1) + "\n")
            if verbose:
                print(f"sweep: {len(self.runs)} runs, {len(done)} finished, {len(todo)} to run in "
                      f"{len(stacks)} stack{'s' if len(stacks) != 1 else ''} (stack size {stack_size})", flush=True)
        if self.toy:  # the base model's images first, as the toy job does: their prompts' text features are
            for run in todo:  # then encoded (and cached) outside any training mesh, alike on 1 or N processes
                self._bench(run.config)
        for number, stack in enumerate(stacks):
            if verbose and is_main_process():
                print(f"stack {number + 1}/{len(stacks)}: {', '.join(r.name for r in stack)}", flush=True)
            for row in self._train_and_evaluate(stack, config_dir):
                if is_main_process():
                    results.record_run(self.workdir, row)
                    results.write_tables(self.workdir, results.read_rows(self.workdir), planned=len(self.runs))
        rows = results.read_rows(self.workdir) if (self.workdir / "results.jsonl").exists() else []
        if is_main_process():
            if rows and not stacks:
                results.write_tables(self.workdir, rows, planned=len(self.runs))
            summary = {"command": self.command, "planned": len(self.runs), "finished": len(rows),
                       "ran_this_start": len(todo), "stacks_this_start": [len(s) for s in stacks],
                       "wall_time_s": round(time.time() - start, 1), "rows": rows}
            write_text_atomic(self.workdir / "summary.json", json.dumps(summary, indent=1) + "\n")
        return rows

    def _train_and_evaluate(self, stack: Sequence[Run], config_dir: str | None):
        """Trains one stack; yields each run's row after its export and evaluation."""
        from varejax.erase.trainer import _wait_for_files, prepare, setup_erase, svare_config, train

        start = time.time()
        configs = [self.resolved(run, config_dir) for run in stack]
        setups = [setup_erase(c, self.run_dir(r), models=self.models(), config_dir=config_dir)
                  for r, c in zip(stack, configs, strict=True)]
        files = [prepare(c, s) for c, s in zip(configs, setups, strict=True)]  # skips what is already there
        for run_files in files:
            _wait_for_files(run_files)
        if int(self.config.stack_size) == 1:  # the ordinary trainer, one run after another
            finals = [train(configs[0], setups[0], files[0], svare_config(configs[0]))]
        else:
            from varejax.sweep.train import train_stack
            finals = train_stack(configs, setups, files, self.workdir / "stacks" / stack_id(stack) / "checkpoints")
        seconds = (time.time() - start) / len(stack)
        for run, config, setup, params in zip(stack, configs, setups, finals, strict=True):
            yield self._finish(run, config, setup, params, seconds)

    def _finish(self, run: Run, config: Any, setup: Any, params: Any, train_seconds: float) -> dict[str, Any]:
        """Exports the run, evaluates it, writes its results.json; returns its results row."""
        from varejax.erase.trainer import _export, _original_params, svare_config
        from varejax.parallel.distributed import is_main_process

        start = time.time()
        scfg = svare_config(config)
        _export(config, setup.workdir, setup.cfg, params, _original_params(config, setup, params, scfg), scfg)
        metrics = self._evaluate(config, params, setup)
        concept = ",".join(config.toy.concepts) if self.toy else ",".join(
            str(as_path(p).stem) for p in config.pairs)
        row = {"name": run.name, "concept": concept, "stack": stack_key(config), "grid": run.grid,
               "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
               "wall_time_s": round(train_seconds + time.time() - start, 1), "steps": int(config.train.steps)}
        if is_main_process():
            record = {**metrics, "train_steps": int(config.train.steps), "wall_time_s": row["wall_time_s"],
                      "sweep": str(self.workdir), "grid": run.grid, "command": self.command,
                      "config": json.loads(config.to_json_best_effort())}
            write_text_atomic(setup.workdir / "results.json", json.dumps(record, indent=1) + "\n")
        return row

    # ---- evaluation -------------------------------------------------------------------------------

    def _evaluate(self, config: Any, params: Any, setup: Any) -> dict[str, Any]:
        if not self.toy:
            return _training_metrics(setup.workdir)
        from varejax.parallel.distributed import to_local

        bench, base = self._bench(config)
        after = bench.all_images(to_local(params))
        return {**bench.measure(base["before"], after), **base["following"],
                "toy_fid_noise_floor": base["noise_floor"]}

    def _bench(self, config: Any):
        """The toy bench of the run's concepts and eval settings, with the base model's images (once)."""
        from varejax.toy.job import ToyBench

        key = digest({"concepts": list(config.toy.concepts), "eval": json.loads(config.eval.to_json_best_effort())})
        if key not in self._benches:
            self.models()
            from varejax.toy.assets import load_toy_oracle

            if not hasattr(self, "_oracle"):
                self._oracle = load_toy_oracle()
            bench = ToyBench(config, self.workdir / "shared", pipeline=self._pipeline, oracle=self._oracle)
            before = bench.all_images(bench.base_params)
            base = {"before": before, "following": bench.prompt_following(bench.base_params),
                    "noise_floor": bench.toy_fid_noise_floor(bench.base_params, before["others"])}
            self._benches[key] = (bench, base)
        return self._benches[key]


def _training_metrics(workdir) -> dict[str, float]:
    """The last step's training metrics (real models, until the evaluation harness scores them)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line]
    last = json.loads(lines[-1]) if lines else {}
    return {f"final_{k}": v for k, v in last.items() if isinstance(v, (int, float)) and k != "step"}


def run_sweep(sweep_config: Any, workdir: str, *, config_dir: str | None = None,
              command: str | None = None) -> list[dict[str, Any]]:
    """Runs (or resumes) the sweep of `sweep_config` in `workdir`; returns every finished run's row."""
    command = command if command is not None else " ".join(["varejax", *sys.argv[1:]])
    return Sweep(sweep_config, workdir, command).run(config_dir)
