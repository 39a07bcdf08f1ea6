"""Prompt pairs for erasure: (c*, the prompt holding the concept; c, the anchor prompt without it).

Files are JSONL (one object per line) or CSV (header row). Accepted field names, per row:

| ours | S-VARE | EAR |
|---|---|---|
| `target` / `anchor` | `original_prompt` / `modified_prompt` | `unsafe_prompt` / `safe_prompt` |

plus an optional `concept` field. A bad row (missing field, empty prompt, bad encoding, invalid JSON)
stops reading with the file, the line number and the reason; nothing is returned half-read.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Sequence

from varejax.errors import UserError
from varejax.paths import as_path, write_text_atomic

FIELD_SCHEMES: tuple[tuple[str, str, str], ...] = (
    ("varejax", "target", "anchor"),
    ("S-VARE", "original_prompt", "modified_prompt"),
    ("EAR", "unsafe_prompt", "safe_prompt"),
)


class PairFileError(UserError, ValueError):
    """A prompt-pair file is unreadable or has a bad row; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class PromptPair:
    """One erasure pair: `target` (c*, holds the concept) and `anchor` (c, the concept removed)."""

    target: str
    anchor: str
    concept: str = ""
    source: str = ""  # "file:line", for error messages and records

    def to_dict(self) -> dict[str, str]:
        return {"target": self.target, "anchor": self.anchor, "concept": self.concept}


def _row_to_pair(row: dict, where: str, default_concept: str) -> PromptPair:
    if not isinstance(row, dict):
        raise PairFileError(f"{where}: expected an object with prompt fields, got {type(row).__name__}")
    for _, target_key, anchor_key in FIELD_SCHEMES:
        if target_key in row or anchor_key in row:
            missing = [k for k in (target_key, anchor_key) if k not in row]
            if missing:
                raise PairFileError(f"{where}: missing field {missing[0]!r} (found {sorted(row)})")
            target, anchor = row[target_key], row[anchor_key]
            for key, value in ((target_key, target), (anchor_key, anchor)):
                if not isinstance(value, str):
                    raise PairFileError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
                if not value.strip():
                    raise PairFileError(f"{where}: field {key!r} is empty")
            concept = row.get("concept") or default_concept
            return PromptPair(target.strip(), anchor.strip(), str(concept).strip(), where)
    names = ", ".join(f"{t}/{a} ({n})" for n, t, a in FIELD_SCHEMES)
    raise PairFileError(f"{where}: no prompt fields; expected one of {names}, found {sorted(row)}")


def _decoded_lines(path: str) -> list[str]:
    raw = as_path(path).read_bytes()
    lines = []
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as err:
            raise PairFileError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return lines


def read_pairs(path: str | os.PathLike, concept: str = "") -> list[PromptPair]:
    """Reads a JSONL or CSV pair file (by extension); `concept` fills rows without a concept field."""
    path = os.fspath(path)
    if not as_path(path).is_file():
        raise PairFileError(f"{path}: no such file")
    lines = _decoded_lines(path)
    pairs: list[PromptPair] = []
    if path.endswith((".jsonl", ".json")):
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairFileError(f"{where}: invalid JSON ({err.msg})") from None
            pairs.append(_row_to_pair(row, where, concept))
    elif path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO("".join(lines)))
        if not reader.fieldnames:
            raise PairFileError(f"{path}:1: empty CSV (no header row)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise PairFileError(f"{where}: more values than header columns")
            pairs.append(_row_to_pair({k: v for k, v in row.items() if v is not None}, where, concept))
    else:
        raise PairFileError(f"{path}: unknown pair file type; use .jsonl or .csv")
    if not pairs:
        raise PairFileError(f"{path}: no prompt pairs")
    return pairs


def write_pairs(pairs: Iterable[PromptPair], path: str | os.PathLike) -> None:
    """Writes pairs as JSONL in our field names (atomically)."""
    write_text_atomic(path, "".join(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n" for pair in pairs))


def pool_pairs(groups: Sequence[Sequence[PromptPair]], seed: int = 0) -> list[PromptPair]:
    """Several concepts in one run: interleaves the groups round-robin so batches are balanced.

    Smaller groups are cycled (deterministically) up to the size of the largest one.
    """
    if not groups:
        return []
    longest = max(len(g) for g in groups)
    pooled = []
    for i in range(longest):
        for g in groups:
            if g:
                pooled.append(g[(i + seed) % len(g)] if i >= len(g) else g[i])
    return pooled
