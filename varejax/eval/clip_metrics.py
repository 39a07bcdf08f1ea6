"""CLIP score and zero-shot CLIP classification (ACC_e / ACC_i), as scorers of `varejax eval`.

    scorer = build_scorer("clip_score", {"model_dir": "models/clip_vit_b_32"})
    scorer = build_scorer("clip_zero_shot", {"model_dir": "models/clip_vit_b_32", "protocol": "imagenette",
                                             "erased_class": "church"})

Both read a folder written by `varejax convert clip` (its tokenizer files included).

Preprocessing (HF `CLIPImageProcessor` with OpenAI's settings, done here in numpy/PIL): the uint8 RGB image is
resized with PIL bicubic so its shorter side is the model's image size S (224; the longer side becomes
int(S * long / short)), centre-cropped to S x S (offsets floor((size - S) / 2)), scaled by 1/255 (in float64,
then float32) and normalised per channel with CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std
(0.26862954, 0.26130258, 0.27577711). Prompts: `varejax.models.clip_tokenizer` (77 tokens, end token kept).

CLIP score, per image: 100 * max(cos(image_embeds, text_embeds), 0), with its own prompt; the summary is the mean.
The clamp is per image (the definition torchmetrics documents). torchmetrics' code clamps the *mean* instead
(max(mean(100 cos), 0)) and EAR's eval_clip_score.py averages the cosine with no clamp and no factor 100;
both equal `clip_score_unclamped` (EAR's number x 100) whenever the mean is positive, and the two summaries
differ only when some image has a negative cosine (`negative_cosines` counts them).

Zero-shot classification: each class name is put into every prompt template ("a photo of a {}."), the
normalised text embeddings are averaged over templates and normalised again (CLIP's prompt ensembling); an
image's prediction is the class of highest cosine (a hit: the row's true class among the top `topk`).
ACC_e = accuracy on images whose true class is the erased one, ACC_i = accuracy on the others.

A lab's own classifier plugs in the same way: register a scorer that writes per-image class predictions
and summarise them with `classification_summary` (same ACC_e / ACC_i definitions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from varejax.errors import UserError
from varejax.eval.scorers import check_images, register_scorer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MODEL_DIR = "models/clip_vit_b_32"
IMAGENETTE_CLASSES = ("tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                      "garbage truck", "gas pump", "golf ball", "parachute")
OBJECT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a good photo of a {}.", "a close-up photo of a {}.",
                    "a bright photo of a {}.", "a photo of a large {}.", "a photo of a small {}.",
                    "a painting of a {}.")
# Painters for a style classifier: the erased style plus others with well-known, distinct styles.
ARTISTS = ("Vincent van Gogh", "Claude Monet", "Pablo Picasso", "Salvador Dali", "Rembrandt", "Leonardo da Vinci",
           "Andy Warhol", "Katsushika Hokusai", "Gustav Klimt", "Edvard Munch", "Johannes Vermeer", "Frida Kahlo")
STYLE_TEMPLATES = ("a painting by {}.", "an artwork in the style of {}.", "a picture painted by {}.",
                   "a painting in the style of {}.")
# Named class lists + templates; a scorer's `classes` / `templates` options override them.
PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "imagenette": (IMAGENETTE_CLASSES, OBJECT_TEMPLATES),
    "artists": (ARTISTS, STYLE_TEMPLATES),
}


# ---- preprocessing -----------------------------------------------------------------------------------

def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `size` (the longer one: int(size * long / short))."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def preprocess(images: np.ndarray, size: int = 224, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 RGB [N, H, W, 3] -> CLIP's normalised float32 input [N, size, size, 3] (see the module docstring)."""
    from PIL import Image

    images = check_images(images, "CLIP preprocessing")
    out = np.empty((len(images), size, size, 3), np.float32)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        new_h, new_w = resized_shape(h, w, size)
        if (new_h, new_w) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crop = image[top:top + size, left:left + size]
        scaled = (crop.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
        out[i] = (scaled - mean32) / std32
    return out


def preprocessing_settings(size: int) -> dict[str, Any]:
    return {"resize_shorter_side": size, "resample": "PIL bicubic", "centre_crop": [size, size],
            "rescale": "1/255", "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "input": "uint8 RGB"}


# ---- the model ------------------------------------------------------------------------------------------

class Embedder(Protocol):
    """What the scorers need of a CLIP model (tests substitute one whose embeddings they control)."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, H, W, 3] -> L2-normalised image embeddings [N, P] (float32)."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Prompts -> L2-normalised text embeddings [N, P] (float32)."""

    def settings(self) -> dict[str, Any]:
        """Model identity (hashes) and preprocessing."""


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _batched(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over fixed-size batches (the last one padded with copies of its first row: one compiled shape)."""
    outs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
        outs.append(np.asarray(fn(chunk))[:n])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


class CLIPEmbedder:
    """A converted CLIP folder with its tokenizer: images and prompts -> normalised embeddings.

    Args:
      model_dir: a folder written by `varejax convert clip`.
      tokenizer: a tokenizer folder or tokenizer.json, when `model_dir` holds no tokenizer files.
      batch_size: images / prompts per jitted call (the last batch is padded).
    """

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, tokenizer: str | None = None,
                 batch_size: int = 32):
        from varejax.convert.clip import load_clip, model_fingerprint
        from varejax.models.clip_tokenizer import CLIPTokenizer
        from varejax.paths import require_local

        model_dir = require_local(model_dir, "the CLIP tokenizer files are read from local paths")
        if not Path(model_dir, "config.json").is_file():
            raise UserError(f"{model_dir}: no CLIP model folder (config.json missing); convert a local HF CLIP "
                            f"download first: varejax convert clip --src DIR --out {model_dir}")
        if batch_size < 1:
            raise UserError(f"CLIP batch_size must be >= 1, got {batch_size}")
        self.model_dir, self.batch_size = str(model_dir), int(batch_size)
        self.cfg, self.params = load_clip(model_dir)
        source = Path(tokenizer) if tokenizer else Path(model_dir)
        if source.is_file():
            self.tokenizer = CLIPTokenizer.from_file(source)
        else:
            self.tokenizer = CLIPTokenizer.from_folder(source)
        self.tokenizer.check_model(self.cfg.vocab_size, self.cfg.eos_token_id, self.cfg.bos_token_id)
        self.fingerprint = model_fingerprint(model_dir)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        from varejax.models import clip

        pixels = preprocess(images, self.cfg.image_size)
        feats = _batched(lambda x: clip.image_features(self.params, x, cfg=self.cfg), pixels, self.batch_size)
        return _normalise_rows(feats)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        from varejax.models import clip

        ids, mask = self.tokenizer(list(texts), max_length=self.cfg.max_position_embeddings)
        both = np.stack([ids, mask], axis=1)  # batched together, split inside
        feats = _batched(lambda x: clip.text_features(self.params, x[:, 0], x[:, 1], cfg=self.cfg), both,
                         self.batch_size)
        return _normalise_rows(feats)

    def settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"model": {**self.fingerprint, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
                          "vision_layers": cfg.vision_layers, "vision_width": cfg.vision_width,
                          "text_layers": cfg.text_layers, "text_width": cfg.text_width,
                          "projection_dim": cfg.projection_dim},
                "tokenizer": {"source": self.tokenizer.source, "context_length": cfg.max_position_embeddings,
                              "vocab_size": self.tokenizer.vocab_size, "pad_id": self.tokenizer.pad_id,
                              "truncation": "start + first 75 text tokens + end"},
                "preprocessing": preprocessing_settings(cfg.image_size)}


def _prompts(rows: Sequence[Mapping[str, Any]], n: int, where: str, column: str = "prompt") -> list[str]:
    if len(rows) != n:
        raise UserError(f"{where}: {n} images but {len(rows)} prompt rows")
    out = []
    for i, row in enumerate(rows):
        value = row.get(column)
        if not isinstance(value, str):
            raise UserError(f"{where}: row {i} (case_number {row.get('case_number', '?')}) has no {column!r} text")
        out.append(value)
    return out


# ---- CLIP score ------------------------------------------------------------------------------------------

class CLIPScore:
    """Scorer "clip_score": per image 100 * max(cos(image, its prompt), 0) and the raw cosine."""

    name = "clip_score"

    def __init__(self, embedder: Embedder, prompt_column: str = "prompt"):
        self.embedder, self.prompt_column = embedder, prompt_column

    def settings(self) -> dict[str, Any]:
        return {"scorer": "clip_score/1", **self.embedder.settings(), "prompt_column": self.prompt_column,
                "formula": "per image 100 * max(cos(image_embeds, text_embeds), 0); summary: mean over images",
                "unclamped": "clip_score_unclamped = 100 * mean(cos) (EAR's mean cosine x 100; torchmetrics "
                             "reports max(that, 0))"}

    def score(self, images: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        images = check_images(images, "clip_score")
        prompts = _prompts(rows, len(images), "clip_score", self.prompt_column)
        cos = np.sum(self.embedder.embed_images(images) * self.embedder.embed_texts(prompts), axis=-1)
        return {"clip_cosine": cos.astype(np.float32), "clip_score": clip_score_values(cos)}

    def summarize(self, per_image: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        cos = np.asarray(per_image["clip_cosine"], np.float64)
        if cos.size == 0:
            raise UserError("clip_score: no images to summarise")
        return {"clip_score": float(np.mean(clip_score_values(cos))),
                "clip_score_unclamped": float(100.0 * np.mean(cos)),
                "negative_cosines": int(np.sum(cos < 0)), "images": int(cos.size)}


def clip_score_values(cosines: np.ndarray) -> np.ndarray:
    """100 * max(cos, 0), elementwise (float32)."""
    return (100.0 * np.maximum(np.asarray(cosines, np.float64), 0.0)).astype(np.float32)


# ---- zero-shot classification -------------------------------------------------------------------------

def class_text_embeddings(embedder: Embedder, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[C, P]: per class, the mean of its normalised template embeddings, normalised again."""
    texts = [template.format(name) for name in classes for template in templates]
    emb = embedder.embed_texts(texts).reshape(len(classes), len(templates), -1)
    return _normalise_rows(_normalise_rows(emb).mean(axis=1))


def classification_summary(predicted_classes: Sequence[Sequence[str]], rows: Sequence[Mapping[str, Any]],
                           classes: Sequence[str], erased_class: str | None = None,
                           class_column: str = "class") -> dict[str, Any]:
    """ACC_e, ACC_i, overall and per-class accuracy of ranked predictions (any classifier).

    Args:
      predicted_classes: per image, class names best first (a hit: the true class among them).
      rows: prompt rows; `row[class_column]` is the true class (one of `classes`).
      erased_class: the erased class (ACC_e on its images, ACC_i on the others); None: no ACC_e / ACC_i.
    """
    truth = true_classes(rows, classes, class_column)
    if len(truth) != len(predicted_classes):
        raise UserError(f"{len(predicted_classes)} predictions but {len(rows)} prompt rows")
    hits = np.array([t in list(p) for t, p in zip(truth, predicted_classes, strict=True)], bool)
    truth_arr = np.asarray(truth, object)
    out: dict[str, Any] = {"accuracy": float(hits.mean()) if hits.size else None, "images": int(hits.size)}
    out["per_class_accuracy"] = {c: float(hits[truth_arr == c].mean()) for c in classes if np.any(truth_arr == c)}
    out["per_class_images"] = {c: int(np.sum(truth_arr == c)) for c in classes if np.any(truth_arr == c)}
    if erased_class is not None:
        erased = truth_arr == erased_class
        out["erased_class"] = erased_class
        out["ACC_e"] = float(hits[erased].mean()) if erased.any() else None
        out["ACC_i"] = float(hits[~erased].mean()) if (~erased).any() else None
        out["images_erased_class"], out["images_other_classes"] = int(erased.sum()), int((~erased).sum())
    return out


def true_classes(rows: Sequence[Mapping[str, Any]], classes: Sequence[str], class_column: str = "class") -> list[str]:
    """Every row's true class; UserError naming the row when it is missing or not one of `classes`."""
    known = set(classes)
    out = []
    for i, row in enumerate(rows):
        value = row.get(class_column)
        if value is None or str(value) == "":
            raise UserError(f"row {i} (case_number {row.get('case_number', '?')}): no {class_column!r} value; "
                            f"zero-shot classification needs each prompt's true class")
        if str(value) not in known:
            raise UserError(f"row {i} (case_number {row.get('case_number', '?')}): class {value!r} is not one of "
                            f"the classifier's classes {list(classes)}")
        out.append(str(value))
    return out


class ZeroShotClassifier:
    """Scorer "clip_zero_shot": per image the cosine to every class embedding; summary ACC_e / ACC_i / accuracy."""

    name = "clip_zero_shot"

    def __init__(self, embedder: Embedder, classes: Sequence[str], templates: Sequence[str],
                 erased_class: str | None = None, topk: int = 1, class_column: str = "class",
                 protocol: str | None = None):
        classes, templates = [str(c) for c in classes], [str(t) for t in templates]
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise UserError(f"clip_zero_shot: classes must be at least 2 distinct names, got {classes}")
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise UserError(f"clip_zero_shot: every template needs exactly one '{{}}' for the class name; got {bad}")
        if erased_class is not None and erased_class not in classes:
            raise UserError(f"clip_zero_shot: erased_class {erased_class!r} is not one of the classes {classes}")
        if not 1 <= int(topk) <= len(classes):
            raise UserError(f"clip_zero_shot: topk must be in 1..{len(classes)}, got {topk}")
        self.embedder, self.classes, self.templates = embedder, classes, templates
        self.erased_class, self.topk, self.class_column, self.protocol = erased_class, int(topk), class_column, protocol
        self._class_emb: np.ndarray | None = None

    def class_embeddings(self) -> np.ndarray:
        if self._class_emb is None:
            self._class_emb = class_text_embeddings(self.embedder, self.classes, self.templates)
        return self._class_emb

    def settings(self) -> dict[str, Any]:
        return {"scorer": "clip_zero_shot/1", **self.embedder.settings(), "protocol": self.protocol,
                "classes": list(self.classes), "templates": list(self.templates), "erased_class": self.erased_class,
                "topk": self.topk, "class_column": self.class_column,
                "rule": "class embedding = normalised mean of normalised template embeddings; prediction = "
                        "highest cosine; hit = true class in the top k; ACC_e on the erased class's images, "
                        "ACC_i on the others"}

    def score(self, images: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        images = check_images(images, "clip_zero_shot")
        if len(rows) != len(images):
            raise UserError(f"clip_zero_shot: {len(images)} images but {len(rows)} prompt rows")
        true_classes(rows, self.classes, self.class_column)  # fail before the model runs
        cos = self.embedder.embed_images(images) @ self.class_embeddings().T
        return {"class_cosine": cos.astype(np.float32), "predicted": np.argmax(cos, axis=1).astype(np.int32)}

    def summarize(self, per_image: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        cos = np.asarray(per_image["class_cosine"])
        ranked = np.argsort(-cos, axis=1, kind="stable")[:, :self.topk]
        predicted = [[self.classes[j] for j in row] for row in ranked]
        out = classification_summary(predicted, rows, self.classes, self.erased_class, self.class_column)
        out["topk"] = self.topk
        return out


# ---- registration ------------------------------------------------------------------------------------------

@register_scorer("clip_score")
def build_clip_score(model_dir: str = DEFAULT_MODEL_DIR, tokenizer: str | None = None, batch_size: int = 32,
                     prompt_column: str = "prompt") -> CLIPScore:
    """Options: model_dir (`varejax convert clip` output), tokenizer (if the folder has none), batch_size,
    prompt_column."""
    return CLIPScore(CLIPEmbedder(model_dir, tokenizer, batch_size), prompt_column)


@register_scorer("clip_zero_shot")
def build_clip_zero_shot(model_dir: str = DEFAULT_MODEL_DIR, protocol: str = "imagenette",
                         classes: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                         erased_class: str | None = None, topk: int = 1, class_column: str = "class",
                         tokenizer: str | None = None, batch_size: int = 32) -> ZeroShotClassifier:
    """Options: model_dir, protocol (a PROTOCOLS name giving default classes and templates), classes, templates,
    erased_class (for ACC_e / ACC_i), topk, class_column (the rows' true-class column), tokenizer, batch_size."""
    if protocol not in PROTOCOLS:
        raise UserError(f"clip_zero_shot: unknown protocol {protocol!r}; known: {sorted(PROTOCOLS)} (or give "
                        f"classes and templates)")
    default_classes, default_templates = PROTOCOLS[protocol]
    if classes or templates:
        protocol = f"custom (unset options from {protocol})"
    classes = list(classes) if classes else list(default_classes)
    templates = list(templates) if templates else list(default_templates)
    # Validate the options before loading the model.
    ZeroShotClassifier(_NoModel(), classes, templates, erased_class, topk, class_column, protocol)
    embedder = CLIPEmbedder(model_dir, tokenizer, batch_size)
    return ZeroShotClassifier(embedder, classes, templates, erased_class, topk, class_column, protocol)


class _NoModel:
    """Stands in for the model while options are checked."""

    def embed_images(self, images):  # pragma: no cover - never called
        raise NotImplementedError

    embed_texts = embed_images

    def settings(self):  # pragma: no cover
        return {}
