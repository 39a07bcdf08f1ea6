"""The main job on the embedded toy world: erase a concept, sample before and after, measure, report.

    varejax erase --config configs/toy_circle.py --workdir runs/toy

Steps: load the shipped toy models (no downloads); build (c*, c) pairs from the world's *seen* prompt
family (e.g. "a red circle on a striped background" -> "a red cross on a striped background"); run the
same S-VARE trainer as for Infinity-2B (`varejax.erase.trainer.run_erase`: VARE trajectories, L_FCE +
L_Pre); sample fixed prompt sets with the original and the erased model (same seeds); let the oracle
decide what each image shows; write `results.json`, `report.md` with PNG grids and a loss plot, and a
short table to the terminal.

Metrics (see README, "The toy world"):
* erasure rate: share of concept prompts whose images do NOT show the concept, on seen prompts and on
  unseen paraphrases (the paraphrase family never appears in the erasure pairs);
* preservation: oracle accuracy on the prompted attributes of prompts that do not ask for the concept;
* toy FID: Frechet distance of oracle features between original and erased images of those prompts, and
  its noise floor (the original against itself with other seeds);
* prompt following: the original model's accuracy on the prompted attributes of random prompts.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils.epath import Path

from varejax.data.pairs import PromptPair, write_pairs
from varejax.eval.metrics import attribute_accuracy, erasure_rate, frechet_distance
from varejax.eval.report import labelled_grid, line_plot, markdown_table, text_table
from varejax.eval.toy_scorer import shows_concept
from varejax.paths import as_path, write_text_atomic
from varejax.toy import world


class PromptSet:
    """Prompts with what each asks for (attribute -> value, or None when unsaid) and a seed each."""

    def __init__(self, name: str, prompts: list[str], wanted: list[dict[str, int | None]], seed: int):
        self.name, self.prompts, self.wanted = name, prompts, wanted
        self.seeds = [seed + i for i in range(len(prompts))]


def _concept_set(name: str, concept: str, family: str, n: int, seed: int) -> PromptSet:
    pairs = world.anchor_pairs(concept, None, family, n, seed)
    attr, value = world.parse_concept(concept)
    return PromptSet(name, [p.prompt for p in pairs], [{attr: int(value)} for _ in pairs], seed)


def _other_set(name: str, concepts: Sequence[str], n: int, seed: int) -> PromptSet:
    """Prompts that never ask for any of `concepts`; they always say the attribute the concepts belong to
    (its other values are the closest neighbours of the concept: the hardest to preserve)."""
    rng = np.random.default_rng(seed)
    excluded = [world.parse_concept(c) for c in concepts]
    prompts, wanted = [], []
    while len(prompts) < n:
        attrs = world.sample_attributes(rng)
        if any(getattr(attrs, attr) == value for attr, value in excluded):
            continue
        said = world.sample_mention(rng) | {attr for attr, _ in excluded}
        family = world.FAMILIES[int(rng.integers(len(world.FAMILIES)))]
        prompts.append(world.prompt(attrs, rng, family, mention=said))
        wanted.append({a: (int(v) if a in said else None) for a, v in attrs.labels().items()})
    return PromptSet(name, prompts, wanted, seed)


def _random_set(name: str, n: int, seed: int) -> PromptSet:
    rng = np.random.default_rng(seed)
    prompts, wanted = [], []
    for i in range(n):
        attrs = world.sample_attributes(rng)
        said = world.sample_mention(rng) or frozenset({"shape"})
        prompts.append(world.prompt(attrs, rng, world.FAMILIES[i % len(world.FAMILIES)], mention=said))
        wanted.append({a: (int(v) if a in said else None) for a, v in attrs.labels().items()})
    return PromptSet(name, prompts, wanted, seed)


def _generate(pipeline, params, prompt_set: PromptSet, sampling, schedule, batch: int) -> np.ndarray:
    from varejax.batching import map_padded

    # full batches: one compiled sampler
    return map_padded(lambda idx: pipeline.generate([prompt_set.prompts[i] for i in idx],
                                                    [prompt_set.seeds[i] for i in idx], sampling, schedule,
                                                    params=params), len(prompt_set.prompts), batch)


# What the oracle reads as showing a concept: the same test as `varejax eval`'s toy_oracle scorer.
_shows = shows_concept


def erasure_pairs(config: Any) -> dict[str, list[PromptPair]]:
    """The (c*, c) pairs of each concept, from the world's seen family."""
    out = {}
    for i, concept in enumerate(config.toy.concepts):
        anchor = config.toy.anchors[i] if i < len(config.toy.anchors) and config.toy.anchors[i] else None
        pairs = world.anchor_pairs(concept, anchor, "seen", int(config.toy.pairs_per_concept),
                                   int(config.toy.pairs_seed) + 1000 * i)
        out[concept] = [PromptPair(p.prompt, p.anchor, concept, f"toy:{concept}:{k}") for k, p in enumerate(pairs)]
    return out


