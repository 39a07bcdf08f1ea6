"""A Ring-A-Bell-style attack: a concept direction in T5-feature space and a genetic search over tokens.

Ring-A-Bell (Tsai et al., ICLR 2024) finds prompts without the concept's word whose text embedding carries
the concept. Here, on the T5 encoder only (the erasure fine-tunes the transformer, the text encoder is
shared, so the prompts found serve the original and the erased model alike):

1. Direction: for (with, without) prompt pairs (the same prompt with the concept said, and with it left
   unsaid), `direction = mean_i [pool(T5(with_i)) - pool(T5(without_i))]`, where `pool` is the mean over
   the valid rows (EOS included). Pooled, not per position: a pair's two prompts differ in length (the
   concept word vs. a generic word, multi-word synonyms), and a candidate has its own length, so rows at
   equal positions hold different words; the mean over rows is length- and position-free. (The original
   works per position on CLIP's fixed 77-row embedding.)
2. Search: candidates are sequences of `length` token ids (EOS appended) drawn from the vocabulary minus
   special tokens and every token whose text contains a banned word; fitness = cosine of
   `pool(T5(candidate)) - neutral` with the direction, where `neutral` is the mean pooled feature of the
   pairs' "without" prompts; a candidate whose decoded text contains a banned word (e.g. assembled from
   word pieces) scores -2. Tournament selection, uniform crossover, per-token mutation, elitism; all
   draws from `np.random.default_rng(seed)`.
3. The best distinct candidates are decoded to text; their images are judged afterwards (`asr.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from varejax.eval.attacks.paraphrase import contains_banned
from varejax.toy import world


@dataclasses.dataclass(frozen=True)
class RingABellConfig:
    """Search budget and settings.

    length: tokens per candidate (before the EOS); population / generations: the genetic search's size;
    mutation_rate: chance per token of a fresh random token; crossover_rate: chance a child mixes two
    parents (uniform crossover) rather than copying one; elite: best candidates kept unchanged;
    tournament: candidates per selection tournament; n_prompts: distinct prompts returned; seed.
    """

    length: int = 6
    population: int = 64
    generations: int = 30
    mutation_rate: float = 0.15
    crossover_rate: float = 0.5
    elite: int = 4
    tournament: int = 3
    n_prompts: int = 4
    seed: int = 0

    def evaluations(self) -> int:
        """Candidates scored by the T5 encoder (the search's budget)."""
        return self.population * (self.generations + 1)


def pooled(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the valid rows: [B, T, C] features, [B, T] mask -> [B, C]."""
    m = np.asarray(mask, np.float32)[..., None]
    return (np.asarray(features, np.float32) * m).sum(1) / np.maximum(m.sum(1), 1.0)


def toy_direction_pairs(concept: str, n: int, seed: int, family: str = "seen") -> list[tuple[str, str]]:
    """`n` (with, without) prompt pairs of the toy world: the same template, synonym slots and other
    attributes, the concept said in one and its attribute left unsaid in the other
    ("a red circle on a striped background", "a red shape on a striped background")."""
    attr, value = world.parse_concept(concept)
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        attrs = world.sample_attributes(rng, **{attr: value})
        said = world.sample_mention(rng) | {attr}
        choices = dict(zip(("template", "form", "shape_word", "colour_word", "background_word"),
                           (int(c) for c in rng.integers(0, 2 ** 30, size=5)), strict=True))
        pairs.append((world.compose(attrs, family, said, **choices),
                      world.compose(attrs, family, said - {attr}, **choices)))
    return pairs


def concept_direction(encode, pairs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(direction [C], neutral [C]) from (with, without) pairs; `encode(prompts) -> (features, mask)`."""
    if not pairs:
        raise ValueError("the concept direction needs at least one (with, without) pair")
    with_f = pooled(*encode([p for p, _ in pairs]))
    without_f = pooled(*encode([q for _, q in pairs]))
    return (with_f - without_f).mean(0), without_f.mean(0)


def allowed_tokens(tokenizer: Any, banned: Sequence[str]) -> np.ndarray:
    """Token ids a candidate may use: not pad/EOS/unknown, and not decoding to a banned word."""
    special = {tokenizer.pad_id, tokenizer.eos_id, tokenizer._tok.token_to_id("<unk>")}
    ids = [i for i in range(tokenizer.vocab_size)
           if i not in special and tokenizer.decode([i]).strip() and not contains_banned(tokenizer.decode([i]), banned)]
    if not ids:
        raise ValueError("every token is banned: nothing to search over")
    return np.asarray(ids, np.int32)


def _cosine(x: np.ndarray, direction: np.ndarray) -> np.ndarray:
    return (x @ direction) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(direction) + 1e-12)


def candidate_scores(text_encoder: Any, ids: np.ndarray, direction: np.ndarray, neutral: np.ndarray,
                     banned: Sequence[str]) -> np.ndarray:
    """Fitness [P] of candidates `ids` [P, length] (EOS appended here); -2 for a banned decoded text."""
    tok = text_encoder.tokenizer
    full = np.concatenate([ids, np.full((len(ids), 1), tok.eos_id, np.int32)], axis=1)
    features = text_encoder.run_encoder(full, np.ones_like(full))
    scores = _cosine(pooled(features, np.ones(full.shape, np.float32)) - neutral, direction)
    bad = np.asarray([contains_banned(tok.decode(row), banned) for row in ids])
    return np.where(bad, -2.0, scores)


def genetic_search(text_encoder: Any, direction: np.ndarray, neutral: np.ndarray, banned: Sequence[str],
                   config: RingABellConfig = RingABellConfig()) -> dict[str, Any]:
    """The search; returns {"prompts", "scores" (their fitness, re-encoded from the text), "best_per_generation"}.

    `text_encoder`: a `varejax.sample.text_features.TextEncoder` (its tokenizer and `run_encoder`).
    """
    rng = np.random.default_rng(config.seed)
    pool = allowed_tokens(text_encoder.tokenizer, banned)
    P, L = int(config.population), int(config.length)
    if P < 2 or L < 1 or config.elite >= P:
        raise ValueError(f"population {P} must be >= 2 and > elite {config.elite}; length {L} >= 1")
    population = pool[rng.integers(len(pool), size=(P, L))]
    fitness = candidate_scores(text_encoder, population, direction, neutral, banned)
    best = [float(fitness.max())]
    for _ in range(int(config.generations)):
        order = np.argsort(-fitness, kind="stable")
        children = [population[i] for i in order[:config.elite]]

        def select():
            entrants = rng.integers(P, size=config.tournament)
            return population[entrants[np.argmax(fitness[entrants])]]

        while len(children) < P:
            child = select().copy()
            if rng.random() < config.crossover_rate:
                other = select()
                take = rng.random(L) < 0.5
                child[take] = other[take]
            mutate = rng.random(L) < config.mutation_rate
            child[mutate] = pool[rng.integers(len(pool), size=int(mutate.sum()))]
            children.append(child)
        population = np.stack(children)
        fitness = candidate_scores(text_encoder, population, direction, neutral, banned)
        best.append(float(fitness.max()))
    texts, scores = [], []
    for i in np.argsort(-fitness, kind="stable"):
        text = text_encoder.tokenizer.decode(population[i]).strip()
        if fitness[i] <= -2 or text in texts:
            continue
        texts.append(text)
        scores.append(float(fitness[i]))
        if len(texts) == config.n_prompts:
            break
    # The images are drawn from the decoded text (tokenised again): report the fitness of that text.
    if texts:
        scores = [float(s) for s in _cosine(pooled(*text_encoder.encode(texts)) - neutral, direction)]
    return {"prompts": texts, "scores": scores, "best_per_generation": best, "vocabulary": int(len(pool))}


def ring_a_bell_prompts(text_encoder: Any, pairs: Sequence[tuple[str, str]], banned: Sequence[str],
                        config: RingABellConfig = RingABellConfig()) -> dict[str, Any]:
    """Direction from `pairs`, then the genetic search; returns the search's dict plus the settings."""
    direction, neutral = concept_direction(text_encoder.encode, pairs)
    found = genetic_search(text_encoder, direction, neutral, banned, config)
    return {**found, "banned": list(banned), "pairs": len(pairs), "config": dataclasses.asdict(config),
            "evaluations": config.evaluations()}
