"""Template-based prompt-pair generator: many (c*, c) pairs that differ only in the concept.

A concept is described by `PairRecipe`: phrases that carry the concept and the phrases that replace
it in the anchor, subjects/settings/styles to vary the rest of the sentence, and sentence templates
with the slots `{concept}`, `{subject}`, `{setting}`. Each pair fills the same template and slots for
both prompts, swapping only the concept phrase, which is what VARE's teacher forcing needs: the
anchor trajectory should differ from the concept image only where the concept is.

    from varejax.data.templates import RECIPES, generate_pairs
    pairs = generate_pairs(RECIPES["church"], n=50, seed=0)
"""

from __future__ import annotations

import dataclasses
import random

from varejax.data.pairs import PromptPair


@dataclasses.dataclass(frozen=True)
class PairRecipe:
    """How to write pairs for one concept (see module docstring)."""

    concept: str
    concept_phrases: tuple[str, ...]
    anchor_phrases: tuple[str, ...]
    templates: tuple[str, ...]
    subjects: tuple[str, ...] = ("",)
    settings: tuple[str, ...] = ("",)


def _fill(template: str, **slots: str) -> str:
    text = template.format(**slots)
    return " ".join(text.split()).replace(" ,", ",")


def generate_pairs(recipe: PairRecipe, n: int = 50, seed: int = 0) -> list[PromptPair]:
    """`n` distinct pairs, deterministic for a seed. Raises if the recipe cannot make `n` distinct ones."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs: list[PromptPair] = []
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 200 * n:
            raise ValueError(f"recipe {recipe.concept!r} yields only {len(pairs)} distinct pairs, {n} requested")
        index = rng.randrange(len(recipe.concept_phrases))
        slots = {"subject": rng.choice(recipe.subjects), "setting": rng.choice(recipe.settings)}
        template = rng.choice(recipe.templates)
        target = _fill(template, concept=recipe.concept_phrases[index], **slots)
        anchor = _fill(template, concept=recipe.anchor_phrases[index % len(recipe.anchor_phrases)], **slots)
        if target in seen or target == anchor:
            continue
        seen.add(target)
        pairs.append(PromptPair(target, anchor, recipe.concept, f"template:{recipe.concept}:{len(pairs)}"))
    return pairs


RECIPES: dict[str, PairRecipe] = {
    "nudity": PairRecipe(
        concept="nudity",
        concept_phrases=("a nude woman", "a naked man", "a nude model", "a naked woman", "a nude person",
                         "a topless woman", "a naked couple"),
        anchor_phrases=("a woman in a summer dress", "a man in a linen suit", "a model in an evening gown",
                        "a woman in a wool coat", "a person in casual clothes", "a woman in a blouse",
                        "a couple in matching sweaters"),
        templates=("{concept} {setting}", "a photo of {concept} {setting}", "an oil painting of {concept} {setting}",
                   "{concept} {setting}, soft light", "a portrait of {concept} {setting}",
                   "a black and white photograph of {concept} {setting}"),
        settings=("on a beach", "in a forest", "by a window", "in a bedroom", "at sunset", "in a studio",
                  "next to a river", "on a balcony", "in a garden", "in the rain"),
    ),
    "church": PairRecipe(
        concept="church",
        concept_phrases=("a church", "an old church", "a small chapel", "a gothic cathedral", "a village church",
                         "a stone church with a steeple"),
        anchor_phrases=("a house", "an old house", "a small cabin", "a large mansion", "a village house",
                        "a stone house with a chimney"),
        templates=("a photo of {concept} {setting}", "{concept} {setting}", "a painting of {concept} {setting}",
                   "{concept} {setting}, wide angle", "a drawing of {concept} {setting}"),
        settings=("in a snowy landscape", "on a hill", "at dusk", "in a small town", "by the sea",
                  "surrounded by trees", "under a cloudy sky", "in autumn", "at night", "in a valley"),
    ),
    "van_gogh": PairRecipe(
        concept="Van Gogh style",
        concept_phrases=("in the style of Van Gogh", "painted by Vincent van Gogh", "in Van Gogh's style",
                         "by Van Gogh"),
        anchor_phrases=("in a realistic style", "as a photograph", "in a plain style", "as a simple drawing"),
        templates=("{subject} {concept}", "{subject} {setting} {concept}", "a painting of {subject} {concept}",
                   "{subject} {setting}, {concept}"),
        subjects=("a starry night over a village", "a field of sunflowers", "a cafe terrace at night",
                  "a wheat field with cypresses", "a bedroom with a wooden bed", "a self portrait of a man",
                  "irises in a garden", "a bridge over a canal", "an orchard in bloom", "a vase of flowers",
                  "a harbour with boats", "a country road"),
        settings=("at night", "in summer", "at dawn", "under a swirling sky", ""),
    ),
}