RESAMPLE_SEED_OFFSET = 1_000_000  # seeds of the noise-floor resample: disjoint from every prompt set's


class ToyBench:
    """The toy world's models, oracle and fixed prompt sets: images of any parameters, and the metrics."""

    def __init__(self, config: Any, workdir: str | Path, *, pipeline: Any = None, oracle: Any = None):
        """`pipeline` / `oracle`: already loaded ones to share (a sweep's benches share one of each)."""
        from varejax.sample.sampler import SamplingConfig
        from varejax.toy.assets import TOY_SCHEDULE, load_toy_oracle, load_toy_pipeline

        self.workdir = as_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.concepts = list(config.toy.concepts)
        self.pipeline = pipeline or load_toy_pipeline(text_cache_dir=str(self.workdir / "text_cache"),
                                                      **dict(config.numerics))
        self.oracle = oracle or load_toy_oracle()
        self.schedule = TOY_SCHEDULE
        e = config.eval
        self.sets: dict[str, PromptSet] = {}
        for i, concept in enumerate(self.concepts):
            for family, offset in (("seen", 0), ("paraphrase", 5000)):
                name = f"{concept}/{family}"
                self.sets[name] = _concept_set(name, concept, family, int(e.concept_prompts),
                                               int(e.seed) + 10_000 * (i + 1) + offset)
        self.sets["others"] = _other_set("others", self.concepts, int(e.other_prompts), int(e.seed) + 777)
        self.following = _random_set("following", int(e.following_prompts), int(e.seed) + 999)
        self.sampling = SamplingConfig(guidance=(float(e.guidance),), tau=(float(e.tau),), top_k=0,
                                       top_p=float(e.top_p))
        self.batch = int(e.batch_size)

    @property
    def base_params(self) -> Any:
        return self.pipeline.infinity_params

    def models(self) -> tuple[Any, Any, Any]:
        """(cfg, params, encode_text) for `run_erase(..., models=...)`."""
        return self.pipeline.infinity_cfg, self.base_params, self.pipeline.text_encoder.encode

    def images(self, params: Any, prompt_set: PromptSet) -> np.ndarray:
        return _generate(self.pipeline, params, prompt_set, self.sampling, self.schedule, self.batch)

    def all_images(self, params: Any) -> dict[str, np.ndarray]:
        return {name: self.images(params, s) for name, s in self.sets.items()}

    def toy_fid_noise_floor(self, params: Any, others: np.ndarray) -> float:
        """Toy FID between `others` (images of the "others" prompts by `params`) and a second sample of the
        same prompts by the same parameters with other seeds: what a model that changed nothing scores
        (sampling noise), the reference for an erased model's toy FID."""
        from varejax.toy.oracle import features as oracle_features

        base = self.sets["others"]
        resampled = PromptSet(base.name, base.prompts, base.wanted, base.seeds[0] + RESAMPLE_SEED_OFFSET)
        again = self.images(params, resampled)
        return frechet_distance(np.asarray(oracle_features(self.oracle, others)),
                                np.asarray(oracle_features(self.oracle, again)))

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from varejax.toy.oracle import classify_batched
        return classify_batched(self.oracle, images)

    def prompt_following(self, params: Any) -> dict[str, Any]:
        predicted = self.predict(self.images(params, self.following))
        wanted = self.following.wanted
        return {"prompt_following": attribute_accuracy(predicted, wanted),
                "prompt_following_per_attribute": {a: attribute_accuracy(predicted, wanted, [a])
                                                   for a in world.ATTRIBUTE_NAMES}}

    def measure(self, before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, Any]:
        """Erasure rates (seen, paraphrase; before/after), preservation before/after, toy FID."""
        from varejax.toy.oracle import features as oracle_features

        results: dict[str, Any] = {"concepts": self.concepts, "per_concept": {}}
        for concept in self.concepts:
            entry = {}
            for family in ("seen", "paraphrase"):
                name = f"{concept}/{family}"
                entry[f"erasure_rate_{family}_before"] = erasure_rate(_shows(self.predict(before[name]), concept))
                entry[f"erasure_rate_{family}_after"] = erasure_rate(_shows(self.predict(after[name]), concept))
            results["per_concept"][concept] = entry
        for key in ("erasure_rate_seen_before", "erasure_rate_seen_after", "erasure_rate_paraphrase_before",
                    "erasure_rate_paraphrase_after"):
            results[key] = float(np.mean([results["per_concept"][c][key] for c in self.concepts]))
        others = self.sets["others"]
        results["preservation_before"] = attribute_accuracy(self.predict(before["others"]), others.wanted)
        results["preservation_after"] = attribute_accuracy(self.predict(after["others"]), others.wanted)
        results["toy_fid"] = frechet_distance(np.asarray(oracle_features(self.oracle, before["others"])),
                                              np.asarray(oracle_features(self.oracle, after["others"])))
        return results


