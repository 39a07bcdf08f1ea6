"""`varejax toy train`: trains the toy world's models from scratch in JAX, deterministically from a seed.

Stages (each timed; `run` writes model folders to WORKDIR/models and logs to WORKDIR/train.log; what each
trains is in `trainers.py`, the one training loop in `fit.py`):

1. data: `world.dataset` images for training and a held-out set (disjoint seeds).
2. oracle: the attribute classifier; its held-out accuracy is measured on fresh images and stored in its
   config.json.
3. tokenizer: a small BSQ-VAE; the oracle's accuracy on decoded reconstructions (encode ->
   `multiscale_quantize` -> decode, the sampler's path) is measured. Optional: a decoder-only refinement,
   and adapting the oracle to decoded images.
4. text-to-image: the T5 encoder (own WordLevel tokenizer.json over the world's vocabulary) and the Infinity
   transformer, trained jointly on (prompt, image) pairs; a fresh prompt is drawn for each image every time
   it is used.
5. evaluation (`evaluate.py`): the written folders are loaded with `Pipeline.from_dirs` and sampled with
   CFG; the oracle reads the attributes of the images (prompt following per family, attribute and value).

With `config.reuse_dir` (a finished run's models/), a stage whose folder that run holds is copied instead
of trained (the stages are deterministic given the seed and config, so it is what retraining would give).

The folders are those `varejax convert` writes (formats varejax-infinity/1, varejax-vae/1, varejax-t5/1
with tokenizer.json), plus the oracle (varejax-toy-oracle/1) and `world.json` (world version, schedules,
accuracies, timings, the command line and the resolved config). `--config.install=True` copies them into
varejax/toy/assets/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils.epath import Path

from varejax.models.state import flat_params
from varejax.paths import as_path, copy_tree, write_text_atomic
from varejax.toy import evaluate, oracle, trainers, world
from varejax.toy.fit import Logger
from varejax.toy.spec import (
    MODEL_NAMES,
    TOY_MIN_VOCAB,
    TOY_PATCHIFY,
    TOY_SCHEDULE,
    TOY_VAE_SCHEDULE,
    WORLD_FILE,
)

# ---- model folders -----------------------------------------------------------------------------------

def params_sha256(flat: dict[tuple[str, ...], Any]) -> str:
    """sha256 over the parameter names, shapes, dtypes and bytes (identifies trained weights)."""
    h = hashlib.sha256()
    for key in sorted(flat):
        value = np.ascontiguousarray(np.asarray(flat[key]))
        h.update(".".join(key).encode() + str(value.shape).encode() + str(value.dtype).encode())
        h.update(value.tobytes())
    return h.hexdigest()


def write_model(out: Path, kind: str, cfg, params, record: dict[str, Any], seed: int,
                tokenizer_json: str | None = None) -> None:
    """A trained model folder of `kind` ("infinity", "vae" or "t5", the latter with its tokenizer.json), in
    the layout `varejax convert` writes; config.json records the training and the weights' sha256."""
    from varejax.checkpoint import TOKENIZER_FILE, save_model

    flat = {k: np.asarray(v) for k, v in flat_params(params).items()}
    sha = {"params": params_sha256(flat)}
    extra: dict[str, Any] = {"training": record}
    files = None
    if tokenizer_json is not None:
        sha[TOKENIZER_FILE] = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        extra["tokenizer"] = TOKENIZER_FILE
        files = {TOKENIZER_FILE: tokenizer_json}
    source = {"path": "varejax toy train", "layout": "trained", "sha256": sha, "seed": seed,
              "world_version": world.WORLD_VERSION}
    save_model(out, kind, cfg, flat, source=source, extra=extra, files=files, overwrite=True)


def install(models_dir: Path, target: Path) -> None:
    """Replaces `target` (varejax/toy/assets) by the trained folders and world.json."""
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_NAMES:
        _copy_model(models_dir / name, target / name)
    (target / WORLD_FILE).write_bytes((models_dir / WORLD_FILE).read_bytes())


def _copy_model(src: Path, dest: Path) -> None:
    copy_tree(src, dest)


