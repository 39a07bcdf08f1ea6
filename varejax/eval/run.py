"""The `varejax eval` stage: sample a task's prompts, score the images, write results.json and a report.

    varejax eval --config configs/eval_toy.py --workdir runs/eval_toy
    varejax eval --config configs/eval_church.py --workdir runs/eval_church_erased \
        --config.model.delta="('runs/church/delta.safetensors',)"

Steps (`run_eval`):

1. the prompt file's rows (CSV / JSONL in the ESD / UCE / MACE layout: `case_number, prompt, evaluation_seed,
   ...`, or a TFDS mapping: `varejax.data.sources`), `config.prompts.limit` of them; each row gives
   `images_per_prompt` images, seeds evaluation_seed + k;
2. images with `varejax.sample.pipeline.run_sampling` (images/NNNNN.png + a JSON record each, batched
   over the mesh's devices; on several processes every process samples, process 0 writes). Images already
   written are kept: a resumed run samples only the missing ones, and refuses a workdir whose records were
   made for other prompts, seeds, models (folder and delta hashes) or sampling settings;
3. every scorer of `config.eval.scorers` (`varejax.eval.scorers`) on the images, in batches: per-image
   values in scores/<scorer>.npz, extended batch by batch (a resumed run scores only images not yet scored;
   a scorer whose settings changed starts over);
4. each scorer's summary of every image; results.json (the summaries and every setting: model folders and
   hashes, deltas, sampling, the prompt file and its sha256 or the TFDS fields, scorer settings, seeds, command
   line, versions) and report.md / report.html (tables, an image grid with its prompts, a bar chart per scorer).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from varejax.errors import UserError
from varejax.paths import as_path, write_text_atomic

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "varejax-eval/1"


# ---- config ------------------------------------------------------------------------------------------

def base_config(task: str, prompt_file: str | Mapping[str, Any], scorers: Mapping[str, Mapping[str, Any]], *,
                model: Mapping[str, str] | None = None, arch: str = "2b"):
    """The config of an eval task (what configs/eval_*.py start from).

    Args:
      task: the task's name (results of one task compare with each other).
      prompt_file: its prompt file (CSV or JSONL), or a TFDS mapping (`varejax.data.tfds_source.TfdsSource` fields).
      scorers: scorer name -> its options (`config.eval.options.<name>`).
      model: infinity / vae / t5 folders (default: models/infinity_2b, models/vae_d32, models/flan_t5_xl).
      arch: sampling defaults of `varejax.sample.defaults` ("2b", "8b", "toy").
    """
    import ml_collections

    from varejax.sample.defaults import base_config as sample_config

    sample = sample_config(arch)
    config = ml_collections.ConfigDict()
    config.task = task
    config.model = sample.model
    config.model.infinity, config.model.vae, config.model.t5 = (
        (model or {}).get("infinity", "models/infinity_2b"), (model or {}).get("vae", "models/vae_d32"),
        (model or {}).get("t5", "models/flan_t5_xl"))
    # An erased model: delta.safetensors / lora.safetensors files of `varejax erase` added to model.infinity
    # (or point model.infinity at a run's model/ folder or a `varejax merge` output instead).
    config.model.delta = ()
    config.model.force_delta = False   # apply deltas whose recorded base is another model
    config.prompts = ml_collections.ConfigDict()
    config.prompts.file = prompt_file
    config.prompts.limit = 0           # N rows only (0 = all): the first N, or drawn with sample_seed
    config.prompts.sample_seed = -1    # >= 0: draw the `limit` rows at random with this seed (kept in file order)
    config.prompts.required_columns = ()  # columns the task needs besides prompt (checked before sampling)
    config.prompts.seed = 0            # seed of rows without evaluation_seed: seed + row number
    config.images_per_prompt = 1
    config.negative_prompt = sample.negative_prompt
    config.h_div_w = sample.h_div_w
    config.pn = sample.pn
    config.schedule = ()               # explicit (scale, h, w) schedule; () = from h_div_w and pn
    config.batch_size = 8              # images per sampling step (a multiple of the mesh's data axis)
    config.sampling = sample.sampling
    config.text_cache_dir = ""
    config.numerics = sample.numerics
    config.mesh = sample.mesh
    config.eval = ml_collections.ConfigDict()
    config.eval.scorers = tuple(scorers)
    config.eval.options = ml_collections.ConfigDict({name: dict(options) for name, options in scorers.items()})
    config.eval.plugins = ()           # modules to import that register more scorers
    config.eval.batch_size = 32        # images per scoring call
    config.report = ml_collections.ConfigDict()
    config.report.grid_images = 16     # images shown in the report's grid
    config.report.columns = 8
    return config


# ---- prompt rows -------------------------------------------------------------------------------------

def read_rows(source: Any, limit: int = 0, required: Sequence[str] = (), default_seed: int | None = 0,
              sample_seed: int = -1) -> list[dict]:
    """The rows of a prompt source as dicts with `prompt`, `seed` (int), `case_number` and the source's other columns.

    `source` is a prompt file (CSV / JSONL in the ESD / UCE layout) or a TFDS mapping (a dict or ConfigDict with
    a `tfds` key, `varejax.data.tfds_source.TfdsSource`). `varejax.data.sources.read_prompt_rows` reads it (`limit`
    rows, the first ones or, with `sample_seed` >= 0, drawn at random; rows of a file without a seed column get
    default_seed + row number). A one-line UserError names the file for a missing file, column or bad seed.
    """
    from varejax.data.sources import read_prompt_rows
    from varejax.data.tfds_source import TfdsSource

    if TfdsSource.parse(source) is None and (not source or isinstance(source, str | os.PathLike)):
        if not source:
            raise UserError("config.prompts.file is empty: give the task's prompt file (CSV or JSONL) or a TFDS "
                            "mapping")
        if not as_path(source).exists():
            raise UserError(f"prompt file {source} not found")
    return read_prompt_rows(source, count=int(limit) or None, sample_seed=None if sample_seed < 0 else sample_seed,
                            require=tuple(required), default_seed=default_seed)


def prompt_source_record(source: Any) -> dict[str, Any]:
    """How results.json names the prompt source: a file's real path and sha256, or a TFDS source's fields."""
    from varejax.data.sources import source_record

    record = source_record(source)
    if record["kind"] == "file":  # the keys results files have always had
        return {"file": os.path.realpath(record["path"]), "sha256": record["sha256"]}
    return record


def image_rows(rows: Sequence[Mapping[str, Any]], images_per_prompt: int) -> list[dict]:
    """One row per image (row-major: row r's image k is index r * images_per_prompt + k, seed row seed + k)."""
    out = []
    for row in rows:
        for k in range(int(images_per_prompt)):
            out.append({**row, "seed": int(row["seed"]) + k, "image_index": len(out)})
    return out


# ---- sampling ----------------------------------------------------------------------------------------

def _check_model_dirs(config) -> None:
    for name in ("infinity", "vae", "t5"):
        folder = config.model[name]
        if not folder:
            raise UserError(f"config.model.{name} is empty: give the converted model folder")
        if not (as_path(folder) / "config.json").exists():
            raise UserError(f"config.model.{name}: model folder {folder} not found (or it has no config.json)")
    for delta in config.model.delta:
        if not as_path(delta).exists():
            raise UserError(f"config.model.delta: {delta} not found")


def _existing_records(config, workdir, plan: Sequence[tuple[str, int]]) -> list[int]:
    """Indices of images already written; a record for another prompt, seed, model or sampling setting is a
    UserError (checked from the folders' hashes, before any model is loaded)."""
    from varejax.sample.pipeline import check_image_record, record_settings, sampling_from_config

    settings = record_settings(config, sampling_from_config(config.sampling), _schedule(config), model_hashes(config))
    done = []
    for i, (prompt, seed) in enumerate(plan):
        path = workdir / "images" / f"{i:05d}.json"
        if not path.exists():
            continue
        check_image_record(path, json.loads(path.read_text()), prompt, seed, settings)
        done.append(i)
    return done


def model_hashes(config) -> dict[str, str]:
    """What the image records name the models by (`Pipeline.hashes`, plus the applied deltas' files)."""
    from varejax.convert.sources import sha256_file
    from varejax.sample.pipeline import model_hash

    hashes = {name: model_hash(config.model[name]) for name in ("infinity", "vae", "t5")}
    if config.model.delta:
        hashes["delta"] = hashlib.sha256("".join(sha256_file(p) for p in config.model.delta).encode()).hexdigest()[:16]
    return hashes


def load_pipeline(config, workdir):
    """The sampling pipeline of `config.model` (on the config's mesh), with `config.model.delta` applied."""
    import dataclasses

    from varejax.configlib import rules_tuple
    from varejax.parallel import check_mesh_spans_processes, make_mesh
    from varejax.parallel.distributed import announce
    from varejax.sample.pipeline import Pipeline

    mesh = make_mesh(tuple(config.mesh.shape))
    check_mesh_spans_processes(mesh)
    announce(mesh)
    pipeline = Pipeline.from_dirs(config.model.infinity, config.model.vae, config.model.t5,
                                  text_cache_dir=config.text_cache_dir or str(as_path(workdir) / "text_cache"),
                                  min_vocab=config.model.min_vocab, mesh=mesh, rules=rules_tuple(config.mesh.rules),
                                  **dict(config.numerics))
    if not config.model.delta:
        return pipeline
    params, _ = apply_deltas(pipeline.infinity_cfg, pipeline.infinity_params, list(config.model.delta),
                                  force=bool(config.model.force_delta), base=config.model.infinity)
    return dataclasses.replace(pipeline, infinity_params=params, hashes=model_hashes(config))


def apply_deltas(cfg, params, paths: list[str], *, force: bool = False, base: str = "the base"):
    """`params` + the summed deltas of `varejax erase` exports (the arithmetic of `varejax merge`); returns
    (params, a record per delta). A delta made on another base is a UserError unless `force`."""
    from varejax.erase.export import add_deltas, params_sha256
    from varejax.erase.merge import key_problems, read_delta, summed

    deltas = [read_delta(p) for p in paths]
    problems = key_problems(cfg, deltas)
    if problems:
        raise UserError(f"config.model.delta does not fit {base}: {problems[0]}")
    base_hash = params_sha256(params)
    for d in deltas:
        if d.base_sha256 != base_hash and not force:
            raise UserError(f"{d.path} was made on base {d.base_sha256}, but {base} is {base_hash}; set "
                            f"config.model.force_delta=True to apply it anyway")
    return add_deltas(cfg, params, summed(deltas), "config.model.delta"), [d.record(d.base_sha256 != base_hash)
                                                                          for d in deltas]


def _schedule(config):
    if config.schedule:
        return tuple(tuple(int(v) for v in s) for s in config.schedule)  # hashable: a static argument
    from varejax.models import schedules

    return schedules.get_schedule(config.h_div_w, config.pn)


def sample_images(config, workdir, plan: Sequence[tuple[str, int]]) -> list[int]:
    """Samples the images of `plan` not yet in WORKDIR/images; returns their indices (process 0's view)."""
    from varejax.parallel.distributed import is_main_process, sync
    from varejax.sample.pipeline import run_sampling

    done = set(_existing_records(config, workdir, plan)) if is_main_process() else set()
    todo = [i for i in range(len(plan)) if i not in done]
    if _broadcast_int(len(todo)) == 0:
        return []
    pipeline = load_pipeline(config, workdir)
    run_sampling(config, workdir, pipeline, _schedule(config), plan=plan)
    sync("varejax:eval_sampled")
    return todo


def _broadcast_int(value: int) -> int:
    import jax

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


# ---- scoring -----------------------------------------------------------------------------------------

def _settings_key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def score_images(scorer, images_dir, rows: Sequence[Mapping[str, Any]], out_file, batch_size: int,
                 fresh: Sequence[int] = ()) -> tuple[dict[str, np.ndarray], int]:
    """Per-image values of every image (index order), scoring only those not yet in `out_file` (npz: the values,
    `_index` and `_settings`), saved after each batch. Returns (values, how many were scored now).

    `fresh`: images (re)sampled by this run; values stored for them earlier are dropped and scored again."""
    from varejax.eval.scorers import check_images
    from varejax.paths import load_npz, save_npz

    key = _settings_key(scorer.settings())
    stored: dict[str, np.ndarray] = {}
    if as_path(out_file).exists():
        stored = load_npz(out_file)
        if str(stored.get("_settings", "")) != key:  # other settings: the stored values are not these
            stored = {}
    if stored and fresh:
        keep = ~np.isin(stored["_index"], np.asarray(list(fresh), np.int64))
        stored = {k: (v if k == "_settings" else np.asarray(v)[keep]) for k, v in stored.items()}
    have = set(int(i) for i in stored.get("_index", []))
    todo = [i for i in range(len(rows)) if i not in have]
    scored_now = 0
    for start in range(0, len(todo), max(1, int(batch_size))):
        chunk = todo[start:start + int(batch_size)]
        images = _load_images(images_dir, chunk)
        images = check_images(images, f"{images_dir}")
        try:
            values = scorer.score(images, [rows[i] for i in chunk])
        except UserError as err:  # e.g. images of a size the scorer cannot take: say which files
            raise UserError(f"{images_dir}/{chunk[0]:05d}.png ... {chunk[-1]:05d}.png: {err}") from None
        for name, array in values.items():
            array = np.asarray(array)
            if len(array) != len(chunk):
                raise ValueError(f"scorer {scorer.name}: {name} has {len(array)} values for {len(chunk)} images")
            stored[name] = np.concatenate([stored[name], array]) if name in stored else array
        stored["_index"] = np.concatenate([stored.get("_index", np.zeros(0, np.int64)), np.asarray(chunk, np.int64)])
        stored["_settings"] = np.asarray(key)
        save_npz(out_file, **stored)
        scored_now += len(chunk)
    order = np.argsort(stored["_index"], kind="stable")
    return {k: np.asarray(v)[order] for k, v in stored.items() if not k.startswith("_")}, scored_now


def _load_images(images_dir, indices: Sequence[int]) -> np.ndarray:
    from varejax import images as image_io

    images = [image_io.load_uint8(as_path(images_dir) / f"{i:05d}.png") for i in indices]
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise UserError(f"{images_dir}: images of different sizes {sorted(sizes)}")
    return np.stack(images)


# ---- the stage ---------------------------------------------------------------------------------------

def run_eval(config, workdir: str | os.PathLike, command: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """The whole `varejax eval` stage (module doc); returns the results dict (also written as results.json)."""
    from varejax.eval.scorers import build_scorer, import_plugins
    from varejax.parallel.distributed import is_main_process, sync

    start = time.time()
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import_plugins(list(config.eval.plugins))
    _check_model_dirs(config)
    rows = read_rows(config.prompts.file, int(config.prompts.limit), tuple(config.prompts.required_columns),
                     int(config.prompts.seed), int(config.prompts.sample_seed))
    per_image = image_rows(rows, int(config.images_per_prompt))
    plan = [(r["prompt"], int(r["seed"])) for r in per_image]
    # Scorers first: a missing detector or weights file fails before any sampling. (Options of scorers not in
    # config.eval.scorers are unused: a config's defaults for scorers an override left out.)
    scorers = {name: build_scorer(name, dict(config.eval.options.get(name) or {})) for name in config.eval.scorers}

    sampled = sample_images(config, workdir, plan)  # indices of the images sampled now
    results: dict[str, Any] = {}
    if is_main_process():
        values, scored, summaries = {}, {}, {}
        (workdir / "scores").mkdir(exist_ok=True)
        for name, scorer in scorers.items():
            values[name], scored[name] = score_images(scorer, workdir / "images", per_image,
                                                      workdir / "scores" / f"{name}.npz", int(config.eval.batch_size),
                                                      fresh=sampled)
            summaries[name] = _plain(scorer.summarize(values[name], per_image))
        results = {"format": RESULTS_FORMAT, "task": config.task, "summary": summaries,
                   "settings": settings_record(config, scorers, per_image, command),
                   "counts": {"images": len(plan), "sampled_now": len(sampled), "scored_now": scored},
                   "wall_time_s": round(time.time() - start, 1)}
        write_text_atomic(workdir / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
        write_report(workdir, results, per_image, config)
        if verbose:
            print(f"{len(plan)} images ({len(sampled)} sampled now); results: {workdir / RESULTS_FILE}, report: "
                  f"{workdir / 'report.md'}")
    sync("varejax:eval_written")
    return results


def settings_record(config, scorers: Mapping[str, Any], per_image: Sequence[Mapping[str, Any]],
                    command: str | None) -> dict[str, Any]:
    """Every setting that determines the numbers of results.json."""
    import flax
    import jax

    import varejax
    from varejax.data.sources import source_record
    from varejax.sample.pipeline import model_hash, sampling_from_config

    models = {name: {"path": os.path.realpath(config.model[name]), "hash": model_hash(config.model[name])}
              for name in ("infinity", "vae", "t5")}
    deltas = [{"path": os.path.realpath(p), "file_sha256": source_record(p)["sha256"]} for p in config.model.delta]
    sampling = sampling_from_config(config.sampling)
    return {
        "models": models, "delta": deltas, "force_delta": bool(config.model.force_delta),
        "prompts": {**prompt_source_record(config.prompts.file),
                    "limit": int(config.prompts.limit), "rows": len(per_image) // max(1, config.images_per_prompt)},
        "sampling": {"guidance": list(sampling.guidance), "tau": list(sampling.tau), "top_k": sampling.top_k,
                     "top_p": sampling.top_p, "greedy": sampling.greedy, "negative_prompt": config.negative_prompt,
                     "images_per_prompt": int(config.images_per_prompt), "batch_size": int(config.batch_size),
                     "h_div_w": config.h_div_w, "pn": config.pn, "schedule": [list(s) for s in _schedule(config)]},
        "seeds": [int(r["seed"]) for r in per_image],
        "scorers": {name: _plain(s.settings()) for name, s in scorers.items()},
        "command": command if command is not None else shlex.join(["varejax", *sys.argv[1:]]),
        "config": json.loads(config.to_json_best_effort()),
        "versions": {"varejax": varejax.__version__, "jax": jax.__version__, "flax": flax.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "devices": f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s)",
    }


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars and arrays to Python numbers and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def flat_metrics(summary: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
    """Numeric leaves of a (nested) summary as {"a/b/c": value}; booleans and strings are left out."""
    out: dict[str, int | float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


# ---- report ----------------------------------------------------------------------------------------

def write_report(workdir, results: Mapping[str, Any], per_image: Sequence[Mapping[str, Any]], config) -> None:
    """report.md and report.html: settings, a table and a bar chart per scorer, an image grid with prompts."""
    from varejax.eval.report import Page, add_image_grid, add_metrics

    workdir = as_path(workdir)
    (workdir / "figures").mkdir(exist_ok=True)
    settings = results["settings"]
    page = Page(f"varejax eval: {results['task']}")
    models = ", ".join(f"{k} {v['hash']}" for k, v in settings["models"].items())
    prompts = settings["prompts"]
    deltas = f"; deltas {', '.join(d['path'] for d in settings['delta'])}" if settings["delta"] else ""
    source = (f"{prompts['file']} (sha256 {prompts['sha256'][:16]})" if "file" in prompts else
              f"TFDS {prompts.get('tfds')} split {prompts.get('split')}")
    page.text(f"{len(per_image)} images of {source}; models {models}{deltas}. Command: {settings['command']}")
    for name, summary in results["summary"].items():
        add_metrics(page, f"Scorer {name}", flat_metrics(summary), workdir, f"figures/{name}.png", title=name)
    count = min(int(config.report.grid_images), len(per_image))
    if count:
        from varejax import images as image_io

        picks = list(range(count))
        images = np.stack([image_io.load_uint8(workdir / "images" / f"{i:05d}.png") for i in picks])
        add_image_grid(page, "Images", images, [f"{i}: {per_image[i]['prompt']}" for i in picks], workdir,
                       "figures/grid.png", columns=int(config.report.columns), alt="sampled images")
        page.table(["image", "case", "seed", "prompt"],
                   [[i, per_image[i].get("case_number", ""), per_image[i]["seed"], per_image[i]["prompt"]]
                    for i in picks])
    page.heading("Settings")
    sampling = settings["sampling"]
    page.table(["setting", "value"], [
        *[[f"model.{k}", f"{v['path']} ({v['hash']})"] for k, v in settings["models"].items()],
        ["guidance", sampling["guidance"]], ["tau", sampling["tau"]], ["top_p", sampling["top_p"]],
        ["images per prompt", sampling["images_per_prompt"]],
        *[[f"scorer {k}", json.dumps(v, sort_keys=True)] for k, v in settings["scorers"].items()],
        ["versions", ", ".join(f"{k} {v}" for k, v in settings["versions"].items())]])
    page.write(workdir, "report")
