"""The S-VARE trainer behind `varejax erase`: prepare trajectories, train, checkpoint, resume, export.

    varejax erase --config configs/erase.py:church --workdir runs/church \
        --config.model.infinity=models/infinity_2b --config.model.t5=models/flan_t5_xl
    varejax erase prepare --config ... --workdir runs/church     # only the trajectories

In code: `run_erase(config, workdir)` = `setup_erase` (mesh, models, pairs) -> `prepare` (trajectories)
-> `train` (the loop) -> export; `prepare_erase(config, workdir)` stops after the trajectories.

Workdir layout:

    trajectories/NNNNNN.npz   VARE anchor trajectories (prepare phase, resumable)
    trajectories/identity.json, checkpoints/identity.json
                              what they were made from (base model fingerprint, pairs, settings): a
                              re-run with other inputs is refused instead of resumed (erase.identity)
    text_cache/               T5 features of every prompt (sweeps reuse it)
    checkpoints/              orbax: trainable params + optimiser state every `checkpoint_every` steps,
                              stored by name (see varejax.erase.checkpoints)
    metrics.jsonl, tb/        per-step metrics (JSONL and TensorBoard)
    validation/step_NNNNNN.png  images of `validation.prompts` (when a tokenizer is configured)
    model/                    the erased model (a varejax model folder, `varejax sample` reads it)
    delta.safetensors         trainable-parameter deltas in upstream key names and torch layout, with
                              metadata: base hash, method, config (`varejax merge` applies them)
    lora.safetensors          LoRA runs: the trained factors (varejax.erase.export.write_lora_factors)

Options beyond the official recipe:
  config.train.trainable = "lora"   train only LoRA factors of rank config.train.lora_rank (scale
                                    lora_alpha / rank, 0 = 1) on config.train.lora_targets; the
                                    transformer is loaded with those adapters added (A from config.seed,
                                    B = 0). The exported model/ holds the MERGED weights (a plain model)
                                    and delta.safetensors the merged deltas scale * A @ B per target kernel,
                                    so both work like the deltas of full fine-tuning.
  config.train.bf16_params = True   upstream's pure-bf16 training: parameters and AdamW moments stored in
                                    bfloat16, fp32 arithmetic inside each AdamW step (default: fp32 master
                                    weights and moments, bf16 compute). Deltas are still written as float32.

Determinism: batch k and the PRNG key of step k are functions of (seed, k) only, so a run killed at any
point and restarted with the same workdir resumes from its last complete checkpoint and ends with the
same parameters as an uninterrupted run, provided it is the same run: a re-run whose base model, pairs,
trajectory settings, trainable set, mode, seed or batch differ from what the workdir's state was made
from stops with what differs (RunIdentityError). A non-finite loss stops the run; the last good
checkpoint is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils.epath import Path

from varejax.data.pairs import PromptPair, pool_pairs, read_pairs
from varejax.erase import identity, optim
from varejax.erase.checkpoints import Checkpoints
from varejax.erase.data import TrajectoryBatches, prefetched, text_length
from varejax.erase.losses import ERASE_LOSSES
from varejax.erase.prepare import TrajectoryConfig, prepare_trajectories
from varejax.erase.step import SvareConfig, alternating_update, erase_update, jit_step, summed_update
from varejax.errors import ConfigError, UserError
from varejax.models import lora, schedules
from varejax.paths import append_text, as_path, is_remote, write_text_atomic

# config.train.mode -> the update of one training step
UPDATES = {"alternating": alternating_update, "summed": summed_update, "erase_only": erase_update}


class NonFiniteLossError(UserError, RuntimeError):
    """A loss became NaN or inf; the run stopped and kept its last good checkpoint."""


# ---- config -> typed settings ---------------------------------------------------------------------

def svare_config(config: Any) -> SvareConfig:
    """The typed training settings of `config.train`, checked (a bad mode, loss or trainable set fails here)."""
    t = config.train
    for field, known in (("mode", UPDATES), ("erase_loss", ERASE_LOSSES), ("trainable", optim.TRAINABLE_MODES)):
        if t[field] not in known:
            raise ConfigError(f"config.train.{field} must be one of {sorted(known)}, not {t[field]!r}")
    ocfg = optim.OptimConfig(learning_rate=float(t.learning_rate), b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                             weight_decay=float(t.weight_decay), max_grad_norm=float(t.max_grad_norm),
                             trainable=str(t.trainable))
    kwargs = (("eta", float(t.esd_eta)),) if t.erase_loss == "esd" else ()
    return SvareConfig(alpha=float(t.alpha), reg_lambda=float(t.reg_lambda), erase_loss=str(t.erase_loss),
                       erase_loss_kwargs=kwargs, summed_lambda=float(t.summed_lambda), optim=ocfg)


def training_overrides(config: Any) -> dict[str, Any]:
    """Model-config fields the training options set: bf16 storage and, for trainable = "lora", the adapters."""
    t = config.train
    out: dict[str, Any] = {}
    if bool(t.bf16_params):
        out["param_dtype"] = "bfloat16"
    if str(t.trainable) == "lora":
        if int(t.lora_rank) <= 0:
            raise ConfigError(f"config.train.trainable = 'lora' needs config.train.lora_rank > 0, not {t.lora_rank}")
        out.update(lora_rank=int(t.lora_rank), lora_alpha=float(t.lora_alpha),
                   lora_targets=t.lora_targets if isinstance(t.lora_targets, str) else tuple(t.lora_targets),
                   lora_seed=int(config.seed))
    return out


def model_overrides(config: Any) -> dict[str, Any]:
    """Everything `load_infinity` is given for training: config.numerics plus `training_overrides`."""
    return {**dict(config.numerics), **training_overrides(config)}


def trajectory_config(config: Any) -> TrajectoryConfig:
    """The typed settings of the VARE trajectory sampling (`config.prepare`)."""
    p = config.prepare
    return TrajectoryConfig(guidance=float(p.guidance), tau=float(p.tau), top_k=int(p.top_k), top_p=float(p.top_p),
                            seed=int(p.seed), same_seed_for_all_pairs=bool(p.same_seed_for_all_pairs),
                            batch_size=int(p.batch_size))


def load_pairs(config: Any, config_dir: str | None = None) -> list[PromptPair]:
    """The pairs of every concept in `config.pairs` (files), pooled and balanced across concepts."""
    groups = []
    for entry in config.pairs:
        path = entry
        if not is_remote(path) and not os.path.isabs(path) and not os.path.exists(path) and config_dir:
            path = os.path.join(config_dir, path)
        pairs = read_pairs(path)
        if config.max_pairs_per_concept:
            pairs = pairs[: config.max_pairs_per_concept]
        groups.append(pairs)
    if not groups:
        raise ConfigError("config.pairs is empty: give at least one pair file (JSONL or CSV)")
    return pool_pairs(groups, seed=config.seed)


# ---- metrics --------------------------------------------------------------------------------------

class MetricsLog:
    """Per-step metrics to JSONL and (when tensorboardX is installed) TensorBoard; process 0 only."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(workdir / "tb"))
            except ImportError:
                self.tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        for key, value in metrics.items():
            value = np.asarray(value)
            record[key] = value.tolist() if value.ndim else float(value)
            if self.tb is not None:
                if value.ndim == 0:
                    self.tb.add_scalar(key, float(value), step)
                else:
                    for i, v in enumerate(value.reshape(-1)):
                        self.tb.add_scalar(f"{key}/{i}", float(v), step)
        append_text(self.path, json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops records of steps > step (they are recomputed after a resume)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---- the run: setup -> prepare -> train -> export ---------------------------------------------------

@dataclasses.dataclass
class ErasureResult:
    """What `run_erase` returns: final parameters and where things went."""

    cfg: Any
    params: Any
    original_params: Any
    steps: int
    workdir: Path
    pairs: list[PromptPair]
    seconds: float


@dataclasses.dataclass
class ErasureSetup:
    """What `setup_erase` builds once and the prepare, train and export stages share.

    `params` are the parameters before training. Preloaded ones (`models=`) belong to the caller and are
    never donated (training runs on a copy); parameters loaded from `config.model.infinity` are donated
    to the first training step (`train` clears this field when it takes them).
    """

    workdir: Path
    mesh: Any
    rules: tuple
    cfg: Any  # the model config with the training options applied (LoRA adapters, bf16 storage)
    params: Any
    encode_text: Callable[[list[str]], tuple[Any, Any]]
    schedule: schedules.Schedule
    pairs: list[PromptPair]
    preloaded: bool
    fingerprint: dict[str, list[float]] | None = None  # of `params` before training (see erase.identity)

    def model_fingerprint(self) -> dict[str, list[float]]:
        """`identity.params_fingerprint` of the parameters before training (computed once)."""
        if self.fingerprint is None:
            if self.params is None:
                raise RuntimeError("the parameters were donated to training before they were fingerprinted")
            self.fingerprint = identity.params_fingerprint(self.params)
        return self.fingerprint


def checked_mesh(config: Any):
    """The mesh of `config.mesh`, refused (ConfigError) when it leaves a process without devices or cannot
    split the global batch `config.train.batch_size`; cheap, so jobs call it before any work."""
    from varejax.configlib import rules_tuple
    from varejax.parallel import check_global_batch, check_mesh_spans_processes, make_mesh

    mesh = make_mesh(tuple(config.mesh.shape))
    check_mesh_spans_processes(mesh)
    check_global_batch(int(config.train.batch_size), mesh, rules_tuple(config.mesh.rules))
    return mesh


def setup_erase(config: Any, workdir: str | os.PathLike, *, models: Any = None,
                config_dir: str | None = None) -> ErasureSetup:
    """Starts JAX (multi-host too), makes the mesh, loads (or adapts the preloaded) models and the pairs.

    Args:
      config: an erase config (see configs/erase.py; `varejax config show` prints one resolved).
      workdir: run folder (created; re-used to resume).
      models: optional preloaded (cfg, params, encode_text) instead of loading `config.model.*`.
      config_dir: folder that relative pair-file paths are read from when not found as given.
    """
    from varejax.configlib import rules_tuple
    from varejax.parallel.distributed import announce, initialize

    initialize()
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = checked_mesh(config)
    announce(mesh)
    rules = rules_tuple(config.mesh.rules)
    if models is None:
        cfg, params, encode_text = _load_models(config, workdir, mesh, rules)
    else:  # preloaded: add the adapters / bf16 storage the training options ask for
        cfg, params, encode_text = models
        wanted = cfg.replace(**training_overrides(config))
        if wanted != cfg:
            params = lora.retarget(cfg, params, wanted, mesh=mesh, rules=rules)
            cfg = wanted
        if jax.process_count() > 1:  # process-local preloaded values -> global arrays on the mesh
            from varejax.parallel import shard_state
            params = shard_state(jax.tree.map(np.asarray, params), mesh, rules)
    schedule = schedules.as_schedule(config.schedule) if config.schedule else schedules.get_schedule(
        config.h_div_w, config.pn)
    return ErasureSetup(workdir, mesh, rules, cfg, params, encode_text, schedule, load_pairs(config, config_dir),
                        preloaded=models is not None)


def trajectory_dir(config: Any, workdir: Path) -> Path:
    """Where the run's VARE trajectories live: `config.prepare.trajectory_dir`, else WORKDIR/trajectories."""
    return as_path(config.prepare.trajectory_dir) if config.prepare.get("trajectory_dir") else workdir / "trajectories"


def trajectory_identity(config: Any, run: ErasureSetup) -> dict[str, Any]:
    """What the trajectories are sampled from: the base model, the pairs, the schedule, the sampling settings
    (the batch they were sampled in changes nothing)."""
    sampling = dataclasses.asdict(trajectory_config(config))
    sampling.pop("batch_size")
    return {"model": run.model_fingerprint(), "pairs": identity.digest([p.to_dict() for p in run.pairs]),
            "pair_count": len(run.pairs), "schedule": [list(map(int, s)) for s in run.schedule],
            "sampling": sampling}


def prepare(config: Any, run: ErasureSetup) -> list[Path]:
    """Samples the VARE anchor trajectories this process owns (skipping finished files); returns all paths.

    Raises:
      RunIdentityError: the trajectories folder holds trajectories of another model, pairs or settings.
    """
    from varejax.parallel import sharding_context
    from varejax.parallel.distributed import is_main_process

    out_dir = trajectory_dir(config, run.workdir)
    has_files = out_dir.exists() and any(p.name.endswith(".npz") for p in out_dir.iterdir())
    identity.check_or_record(out_dir, trajectory_identity(config, run), "trajectories", has_state=has_files)
    with sharding_context(run.mesh, run.rules):
        return prepare_trajectories(run.pairs, params=run.params, cfg=run.cfg, encode_text=run.encode_text,
                                    schedule=run.schedule, tcfg=trajectory_config(config), out_dir=out_dir,
                                    progress=is_main_process())


def checkpoint_identity(config: Any, run: ErasureSetup, scfg: SvareConfig) -> dict[str, Any]:
    """What a run's checkpoints continue: its trajectories, trainable set, update mode and seed (learning
    rate, weight decay and clipping may change on a resume: see `_resume`)."""
    return {**trajectory_identity(config, run), "trainable": scfg.optim.trainable, "mode": str(config.train.mode),
            "seed": int(config.seed), "batch_size": int(config.train.batch_size)}


def prepare_erase(config: Any, workdir: str | os.PathLike, *, models: Any = None,
                  config_dir: str | None = None) -> list[Path]:
    """`varejax erase prepare`: only the VARE trajectories of `config` in `workdir/trajectories` (resumable).

    Returns the trajectory files (on multi-host runs, other processes write their share).
    """
    return prepare(config, setup_erase(config, workdir, models=models, config_dir=config_dir))


def run_erase(config: Any, workdir: str | os.PathLike, *, models: Any = None,
              config_dir: str | None = None) -> ErasureResult:
    """`varejax erase`: prepare what is missing, train (resuming from the last checkpoint), export.

    Arguments as `setup_erase`. Writes the workdir layout of this module's docstring.
    """
    start_time = time.time()
    run = setup_erase(config, workdir, models=models, config_dir=config_dir)
    files = prepare(config, run)
    _wait_for_files(files)
    scfg = svare_config(config)
    params = train(config, run, files, scfg)
    original = _original_params(config, run, params, scfg)
    _export(config, run.workdir, run.cfg, params, original, scfg)
    return ErasureResult(run.cfg, params, original, int(config.train.steps), run.workdir, run.pairs,
                         time.time() - start_time)


def train(config: Any, run: ErasureSetup, files: list[Path], scfg: SvareConfig) -> Any:
    """The S-VARE training loop: resumes from the last checkpoint, checkpoints, logs, validates.

    Returns the trained parameters (the whole model). Loaded (not preloaded) parameters are donated to
    the step: `run.params` is cleared.

    Raises:
      NonFiniteLossError: a loss became NaN or inf (the last good checkpoint is kept).
      RunIdentityError: the workdir's checkpoints continue another model, pairs or training set-up.
    """
    from tqdm import tqdm

    from varejax.parallel import sharding_context
    from varejax.parallel.distributed import is_main_process

    train_cfg = run.cfg.replace(cond_drop_rate=float(config.train.cond_drop_rate),
                                drop_path_rate=float(config.train.drop_path_rate), remat=bool(config.train.remat))
    step_fn = jit_step(UPDATES[config.train.mode], donate=True)
    global_batch = int(config.train.batch_size)  # global: each process loads its rows of it
    rows = _batch_rows(global_batch, run.mesh, run.rules)
    batches = TrajectoryBatches(files, global_batch, int(config.seed), text_length(files), rows)
    checkpoints = Checkpoints(run.workdir / "checkpoints")
    try:
        identity.check_or_record(checkpoints.directory, checkpoint_identity(config, run, scfg), "checkpoints",
                                 has_state=checkpoints.latest_step() is not None)
    except identity.RunIdentityError:
        checkpoints.close()
        raise
    if run.preloaded:  # the step donates its inputs: keep the caller's parameters valid
        params = jax.tree.map(lambda x: x.copy(), run.params)
    else:
        params, run.params = run.params, None
    with sharding_context(run.mesh, run.rules):
        opt_state = optim.init_opt_state_sharded(params, scfg.optim)
    metrics_log = MetricsLog(run.workdir, enabled=is_main_process())
    total = int(config.train.steps)
    base_key = jax.random.key(int(config.seed))
    try:
        params, opt_state, first_step = _resume(checkpoints, metrics_log, params, opt_state, scfg)
        validation = _validation(config, run.workdir, train_cfg, run.schedule, run.encode_text, run.mesh, run.rules)
        if first_step == 0 and validation is not None:
            validation(0, params)
        progress = tqdm(desc="S-VARE", unit="step", initial=first_step, total=total, disable=not is_main_process())
        for step, host_batch in prefetched(batches, range(first_step, total)):
            with sharding_context(run.mesh, run.rules):
                batch = _global_batch(host_batch, global_batch, run.mesh, run.rules)
                params, opt_state, metrics = step_fn(params, opt_state, batch, jax.random.fold_in(base_key, step),
                                                     cfg=train_cfg, schedule=run.schedule, scfg=scfg)
            metrics = jax.device_get(metrics)
            check_finite(metrics, step, checkpoints)
            metrics_log.write(step + 1, metrics)
            progress.set_postfix(erase=f"{float(metrics['loss_erase']):.4f}",
                                 kept=f"{float(metrics.get('kept_fraction', float('nan'))):.2f}")
            progress.update(1)
            done = step + 1
            if done % int(config.train.checkpoint_every) == 0 or done == total:
                checkpoints.save(done, _training_state(params, opt_state, scfg))
            if validation is not None and config.validation.every and done % int(config.validation.every) == 0:
                validation(done, params)
        progress.close()
    finally:
        checkpoints.close()
        metrics_log.close()
    return params


def _training_state(params: Any, opt_state: Any, scfg: SvareConfig) -> dict[str, Any]:
    """What a checkpoint holds: the trainable parameters and the optimiser state (frozen ones never change)."""
    return {"params": optim.trainable_params(params, scfg.optim.trainable), "opt_state": opt_state}


def _resume(checkpoints: Checkpoints, metrics_log: MetricsLog, params: Any, opt_state: Any,
            scfg: SvareConfig) -> tuple[Any, Any, int]:
    """(params, opt_state, first step) from the last checkpoint; the inputs and step 0 when there is none."""
    latest = checkpoints.latest_step()
    if latest is None:
        return params, opt_state, 0
    state = checkpoints.restore(latest, _training_state(params, opt_state, scfg))
    params = optim.merge_trainable(params, state["params"])
    # The config's lr / weight decay / clip win over the values saved in the optimiser state.
    opt_state = optim.set_hyperparams(state["opt_state"], learning_rate=scfg.optim.learning_rate,
                                      weight_decay=scfg.optim.weight_decay, max_grad_norm=scfg.optim.max_grad_norm)
    metrics_log.truncate_after(latest)
    return params, opt_state, latest


def check_finite(metrics: dict[str, Any], step: int, checkpoints: Checkpoints, run: str = "") -> None:
    """Raises NonFiniteLossError naming the step (and `run`, in a stack) when a loss is NaN or inf."""
    bad = [k for k in ("loss_erase", "loss_pre", "loss_total") if k in metrics
           and not math.isfinite(float(metrics[k]))]
    if bad:
        raise NonFiniteLossError(
            f"{f'run {run}, ' if run else ''}step {step + 1}: {bad[0]} = {float(metrics[bad[0]])}; stopping. The "
            f"last good checkpoint (step {checkpoints.latest_step()}) is kept in {checkpoints.directory}; lower "
            f"config.train.learning_rate or check the inputs")


def _original_params(config: Any, run: ErasureSetup, params: Any, scfg: SvareConfig) -> Any:
    """The parameters the deltas are taken against, read back only now (no training-time memory)."""
    if run.preloaded:
        return run.params
    if scfg.optim.trainable == "lora":  # only the adapters trained: the final base with the initial factors
        return lora.reinitialise(run.cfg, params)
    from varejax.checkpoint import load_infinity
    return load_infinity(config.model.infinity, mesh=run.mesh, rules=run.rules, **model_overrides(config))[1]


def _batch_rows(global_batch: int, mesh, rules) -> slice:
    """The rows of every global batch this process loads (those its devices hold)."""
    from varejax.parallel import batch_sharding, process_rows

    return process_rows(batch_sharding(mesh, rules, shape=(global_batch,)), (global_batch,))


def _global_batch(batch: dict[str, np.ndarray], global_batch: int, mesh, rules) -> dict[str, jax.Array]:
    """One array per field from every process's rows (`_batch_rows`) of the global batch."""
    from varejax.parallel import batch_sharding

    out = {}
    for k, v in batch.items():
        shape = (global_batch,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, rules, shape=shape), v, shape)
    return out


