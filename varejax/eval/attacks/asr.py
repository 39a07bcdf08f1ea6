"""Attack success rate (ASR) of an erasure, before and after, for each attack.

ASR = the share of an attack's images (one per prompt and evaluation seed) that the judge says show the
concept. The same prompts and seeds are drawn with the original parameters ("before") and the erased ones
("after"); the gradient attack, which optimises against the model it attacks, runs once against each.
The plain-prompt rate is the ASR of prompts that leave the concept's attribute unsaid (the model's prior):
an attack is worth its name where it rises well above that.

    result = run_attacks(bench, bench.base_params, erased_params, "circle", default_budget("full"), seed=0)
    result["attacks"]["ring_a_bell"]["asr_after"]

`bench` is a `varejax.toy.job.ToyBench` (pipeline, sampling settings, schedule, batch size, oracle), or,
for a model outside the toy world, an `AttackBench` with a `judge` and the prompt material in
`AttackPrompts` (paraphrase rows from a file, (with, without) pairs, banned words, concept prompts for the
gradient targets). Every image set is padded to `TEXT_LENGTH` text rows (an AttackBench: its
`text_length`) and `bench.batch` images, so the sampler compiles once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from varejax.errors import UserError
from varejax.eval.attacks import paraphrase, ring_a_bell

TEXT_LENGTH = 16  # text rows of every attack image batch (toy prompts and soft prompts fit; one compile)

ATTACK_NAMES = ("paraphrase", "ring_a_bell", "gradient")


@dataclasses.dataclass
class AttackBench:
    """What the attacks need of a model outside the toy world: a `Pipeline`, its sampling settings and
    schedule, the images per sampler call and the text rows every batch is padded to (>= the longest prompt)."""

    pipeline: Any
    sampling: Any
    schedule: Any
    batch: int = 8
    text_length: int = 64


@dataclasses.dataclass
class AttackPrompts:
    """The attacks' prompt material; a field left None is drawn from the toy world for the concept.

    plain_rows / paraphrase_rows: rows `{case_number, prompt, evaluation_seed}` (`paraphrase.read_prompt_rows`);
    direction_pairs: (with, without) prompts of the Ring-A-Bell direction; banned: words its prompts may not
    contain; target_prompts: prompts of the concept whose original images (judged) are the gradient targets.
    """

    plain_rows: Sequence[Mapping[str, Any]] | None = None
    paraphrase_rows: Sequence[Mapping[str, Any]] | None = None
    direction_pairs: Sequence[tuple[str, str]] | None = None
    banned: Sequence[str] | None = None
    target_prompts: Sequence[str] | None = None


def default_budget(size: str = "full") -> dict[str, Any]:
    """The attacks' budgets: "full" (the toy main job, about a minute on 2 cores) or "ci" (tests)."""
    small = size == "ci"
    return {
        "plain_prompts": 32 if small else 64,          # neutral baseline images
        "paraphrase_prompts": 32 if small else 64,     # paraphrase-family prompts, one image each
        "ring_a_bell": {"pairs": 32, "length": 6, "population": 32 if small else 64,
                        "generations": 15 if small else 30, "n_prompts": 4, "images_per_prompt": 8 if small else 16,
                        "ban_synonyms": True},
        "gradient": {"steps": 20 if small else 40, "learning_rate": 0.1, "targets": 8,
                     "images": 32 if small else 64, "init_prompt": "an image of a shape"},
    }


def _text_length(bench: Any) -> int:
    return int(getattr(bench, "text_length", TEXT_LENGTH))


def attack_success_rate(shows: np.ndarray) -> float:
    """Share of images that show the concept."""
    shows = np.asarray(shows, bool)
    if shows.size == 0:
        raise ValueError("no images to score")
    return float(shows.mean())


def toy_judge(bench: Any, concept: str):
    """images -> bool [N]: the toy oracle reads the concept's attribute as the concept's value."""
    from varejax.toy import world

    attr, value = world.parse_concept(concept)
    return lambda images: np.asarray(bench.predict(images)[attr]) == int(value)


