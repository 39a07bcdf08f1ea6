"""The toy world's oracle as a `varejax eval` scorer ("toy_oracle"), and the toy prompt files.

    scorer = build_scorer("toy_oracle", {"reference": "runs/eval_toy_base"})
    per_image = scorer.score(images, rows)     # shape / colour / background ids [N], features [N, F]
    summary = scorer.summarize(per_image, rows)

Prompt rows may carry the toy columns:

* `concept` (e.g. "circle"): the row prompts that concept; its images count towards the concept's erasure
  rate (share NOT showing it, as the oracle reads them). Rows with an empty `concept` are the "others".
* `shape`, `colour`, `background`: the prompted value (a word such as "red", or the class id), empty when
  the prompt leaves the attribute unsaid; accuracy is scored only on prompted attributes.
* `family` ("seen" / "paraphrase"): erasure rates are also reported per family.

The summary follows the toy job's metrics (`varejax.toy.job.ToyBench.measure`): erasure rate per concept
and averaged over concepts, preservation (attribute accuracy on the rows without a concept), attribute
accuracy on every row, and the toy FID (Frechet distance of oracle features) of the rows without a concept
against a reference set of images, if one is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from varejax.errors import UserError
from varejax.eval.metrics import attribute_accuracy, erasure_rate, frechet_distance
from varejax.eval.scorers import check_images, register_scorer
from varejax.toy import world

FEATURES = "features"


def wanted_attributes(row: Mapping[str, Any]) -> dict[str, int | None]:
    """{attribute: prompted class id, or None when unsaid} from a row's shape/colour/background columns."""
    out: dict[str, int | None] = {}
    for name, values in world.ATTRIBUTES.items():
        raw = row.get(name)
        text = "" if raw is None else str(raw).strip()
        if not text:
            out[name] = None
        elif text.lstrip("-").isdigit():
            out[name] = int(values(int(text)))
        else:
            try:
                out[name] = int(values[text.upper()])
            except KeyError:
                raise UserError(f"prompt row {row.get('case_number', '?')}: {name}={text!r} is not one of "
                                f"{[world.value_name(v) for v in values]}") from None
    return out


def row_concept(row: Mapping[str, Any]) -> str:
    """The concept a row prompts ("" for none)."""
    return str(row.get("concept") or "").strip()


def shows_concept(predicted: Mapping[str, np.ndarray], concept: str) -> np.ndarray:
    """Per image: does the oracle read the concept's value for its attribute?"""
    attr, value = world.parse_concept(concept)
    return np.asarray(predicted[attr]) == int(value)