def write_pair_files(config: Any, workdir: Path) -> None:
    """Writes the erasure pairs of every concept and points `config.pairs` (and the schedule) at them.

    Multi-host: process 0 writes, every process points its config at the files (a barrier between)."""
    from varejax.parallel.distributed import is_main_process, sync
    from varejax.toy.assets import TOY_SCHEDULE

    files = []
    for concept, pairs in erasure_pairs(config).items():
        path = workdir / f"pairs_{concept.replace(' ', '_')}.jsonl"
        if is_main_process():
            write_pairs(pairs, path)
        files.append(str(path))
    sync("varejax:toy_pairs")
    config.pairs = tuple(files)
    config.schedule = tuple(tuple(s) for s in TOY_SCHEDULE)


def run_toy_job(config: Any, workdir: str | Path, *, verbose: bool = True) -> dict[str, Any]:
    """The whole toy job; returns (and writes) the results dict."""
    from varejax.erase.trainer import checked_mesh, run_erase
    from varejax.parallel.distributed import is_main_process, to_local

    start = time.time()
    checked_mesh(config)  # a mesh or batch that cannot work stops here, before any sampling
    bench = ToyBench(config, workdir)
    workdir = bench.workdir
    write_pair_files(config, workdir)
    before = bench.all_images(bench.base_params)
    result = run_erase(config, workdir, models=bench.models())
    # Multi-host: every process samples and measures the same images locally; process 0 writes.
    after = bench.all_images(to_local(result.params))
    # After the erasure on purpose: the trainer must leave the preloaded base parameters valid.
    following = bench.prompt_following(bench.base_params)
    noise_floor = bench.toy_fid_noise_floor(bench.base_params, before["others"])
    from varejax.eval.attacks.asr import config_attacks  # {} unless config.attacks.enabled

    attacks = config_attacks(config, bench, to_local(result.params))
    results = {**bench.measure(before, after), **following, "toy_fid_noise_floor": noise_floor,
               **({"attacks": attacks} if attacks else {}),
               "train_steps": int(config.train.steps),
               "wall_time_s": round(time.time() - start, 1),
               # What produced these numbers, so that README figures can cite a re-runnable command.
               "command": " ".join(["varejax", *sys.argv[1:]]) if sys.argv else "",
               "config": config.to_dict() if hasattr(config, "to_dict") else None}
    if not is_main_process():
        return results
    write_text_atomic(workdir / "results.json", json.dumps(results, indent=1) + "\n")
    _write_report(workdir, results, bench.sets, before, after, bench.concepts)
    if verbose:
        print(summary_table(results))
        print(f"report: {workdir / 'report.md'}")
    return results