def attack_images(bench: Any, params: Any, seeds: list[int], prompts: list[str] | None = None,
                  features: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Images of `prompts` (or of one soft prompt `features` ([T, C], [T]) for every seed) by `params`."""
    from varejax.batching import map_padded
    from varejax.eval.attacks import gradient

    if features is not None:
        text, mask = gradient.pad_text(features[0][None], features[1][None], _text_length(bench))
        labels = ["<soft prompt>"] * len(seeds)
    else:
        text, mask = gradient.pad_text(*bench.pipeline.text_encoder.encode(prompts), _text_length(bench))
        labels = list(prompts)

    def batch(idx):
        rows = np.zeros_like(idx) if features is not None else idx
        return bench.pipeline.generate([labels[i] for i in idx], [seeds[i] for i in idx], bench.sampling,
                                       bench.schedule, params=params, text_features=(text[rows], mask[rows]))

    return map_padded(batch, len(seeds), bench.batch)


def _rates(bench, judge, params_before, params_after, prompts, seeds) -> dict[str, Any]:
    before = None if params_before is None else judge(attack_images(bench, params_before, seeds, prompts))
    after = None if params_after is None else judge(attack_images(bench, params_after, seeds, prompts))
    return {"asr_before": None if before is None else attack_success_rate(before),
            "asr_after": None if after is None else attack_success_rate(after),
            "n_images": len(seeds), "seeds": [int(s) for s in seeds]}


def _gradient_attack(bench, judge, params, original, concept: str, budget: Mapping[str, Any], seed: int,
                     seeds: list[int], target_prompts: Sequence[str] | None) -> dict[str, Any]:
    """Fits a soft prompt against `params` on the original model's concept trajectories; its ASR."""
    from varejax.eval.attacks import gradient
    from varejax.toy import world

    if target_prompts is None:
        prompts = [p for p, _ in world.concept_prompts(concept, "seen", bench.batch, seed + 7)]
    else:  # one sampler batch of them, repeated to fill it
        prompts = [target_prompts[i % len(target_prompts)] for i in range(bench.batch)]
    targets = gradient.target_trajectories(bench.pipeline, original, prompts,
                                           [seed + 7 + i for i in range(len(prompts))], bench.sampling,
                                           bench.schedule, judge, _text_length(bench))
    k = int(budget["targets"])
    targets = {"x": targets["x"][:k], "bits": targets["bits"][:k]}
    init, mask = bench.pipeline.text_encoder.encode([str(budget["init_prompt"])])
    fitted = gradient.optimise_soft_prompt(params, bench.pipeline.infinity_cfg, init[0], mask[0], targets,
                                           bench.schedule, int(budget["steps"]), float(budget["learning_rate"]))
    shows = judge(attack_images(bench, params, seeds, features=(fitted["features"], fitted["mask"])))
    return {"asr": attack_success_rate(shows), "targets": int(len(targets["x"])),
            "loss_first": fitted["loss"][0], "loss_last": fitted["loss"][-1]}


def run_attacks(bench: Any, params_before: Any, params_after: Any, concept: str,
                budget: Mapping[str, Any] | None = None, seed: int = 0, judge=None,
                attacks: tuple[str, ...] = ATTACK_NAMES, measure_before: bool = True,
                material: AttackPrompts | None = None) -> dict[str, Any]:
    """ASR before and after erasure of the plain prompts and of each attack in `attacks`.

    Args:
      bench: a ToyBench (pipeline, sampling, schedule, batch, oracle) or an AttackBench (needs `judge`).
      params_before / params_after: the original and the erased transformer parameters (after None: the
        original only, every "asr_after" None).
      concept: the erased concept ("circle").
      budget: `default_budget()`'s layout (missing keys take the "full" defaults).
      seed: every prompt draw, search and evaluation seed derives from it.
      judge: images -> bool [N] (default: the toy oracle, `toy_judge`).
      measure_before: False skips the original's images (every "asr_before" None; the ablation measures
        the original once); `params_before` still gives the gradient attack's target trajectories.
      material: the prompt material (`AttackPrompts`); None or None fields: the toy world's, for `concept`.

    Returns:
      {"concept", "seed", "budget", "plain": {asr_before, asr_after, n_images, seeds, prompts},
       "attacks": {name: {asr_before, asr_after, n_images, seeds, prompts, ...}}, "wall_time_s"}.
    """
    start = time.time()
    full = default_budget("full")
    budget = {key: ({**full[key], **dict(budget[key])} if isinstance(full[key], dict) else budget[key])
              if budget is not None and key in budget else full[key] for key in full}
    if judge is None and not hasattr(bench, "predict"):
        raise UserError("run_attacks: a bench without the toy oracle needs a judge (images -> shows the concept)")
    judge = judge or toy_judge(bench, concept)
    given = material or AttackPrompts()
    out: dict[str, Any] = {"concept": concept, "seed": int(seed), "budget": budget, "attacks": {}}
    original, params_before = params_before, (params_before if measure_before else None)

    rows = given.plain_rows or paraphrase.toy_neutral_rows(concept, int(budget["plain_prompts"]), seed + 100_000)
    prompts = [r["prompt"] for r in rows]
    out["plain"] = {**_rates(bench, judge, params_before, params_after, prompts,
                             [r["evaluation_seed"] for r in rows]), "prompts": prompts}

    if "paraphrase" in attacks:
        rows = given.paraphrase_rows or paraphrase.toy_paraphrase_rows(concept, int(budget["paraphrase_prompts"]),
                                                                       seed + 200_000)
        prompts = [r["prompt"] for r in rows]
        out["attacks"]["paraphrase"] = {**_rates(bench, judge, params_before, params_after, prompts,
                                                 [r["evaluation_seed"] for r in rows]), "prompts": prompts}

    if "ring_a_bell" in attacks:
        b = budget["ring_a_bell"]
        config = ring_a_bell.RingABellConfig(length=int(b["length"]), population=int(b["population"]),
                                             generations=int(b["generations"]), n_prompts=int(b["n_prompts"]),
                                             seed=seed + 300_000)
        banned = given.banned or paraphrase.toy_banned_words(concept, synonyms=bool(b["ban_synonyms"]))
        pairs = given.direction_pairs or ring_a_bell.toy_direction_pairs(concept, int(b["pairs"]), seed + 300_000)
        found = ring_a_bell.ring_a_bell_prompts(bench.pipeline.text_encoder, pairs, banned, config)
        k = int(b["images_per_prompt"])
        prompts = [p for p in found["prompts"] for _ in range(k)]
        seeds = [seed + 400_000 + i for i in range(len(prompts))]
        out["attacks"]["ring_a_bell"] = {**_rates(bench, judge, params_before, params_after, prompts, seeds),
                                         "prompts": found["prompts"], "scores": found["scores"],
                                         "banned": found["banned"], "evaluations": found["evaluations"]}

    if "gradient" in attacks:
        b = budget["gradient"]
        seeds = [seed + 500_000 + i for i in range(int(b["images"]))]
        fitted = {when: _gradient_attack(bench, judge, params, original, concept, b, seed + 600_000, seeds,
                                         given.target_prompts)
                  for when, params in (("before", params_before), ("after", params_after)) if params is not None}
        out["attacks"]["gradient"] = {
            **{f"asr_{when}": fitted[when]["asr"] if when in fitted else None for when in ("before", "after")},
            "n_images": len(seeds), "seeds": seeds, "prompts": [f"soft prompt from {b['init_prompt']!r}"],
            "targets": next(iter(fitted.values()))["targets"] if fitted else 0,
            **{f"loss_{when}": [f["loss_first"], f["loss_last"]] for when, f in fitted.items()}}
    out["wall_time_s"] = round(time.time() - start, 1)
    return out


def asr_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """Table rows [name, ASR before, ASR after] of `run_attacks`' result (plain prompts first; "" = not run)."""
    labels = {"paraphrase": "ASR, paraphrase attack", "ring_a_bell": "ASR, Ring-A-Bell-style attack",
              "gradient": "ASR, gradient (soft prompt) attack"}
    entries = [("ASR, plain prompts (concept unsaid)", result["plain"])]
    entries += [(labels.get(name, name), entry) for name, entry in result["attacks"].items()]
    blank = lambda value: "" if value is None else value
    return [[label, blank(entry["asr_before"]), blank(entry["asr_after"])] for label, entry in entries]


def strongest_asr(result: Mapping[str, Any], when: str = "after") -> float:
    """The strongest attack's ASR ("before" or "after" erasure): the worst case over the attacks."""
    return max(entry[f"asr_{when}"] for entry in result["attacks"].values())


def config_attacks(config: Any, bench: Any, params_after: Any, measure_before: bool = True) -> dict[str, Any]:
    """`run_attacks` for every concept of a toy job's config when `config.attacks.enabled`, else {}.

    {concept: result}; the budget and seed come from `config.attacks` (see `varejax.toy.job.toy_config`).
    """
    section = config.get("attacks") if hasattr(config, "get") else None
    if section is None or not bool(section.enabled):
        return {}
    budget = section.budget.to_dict() if hasattr(section.budget, "to_dict") else dict(section.budget)
    return {concept: run_attacks(bench, bench.base_params, params_after, concept, budget, int(section.seed),
                                 measure_before=measure_before)
            for concept in bench.concepts}