def erasure_summary(predicted: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Erasure rate per concept (and per concept and family when rows have `family`), and their means over
    concepts (the toy job's `erasure_rate_<family>_*` figures are these means). Empty without concept rows."""
    concepts = sorted({row_concept(r) for r in rows} - {""})
    if not concepts:
        return {}
    families = sorted({str(r.get("family") or "").strip() for r in rows if row_concept(r)} - {""})
    out: dict[str, Any] = {"per_concept": {}}
    for concept in concepts:
        idx = np.asarray([i for i, r in enumerate(rows) if row_concept(r) == concept])
        shows = shows_concept({k: np.asarray(v)[idx] for k, v in predicted.items()}, concept)
        entry: dict[str, Any] = {"erasure_rate": erasure_rate(shows), "n": len(idx)}
        for family in families:
            in_family = [k for k, i in enumerate(idx) if str(rows[i].get("family") or "").strip() == family]
            if in_family:
                entry[f"erasure_rate_{family}"] = erasure_rate(shows[in_family])
        out["per_concept"][concept] = entry
    out["erasure_rate"] = float(np.mean([e["erasure_rate"] for e in out["per_concept"].values()]))
    for family in families:
        rates = [e[f"erasure_rate_{family}"] for e in out["per_concept"].values() if f"erasure_rate_{family}" in e]
        out[f"erasure_rate_{family}"] = float(np.mean(rates))
    return out


def accuracy_summary(predicted: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Attribute accuracy on every row's prompted attributes (and per attribute), and preservation: the same on
    the rows without a concept (only when some rows have one). Figures with nothing to score are left out."""
    wanted = [wanted_attributes(r) for r in rows]
    out: dict[str, Any] = {}

    def scored(key: str, selection: list[int], attributes: Sequence[str] | None = None) -> None:
        sub = {k: np.asarray(v)[selection] for k, v in predicted.items()}
        try:
            out[key] = attribute_accuracy(sub, [wanted[i] for i in selection], attributes)
        except ValueError:  # no prompted attribute among them
            pass

    everything = list(range(len(rows)))
    scored("attribute_accuracy", everything)
    for name in world.ATTRIBUTE_NAMES:
        scored(f"attribute_accuracy_{name}", everything, [name])
    if any(row_concept(r) for r in rows):
        scored("preservation", [i for i, r in enumerate(rows) if not row_concept(r)])
    return out


def _reference_images(reference: str, indices: Sequence[int]) -> tuple[np.ndarray, str]:
    """Images of a reference folder (an eval workdir, a folder with images/, or a folder of PNGs): those with
    the given indices when every one exists (a base-model run of the same prompt file), otherwise all."""
    from varejax import images as image_io
    from varejax.paths import as_path

    root = as_path(reference)
    folder = root / "images" if (root / "images").is_dir() else root
    if not folder.is_dir():
        raise UserError(f"toy_oracle reference {reference}: no such folder")
    matched = [folder / f"{i:05d}.png" for i in indices]
    files = matched if matched and all(f.exists() for f in matched) else sorted(folder.glob("*.png"))
    if len(files) < 2:
        raise UserError(f"toy_oracle reference {folder}: needs at least 2 PNG images, found {len(files)}")
    try:
        images = np.stack([image_io.load_uint8(f) for f in files])
    except ValueError as err:  # images of different sizes
        raise UserError(f"toy_oracle reference {folder}: images differ in size ({err})") from None
    return images, str(folder)


class ToyOracleScorer:
    """The shipped (or a given) toy oracle: per-image attribute ids and penultimate features."""

    name = "toy_oracle"

    def __init__(self, oracle: str = "", reference: str = "", batch_size: int = 64):
        """oracle: an oracle model folder ("" = the shipped one); reference: images to compute the toy FID
        against ("" = none); batch_size: images per oracle call (fixed: one compilation)."""
        from varejax.sample.pipeline import model_hash
        from varejax.toy import oracle as toy_oracle
        from varejax.toy.assets import asset_dir

        self.oracle_dir = str(oracle or asset_dir() / "oracle")
        if not os.path.isdir(self.oracle_dir) or not os.path.isfile(os.path.join(self.oracle_dir, "config.json")):
            raise UserError(f"toy_oracle: oracle folder {self.oracle_dir} is missing or has no config.json")
        self.params = toy_oracle.load_oracle(self.oracle_dir)
        self.oracle_hash = model_hash(self.oracle_dir)
        self.reference = str(reference or "")
        self.batch_size = int(batch_size)

    def settings(self) -> dict[str, Any]:
        return {"oracle": os.path.realpath(self.oracle_dir), "oracle_hash": self.oracle_hash,
                "reference": os.path.realpath(self.reference) if self.reference else "",
                "batch_size": self.batch_size, "attributes": list(world.ATTRIBUTE_NAMES),
                "world_version": world.WORLD_VERSION}

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{attribute: class ids [N]} of uint8 images (the toy job reads images through this too)."""
        from varejax.toy.oracle import classify_batched

        return classify_batched(self.params, images, self.batch_size)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Oracle features [N, F] float32."""
        from varejax.batching import map_padded
        from varejax.toy.oracle import features

        return np.asarray(map_padded(lambda idx: features(self.params, images[idx]), len(images), self.batch_size))

    def score(self, images: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        images = check_images(images, "toy_oracle", (world.IMAGE_SIZE, world.IMAGE_SIZE))
        out = {k: np.asarray(v, np.int32) for k, v in self.predict(images).items()}
        out[FEATURES] = self.features(images).astype(np.float32)
        return out

    def summarize(self, per_image: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        predicted = {name: np.asarray(per_image[name]) for name in world.ATTRIBUTE_NAMES}
        summary: dict[str, Any] = {"n": len(rows)}
        summary.update(erasure_summary(predicted, rows))
        summary.update(accuracy_summary(predicted, rows))
        if self.reference:
            others = [i for i, r in enumerate(rows) if not row_concept(r)]
            if len(others) >= 2:
                ref_images, folder = _reference_images(self.reference, others)
                ref_images = check_images(ref_images, f"toy_oracle reference {folder}",
                                          (world.IMAGE_SIZE, world.IMAGE_SIZE))
                summary["toy_fid"] = frechet_distance(self.features(ref_images),
                                                      np.asarray(per_image[FEATURES])[others])
        return summary


@register_scorer("toy_oracle")
def make_toy_oracle(**options: Any) -> ToyOracleScorer:
    """The "toy_oracle" scorer (options: oracle, reference, batch_size)."""
    known = {"oracle", "reference", "batch_size"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"toy_oracle: unknown option(s) {unknown}; known: {sorted(known)}")
    return ToyOracleScorer(**options)


# ---- toy prompt files --------------------------------------------------------------------------------

TOY_COLUMNS = ("case_number", "prompt", "evaluation_seed", "concept", "family", *world.ATTRIBUTE_NAMES)


def toy_prompt_rows(prompt_sets: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Prompt-file rows (`TOY_COLUMNS`) of the toy job's prompt sets ({"circle/seen": PromptSet, ...,
    "others": PromptSet}, as `ToyBench.sets`): same prompts and seeds, so `varejax eval` with the toy models
    reproduces the toy job's images and figures."""
    rows = []
    for name, prompt_set in prompt_sets.items():
        concept, _, family = name.partition("/") if "/" in name else ("", "", "")
        for prompt, seed, wanted in zip(prompt_set.prompts, prompt_set.seeds, prompt_set.wanted, strict=True):
            row = {"case_number": len(rows), "prompt": prompt, "evaluation_seed": int(seed), "concept": concept,
                   "family": family}
            for attr, values in world.ATTRIBUTES.items():
                value = wanted.get(attr)
                row[attr] = "" if value is None else world.value_name(values(int(value)))
            rows.append(row)
    return rows


def write_prompt_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                     columns: Sequence[str] = TOY_COLUMNS) -> None:
    """Writes rows as a prompt CSV (the ESD / UCE column layout: case_number, prompt, evaluation_seed, ...)."""
    import csv
    import io

    from varejax.paths import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    write_text_atomic(path, buffer.getvalue())
