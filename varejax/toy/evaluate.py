"""Evaluation of toy models: how well generated images follow their prompts, read by the oracle.

    varejax toy eval --workdir runs/toy_eval                       # the shipped models (varejax/toy/assets)
    varejax toy eval --workdir runs/toy_eval --models runs/toy/models

The training run's last stage (`train.run`) calls `evaluate_prompt_following` and stores its result in
world.json ("prompt_following"); `run_eval` re-runs the same evaluation on existing model folders and writes
WORKDIR/evaluation.json. Both record, besides the accuracy per prompt family and attribute, the accuracy per
prompted value with the values the oracle read instead (`per_value`), and a preview grid WORKDIR/samples.png.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from typing import Any

import numpy as np
from etils.epath import Path

from varejax.paths import as_path, is_remote, write_text_atomic
from varejax.toy import oracle, world
from varejax.toy.spec import EVAL_FILE, TOY_MIN_VOCAB, TOY_SCHEDULE


def sampling_config(config):
    """The `SamplingConfig` of an eval config (cfg, tau, top_p, greedy)."""
    from varejax.sample.sampler import SamplingConfig

    return SamplingConfig(guidance=(float(config.cfg),), tau=(float(config.tau),), top_k=0, top_p=float(config.top_p),
                          greedy=bool(config.greedy))


def generate_batched(pipeline, prompts: list[str], seeds: list[int], sampling, batch: int) -> np.ndarray:
    """uint8 images of `prompts` in fixed-size batches (the last one padded: one compilation)."""
    from varejax.batching import map_padded

    return map_padded(lambda idx: pipeline.generate([prompts[i] for i in idx], [seeds[i] for i in idx], sampling,
                                                    TOY_SCHEDULE), len(prompts), batch)


def per_value(wanted: dict[str, np.ndarray], read: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Accuracy per prompted value, and what the oracle read for it.

    wanted / read: attribute -> int array of the prompted / read values of the same images. Returns
    attribute -> value name -> {"n": prompts asking for it, "accuracy": share read as asked (None when
    n = 0), "read_as": value name -> count, over every value read at least once (a confusion-matrix row)}.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, values in world.ATTRIBUTES.items():
        asked, got = np.asarray(wanted[name]), np.asarray(read[name])
        out[name] = {}
        for value in values:
            hits = got[asked == int(value)]
            counts = {world.value_name(values(int(v))): int(np.sum(hits == v)) for v in np.unique(hits)}
            out[name][world.value_name(value)] = {
                "n": int(len(hits)), "accuracy": float(np.mean(hits == int(value))) if len(hits) else None,
                "read_as": dict(sorted(counts.items(), key=lambda item: -item[1]))}
    return out


def evaluate_prompt_following(pipeline, oracle_params, config, seed: int) -> dict[str, Any]:
    """Oracle-read attributes of generated images vs the prompts.

    `all_said[family][attr]`: accuracy on `config.n` prompts per family that say all three attributes;
    `per_value[attr][value]`: the same images grouped by the prompted value (both families together), with
    the values read instead; `circle[family]`: fraction of images of `config.n_circle` circle prompts (other
    attributes said or not) classified as circles.
    """
    sampling = sampling_config(config)
    result: dict[str, Any] = {"sampling": {"cfg": config.cfg, "tau": config.tau, "top_p": config.top_p,
                                           "greedy": config.greedy}, "n": config.n, "all_said": {}, "circle": {}}
    wanted: dict[str, list[np.ndarray]] = {name: [] for name in world.ATTRIBUTE_NAMES}
    read: dict[str, list[np.ndarray]] = {name: [] for name in world.ATTRIBUTE_NAMES}
    for f, family in enumerate(world.FAMILIES):
        rng = np.random.default_rng(seed + 100 + f)
        attrs = [world.sample_attributes(rng) for _ in range(config.n)]
        prompts = [world.prompt(a, rng, family, mention="all") for a in attrs]
        seeds = [seed * 100000 + f * 10000 + i for i in range(config.n)]
        images = generate_batched(pipeline, prompts, seeds, sampling, config.batch_size)
        ids = oracle.classify_batched(oracle_params, images)
        for name in world.ATTRIBUTE_NAMES:
            wanted[name].append(np.array([int(getattr(a, name)) for a in attrs]))
            read[name].append(np.asarray(ids[name]))
        result["all_said"][family] = {name: float(np.mean(read[name][-1] == wanted[name][-1]))
                                      for name in world.ATTRIBUTE_NAMES}
        pairs = world.concept_prompts("circle", family, n=config.n_circle, seed=seed + 200 + f)
        images = generate_batched(pipeline, [p for p, _ in pairs],
                                  [seed * 100000 + 50000 + f * 10000 + i for i in range(len(pairs))], sampling,
                                  config.batch_size)
        result["circle"][family] = float(np.mean(oracle.classify_batched(oracle_params, images)["shape"] ==
                                                 int(world.Shape.CIRCLE)))
    result["per_value"] = per_value({k: np.concatenate(v) for k, v in wanted.items()},
                                    {k: np.concatenate(v) for k, v in read.items()})
    return result


def save_sample_grid(pipeline, config, path: Path) -> None:
    """16 seen-family prompts spread over the enumerated ones, sampled with the eval settings, as one PNG."""
    from varejax import images as image_io
    from varejax.sample.pipeline import image_grid

    every = world.enumerate_prompts("seen")
    preview = every[:: max(1, len(every) // 16)][:16]
    images = generate_batched(pipeline, preview, list(range(len(preview))), sampling_config(config),
                              config.batch_size)
    image_io.save_image(path, image_grid(images, columns=int(math.ceil(math.sqrt(len(images))))))


def load_models(models_dir: str | Path):
    """(Pipeline, oracle parameters) of a folder holding infinity/, vae/, t5/ and oracle/."""
    from varejax.sample.pipeline import Pipeline

    models = as_path(models_dir)
    for name in ("infinity", "vae", "t5", "oracle"):
        if not (models / name).is_dir():
            raise FileNotFoundError(f"{models / name} is missing: --models must hold infinity/, vae/, t5/ "
                                    f"and oracle/ (WORKDIR/models of `varejax toy train`)")
    pipeline = Pipeline.from_dirs(str(models / "infinity"), str(models / "vae"), str(models / "t5"),
                                  min_vocab=TOY_MIN_VOCAB)
    return pipeline, oracle.load_oracle(str(models / "oracle"))


def run_eval(config, workdir: str | Path, models_dir: str | Path | None = None,
             command: str | None = None) -> dict[str, Any]:
    """Evaluates existing model folders (default: the shipped assets) with `config.eval` and `config.seed`;
    writes WORKDIR/evaluation.json and WORKDIR/samples.png and returns the record."""
    from varejax.toy.assets import asset_dir

    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    models = as_path(models_dir or asset_dir())
    start = time.time()
    pipeline, oracle_params = load_models(models)
    evaluation = evaluate_prompt_following(pipeline, oracle_params, config.eval, int(config.seed))
    save_sample_grid(pipeline, config.eval, workdir / "samples.png")
    where = str(models) if is_remote(models) else os.path.realpath(models)
    record = {"models": where, "seed": int(config.seed), "prompt_following": evaluation,
              "seconds": round(time.time() - start, 1),
              "command": command if command is not None else shlex.join(sys.argv),
              "eval_config": json.loads(config.eval.to_json())}
    write_text_atomic(workdir / EVAL_FILE, json.dumps(record, indent=1) + "\n")
    return record
