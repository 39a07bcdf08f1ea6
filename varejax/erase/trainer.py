"""The S-VARE trainer behind `varejax erase`: prepare trajectories, train, checkpoint, resume, export.

    varejax erase --config configs/erase.py:church --workdir runs/church \
        --config.model.infinity=models/infinity_2b --config.model.t5=models/flan_t5_xl

Workdir layout:

    trajectories/NNNNNN.npz   VARE anchor trajectories (prepare phase, resumable)
    text_cache/               T5 features of every prompt (sweeps reuse it)
    checkpoints/              orbax: trainable params + optimiser state every `checkpoint_every` steps
    metrics.jsonl, tb/        per-step metrics (JSONL and TensorBoard)
    validation/step_NNNNNN.png  images of `validation.prompts` (when a tokenizer is configured)
    model/                    the erased model (a varejax model folder, `varejax sample` reads it)
    delta.safetensors         trainable-parameter deltas in upstream key names and torch layout

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
same parameters as an uninterrupted run. A non-finite loss stops the run; the last good checkpoint is
kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from varejax.data.pairs import PromptPair, pool_pairs, read_pairs
from varejax.erase import optim
from varejax.erase.data import TrajectoryBatches, text_length
from varejax.erase.prepare import TrajectoryConfig, prepare_trajectories
from varejax.erase.step import SvareConfig, alternating_update, erase_update, jit_step, summed_update
from varejax.models import lora, schedules


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the run stopped and kept its last good checkpoint."""


# ---- config -> typed settings ---------------------------------------------------------------------

def svare_config(config: Any) -> SvareConfig:
    t = config.train
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
            raise ValueError(f"config.train.trainable = 'lora' needs config.train.lora_rank > 0, not {t.lora_rank}")
        out.update(lora_rank=int(t.lora_rank), lora_alpha=float(t.lora_alpha),
                   lora_targets=t.lora_targets if isinstance(t.lora_targets, str) else tuple(t.lora_targets),
                   lora_seed=int(config.seed))
    return out


def model_overrides(config: Any) -> dict[str, Any]:
    """Everything `load_infinity` is given for training: config.numerics plus `training_overrides`."""
    return {**dict(config.numerics), **training_overrides(config)}


def trajectory_config(config: Any) -> TrajectoryConfig:
    p = config.prepare
    return TrajectoryConfig(guidance=float(p.guidance), tau=float(p.tau), top_k=int(p.top_k), top_p=float(p.top_p),
                            seed=int(p.seed), same_seed_for_all_pairs=bool(p.same_seed_for_all_pairs),
                            batch_size=int(p.batch_size))


def load_pairs(config: Any, config_dir: str | None = None) -> list[PromptPair]:
    """The pairs of every concept in `config.pairs` (files), pooled and balanced across concepts."""
    groups = []
    for entry in config.pairs:
        path = entry
        if not os.path.isabs(path) and not os.path.exists(path) and config_dir:
            path = os.path.join(config_dir, path)
        pairs = read_pairs(path)
        if config.max_pairs_per_concept:
            pairs = pairs[: config.max_pairs_per_concept]
        groups.append(pairs)
    if not groups:
        raise ValueError("config.pairs is empty: give at least one pair file (JSONL or CSV)")
    return pool_pairs(groups, seed=config.seed)


# ---- checkpoints ----------------------------------------------------------------------------------

