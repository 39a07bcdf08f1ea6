"""Evaluation metrics of an erasure: erasure rate, preservation, Frechet distance of features.

All functions are plain numpy on a detector's outputs, so the same code serves the toy world's oracle and
real detectors (NudeNet-style flags, ImageNet classifiers, Inception features).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def erasure_rate(shows_concept: Sequence[bool] | np.ndarray) -> float:
    """Share of images of concept prompts that do NOT show the concept (1.0 = fully erased)."""
    shows = np.asarray(shows_concept, bool)
    if shows.size == 0:
        raise ValueError("no images to score")
    return float(1.0 - shows.mean())


def attribute_accuracy(predicted: Mapping[str, np.ndarray], wanted: Sequence[Mapping[str, int | None]],
                       attributes: Sequence[str] | None = None) -> float:
    """Share of (image, attribute) pairs where the detector sees what the prompt asked for.

    `wanted[i][attr]` is the prompted value (None = the prompt left it unsaid: not scored).
    """
    hits = total = 0
    for i, request in enumerate(wanted):
        for attr, value in request.items():
            if value is None or (attributes is not None and attr not in attributes):
                continue
            total += 1
            hits += int(predicted[attr][i] == value)
    if total == 0:
        raise ValueError("no prompted attribute to score")
    return hits / total


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, F] (the FID formula).

    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64; the symmetric form of the
    matrix square root keeps it real and stable for small N.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, F] with equal F, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples per set")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """`frechet_distance` from the Gaussians' means [F] and covariances [F, F] (e.g. cached reference statistics)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cross))
    return max(value, 0.0)
