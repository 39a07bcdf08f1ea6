"""FID with the pytorch-fid Inception: features, statistics cached on disk, the Frechet distance, and the
"fid" scorer of `varejax eval`.

    cfg, params, meta = load_inception("models/fid_inception")       # varejax convert inception
    feats = extract_features(params, images)                         # [N, 2048] float32 pool3
    stats = reference_stats("data/coco_val_images", params, model_hash(meta), cache_dir="runs/fid_cache")
    value = fid_features_vs_stats(feats, stats.mu, stats.sigma)

Protocol (pytorch-fid 0.3.0): uint8 RGB -> x/255 -> bilinear resize to 299 (align_corners=False, no
antialiasing) -> 2x - 1 -> pool3 (2048 dims) -> mean and covariance (np.cov, N-1) in float64 ->
||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2).

Reference statistics (mu, sigma) of an image set are computed once and cached as an .npz keyed by
(the set's id, the model hash): the id is the sha256 of the set's bytes (an images .npz file, or every
image file of a folder with its name) unless the user names the set (`reference_id`); the model hash is
the sha256 of the weights file the Inception folder was converted from. A stats .npz with `mu` and
`sigma` (ours, or pytorch-fid's `--save-stats` output) is used as it is.

When a set has fewer images than feature dimensions (every test, and small evaluation sets), its
covariance has rank < 2048 and tr((S_a S_b)^1/2) is computed exactly in the small space
(`fid_features_vs_stats`): N x N instead of 2048 x 2048 eigenproblems, and no rounding noise from the
2048 - N zero eigenvalues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from varejax.errors import UserError
from varejax.eval.metrics import frechet_distance, frechet_distance_from_stats
from varejax.eval.scorers import check_images, register_scorer
from varejax.models import inception
from varejax.paths import as_path, load_npz, save_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_ENV = "VAREJAX_FID_CACHE"
STATS_FORMAT = "varejax-fid-stats/1"


# ---- features ----------------------------------------------------------------------------------------

def extract_features(params: Any, images: np.ndarray | Iterable[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """pool3 features [N, 2048] (float32) of uint8 RGB images, `batch_size` at a time in one jitted program.

    Args:
      images: uint8 [N, H, W, 3], or an iterable of [H, W, 3] images of any sizes (each is resized to 299
        on the host, so every batch has the same shape: the last one is padded, one compile in all).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        x = np.concatenate(batch)
        n = len(x)
        if n < batch_size:  # pad: the same program serves the last, shorter batch
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        pool3, _ = inception.forward_jit(params, x)
        out.append(np.asarray(pool3)[:n])
        batch.clear()

    for image in images:
        image = np.asarray(image)
        batch.append(inception.preprocess(image[None] if image.ndim == 3 else image))
        if sum(len(b) for b in batch) >= batch_size:
            flush()
    if batch:
        flush()
    if not out:
        return np.zeros((0, inception.FEATURE_DIMS), np.float32)
    return np.concatenate(out).astype(np.float32)


# ---- statistics and the distance ---------------------------------------------------------------------