class Checkpoints:
    """Orbax checkpoints of (trainable params, optimiser state); the step number is the data state."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        import orbax.checkpoint as ocp

        self.manager = ocp.CheckpointManager(Path(directory).absolute(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    @staticmethod
    def _flat(state: Any) -> dict[str, Any]:
        return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.StandardSave(self._flat(state)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """Restores into the structure (and shardings) of `like`."""
        import orbax.checkpoint as ocp

        leaves, treedef = jax.tree.flatten(like)
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                    for i, x in enumerate(leaves)}
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return jax.tree.unflatten(treedef, [restored[f"{i:05d}"] for i in range(len(leaves))])

    def close(self) -> None:
        self.manager.close()


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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops records of steps > step (they are recomputed after a resume)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---- the run --------------------------------------------------------------------------------------

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


def _global_batch(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    from varejax.parallel import batch_sharding

    def global_shape(v):  # the process-local batches stack along dim 0
        return (v.shape[0] * jax.process_count(),) + v.shape[1:]

    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, shape=global_shape(v)), v)
            for k, v in batch.items()}


def run_erase(config: Any, workdir: str | os.PathLike, *, models: Any = None, phase: str = "all",
              config_dir: str | None = None) -> ErasureResult | None:
    """Runs the erasure stage (prepare and/or train) of `config` in `workdir`.

    Args:
      config: an erase config (see configs/erase.py).
      workdir: run folder (created; re-used to resume).
      models: optional preloaded (cfg, params, encode_text) instead of loading `config.model.*`.
      phase: "prepare", "train" or "all".
    """
    from tqdm import tqdm

    from varejax.configlib import rules_tuple
    from varejax.parallel import make_mesh, sharding_context
    from varejax.parallel.distributed import initialize, is_main_process

    start_time = time.time()
    initialize()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(tuple(config.mesh.shape))
    rules = rules_tuple(config.mesh.rules)
    cfg, params, encode_text = models if models is not None else _load_models(config, workdir, mesh, rules)
    if models is not None:  # preloaded: add the adapters / bf16 storage the training options ask for
        wanted = cfg.replace(**training_overrides(config))
        if wanted != cfg:
            params = lora.retarget(cfg, params, wanted, mesh=mesh, rules=rules)
            cfg = wanted
    schedule = schedules.as_schedule(config.schedule) if config.schedule else schedules.get_schedule(
        config.h_div_w, config.pn)
    pairs = load_pairs(config, config_dir)
    with sharding_context(mesh, rules):
        files = prepare_trajectories(pairs, params=params, cfg=cfg, encode_text=encode_text, schedule=schedule,
                                     tcfg=trajectory_config(config), out_dir=workdir / "trajectories",
                                     progress=is_main_process())
    if phase == "prepare":
        return None
    _wait_for_files(files)

    scfg = svare_config(config)
    train_cfg = cfg.replace(cond_drop_rate=float(config.train.cond_drop_rate),
                            drop_path_rate=float(config.train.drop_path_rate), remat=bool(config.train.remat))
    modes = {"alternating": alternating_update, "summed": summed_update, "erase_only": erase_update}
    if config.train.mode not in modes:
        raise ValueError(f"config.train.mode must be one of {sorted(modes)}, not {config.train.mode!r}")
    update = modes[config.train.mode]
    step_fn = jit_step(update, donate=True)
    batches = TrajectoryBatches(files, int(config.train.batch_size), int(config.seed), text_length(files),
                                jax.process_index(), jax.process_count())
    # The step donates its inputs. Preloaded models: train on a device copy, so the caller's parameters
    # stay valid (an ablation reuses them) and are the originals the deltas are taken against. Models
    # loaded from a folder are re-read from it at export time instead (no training-time memory).
    original = None
    if models is not None:
        original = params
        params = jax.tree.map(lambda x: x.copy(), params)
    with sharding_context(mesh, rules):
        opt_state = jax.jit(lambda p: optim.init_opt_state(p, scfg.optim))(params)
    checkpoints = Checkpoints(workdir / "checkpoints")
    metrics_log = MetricsLog(workdir, enabled=is_main_process())
    first_step = 0
    latest = checkpoints.latest_step()
    if latest is not None:
        trainable, opt_state = checkpoints.restore(latest, (optim.trainable_params(params, scfg.optim.trainable),
                                                            opt_state))
        params = optim.merge_trainable(params, trainable)
        # The config's lr / weight decay / clip win over the values saved in the optimiser state.
        opt_state = optim.set_hyperparams(opt_state, learning_rate=scfg.optim.learning_rate,
                                          weight_decay=scfg.optim.weight_decay,
                                          max_grad_norm=scfg.optim.max_grad_norm)
        first_step = latest
        metrics_log.truncate_after(latest)
    total = int(config.train.steps)
    base_key = jax.random.key(int(config.seed))
    validation = _validation(config, workdir, train_cfg, schedule, encode_text, mesh, rules)
    if first_step == 0 and validation is not None:
        validation(0, params)
    progress = tqdm(range(first_step, total), desc="S-VARE", unit="step", initial=first_step, total=total,
                    disable=not is_main_process())
    try:
        for step in progress:
            with sharding_context(mesh, rules):
                batch = _global_batch(batches[step], mesh, rules)
                params, opt_state, metrics = step_fn(params, opt_state, batch, jax.random.fold_in(base_key, step),
                                                     cfg=train_cfg, schedule=schedule, scfg=scfg)
            metrics = jax.device_get(metrics)
            bad = [k for k in ("loss_erase", "loss_pre", "loss_total") if k in metrics
                   and not math.isfinite(float(metrics[k]))]
            if bad:
                raise NonFiniteLossError(
                    f"step {step + 1}: {bad[0]} = {float(metrics[bad[0]])}; stopping. The last good checkpoint "
                    f"(step {checkpoints.latest_step()}) is kept in {workdir / 'checkpoints'}; lower "
                    f"config.train.learning_rate or check the inputs")
            metrics_log.write(step + 1, metrics)
            progress.set_postfix(erase=f"{float(metrics['loss_erase']):.4f}",
                                 kept=f"{float(metrics.get('kept_fraction', float('nan'))):.2f}")
            done = step + 1
            if done % int(config.train.checkpoint_every) == 0 or done == total:
                checkpoints.save(done, (optim.trainable_params(params, scfg.optim.trainable), opt_state))
            if validation is not None and config.validation.every and done % int(config.validation.every) == 0:
                validation(done, params)
    finally:
        checkpoints.close()
        metrics_log.close()
    if original is None and scfg.optim.trainable == "lora":
        # Only the adapters trained: the original is the final base with the initial factors.
        original = lora.reinitialise(cfg, params)
    elif original is None:
        from varejax.checkpoint import load_infinity
        _, original = load_infinity(config.model.infinity, mesh=mesh, rules=rules, **model_overrides(config))
    _export(config, workdir, cfg, params, original, scfg)
    return ErasureResult(cfg, params, original, total, workdir, pairs, time.time() - start_time)


def _wait_for_files(files: list[Path], timeout_s: float = 3600.0) -> None:
    """Multi-host: every process prepared its share; wait until all trajectories are visible."""
    deadline = time.time() + timeout_s
    while True:
        missing = [f for f in files if not f.exists()]
        if not missing:
            return
        if jax.process_count() == 1 or time.time() > deadline:
            raise FileNotFoundError(f"{len(missing)} trajectories missing, e.g. {missing[0]}")
        time.sleep(2.0)


def _load_models(config: Any, workdir: Path, mesh, rules):
    from varejax.checkpoint import load_infinity
    from varejax.sample.text_features import TextEncoder

    for key in ("infinity", "t5"):
        if not config.model[key]:
            raise ValueError(f"config.model.{key} is empty: give the converted model folder "
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
    sampling = SamplingConfig(cfg=(float(config.validation.guidance),), tau=(float(config.validation.tau),),
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
    """Every process takes part (gathering sharded arrays is collective); process 0 writes."""
    from varejax.erase.export import write_delta, write_erased_model

    write_erased_model(workdir / "model", cfg, params, config)
    write_delta(workdir / "delta.safetensors", cfg, params, original, scfg.optim.trainable)