def _wait_for_files(files: list[Path]) -> None:
    """Multi-host: every process prepared its share; a barrier, then every trajectory must be visible."""
    from varejax.parallel.distributed import sync

    sync("varejax:trajectories")
    missing = [f for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} trajectories missing after every process prepared its share, "
                                f"e.g. {missing[0]} (on several hosts the workdir must be shared: a network file "
                                f"system or a gs:// path)")


def _load_models(config: Any, workdir: Path, mesh, rules):
    from varejax.checkpoint import load_infinity
    from varejax.sample.text_features import TextEncoder

    for key in ("infinity", "t5"):
        if not config.model[key]:
            raise ConfigError(f"config.model.{key} is empty: give the converted model folder "
                              f"(varejax convert {key} ...)")
    cfg, params = load_infinity(config.model.infinity, mesh=mesh, rules=rules, **model_overrides(config))
    text = TextEncoder.from_dir(config.model.t5, cache_dir=str(workdir / "text_cache"),
                                min_vocab=int(config.model.min_vocab), mesh=mesh, rules=rules)
    return cfg, params, text.encode


def _validation(config, workdir, cfg, schedule, encode_text, mesh, rules):
    """A function (step, params) -> writes validation/step_NNNNNN.png, or None when not configured."""
    if not config.validation.prompts or not config.model.vae:
        return None
    from varejax import images as image_io
    from varejax.checkpoint import load_vae
    from varejax.models.bsq_vae import decode_jit
    from varejax.parallel import sharding_context
    from varejax.parallel.distributed import is_main_process
    from varejax.sample.pipeline import image_grid
    from varejax.sample.sampler import SamplingConfig, generate_jit

    vae_cfg, vae_params = load_vae(config.model.vae, mesh=mesh, rules=rules)
    prompts = list(config.validation.prompts)
    text, mask = encode_text(prompts)
    sampling = SamplingConfig(guidance=(float(config.validation.guidance),), tau=(float(config.validation.tau),),
                              top_p=0.97)
    keys = jax.vmap(jax.random.key)(np.arange(len(prompts), dtype=np.uint32))
    eval_cfg = cfg.replace(cond_drop_rate=0.0, drop_path_rate=0.0)
    out_dir = workdir / "validation"
    out_dir.mkdir(exist_ok=True)

    def run(step: int, params: Any) -> None:
        with sharding_context(mesh, rules):
            out = generate_jit(params, text, mask, schedule, cfg=eval_cfg, sampling=sampling, rng=keys)
            images = image_io.to_uint8(np.asarray(decode_jit(vae_params, out.summed_codes, vae_cfg)))
        if is_main_process():
            image_io.save_image(out_dir / f"step_{step:06d}.png", image_grid(images))

    return run


def _export(config, workdir: Path, cfg, params, original, scfg: SvareConfig) -> None:
    """Every process takes part (gathering sharded arrays is collective); process 0 writes model/,
    delta.safetensors with its metadata (base hash, method, config) and, for LoRA, lora.safetensors."""
    from varejax.erase.export import export_run

    export_run(workdir, cfg, params, original, config, scfg.optim.trainable)
