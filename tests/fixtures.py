"""Discovery of the golden fixture folders (made by the upstream PyTorch code).

The root is `$VAREJAX_FIXTURES`, or `../shared/fixtures` next to the repository. An Infinity fixture
folder is one whose `config.json` has `infinity_constructor_kwargs` and no `fixture_kind`; every size
comes from that file, so a held-out folder with other sizes passes the same tests.

A missing fixture fails the tests that need it (conftest.py turns the `missing_fixture` mark into a
failure, and fails the session when a kind the suite needs has no folder at all): a parity suite that
skips when its references are absent passes without checking anything. A developer without the fixtures
can set VAREJAX_ALLOW_MISSING_FIXTURES=1 to skip those tests instead; CI never sets it. An unreadable
`config.json` is an error, never silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOW_MISSING = "VAREJAX_ALLOW_MISSING_FIXTURES"

# The real checkpoints' key -> shape tables the converter and parameter-count tests read.
SHAPE_TABLES = ("infinity_2b_state_dict_shapes.json", "infinity_8b_state_dict_shapes.json",
                "vae_d32_state_dict_shapes.json", "vae_d14_patchify_8b_state_dict_shapes.json")
SVARE_FILES = ("losses.npz", "train_step.npz")


class FixtureError(Exception):
    """A fixture file that exists but cannot be read."""


def root() -> Path:
    return Path(os.environ.get("VAREJAX_FIXTURES", REPO.parent / "shared" / "fixtures"))


def missing_allowed() -> bool:
    """Whether the developer asked to skip, not fail, tests whose fixtures are absent (never in CI)."""
    return os.environ.get(ALLOW_MISSING, "") == "1"


def missing_message(what: str) -> str:
    return (f"golden fixture missing: {what} under the fixture root {root()} ($VAREJAX_FIXTURES, default "
            f"../shared/fixtures; see its README.md). {ALLOW_MISSING}=1 skips such tests instead (never in CI).")


def missing_mark(what: str) -> pytest.MarkDecorator:
    """The mark of a test whose fixture is absent: a failure (conftest.py), or a skip when allowed."""
    reason = missing_message(what)
    return pytest.mark.skip(reason=reason) if missing_allowed() else pytest.mark.missing_fixture(reason=reason)


def requires(*names: str):
    """A decorator for tests that read the given paths under the root: `missing_mark` when one is absent,
    else the test unchanged."""
    absent = [name for name in names if not (root() / name).exists()]
    return missing_mark(", ".join(absent)) if absent else (lambda test: test)


def require(path: Path) -> Path:
    """Inside a test: `path`, or a failure (a skip when allowed) naming it."""
    if not path.exists():
        (pytest.skip if missing_allowed() else pytest.fail)(missing_message(str(path)))
    return path


def _configs() -> list[tuple[Path, dict]]:
    base = root()
    if not base.is_dir():
        return []
    out = []
    for path in sorted(base.glob("*/config.json")):
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FixtureError(f"{path}: unreadable fixture config ({err})") from err
        if not isinstance(cfg, dict):
            raise FixtureError(f"{path}: a fixture config must be a JSON object, not {type(cfg).__name__}")
        out.append((path.parent, cfg))
    return out


def _is_infinity(cfg: dict) -> bool:
    return "fixture_kind" not in cfg and "infinity_constructor_kwargs" in cfg


def infinity_folders() -> list[Path]:
    return [folder for folder, cfg in _configs() if _is_infinity(cfg)]


def vae_folders() -> list[Path]:
    """Infinity fixture folders that hold a tokenizer (`vae_config`, a 'vae' checkpoint and vae.npz)."""
    return [folder for folder, cfg in _configs()
            if _is_infinity(cfg) and "vae_config" in cfg and (folder / "vae.npz").exists()]


def svare_folders(npz_name: str) -> list[Path]:
    """S-VARE fixture folders (a config.json and `npz_name`, one of SVARE_FILES)."""
    return [folder for folder, cfg in _configs() if not _is_infinity(cfg) and (folder / npz_name).is_file()]


def kind_folders(kind: str) -> list[Path]:
    """Folders whose config.json says `"fixture_kind": kind` (e.g. "fid_inception")."""
    return [folder for folder, cfg in _configs() if cfg.get("fixture_kind") == kind]


def inventory() -> dict[str, list[str]]:
    """What the root holds, by kind (names of folders or files); raises FixtureError on an unreadable config."""
    configs = _configs()
    known = set(infinity_folders()) | {f for name in SVARE_FILES for f in svare_folders(name)}
    known |= {folder for folder, cfg in configs if "fixture_kind" in cfg}
    return {
        "infinity": [f.name for f in infinity_folders()],
        "vae": [f.name for f in vae_folders()],
        "svare losses": [f.name for f in svare_folders("losses.npz")],
        "svare train_step": [f.name for f in svare_folders("train_step.npz")],
        "fid_inception": [f.name for f in kind_folders("fid_inception")],
        "shape_only": ["shape_only"] if (root() / "shape_only").is_dir() else [],
        "shape tables": [name for name in SHAPE_TABLES if (root() / name).is_file()],
        "unrecognised": [folder.name for folder, _ in configs if folder not in known],
    }


# Kinds the suite cannot do without (fid_inception: tests/test_fid_inception.py).
REQUIRED = {"infinity": 1, "vae": 1, "svare losses": 1, "svare train_step": 1, "fid_inception": 1, "shape_only": 1,
            "shape tables": len(SHAPE_TABLES)}


def summary() -> tuple[str, list[str]]:
    """(one line of counts per kind with the root, problems that must fail the run)."""
    try:
        found = inventory()
    except FixtureError as err:
        return f"fixtures: root={root()} UNREADABLE", [str(err)]
    counts = ", ".join(f"{len(v)} {k}" for k, v in found.items() if k not in ("shape_only", "unrecognised"))
    line = f"fixtures: {counts}, shape_only: {'yes' if found['shape_only'] else 'NO'}, root={root()}"
    short = [f"{kind} {len(found[kind])} of at least {n}" for kind, n in REQUIRED.items() if len(found[kind]) < n]
    problems = [missing_message(f"too few folders ({'; '.join(short)})")] if short else []
    if found["unrecognised"]:
        problems.append(f"fixture folders of no known kind under {root()}: {', '.join(found['unrecognised'])} "
                        "(an Infinity config without infinity_constructor_kwargs, or an S-VARE folder without "
                        f"{' / '.join(SVARE_FILES)}?)")
    return line, problems


def config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def checkpoint_file(folder: str | Path, kind: str) -> Path:
    """The transformer ('transformer') or tokenizer ('vae') checkpoint named in config.json."""
    for name, info in config(folder)["checkpoints"].items():
        is_vae = "'vae'" in info.get("format", "")
        if (kind == "vae") == is_vae:
            return Path(folder) / name
    raise FileNotFoundError(f"{folder}: no {kind} checkpoint listed in config.json")


def params_for_folders(folders: list[Path], what: str = "Infinity fixture folder"):
    """pytest parametrisation over fixture folders; one failing (`missing_mark`) case when none is found."""
    if not folders:
        return [pytest.param(None, id="missing-fixture", marks=missing_mark(f"no {what}"))]
    return [pytest.param(f, id=f.name) for f in folders]


def first_infinity_folder() -> Path:
    """The first Infinity fixture folder; inside a test, a failure (a skip when allowed) when there is none."""
    folders = infinity_folders()
    if not folders:
        (pytest.skip if missing_allowed() else pytest.fail)(missing_message("no Infinity fixture folder"))
    return folders[0]


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


def main() -> int:
    """`python -m tests.fixtures`: prints the fixture counts; exit status 1 when the suite would fail on them."""
    line, problems = summary()
    print(line)
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems and not missing_allowed() else 0


if __name__ == "__main__":
    raise SystemExit(main())
