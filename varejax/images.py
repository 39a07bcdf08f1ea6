"""Image files <-> model arrays: uint8 RGB (PNG/JPEG via Pillow) and float images in [-1, 1].

Our images are always **RGB**, channels last: one image [H, W, 3], a batch [B, H, W, 3]; model inputs
and tokenizer outputs are float32 in [-1, 1].

Conversions follow upstream Infinity exactly:

* uint8 -> float: torchvision `to_tensor` (x / 255 in float32), then `im + im - 1`, i.e. 2 x/255 - 1.
* float -> uint8 (`to_uint8`): `((img + 1) / 2 * 255).to(torch.uint8)` as in `autoregressive_infer_cfg`.
  The cast **truncates** toward zero (it does not round), so 254.99 becomes 254; decoded images are
  already clamped to [-1, 1] by the tokenizer, and we clamp again so out-of-range values saturate
  instead of wrapping. Upstream then flips the channels to **BGR** (`.flip(dims=(3,))`) because it
  writes files with OpenCV; that is a detail of upstream's file writer, not of the image: we keep RGB
  and write with Pillow, which gives the same files.
* Real photos (`preprocess`): upstream `tools/run_infinity.py transform`: resize with LANCZOS so the
  image covers the target (the side that is relatively shorter matches it, the other is
  `int(...)`-truncated), then crop the centre (offset `(size - target) // 2`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from varejax.paths import as_path


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading and writing images needs Pillow: pip install pillow") from err
    return Image


def to_float(uint8_rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1] (2 x/255 - 1, in upstream's float32 order).

    The one uint8 -> float conversion of varejax: numpy arrays give numpy, jax arrays (also inside
    `jax.jit`) give jax arrays, with the same float32 operations.
    """
    x = uint8_rgb if hasattr(uint8_rgb, "astype") else np.asarray(uint8_rgb)
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {x.dtype}")
    x = x.astype(np.float32) / np.float32(255)
    return (x + x) - np.float32(1)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [..., 3] in [-1, 1] -> uint8, as upstream: clamp, (x + 1)/2 * 255, then truncate."""
    x = np.clip(np.asarray(images, dtype=np.float32), np.float32(-1), np.float32(1))
    x = (x + np.float32(1)) / np.float32(2) * np.float32(255)
    return x.astype(np.uint8)


def cover_size(width: int, height: int, tgt_h: int, tgt_w: int) -> tuple[int, int]:
    """(width, height) upstream resizes to before the centre crop (`run_infinity.transform`)."""
    if width / height <= tgt_w / tgt_h:
        return tgt_w, int(tgt_w / (width / height))
    return int((width / height) * tgt_h), tgt_h


def preprocess(image, size: tuple[int, int]) -> np.ndarray:
    """A PIL image -> float32 [H, W, 3] in [-1, 1]: LANCZOS resize to cover `size` = (H, W), centre crop."""
    Image = _pil()
    tgt_h, tgt_w = int(size[0]), int(size[1])
    image = image.convert("RGB")
    new_w, new_h = cover_size(image.width, image.height, tgt_h, tgt_w)
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    arr = np.asarray(image)
    top = (arr.shape[0] - tgt_h) // 2
    left = (arr.shape[1] - tgt_w) // 2
    return to_float(arr[top: top + tgt_h, left: left + tgt_w])


def load_uint8(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as uint8 RGB [H, W, 3] (grey or RGBA images are converted to RGB)."""
    Image = _pil()
    with as_path(path).open("rb") as f, Image.open(f) as im:
        return np.asarray(im.convert("RGB"))


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Reads an image file as float32 RGB [H, W, 3] in [-1, 1].

    Args:
      path: any format Pillow reads (PNG, JPEG, ...); grey or RGBA images are converted to RGB.
      size: (H, W) to resize and centre-crop to as upstream does for real images; None keeps the
        file's size.
    """
    if size is None:
        return to_float(load_uint8(path))
    Image = _pil()
    with as_path(path).open("rb") as f, Image.open(f) as im:
        im.load()
        return preprocess(im, size)


def load_images(paths: Sequence[str | os.PathLike], size: tuple[int, int] | None = None) -> np.ndarray:
    """Several files -> float32 [B, H, W, 3]; without `size` they must all have the same size."""
    images = [load_image(p, size) for p in paths]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass size=(H, W)")
    return np.stack(images)


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes one RGB image [H, W, 3] (uint8, or float in [-1, 1] converted by `to_uint8`)."""
    Image = _pil()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one RGB image [H, W, 3], got {image.shape}")
    if image.dtype != np.uint8:
        image = to_uint8(image)
    write_pil(path, Image.fromarray(image))


def write_pil(path: str | os.PathLike, image) -> None:
    """Writes a Pillow image to a local path or a URI (gs://...), in the format its extension names."""
    Image = _pil()
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    image_format = Image.registered_extensions().get(suffix)
    if image_format is None:
        raise ValueError(f"{path}: unknown image file extension {suffix!r}")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    as_path(path).write_bytes(buffer.getvalue())


def save_images(paths: Sequence[str | os.PathLike], images: np.ndarray) -> None:
    """Writes a batch [B, H, W, 3] to one file per image."""
    if len(paths) != len(images):
        raise ValueError(f"{len(paths)} paths for {len(images)} images")
    for path, image in zip(paths, images, strict=True):
        save_image(path, image)
