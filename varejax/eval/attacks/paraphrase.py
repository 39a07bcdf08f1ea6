"""Paraphrase attack sets: prompts that describe a concept without naming it.

A paraphrase set is a list of rows `{case_number, prompt, evaluation_seed}` (the schema of the usual
erasure benchmark prompt files, e.g. I2P / UnlearnDiffAtk CSVs), one image per row.

* Toy world: `toy_paraphrase_rows(concept, n, seed)` draws prompts of the world's *paraphrase* family
  that ask for the concept through a synonym ("a crimson disk with stripes behind it" for "circle");
  the erasure pairs are built from the *seen* family only, so none of these prompts was trained on.
  Every row is checked not to contain a banned word (`toy_banned_words`).
* Real models: `read_prompt_rows(path)` reads a CSV (header row) or JSONL file with those columns;
  `write_prompt_rows` writes one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from varejax.errors import UserError
from varejax.paths import as_path, write_text_atomic
from varejax.toy import world

ROW_FIELDS = ("case_number", "prompt", "evaluation_seed")


def toy_banned_words(concept: str, synonyms: bool = True) -> tuple[str, ...]:
    """The words an attack prompt on `concept` may not contain.

    Always the concept's name ("circle"); with `synonyms`, also every word of its synonyms in both prompt
    families that names no other value and is not a template or generic word ("disk", "disc", "round":
    "form" is left out, it also appears in "three-sided form" and as the generic "form").
    """
    attr, value = world.parse_concept(concept)
    banned = {world.value_name(value)}
    if synonyms:
        shared = {"a", "an"}
        for fam in world.PROMPT_FAMILIES.values():
            shared.update(w for g in fam.generic for w in g.split())
            shared.update(w for t in (*fam.templates_bg, *fam.templates, *fam.forms) for w in t.split()
                          if not w.startswith("{"))
            for other, words in fam.words[attr].items():
                if other != value:
                    shared.update(w for s in words for w in s.replace("-", " ").split())
            if attr == "background":  # "background", "backdrop" and articles name no value
                shared.update(w for other, phrases in fam.bg_nouns.items() if other != value
                              for p in phrases for w in p.split())
        for fam in world.PROMPT_FAMILIES.values():
            for synonym in fam.words[attr][value]:
                banned.update(w for w in synonym.replace("-", " ").split() if w not in shared)
            if attr == "background":
                for phrase in fam.bg_nouns[value]:
                    banned.update(w for w in phrase.split() if w not in shared)
    return tuple(sorted(banned))


def contains_banned(text: str, banned: Iterable[str]) -> bool:
    """Whether `text` contains any banned word as a whole word (case-insensitive; hyphens split words)."""
    words = set(re.findall(r"[a-z0-9]+", text.lower()))
    return any(b.lower() in words for b in banned)


def toy_paraphrase_rows(concept: str, n: int, seed: int, images_per_prompt: int = 1) -> list[dict[str, Any]]:
    """`n` distinct paraphrase-family prompts asking for `concept` (other attributes random), as rows.

    Each prompt appears `images_per_prompt` times with consecutive evaluation seeds starting at `seed`.
    """
    candidates = world.enumerate_prompts("paraphrase", concept)
    banned = (world.value_name(world.parse_concept(concept)[1]),)
    candidates = [p for p in candidates if not contains_banned(p, banned)]
    if n > len(candidates):
        raise UserError(f"asked for {n} paraphrases of {concept!r}, the world has {len(candidates)}")
    picked = np.random.default_rng(seed).choice(len(candidates), size=n, replace=False)
    prompts = [candidates[int(i)] for i in picked]
    return rows_of(prompts, seed, images_per_prompt)


def rows_of(prompts: Sequence[str], seed: int, images_per_prompt: int = 1) -> list[dict[str, Any]]:
    """Rows of `prompts`, each repeated `images_per_prompt` times; seeds seed, seed + 1, ... in row order."""
    rows = []
    for case, text in enumerate(prompts):
        for _ in range(images_per_prompt):
            rows.append({"case_number": case, "prompt": text, "evaluation_seed": seed + len(rows)})
    return rows


def _check_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: expected an object with {', '.join(ROW_FIELDS)}, got {type(row).__name__}")
    missing = [k for k in ROW_FIELDS if k not in row or row[k] in (None, "")]
    if missing:
        raise UserError(f"{where}: missing column {missing[0]!r} (found {sorted(row)})")
    try:
        case, seed = int(row["case_number"]), int(row["evaluation_seed"])
    except (TypeError, ValueError):
        raise UserError(f"{where}: case_number and evaluation_seed must be integers, got "
                        f"{row['case_number']!r}, {row['evaluation_seed']!r}") from None
    return {**row, "case_number": case, "prompt": str(row["prompt"]), "evaluation_seed": seed}


def read_prompt_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a paraphrase/attack prompt file: CSV with a header row, or JSONL (`.jsonl` / `.json` suffix).

    Extra columns are kept; a missing column, a non-integer seed or an empty file is a one-line UserError.
    """
    path = as_path(path)
    if not path.exists():
        raise UserError(f"{path}: no such prompt file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    rows = []
    if str(path).endswith((".jsonl", ".json")):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: invalid JSON ({err.msg})") from None
            rows.append(_check_row(row, f"{path}:{number}"))
    else:
        reader = csv.DictReader(io.StringIO(text))
        for number, row in enumerate(reader, 2):
            rows.append(_check_row(row, f"{path}:{number}"))
    if not rows:
        raise UserError(f"{path}: no prompt rows")
    return rows


def write_prompt_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Writes rows as CSV (header `case_number,prompt,evaluation_seed`) or JSONL, by the path's suffix."""
    path = as_path(path)
    rows = [_check_row(r, f"{path} (row {i})") for i, r in enumerate(rows)]
    if str(path).endswith((".jsonl", ".json")):
        text = "".join(json.dumps({k: r[k] for k in ROW_FIELDS}) + "\n" for r in rows)
    else:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=ROW_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = out.getvalue()
    write_text_atomic(path, text)


def toy_neutral_rows(concept: str, n: int, seed: int) -> list[dict[str, Any]]:
    """The plain-prompt baseline: `n` prompts of both families that leave the concept's attribute unsaid
    ("a crimson object with stripes behind it" for a shape concept), other attributes random.

    What the model draws for them is its prior on that attribute: the rate at which it shows the concept
    without being asked, the reference an attack must rise above.
    """
    attr, _ = world.parse_concept(concept)
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        attrs = world.sample_attributes(rng)
        said = (world.sample_mention(rng) | {a for a in world.ATTRIBUTE_NAMES if a != attr}) - {attr}
        prompts.append(world.prompt(attrs, rng, world.FAMILIES[i % len(world.FAMILIES)], mention=said))
    return rows_of(prompts, seed)