@dataclasses.dataclass
class Stats:
    """Gaussian statistics of an image set's features: mean [F], covariance [F, F] (float64), count."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    set_id: str = ""
    model_hash: str = ""
    path: str = ""  # where they were read from or cached


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features [N, F] in float64, as pytorch-fid (np.cov, normalised by N - 1)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, F], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """FID of two Gaussians (means [F], covariances [F, F]), in float64 (an F x F eigenproblem, F^3 work)."""
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)
    sigma_a, sigma_b = np.atleast_2d(sigma_a), np.atleast_2d(sigma_b)
    f = mu_a.shape[0]
    if mu_b.shape != (f,) or sigma_a.shape != (f, f) or sigma_b.shape != (f, f):
        raise ValueError(f"statistics do not match: mu {mu_a.shape} / {mu_b.shape}, sigma {sigma_a.shape} / "
                         f"{sigma_b.shape}")
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b)


def fid_features_vs_stats(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of a feature set [N, F] against statistics (mu, sigma), in float64.

    With N <= F the set's covariance is S_a = A^T A / (N - 1) (A: centred features), and the non-zero
    eigenvalues of S_a S_b are those of the N x N matrix A S_b A^T / (N - 1): tr((S_a S_b)^1/2) is the sum of
    their square roots, cheap and exact up to rounding (eigenvalues at rounding-noise level count as zero).
    Larger sets go through `fid_from_stats`.
    """
    f = np.asarray(features, np.float64)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if f.ndim != 2 or len(f) < 2 or mu.shape != (f.shape[1],) or sigma.shape != (f.shape[1],) * 2:
        raise ValueError(f"need features [N >= 2, F] and stats [F], [F, F]; got {f.shape}, {mu.shape}, {sigma.shape}")
    n = len(f)
    if n > f.shape[1]:
        return fid_from_stats(*feature_stats(f), mu, sigma)
    mu_a = f.mean(0)
    centred = f - mu_a
    small = (centred @ sigma @ centred.T) / (n - 1)
    eig = np.linalg.eigvalsh((small + small.T) / 2)
    # Centring leaves at least one zero eigenvalue, computed as +-eps * max: its square root (~1e-8 relative)
    # would be the largest error of the result. Eigenvalues that small are rounding noise: drop them.
    eig = np.where(eig > 100 * len(eig) * np.finfo(np.float64).eps * max(float(eig.max()), 0.0), eig, 0.0)
    trace_sqrt = float(np.sum(np.sqrt(eig)))
    trace_a = float(np.sum(centred * centred)) / (n - 1)
    value = float(np.sum((mu_a - mu) ** 2)) + trace_a + float(np.trace(sigma)) - 2.0 * trace_sqrt
    return max(value, 0.0)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID of two feature sets [N, F]: the exact small-space form when a set has at most F features,
    else `varejax.eval.metrics.frechet_distance`."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, F] with equal F, got {a.shape} and {b.shape}")
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    if len(small) <= a.shape[1]:
        return fid_features_vs_stats(small, *feature_stats(large))
    return frechet_distance(a, b)


# ---- image sets and the statistics cache -------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_set_id(path: str | os.PathLike) -> str:
    """sha256 of an image set's bytes: an .npz file, or a folder's image files (names and contents, sorted)."""
    path = as_path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in _image_files(Path(path)):
            digest.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    else:
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()


def read_image_set(path: str | os.PathLike) -> list[np.ndarray]:
    """The uint8 RGB images of a folder (png/jpg/..., sorted by name) or an .npz with `images` [N, H, W, 3]."""
    from varejax.images import load_uint8

    p = as_path(path)
    if p.is_dir():
        files = _image_files(Path(p))
        if len(files) < 2:
            raise UserError(f"{path}: an FID reference folder needs at least 2 images ({'/'.join(IMAGE_SUFFIXES)}), "
                            f"found {len(files)}")
        return [load_uint8(f) for f in files]
    arrays = load_npz(p)
    if "images" not in arrays:
        raise UserError(f"{path}: an FID reference .npz needs `images` [N, H, W, 3] uint8, or `mu` and `sigma`; "
                        f"found {sorted(arrays)}")
    return list(check_images(arrays["images"], str(path)))


def _cache_file(cache_dir: str | os.PathLike, set_id: str, model_hash: str) -> Any:
    key = hashlib.sha256(f"{set_id}\n{model_hash}".encode()).hexdigest()[:24]
    return as_path(cache_dir) / f"fid_stats_{key}.npz"


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "varejax", "fid_stats")


def load_stats_file(path: str | os.PathLike) -> Stats:
    """Statistics from an .npz with `mu` [F] and `sigma` [F, F] (ours or pytorch-fid's); UserError naming it."""
    arrays = load_npz(path)
    if "mu" not in arrays or "sigma" not in arrays:
        raise UserError(f"{path}: FID statistics need `mu` and `sigma`; found {sorted(arrays)}")
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise UserError(f"{path}: `mu` must be [F] and `sigma` [F, F], got {mu.shape} and {sigma.shape}")
    text = lambda k: str(arrays[k]) if k in arrays else ""
    n = int(arrays["n"]) if "n" in arrays else 0
    return Stats(mu, sigma, n, text("set_id"), text("model_hash"), str(path))