def _save_preview(path: Path, originals: np.ndarray, recon: np.ndarray) -> None:
    from varejax import images as image_io
    from varejax.sample.pipeline import image_grid

    pairs = np.stack([originals, recon], axis=1).reshape(-1, *originals.shape[1:])
    image_io.save_image(path, image_grid(pairs, columns=8))


# ---- stages ------------------------------------------------------------------------------------------

class Stages:
    """Times and logs the stages of a run; `reuse_or_train` copies a stage's folders from a finished run
    (`config.reuse_dir`) instead of training it."""

    def __init__(self, models: Path, reuse: Path | None, log: Callable[[str], None]):
        self.models, self.reuse, self.log = models, reuse, log
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def timed(self, name: str, fn: Callable[[Callable[[], float]], Any], carried: float = 0.0) -> Any:
        """fn(elapsed) with `elapsed()` the seconds since the stage began (plus `carried`, the time of work
        reused from a finished run); the total is added to `seconds[name]`."""
        start = time.time()

        def elapsed() -> float:
            return time.time() - start + carried

        result = fn(elapsed)
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed()
        return result

    def reuse_or_train(self, name: str, folders: tuple[str, ...], reuse: Callable[[Path], tuple[Any, float]],
                       train: Callable[[Callable[[], float]], Any], can_reuse: bool = True) -> Any:
        """`reuse(reuse_dir) -> (result, seconds the finished run spent)` and a copy of its `folders`, when a
        reuse_dir is set and `can_reuse`; otherwise `timed(name, train)` (train writes the folders)."""
        if self.reuse is None or not can_reuse:
            return self.timed(name, train)
        result, seconds = reuse(self.reuse)
        for folder in folders:
            _copy_model(self.reuse / folder, self.models / folder)
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.reused += list(folders)
        self.log(f"{name}: {', '.join(folders)} reused from {self.reuse}")
        return result


