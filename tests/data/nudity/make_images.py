"""Rebuilds the test images of tests/test_nudity.py: abstract paintings that NudeNet's detector reads as a class.

    .venv/bin/python tests/data/nudity/make_images.py        # writes the PNGs next to this file (~2 CPU minutes)

Each image starts from a flat cartoon face (ellipses on a plain background) and is changed by a hill climb: a
step paints one random translucent ellipse and is kept when the detector's best score for the target class rises
while every sensitive class stays below 0.1. Nothing here depicts a body: abstract shapes push the detector
towards a face class and towards a non-sensitive "exposed" class (BELLY_EXPOSED). Deterministic (fixed seeds,
one onnxruntime thread), so a rebuild with the pinned packages gives the same files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from varejax.eval import nudity

HERE = Path(__file__).resolve().parent
HEIGHT, WIDTH = 120, 100  # not square and not 320: the tests also cover padding and upscaling
SENSITIVE_LIMIT = 0.1


def cartoon_face(rng: np.random.Generator) -> np.ndarray:
    """A flat face: background, hair, skin oval, eyes and mouth (uint8 RGB [HEIGHT, WIDTH, 3])."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    image = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    image[:] = (40, 90, 160)
    cx, cy = WIDTH / 2, HEIGHT / 2

    def ellipse(x, y, rx, ry):
        return ((xx - x) / rx) ** 2 + ((yy - y) / ry) ** 2 < 1

    image[ellipse(cx, cy - 4, 0.33 * WIDTH, 0.42 * HEIGHT)] = (60, 35, 20)
    image[ellipse(cx, cy + 4, 0.25 * WIDTH, 0.36 * HEIGHT)] = (224, 172, 140)
    for ex in (cx - 0.1 * WIDTH, cx + 0.1 * WIDTH):
        image[ellipse(ex, cy - 4, 5, 2.5)] = (255, 255, 255)
        image[ellipse(ex, cy - 4, 2, 2)] = (60, 40, 30)
    image[ellipse(cx, cy + 26, 9, 3)] = (200, 60, 80)
    return image.astype(np.uint8)


class Objective:
    """Detector scores of one image: the target class's best anchor score, and the best sensitive-class score."""

    def __init__(self, detector: nudity.NudityDetector, target: str):
        self.detector = detector
        self.target = detector.labels.index(target)
        self.sensitive = [detector.labels.index(c) for c in nudity.SENSITIVE_CLASSES]

    def __call__(self, image: np.ndarray) -> tuple[float, float]:
        scores = self.detector.raw_outputs(image[None])[0, 4:]
        return float(scores[self.target].max()), float(scores[self.sensitive].max())


def climb(detector, start: np.ndarray, target: str, stop_at: float, steps: int, seed: int,
          snapshots: tuple[float, ...] = ()) -> dict[float, np.ndarray]:
    """Hill climb towards `target` until its score passes `stop_at`; returns the first image past each snapshot
    level (and the final image under the key `stop_at`)."""
    rng = np.random.default_rng(seed)
    objective = Objective(detector, target)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    image = start.astype(np.float32)
    best, _ = objective(start)
    found: dict[float, np.ndarray] = {}
    for step in range(steps):
        x, y = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        rx, ry = rng.uniform(2, WIDTH / 4), rng.uniform(2, HEIGHT / 4)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        alpha = rng.uniform(0.2, 0.8)
        mask = (((xx - x) / rx) ** 2 + ((yy - y) / ry) ** 2 < 1)[..., None]
        trial = np.where(mask, (1 - alpha) * image + alpha * colour, image)
        trial8 = np.round(trial).astype(np.uint8)
        score, sensitive = objective(trial8)
        if score > best and sensitive < SENSITIVE_LIMIT:
            image, best = trial8.astype(np.float32), score
            for level in snapshots:
                if best > level and level not in found:
                    found[level] = trial8
            print(f"{target} step {step}: {best:.3f} (sensitive {sensitive:.3f})", file=sys.stderr)
            if best > stop_at:
                break
    found[stop_at] = image.astype(np.uint8)
    return found


def main() -> None:
    detector = nudity.NudityDetector()
    start = cartoon_face(np.random.default_rng(0))
    faces = climb(detector, start, "FACE_FEMALE", stop_at=0.85, steps=3000, seed=1, snapshots=(0.5, 0.68))
    belly = climb(detector, start, "BELLY_EXPOSED", stop_at=0.7, steps=3000, seed=2)
    outputs = {"face_050.png": faces[0.5], "face_068.png": faces[0.68], "face_085.png": faces[0.85],
               "belly_070.png": belly[0.7]}
    for name, image in outputs.items():
        Image.fromarray(image).save(HERE / name, optimize=True)
        print(name, [(d.label, d.box, round(d.score, 3)) for d in detector.detect(image[None], 0.25)[0]])


if __name__ == "__main__":
    main()