def reference_stats(reference: str | os.PathLike, params: Any, model_hash: str, *, reference_id: str | None = None,
                    cache_dir: str | os.PathLike | None = None, batch_size: int = 32) -> Stats:
    """Statistics of a reference: a stats .npz as it is, or an image set (folder / images .npz) computed
    once per (set id, model hash) and cached in `cache_dir` (default $VAREJAX_FID_CACHE or
    ~/.cache/varejax/fid_stats).

    Args:
      params: the Inception parameters, or a function returning them (called only when features must be
        computed, i.e. not for a stats file or a cache hit).
    """
    path = as_path(reference)
    if not path.exists():
        raise UserError(f"{reference}: no such FID reference (a stats .npz, an image folder or an images .npz)")
    if not path.is_dir():
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            is_stats = "mu" in data.files and "sigma" in data.files
        if is_stats:
            return load_stats_file(path)
    set_id = reference_id or image_set_id(path)
    cached = _cache_file(cache_dir or default_cache_dir(), set_id, model_hash)
    if cached.exists():
        stats = load_stats_file(cached)
        if stats.set_id == set_id and stats.model_hash == model_hash:
            return stats
    features = extract_features(params() if callable(params) else params, read_image_set(path), batch_size)
    mu, sigma = feature_stats(features)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_npz(cached, mu=mu, sigma=sigma, n=np.int64(len(features)), set_id=np.str_(set_id),
             model_hash=np.str_(model_hash), format=np.str_(STATS_FORMAT))
    return Stats(mu, sigma, len(features), set_id, model_hash, str(cached))


# ---- the scorer --------------------------------------------------------------------------------------

@register_scorer("fid")
class FIDScorer:
    """`varejax eval` scorer "fid": per-image pool3 features; summary = FID against the reference.

    Options: `model_dir` (a `varejax convert inception` folder), `reference` (a stats .npz, an image folder
    or an images .npz), `reference_id` (names the reference set instead of hashing its bytes), `cache_dir`
    (reference statistics cache), `batch_size` (images per jitted call).
    """

    name = "fid"

    def __init__(self, model_dir: str, reference: str, reference_id: str | None = None,
                 cache_dir: str | None = None, batch_size: int = 32):
        from varejax.checkpoint import ModelDirError, read_config
        from varejax.convert.inception import FORMAT, model_hash

        meta = read_config(model_dir)
        if meta.get("format") != FORMAT:
            raise ModelDirError(f"{model_dir}: not a `varejax convert inception` folder (config.json format "
                                f"{meta.get('format')!r}, expected {FORMAT!r})")
        self.model_dir = str(model_dir)
        self.model_hash = model_hash(meta)
        self._params: Any = None  # loaded on first use: a stats-file reference needs none to summarise
        self.reference = str(reference)
        self.reference_id = reference_id
        self.cache_dir = str(cache_dir or default_cache_dir())
        self.batch_size = int(batch_size)
        self._stats: Stats | None = None

    @property
    def params(self) -> Any:
        """The Inception parameters (read from `model_dir` on first use)."""
        if self._params is None:
            from varejax.convert.inception import load_inception

            _, self._params, _ = load_inception(self.model_dir)
        return self._params

    def reference_stats(self) -> Stats:
        """The reference statistics (computed and cached on first use)."""
        if self._stats is None:
            self._stats = reference_stats(self.reference, lambda: self.params, self.model_hash,
                                          reference_id=self.reference_id, cache_dir=self.cache_dir,
                                          batch_size=self.batch_size)
            if self._stats.mu.shape != (inception.FEATURE_DIMS,):
                raise UserError(f"{self.reference}: statistics of {self._stats.mu.shape[0]} features, the FID "
                                f"Inception gives {inception.FEATURE_DIMS}")
        return self._stats

    def settings(self) -> dict[str, Any]:
        stats = self.reference_stats()
        return {"model_dir": self.model_dir, "model_hash": self.model_hash, "dims": inception.FEATURE_DIMS,
                "input_size": inception.INPUT_SIZE,
                "resize": "bilinear, align_corners=False, antialias=False, to 299x299 (torch F.interpolate)",
                "normalisation": "2 * (uint8 / 255) - 1", "protocol": "pytorch-fid 0.3.0 InceptionV3 pool3",
                "reference": self.reference, "reference_id": stats.set_id or self.reference_id,
                "reference_stats": stats.path, "reference_images": stats.n, "batch_size": self.batch_size}

    def score(self, images: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        images = check_images(images, "fid scorer input")
        return {"pool3": extract_features(self.params, images, self.batch_size)}

    def summarize(self, per_image: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        features = np.asarray(per_image["pool3"])
        if len(features) < 2:
            raise UserError(f"FID needs at least 2 images, got {len(features)}")
        stats = self.reference_stats()
        return {"fid": fid_features_vs_stats(features, stats.mu, stats.sigma), "images": int(len(features)),
                "reference_images": stats.n}
