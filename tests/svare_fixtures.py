"""Discovery of the S-VARE golden fixture folders (made by the official PyTorch trainer).

An S-VARE folder is any folder under the fixture root (tests/fixtures.py: $VAREJAX_FIXTURES or
../shared/fixtures) holding `losses.npz` and/or `train_step.npz`. Its config.json names the Infinity
model it was made with in official_code.infinity.model_fixture ("shared/fixtures/<name> (...)"),
resolved as the sibling folder <name>.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests import fixtures


def folders_with(npz_name: str) -> list[Path]:
    return fixtures.svare_folders(npz_name)


def params_with(npz_name: str):
    return fixtures.params_for_folders(folders_with(npz_name), f"S-VARE fixture folder with {npz_name}")


def model_folder(folder: Path) -> Path:
    """The Infinity fixture folder an S-VARE fixture was generated from."""
    entry = fixtures.config(folder)["official_code"]["infinity"]["model_fixture"]
    name = Path(entry.split()[0]).name
    path = Path(folder).parent / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: model fixture {entry!r} not found as {path}")
    return path


def text_mask(lens: np.ndarray, T: int) -> np.ndarray:
    return (np.arange(T)[None] < np.asarray(lens)[:, None]).astype(np.int32)
