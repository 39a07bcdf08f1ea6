"""Text to image: T5 features -> KV-cache CFG sampler -> BSQ-VAE decoder -> PNG files with records.

    varejax sample --config configs/sample.py --config.prompts="('a red fox in the snow',)" --workdir runs/s1

`Pipeline` holds the three models; `run_sampling(config, workdir)` is the stage behind the command:
it writes `images/{index:05d}.png` with a JSON record each (prompt, seed, cfg, tau, schedule, model
hashes), and `grid.png`. A re-run with the same workdir skips images already written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from varejax import images as image_io
from varejax.batching import padded_batches
from varejax.errors import ConfigError, UserError
from varejax.models import schedules
from varejax.paths import as_path, write_text_atomic
from varejax.sample.sampler import SamplingConfig, generate_jit


def model_hash(model_dir: str | os.PathLike) -> str:
    """A short, stable id of a model folder: sha256 of its config.json (which records its sources)."""
    path = as_path(model_dir) / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclasses.dataclass
class Pipeline:
    """The three models of Infinity text-to-image, ready to sample."""

    infinity_cfg: Any
    infinity_params: Any
    vae_cfg: Any
    vae_params: Any
    text_encoder: Any
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)
    mesh: Any = None
    rules: Any = None

    @classmethod
    def from_dirs(cls, infinity_dir: str, vae_dir: str, t5_dir: str, *, text_cache_dir: str | None = None,
                  min_vocab: int = 32100, max_text_length: int = 512, mesh: Any = None, rules: Any = None,
                  **numerics: Any) -> Pipeline:
        """Loads converted model folders (`varejax convert infinity|vae|t5`), sharded onto `mesh` if given."""
        from varejax.checkpoint import load_infinity, load_vae
        from varejax.parallel import DEFAULT_RULES
        from varejax.sample.text_features import TextEncoder

        rules = rules or DEFAULT_RULES
        infinity_cfg, infinity_params = load_infinity(infinity_dir, mesh=mesh, rules=rules, **numerics)
        vae_cfg, vae_params = load_vae(vae_dir, mesh=mesh, rules=rules)
        text_encoder = TextEncoder.from_dir(t5_dir, cache_dir=text_cache_dir, min_vocab=min_vocab,
                                            max_length=max_text_length, mesh=mesh, rules=rules)
        hashes = {"infinity": model_hash(infinity_dir), "vae": model_hash(vae_dir), "t5": model_hash(t5_dir)}
        return cls(infinity_cfg, infinity_params, vae_cfg, vae_params, text_encoder, hashes, mesh, rules)

    def check_compatible(self) -> None:
        """Raises ConfigError when the three models were not made for each other (e.g. a 2B tokenizer with
        an 8B transformer)."""
        if self.text_encoder.cfg.d_model != self.infinity_cfg.text_channels:
            raise ConfigError(f"the text encoder is {self.text_encoder.cfg.d_model} wide, the transformer expects "
                             f"{self.infinity_cfg.text_channels}")
        if self.vae_cfg.codebook_dim != self.infinity_cfg.codebook_dim:
            raise ConfigError(f"the tokenizer has {self.vae_cfg.codebook_dim} bits, the transformer "
                             f"{self.infinity_cfg.codebook_dim}")

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingConfig,
                 schedule: schedules.Schedule, negative_prompt: str = "", params: Any = None,
                 text_features: tuple[Any, Any] | None = None) -> np.ndarray:
        """uint8 RGB images [B, H, W, 3], one per prompt, each from its own seed.

        `params` replaces the transformer parameters (e.g. an erased model sharing the other two).
        `text_features` (features [B, T, C], mask [B, T]) replaces the encoded prompts (soft prompts of
        an attack); `prompts` then only labels the rows.
        """
        from varejax.models.bsq_vae import decode_jit

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        text, mask = self.text_encoder.encode(list(prompts)) if text_features is None else text_features
        negative = {}
        if negative_prompt:
            neg_text, neg_mask = self.text_encoder.encode([negative_prompt] * len(prompts))
            negative = {"negative_text": neg_text, "negative_mask": neg_mask}
        keys = jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))
        with self._sharding():
            out = generate_jit(self.infinity_params if params is None else params, text, mask, schedule,
                               cfg=self.infinity_cfg, sampling=sampling, rng=None if sampling.greedy else keys,
                               **negative)
            decoded = decode_jit(self.vae_params, out.summed_codes, self.vae_cfg)
        from varejax.models.lora import host_array  # a gather when the mesh spans processes

        return image_io.to_uint8(host_array(decoded))

    def _sharding(self):
        import contextlib

        from varejax.parallel import sharding_context
        return contextlib.nullcontext() if self.mesh is None else sharding_context(self.mesh, self.rules)


def sampling_from_config(config: Any) -> SamplingConfig:
    """The `SamplingConfig` of a config's `sampling` section (one guidance / tau value, or one per scale)."""
    return SamplingConfig(guidance=tuple(float(g) for g in _as_tuple(config.guidance)),
                          tau=tuple(float(t) for t in _as_tuple(config.tau)),
                          top_k=int(config.top_k), top_p=float(config.top_p), greedy=bool(config.greedy))


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tiles [N, H, W, 3] images into one image, row by row (missing cells black)."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def plan_images(prompts: Sequence[str], images_per_prompt: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, seed) of every image: seeds seed, seed+1, ... in prompt-major order."""
    out = []
    for p, prompt in enumerate(prompts):
        for k in range(images_per_prompt):
            out.append((prompt, seed + p * images_per_prompt + k))
    return out