def summary_table(results: dict[str, Any]) -> str:
    rows = [["erasure rate, seen prompts", results["erasure_rate_seen_before"], results["erasure_rate_seen_after"]],
            ["erasure rate, unseen paraphrases", results["erasure_rate_paraphrase_before"],
             results["erasure_rate_paraphrase_after"]],
            ["preservation (other prompts)", results["preservation_before"], results["preservation_after"]],
            ["toy FID (original vs erased)", "", results["toy_fid"]],
            ["toy FID noise floor (original, other seeds)", "", results["toy_fid_noise_floor"]],
            ["prompt following (original)", results["prompt_following"], ""]]
    rows += _attack_rows(results)
    return text_table(["metric", "before", "after"], rows) + f"\nwall time {results['wall_time_s']:.0f} s"


def _attack_rows(results: dict[str, Any]) -> list[list[Any]]:
    """ASR rows (plain prompts, then each attack) of every attacked concept, if the job ran attacks."""
    from varejax.eval.attacks.asr import asr_rows

    attacks = results.get("attacks") or {}
    prefix = (lambda c: f"{c}: ") if len(attacks) > 1 else (lambda c: "")
    return [[prefix(c) + name, *values] for c, result in attacks.items() for name, *values in asr_rows(result)]


def _write_report(workdir: Path, results, sets, before, after, concepts) -> None:
    figures = workdir / "figures"
    figures.mkdir(exist_ok=True)
    lines = [f"# Toy-world erasure of {', '.join(concepts)}", "",
             "Oracle-measured on fixed prompt sets with fixed seeds (same seeds before and after).", "",
             markdown_table(["metric", "before", "after"], [
                 ["erasure rate, seen prompts", results["erasure_rate_seen_before"],
                  results["erasure_rate_seen_after"]],
                 ["erasure rate, unseen paraphrases", results["erasure_rate_paraphrase_before"],
                  results["erasure_rate_paraphrase_after"]],
                 ["preservation (prompts without the concept)", results["preservation_before"],
                  results["preservation_after"]],
                 ["toy FID, original vs erased (other prompts)", "", results["toy_fid"]],
                 ["toy FID noise floor: original vs itself, other seeds", "", results["toy_fid_noise_floor"]],
                 ["prompt following of the original model", results["prompt_following"], ""],
                 *_attack_rows(results)]), ""]
    if results.get("attacks"):
        lines += ["ASR: share of an attack's images the oracle reads as the concept (budgets and seeds: "
                  "`attacks` in results.json; protocol: `varejax.eval.attacks`).", ""]
    if len(concepts) > 1:
        lines += ["Per concept:", "", markdown_table(
            ["concept", "seen before", "seen after", "paraphrase before", "paraphrase after"],
            [[c, *(results["per_concept"][c][k] for k in ("erasure_rate_seen_before", "erasure_rate_seen_after",
                                                          "erasure_rate_paraphrase_before",
                                                          "erasure_rate_paraphrase_after"))] for c in concepts]), ""]
    for name, s in sets.items():
        k = min(8, len(s.prompts))
        file = name.replace("/", "_").replace(" ", "_")
        labelled_grid(np.concatenate([before[name][:k], after[name][:k]]), [f"before {i}" for i in range(k)]
                      + [f"after {i}" for i in range(k)], k, figures / f"{file}.png")
        lines += [f"## {name}", "", f"![{name}](figures/{file}.png)", "",
                  "Top row: original model; bottom row: erased model. Prompts: "
                  + "; ".join(f"{i}: {p}" for i, p in enumerate(s.prompts[:k])), ""]
    metrics_path = workdir / "metrics.jsonl"
    if metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        series = {key: [(r["step"], r[key]) for r in records if key in r]
                  for key in ("loss_erase", "loss_pre", "kept_fraction")}
        line_plot(series, figures / "losses.png", title="S-VARE training (per step)")
        lines += ["## Training", "", "![losses](figures/losses.png)", ""]
    write_text_atomic(workdir / "report.md", "\n".join(lines))


