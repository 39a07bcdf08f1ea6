"""Discovery of the golden fixture folders (made by the upstream PyTorch code).

The root is `$VAREJAX_FIXTURES`, or `../shared/fixtures` next to the repository. An Infinity fixture
folder is one whose `config.json` has `infinity_constructor_kwargs` and no `fixture_kind`; every size
comes from that file, so a held-out folder with other sizes passes the same tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def root() -> Path:
    return Path(os.environ.get("VAREJAX_FIXTURES", REPO.parent / "shared" / "fixtures"))


def _configs() -> list[tuple[Path, dict]]:
    base = root()
    if not base.is_dir():
        return []
    out = []
    for path in sorted(base.glob("*/config.json")):
        try:
            out.append((path.parent, json.loads(path.read_text())))
        except json.JSONDecodeError:
            continue
    return out


def infinity_folders() -> list[Path]:
    return [folder for folder, cfg in _configs()
            if "fixture_kind" not in cfg and "infinity_constructor_kwargs" in cfg]


def vae_folders() -> list[Path]:
    """Infinity fixture folders that hold a tokenizer (`vae_config`, a 'vae' checkpoint and vae.npz)."""
    out = []
    for folder in infinity_folders():
        cfg = config(folder)
        if "vae_config" in cfg and (folder / "vae.npz").exists():
            out.append(folder)
    return out


def config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def checkpoint_file(folder: str | Path, kind: str) -> Path:
    """The transformer ('transformer') or tokenizer ('vae') checkpoint named in config.json."""
    for name, info in config(folder)["checkpoints"].items():
        is_vae = "'vae'" in info.get("format", "")
        if (kind == "vae") == is_vae:
            return Path(folder) / name
    raise FileNotFoundError(f"{folder}: no {kind} checkpoint listed in config.json")


def params_for_folders(folders: list[Path]):
    """pytest parametrisation over fixture folders; a clear skip when none is found."""
    if not folders:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no fixture folders under {root()}"))]
    return [pytest.param(f, id=f.name) for f in folders]


def convert_transformer(folder: str | Path, out: str) -> None:
    """Runs `varejax convert infinity` (the CLI entry point) on a fixture folder."""
    from varejax.cli import main

    folder = Path(folder)
    code = main(["convert", "infinity", "--src", str(checkpoint_file(folder, "transformer")),
                 "--arch", str(folder / "config.json"), "--out", out])
    assert code == 0, f"conversion of {folder} failed"


def schedule(cfg: dict, key: str = "scale_schedule") -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(int(v) for v in s) for s in cfg[key])


def convert_vae(folder: str | Path, out: str) -> None:
    """Runs `varejax convert vae` (the CLI entry point) on a fixture folder's tokenizer."""
    from varejax.cli import main

    folder = Path(folder)
    code = main(["convert", "vae", "--src", str(checkpoint_file(folder, "vae")),
                 "--arch", str(folder / "config.json"), "--out", out])
    assert code == 0, f"conversion of the tokenizer of {folder} failed"


def patchify(cfg: dict) -> bool:
    """Whether the fixture's transformer uses 2x2 spatial patchify (Infinity-8B style)."""
    return bool(cfg.get("infinity_constructor_kwargs", {}).get("apply_spatial_patchify", 0))