def record_settings(config: Any, sampling: SamplingConfig, schedule: Sequence[Sequence[int]],
                    hashes: dict[str, str]) -> dict[str, Any]:
    """What an image record holds besides its index, prompt and seed, for the images `config` samples with
    these models (`Pipeline.hashes`): a re-run reuses a kept image only when all of it agrees."""
    return {"negative_prompt": config.negative_prompt, "guidance": list(sampling.guidance), "tau": list(sampling.tau),
            "top_k": sampling.top_k, "top_p": sampling.top_p, "greedy": sampling.greedy, "h_div_w": config.h_div_w,
            "pn": config.pn, "schedule": [list(s) for s in schedule], "models": dict(hashes)}


def check_image_record(path: Any, record: dict[str, Any], prompt: str, seed: int, settings: dict[str, Any]) -> None:
    """Raises UserError when an existing image record was made for another prompt, seed, model or sampling
    setting than this run would use (reusing the image would mix runs)."""
    wanted = {"prompt": prompt, "seed": int(seed), **settings}
    for field, value in wanted.items():
        # Records are JSON (tuples read back as lists): compare the values as JSON holds them.
        if json.loads(json.dumps(record.get(field))) != json.loads(json.dumps(value)):
            raise UserError(f"{path} was made with {field} {record.get(field)!r}, this run uses {value!r}: use a "
                            "fresh --workdir (or delete its images/ folder to sample them again)")