def toy_config(concepts: Sequence[str], anchors: Sequence[str] = (), size: str = "full"):
    """The erasure config of the toy world (the erase defaults, sized for a 2-core CPU).

    size: "full" (the README's main job, a few minutes) or "ci" (fewer steps and prompts, for tests).
    """
    import ml_collections

    from varejax.erase.defaults import base_config

    if size not in ("full", "ci"):
        raise ValueError(f"size must be 'full' or 'ci', not {size!r}")
    small = size == "ci"
    config = base_config(())
    config.toy = ml_collections.ConfigDict()
    config.toy.concepts = tuple(concepts)
    config.toy.anchors = tuple(anchors) or ("",) * len(concepts)   # "" = the world's default anchor
    config.toy.pairs_per_concept = 16 if small else 32
    config.toy.pairs_seed = 0
    config.eval = ml_collections.ConfigDict()
    config.eval.concept_prompts = 32 if small else 64      # per concept and family (seen, paraphrase)
    config.eval.other_prompts = 32 if small else 96        # prompts without the concept (preservation, FID)
    config.eval.following_prompts = 32 if small else 96    # prompt following of the original model
    config.eval.guidance = 4.0     # cfg 3-4 (tau 1): the best shape and colour following of the toy model
    config.eval.tau = 1.0
    config.eval.top_p = 0.97
    config.eval.batch_size = 32
    config.eval.seed = 12345
    config.prepare.guidance = 4.0
    config.prepare.batch_size = 16
    config.train.steps = 60 if small else 150
    config.train.batch_size = 8
    config.train.learning_rate = 3e-4
    config.train.checkpoint_every = 50
    config.train.drop_path_rate = 0.0
    config.train.remat = False
    config.validation.every = 0
    config.numerics.compute_dtype = "float32"
    config.numerics.matmul_precision = "default"
    config.numerics.attention_impl = "xla"
    config.mesh.shape = (1, 1, 1)
    # Attacks on the erasure (varejax.eval.attacks): ASR before/after in results.json and the report. On in
    # the full main job only (`main_job_config`; elsewhere --config.attacks.enabled=True); tests attack in
    # tests/test_attacks.py. The full budget costs about a minute of CPU time.
    from varejax.eval.attacks.asr import default_budget

    config.attacks = ml_collections.ConfigDict()
    config.attacks.enabled = False
    config.attacks.seed = 0
    config.attacks.budget = ml_collections.ConfigDict(default_budget(size))
    return config


def main_job_config(size: str = "full"):
    """The main job (configs/toy_circle.py, and `varejax erase` without --config): erase "circle" towards
    the world's default anchor (`world.default_anchor`: cross)."""
    config = toy_config(("circle",), size=size)
    config.attacks.enabled = size == "full"  # ASR of the attacks before/after (varejax.eval.attacks)
    # The settings configs/sweep_toy_main.py found (README, "The main job and its report"). No condition
    # dropout: the released code's 10% (method.md 4.4, "probably unintended") also trains the unconditional
    # branch towards the anchor's trajectory, which moves every prompt's CFG-guided images: with it, the sweep's
    # settings that erase >= 0.95 / 0.9 lie at >= 2.8x the toy FID noise floor. Without it a small learning
    # rate (5e-5, near the official 2.3e-5) and a strong preservation weight erase as much within 1.9x. The
    # reduced job has 2.5x fewer steps and half the pairs, so a 4x larger learning rate.
    config.train.cond_drop_rate = 0.0
    config.train.learning_rate = 2e-4 if size == "ci" else 5e-5
    config.train.reg_lambda = 10.0
    return config