def run(config, workdir: str | os.PathLike, command: str | None = None) -> dict[str, Any]:
    """Trains everything and writes WORKDIR/models/{infinity,vae,t5,oracle} and world.json.

    command: the command line recorded in world.json (default: this process's `sys.argv`).
    """
    from varejax.checkpoint import load_infinity, load_t5, load_vae, read_config

    workdir = as_path(workdir)
    models = workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    log = Logger(workdir / "train.log", quiet=config.quiet)
    stages = Stages(models, as_path(config.reuse_dir) if config.reuse_dir else None, log)
    wall_start = time.time()
    seed = int(config.seed)
    batch = int(config.data.eval_batch)
    log(f"toy world v{world.WORLD_VERSION}: training with seed {seed} into {workdir}")

    train, heldout = stages.timed("data", lambda _: (
        world.dataset(config.data.n_train, seed=seed * 1000 + 1, pattern_phase=config.data.pattern_phase),
        world.dataset(config.data.n_heldout, seed=seed * 1000 + 2, pattern_phase=config.data.pattern_phase)))
    log(f"data: {len(train.images)} training and {len(heldout.images)} held-out images "
        f"({stages.seconds['data']:.0f}s)")

    def tokenizer_quality(vae_cfg, vae_params, oracle_params, preview: bool):
        recon = trainers.reconstruct(vae_cfg, vae_params, heldout.images, batch)
        if preview:
            _save_preview(workdir / "reconstructions.png", heldout.images[:32], recon[:32])
        mae = float(np.mean(np.abs(recon.astype(np.float32) - heldout.images.astype(np.float32))))
        return oracle.accuracy(oracle_params, recon, heldout.labels, batch), mae

    # -- oracle
    def reuse_oracle(reuse: Path):
        meta = oracle.read_oracle_config(str(reuse / "oracle"))
        return oracle.load_oracle(str(reuse / "oracle")), float(meta["training"]["seconds"])

    def train_oracle(elapsed):
        params, record = trainers.train_oracle(config.oracle, train, log, seed)
        acc = oracle.accuracy(params, heldout.images, heldout.labels, batch)
        log(f"oracle held-out accuracy {acc} ({elapsed():.0f}s)")
        oracle.write_oracle(str(models / "oracle"), params,
                            {"accuracy": acc, "heldout": {"n": len(heldout.images), "seed": seed * 1000 + 2},
                             "training": {**record, "seconds": round(elapsed(), 1), "seed": seed},
                             "world_version": world.WORLD_VERSION}, overwrite=True)
        return params

    oracle_params = stages.reuse_or_train("oracle", ("oracle",), reuse_oracle, train_oracle)

    # -- tokenizer
    def reuse_vae(reuse: Path):
        vae_cfg, vae_params = load_vae(str(reuse / "vae"))
        return (vae_cfg, vae_params), float(read_config(reuse / "vae")["training"]["seconds"])

    def train_vae(elapsed):
        vae_cfg, vae_params, record = trainers.train_vae(config.vae, train, log, seed)
        acc, mae = tokenizer_quality(vae_cfg, vae_params, oracle_params, preview=True)
        log(f"tokenizer: oracle on reconstructions {acc}, mean abs error {mae:.2f}/255 ({elapsed():.0f}s)")
        write_model(models / "vae", "vae", vae_cfg, vae_params,
                    {**record, "seconds": round(elapsed(), 1), "oracle_on_reconstructions": acc,
                     "reconstruction_mae_uint8": mae}, seed)
        return vae_cfg, vae_params

    vae_cfg, vae_params = stages.reuse_or_train("vae", ("vae",), reuse_vae, train_vae)

    raw = stages.timed("encode", lambda _: trainers.encode_raw(vae_cfg, vae_params,
                                                                train.images[:config.data.n_latent], batch))
    log(f"encoded {len(raw)} training images to {raw.shape[1:]} latents ({stages.seconds['encode']:.0f}s)")

    # -- optional: decoder refinement (skipped when the reused tokenizer has it)
    vae_meta = read_config(models / "vae")["training"]
    if config.vae.refine_steps > 0 and "decoder_refinement" not in vae_meta:
        def refine(elapsed):
            params, record = trainers.refine_decoder(config.vae, vae_cfg, vae_params,
                                                     trainers.summed_codes(raw, batch),
                                                     train.images[:config.data.n_latent], log, seed)
            acc, mae = tokenizer_quality(vae_cfg, params, oracle_params, preview=True)
            log(f"decoder refined: oracle on reconstructions {acc}, mean abs error {mae:.2f}/255 "
                f"({elapsed():.0f}s)")
            write_model(models / "vae", "vae", vae_cfg, params,
                        {**vae_meta, "seconds": round(stages.seconds["vae"] + elapsed(), 1),
                         "oracle_on_reconstructions": acc, "reconstruction_mae_uint8": mae,
                         "decoder_refinement": {**record, "seconds": round(elapsed(), 1)}}, seed)
            return params

        vae_params = stages.timed("vae", refine)
    vae_meta = read_config(models / "vae")["training"]

    # -- optional: the oracle adapted to decoded images (skipped when the reused oracle has it)
    oracle_meta = oracle.read_oracle_config(str(models / "oracle"))
    if config.oracle.adapt_steps > 0 and "adaptation" not in oracle_meta:
        def adapt(elapsed):
            params, record = trainers.adapt_oracle(config.oracle, oracle_params, vae_cfg, vae_params, raw, train,
                                                   log, seed)
            acc = oracle.accuracy(params, heldout.images, heldout.labels, batch)
            on_recon, _ = tokenizer_quality(vae_cfg, vae_params, params, preview=False)
            log(f"oracle adapted to decoded images: held-out accuracy {acc}, on their reconstructions "
                f"{on_recon} ({elapsed():.0f}s)")
            meta = {k: v for k, v in oracle_meta.items() if k not in ("format", "model")}
            oracle.write_oracle(str(models / "oracle"), params,
                                {**meta, "accuracy": acc, "accuracy_on_reconstructions": on_recon,
                                 "adaptation": {**record, "seconds": round(elapsed(), 1)}}, overwrite=True)
            return params

        oracle_params = stages.timed("oracle", adapt)
        oracle_meta = oracle.read_oracle_config(str(models / "oracle"))

    # -- T5 + Infinity
    tokenizer_json = trainers.build_tokenizer().to_str(pretty=True)
    total_cycles = 1 + len(config.t2i.restarts)
    reuse_t2i = stages.reuse is not None and config.reuse_t2i
    reused = read_config(stages.reuse / "infinity")["training"] if reuse_t2i else None

    def train_t2i(elapsed):
        from varejax.models.t5_tokenizer import T5Tokenizer

        start_from = None
        if reused is not None:
            done = int(reused.get("cycles", 1))
            start_from = (load_t5(str(stages.reuse / "t5"))[1], load_infinity(str(stages.reuse / "infinity"))[1],
                          done)
            log(f"T5 + Infinity: continuing from {stages.reuse} after {done} of {total_cycles} cycles")
        tokenizer = T5Tokenizer(trainers.build_tokenizer(), source="toy", min_vocab=TOY_MIN_VOCAB)
        t5_cfg, t5_params, inf_cfg, inf_params, record = trainers.train_text_to_image(
            config.t2i, raw, train.labels, tokenizer, log, seed, start_from=start_from)
        record["seconds"] = round(elapsed(), 1)
        write_model(models / "t5", "t5", t5_cfg, t5_params, record, seed, tokenizer_json=tokenizer_json)
        write_model(models / "infinity", "infinity", inf_cfg, inf_params, record, seed)
        log(f"text-to-image trained ({elapsed():.0f}s)")

    # The transformer learns from the encoder's bits only, which the decoder refinement leaves as they are:
    # a finished run's T5 + Infinity (all cycles done) are what retraining would give.
    if reused is not None and reused.get("cycles", 1) >= total_cycles:
        stages.reuse_or_train("t2i", ("t5", "infinity"), lambda _: (None, float(reused["seconds"])), train_t2i)
    else:
        stages.timed("t2i", train_t2i, carried=float(reused["seconds"]) if reused is not None else 0.0)

    times = stages.seconds
    times["train_total"] = sum(times[k] for k in ("data", "oracle", "vae", "encode", "t2i"))

    def evaluation_stage(_):
        if config.eval.n <= 0:
            return None
        pipeline, _ = evaluate.load_models(models)
        result = evaluate.evaluate_prompt_following(pipeline, oracle_params, config.eval, seed)
        log(f"prompt following: {json.dumps({k: result[k] for k in ('all_said', 'circle')})}")
        evaluate.save_sample_grid(pipeline, config.eval, workdir / "samples.png")
        return result

    prompt_following = stages.timed("eval", evaluation_stage)
    times["total"] = times["train_total"] + times["eval"]
    times["this_run_wall"] = time.time() - wall_start

    summary = {
        "world_version": world.WORLD_VERSION, "image_size": world.IMAGE_SIZE,
        "schedule": [list(s) for s in TOY_SCHEDULE], "spatial_patchify": TOY_PATCHIFY,
        "vae_schedule": [list(s) for s in TOY_VAE_SCHEDULE], "seed": seed, "min_vocab": TOY_MIN_VOCAB,
        "oracle_accuracy": oracle_meta["accuracy"],
        "oracle_accuracy_on_reconstructions": oracle_meta.get("accuracy_on_reconstructions"),
        "tokenizer": {"oracle_on_reconstructions": vae_meta["oracle_on_reconstructions"],
                      "reconstruction_mae_uint8": vae_meta["reconstruction_mae_uint8"]},
        "prompt_following": prompt_following, "seconds": {k: round(v, 1) for k, v in times.items()},
        "command": command if command is not None else shlex.join(sys.argv),
        "config": json.loads(config.to_json()),
        "reused_stages": stages.reused,
        "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()},
    }
    write_text_atomic(models / WORLD_FILE, json.dumps(summary, indent=1) + "\n")
    log(f"done in {times['total']:.0f}s: {json.dumps(summary['seconds'])}")
    if config.install:
        from varejax.toy.assets import package_asset_dir

        install(models, as_path(package_asset_dir()))
        log(f"installed into {package_asset_dir()}")
    return summary