def run_sampling(config: Any, workdir: str | os.PathLike, pipeline: Pipeline | None = None,
                 schedule: Sequence[tuple[int, int, int]] | None = None,
                 plan: Sequence[tuple[str, int]] | None = None) -> list[dict]:
    """The `varejax sample` stage: images, records and a grid in `workdir`; returns the records.

    Without `pipeline`, the models are the folders of `config.model`; a given pipeline may bring its own
    `schedule` (the embedded toy world's, resolved by the command), otherwise `config.h_div_w` and `pn` pick it.
    `plan` gives the (prompt, seed) of every image (`varejax eval`: a prompt file's own seeds) instead of
    `config.prompts`, `images_per_prompt` and `seed`.
    """
    from tqdm import tqdm

    workdir = as_path(workdir)
    out_dir = workdir / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    if schedule is None:
        schedule = schedules.get_schedule(config.h_div_w, config.pn)
    if pipeline is None:
        missing = [k for k in ("infinity", "vae", "t5") if not config.model[k]]
        if missing:
            raise ConfigError(f"config.model.{missing[0]} is empty: give the converted model folder "
                             f"(varejax convert {missing[0]} ...)")
        from varejax.configlib import rules_tuple
        from varejax.parallel import check_mesh_spans_processes, make_mesh
        from varejax.parallel.distributed import announce, initialize

        initialize()
        mesh = make_mesh(tuple(config.mesh.shape))
        check_mesh_spans_processes(mesh)
        announce(mesh)
        pipeline = Pipeline.from_dirs(config.model.infinity, config.model.vae, config.model.t5,
                                      text_cache_dir=config.text_cache_dir or str(workdir / "text_cache"),
                                      min_vocab=config.model.min_vocab, mesh=mesh,
                                      rules=rules_tuple(config.mesh.rules), **dict(config.numerics))
    pipeline.check_compatible()
    if plan is None and not config.prompts:
        raise ConfigError("config.prompts is empty: give at least one prompt")
    sampling = sampling_from_config(config.sampling)
    sampling.per_scale(len(schedule))  # a per-scale guidance or tau list that does not fit fails here
    if plan is None:
        plan = plan_images(list(config.prompts), config.images_per_prompt, config.seed)
    settings = record_settings(config, sampling, schedule, pipeline.hashes)
    todo = _missing(out_dir, len(plan))
    _check_kept_images(out_dir, plan, set(todo), settings)
    writer = jax.process_index() == 0  # multi-host: every process samples every batch, process 0 writes
    batch = max(1, int(config.batch_size))
    # Full batches (the last one padded by repetition) so the sampler compiles once.
    for idx, count in tqdm(list(padded_batches(len(todo), batch)), desc="sampling", unit="batch",
                           disable=not (todo and writer)):
        padded = [todo[i] for i in idx]
        chunk = padded[:count]
        images = pipeline.generate([plan[i][0] for i in padded], [plan[i][1] for i in padded], sampling, schedule,
                                   negative_prompt=config.negative_prompt)
        for i, image in zip(chunk, images, strict=False):
            if not writer:
                continue
            prompt, seed = plan[i]
            record = {"index": i, "prompt": prompt, "seed": seed, **settings}
            image_io.save_image(out_dir / f"{i:05d}.png", image)
            # The record last: it marks the image done.
            write_text_atomic(out_dir / f"{i:05d}.json", json.dumps(record, indent=1) + "\n")
    from varejax.parallel.distributed import sync

    sync("varejax:sampling")  # every image written before anyone reads them
    records = [json.loads((out_dir / f"{i:05d}.json").read_text()) for i in range(len(plan))]
    if writer:
        all_images = np.stack([image_io.load_uint8(out_dir / f"{i:05d}.png") for i in range(len(plan))])
        image_io.save_image(workdir / "grid.png", image_grid(all_images))
    return records


def _check_kept_images(out_dir: Any, plan: Sequence[tuple[str, int]], missing: set[int],
                       settings: dict[str, Any]) -> None:
    """Images already written are kept only if they are this run's (`check_image_record`); process 0 reads
    the records and every process raises with it (none is left waiting in a collective)."""
    problem = ""
    if jax.process_index() == 0:
        try:
            for i in (i for i in range(len(plan)) if i not in missing):
                path = out_dir / f"{i:05d}.json"
                check_image_record(path, json.loads(path.read_text()), *plan[i], settings)
        except UserError as err:
            problem = str(err)
    failed = bool(problem)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    if failed:
        raise UserError(problem or f"{out_dir} holds images of another run (process 0 names them)")


def _missing(out_dir: os.PathLike, count: int) -> list[int]:
    """Indices of the images without a record, as process 0 sees them (every process agrees)."""
    done = np.asarray([(out_dir / f"{i:05d}.json").exists() for i in range(count)], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return [i for i in range(count) if not done[i]]
