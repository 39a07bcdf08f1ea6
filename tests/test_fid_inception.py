"""The FID Inception port, its torch-free converter and FID, against pytorch-fid 0.3.0's golden fixtures.

Every folder under the fixture root whose config.json says `"fixture_kind": "fid_inception"` is tested; all
sizes (images, blocks, crops) come from its files. The weights are rebuilt with numpy from config.json's
`weights_recipe` and bn.npz, written with `torch.save(..., _use_new_zipfile_serialization=False)` (the
legacy format of pytorch-fid's real file) and converted through `varejax convert inception`, which reads
the file without torch. Tolerances are the fixture's recommended ones (`TOLERANCES`), never loosened:
pool3 1e-3 (float32) / 1e-9 (float64), resized-input crops 2e-4, per-block channel means per block, FID
rtol 1e-9 (full-rank case) / 1e-4 (fewer samples than dimensions). One jitted forward shape per dtype:
the fixture's images in one batch.
"""

from __future__ import annotations

import collections
import hashlib
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import fixtures, measured
from varejax.cli import main
from varejax.convert import torch_legacy
from varejax.convert.inception import load_inception
from varejax.convert.sources import CheckpointError
from varejax.eval import fid
from varejax.eval.metrics import frechet_distance
from varejax.eval.scorers import build_scorer
from varejax.models import inception
from varejax.models.state import flat_params

FOLDERS = fixtures.params_for_folders(fixtures.kind_folders("fid_inception"), "fid_inception fixture folder")
# The fixture's recommended tolerances (config.json "recommended_tolerances"); a folder may only tighten them.
TOLERANCES = {"pool3": 1e-3, "pool3_fp64": 1e-9, "crops": 2e-4, "fid_lowdim_rtol": 1e-9, "fid_singular_rtol": 1e-4,
              "chan_mean": {"block0": 2e-5, "block1": 5e-5, "Mixed_5b": 5e-5, "Mixed_5c": 1e-4, "Mixed_5d": 1e-4,
                            "Mixed_6a": 1e-4, "Mixed_6b": 1e-4, "Mixed_6c": 2e-4, "Mixed_6d": 2e-4, "Mixed_6e": 2e-4,
                            "Mixed_7a": 5e-4, "Mixed_7b": 5e-4, "Mixed_7c": 1e-3}}
LOWDIM_CASES = ("lowdim",)  # N > dims: full-rank covariances


def _tolerances(cfg: dict) -> dict:
    rec = cfg["recommended_tolerances"]
    chan = {k: min(v, float(rec["chan_mean_float32_port"].get(k, v))) for k, v in TOLERANCES["chan_mean"].items()}
    return {"pool3": min(TOLERANCES["pool3"], rec["pool3_float32_port"]["atol"]),
            "pool3_fp64": min(TOLERANCES["pool3_fp64"], rec["pool3_float64_port_vs_pool3_fp64"]["atol"]),
            "crops": min(TOLERANCES["crops"], rec["input299_crops_float32_port"]["atol"]),
            "fid_lowdim_rtol": min(TOLERANCES["fid_lowdim_rtol"], rec["fid"]["lowdim"]["rtol"]),
            "fid_singular_rtol": min(TOLERANCES["fid_singular_rtol"], rec["fid"]["singular_cases"]["rtol"]),
            "chan_mean": chan}


def rebuild_state_dict(folder: Path) -> collections.OrderedDict:
    """config.json weights_recipe + bn.npz -> the state_dict pytorch-fid ran with (numpy only)."""
    cfg = fixtures.config(folder)
    bn = np.load(folder / "bn.npz")
    sd = collections.OrderedDict()
    for entry in cfg["weights_recipe"]["tensors"]:
        if entry["source"] == "recipe":
            normal = np.random.RandomState(entry["seed"]).standard_normal(entry["shape"]) * entry["std"]
            sd[entry["key"]] = normal.astype(np.float32).astype(np.float16).astype(np.float32)
        else:
            sd[entry["key"]] = bn[entry["key"]].astype(entry["dtype"])
    return sd


def fixture_images(folder: Path) -> list[np.ndarray]:
    from varejax.images import load_uint8

    return [load_uint8(folder / item["png"]) for item in fixtures.config(folder)["inputs"]["images"]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per fixture folder, once: the rebuilt state_dict, its legacy .pth, and the folder `varejax convert
    inception` made of it (read back with `load_inception`)."""
    import torch

    cache: dict[Path, dict] = {}

    def get(folder: Path) -> dict:
        if folder not in cache:
            sd = rebuild_state_dict(folder)
            tmp = tmp_path_factory.mktemp(f"fid_{folder.name}")
            pth = tmp / "pt_inception-2015-12-05-6726825d.pth"
            torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items()), pth,
                       _use_new_zipfile_serialization=False)
            out = tmp / "inception"
            assert main(["convert", "inception", "--src", str(pth), "--out", str(out)]) == 0
            _, params, meta = load_inception(out)
            cache[folder] = {"sd": sd, "pth": pth, "dir": out, "params": params, "meta": meta}
        return cache[folder]

    return get


@pytest.fixture(scope="module")
def float32_run(converted):
    """Per fixture folder, once: the preprocessed inputs and (pool3, block means) of all images in ONE batch."""
    cache: dict[Path, tuple] = {}

    def get(folder: Path) -> tuple:
        if folder not in cache:
            x = np.concatenate([inception.preprocess(image[None]) for image in fixture_images(folder)])
            pool3, means = inception.forward_jit(converted(folder)["params"], x)
            cache[folder] = (x, np.asarray(pool3), {k: np.asarray(v) for k, v in means.items()})
        return cache[folder]

    return get


def _crops(x: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W, C] -> [N, C, 3, size, size]: top-left, centre and bottom-right crops (the fixture's layout)."""
    h, w = x.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    crops = [x[:, :size, :size], x[:, top:top + size, left:left + size], x[:, -size:, -size:]]
    return np.stack(crops, 1).transpose(0, 4, 1, 2, 3)


# ---- the converter ------------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_torch_free_reader_reads_the_legacy_file_bit_for_bit(folder, converted):
    got = converted(folder)
    sd, cfg = got["sd"], fixtures.config(folder)
    digest = hashlib.sha256()
    for value in sd.values():
        digest.update(value.tobytes())
    assert digest.hexdigest() == cfg["weights_recipe"]["check"]["sha256_all"], "state_dict rebuild differs"
    source = torch_legacy.open_torch_file(got["pth"])
    assert source.layout == "torch-legacy"
    assert list(source.tensors) == list(sd)  # the file's key order
    for key, value in sd.items():
        read = source.tensors[key].load()
        assert read.dtype == value.dtype and read.shape == value.shape, key
        assert read.tobytes() == value.tobytes(), f"{key} differs"
    # The converted folder holds every tensor, transposed to our layout, and records the file's sha256.
    flat = {k: np.asarray(v) for k, v in flat_params(got["params"]).items()}
    assert len(flat) == len(sd) - sum(k.endswith("num_batches_tracked") for k in sd)
    np.testing.assert_array_equal(flat[("Mixed_6b", "branch7x7_2", "conv", "kernel")],
                                  sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat[("fc", "kernel")], sd["fc.weight"].T)
    np.testing.assert_array_equal(flat[("Mixed_7c", "branch_pool", "bn", "var")],
                                  sd["Mixed_7c.branch_pool.bn.running_var"])
    assert got["meta"]["source"]["sha256"] == {got["pth"].name: hashlib.sha256(got["pth"].read_bytes()).hexdigest()}
    assert {k: list(v.shape) for k, v in sd.items()} == cfg["state_dict_shapes"]


def test_reader_honours_views_in_both_formats_and_refuses_code(tmp_path):
    import torch

    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = collections.OrderedDict(plain=base, transposed=base.t(), window=base[2:4, 3:7], scalar=torch.tensor(7),
                                 half=torch.linspace(-2, 2, 12).reshape(3, 4).half(), empty=torch.zeros(0, 3))
    for zip_format in (False, True):
        path = tmp_path / f"views_{zip_format}.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
        read = torch_legacy.load_state_dict(path)
        assert list(read) == list(sd)
        for key, value in sd.items():
            assert read[key].shape == tuple(value.shape) and read[key].dtype == value.numpy().dtype, key
            np.testing.assert_array_equal(read[key], value.numpy(), err_msg=key)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    for zip_format in (False, True):
        evil = tmp_path / f"evil_{zip_format}.pth"
        torch.save({"weight": Payload()}, evil, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(CheckpointError, match=r"evil_.*refuses to load .*print"):
            torch_legacy.open_torch_file(evil)
    truncated = tmp_path / "truncated.pth"
    torch.save(sd, tmp_path / "full.pth", _use_new_zipfile_serialization=False)
    truncated.write_bytes((tmp_path / "full.pth").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        torch_legacy.open_torch_file(truncated)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pth"):
        torch_legacy.open_torch_file(tmp_path / "text.pth")


@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_converter_names_missing_misshaped_and_unexpected_keys(folder, converted, tmp_path, capsys):
    import torch

    sd = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in converted(folder)["sd"].items())
    del sd["Mixed_6b.branch1x1.bn.running_var"]
    sd["fc.bias"] = torch.zeros(1000)
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad, _use_new_zipfile_serialization=False)
    code = main(["convert", "inception", "--src", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists()
    assert f"error: {bad} is not pytorch-fid's FID Inception state_dict: 1 missing, 1 unexpected, 1 mis-shaped" in err
    assert "missing  Mixed_6b.branch1x1.bn.running_var" in err
    assert "shape  fc.bias: expected [1008], found [1000]" in err
    assert "unexpected  AuxLogits.fc.weight" in err
    assert "torchvision's ImageNet Inception-v3" in err


# ---- the network ----------------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_pool3_block_means_and_input_crops_float32(folder, float32_run):
    ref = np.load(folder / "outputs.npz")
    tol = _tolerances(fixtures.config(folder))
    x, pool3, means = float32_run(folder)
    assert x.dtype == np.float32 and pool3.shape == ref["pool3"].shape
    crops = _crops(x, ref["input299_crops"].shape[-1])
    measured.check(f"{folder.name}/fid/input299_crops", np.abs(crops - ref["input299_crops"]).max(), tol["crops"])
    measured.check(f"{folder.name}/fid/pool3", np.abs(pool3 - ref["pool3"]).max(), tol["pool3"])
    # Images 0 and 1 in one batch of the reference too: batching changes nothing beyond the tolerance.
    n = len(ref["pool3_batch01"])
    measured.check(f"{folder.name}/fid/pool3_batch01", np.abs(pool3[:n] - ref["pool3_batch01"]).max(), tol["pool3"])
    blocks = sorted(k.split("__")[0] for k in ref.files if k.endswith("__chan_mean"))
    assert set(blocks) == set(inception.BLOCK_NAMES)
    for block in blocks:
        err = np.abs(means[block] - ref[f"{block}__chan_mean"]).max()
        measured.check(f"{folder.name}/fid/chan_mean/{block}", err, tol["chan_mean"][block])


@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_pool3_float64(folder, converted):
    ref = np.load(folder / "outputs.npz")
    tol = _tolerances(fixtures.config(folder))
    with jax.enable_x64(True):
        x = np.concatenate([inception.preprocess(image[None], np.float64) for image in fixture_images(folder)])
        params = inception.cast_params(converted(folder)["params"], np.float64)
        pool3, means = inception.forward_jit(params, x)
        pool3 = np.asarray(pool3)
    assert pool3.dtype == np.float64
    crops = _crops(x, ref["input299_crops_fp64"].shape[-1])
    measured.check(f"{folder.name}/fid/input299_crops_fp64", np.abs(crops - ref["input299_crops_fp64"]).max(),
                   tol["pool3_fp64"])
    measured.check(f"{folder.name}/fid/pool3_fp64", np.abs(pool3 - ref["pool3_fp64"]).max(), tol["pool3_fp64"])
    err = max(np.abs(np.asarray(means[b]) - ref[f"{b}__chan_mean_fp64"]).max() for b in inception.BLOCK_NAMES)
    measured.check(f"{folder.name}/fid/chan_mean_fp64", err, tol["pool3_fp64"], what="max abs error (worst block)")


@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_fc_logits_of_the_reference_pool3(folder, converted):
    """Not FID: checks the fc layer's mapping (torch [out, in] -> ours [in, out]) on the reference pool3."""
    ref = np.load(folder / "outputs.npz")
    got = np.asarray(inception.logits(converted(folder)["params"], ref["pool3"]))
    bound = _tolerances(fixtures.config(folder))["pool3"]
    measured.check(f"{folder.name}/fid/logits", np.abs(got - ref["logits"]).max(), bound)


# ---- FID -----------------------------------------------------------------------------------------------

def _fid_case_inputs(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixture's FID cases as (features a, features b) in float64 (fid.npz + outputs.npz pool3)."""
    cases = fixtures.config(folder)["fid"]["cases"]
    arrays = np.load(folder / "fid.npz")
    pool3 = np.load(folder / "outputs.npz")["pool3"].astype(np.float64)
    assert "set1 = images 0,1 and set2 = images 2.." in cases["given_paths"]["inputs"]
    split = 2
    out = {"vec": (arrays["vec_a"], arrays["vec_b"]), "lowdim": (arrays["lowdim_a"], arrays["lowdim_b"]),
           "img_shift": (pool3, pool3 + arrays["shift"].astype(np.float64)),
           "given_paths": (pool3[:split], pool3[split:])}
    assert set(out) == set(cases), f"FID cases of {folder}: {sorted(cases)}"
    return {k: (np.asarray(a, np.float64), np.asarray(b, np.float64)) for k, (a, b) in out.items()}


@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_fid_matches_pytorch_fid_cases(folder):
    tol = _tolerances(fixtures.config(folder))
    values = np.load(folder / "fid.npz")
    for case, (a, b) in _fid_case_inputs(folder).items():
        expected = float(values[f"value__{case}"])
        rtol = tol["fid_lowdim_rtol"] if case in LOWDIM_CASES else tol["fid_singular_rtol"]
        got = fid.fid_from_features(a, b)
        measured.check(f"{folder.name}/fid/case_{case}", abs(got - expected) / expected, rtol, what="relative error")
        if case in LOWDIM_CASES:  # the covariance forms (F^3 work: only where F is small)
            assert frechet_distance(a, b) == pytest.approx(expected, rel=rtol, abs=0)
            assert fid.fid_from_stats(*fid.feature_stats(a), *fid.feature_stats(b)) == pytest.approx(
                expected, rel=rtol, abs=0)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))  # correlated, full rank
    direction = rng.normal(size=6)
    mu, sigma = fid.feature_stats(features)
    assert fid.fid_from_stats(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    assert fid.fid_from_features(features, features) == pytest.approx(0.0, abs=1e-9)
    values = [fid.fid_from_features(features, features + s * direction) for s in (0.0, 0.1, 0.5, 1.0, 3.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values
    # A pure shift keeps the covariance: FID = |shift|^2 exactly.
    np.testing.assert_allclose(values, [s * s * direction @ direction for s in (0.0, 0.1, 0.5, 1.0, 3.0)],
                               rtol=1e-9, atol=1e-9)
    # Fewer samples than dimensions (a singular covariance): the small-space form against an independent exact
    # one, tr((S_a S_b)^1/2) = nuclear norm of A L_b / sqrt(N - 1) with S_b = L_b L_b^T (no square roots of
    # rounding-noise eigenvalues, which make the F x F form agree only to ~1e-8 here).
    few = rng.normal(size=(4, 6))
    centred = few - few.mean(0)
    cross = np.linalg.svd(centred @ np.linalg.cholesky(sigma), compute_uv=False).sum() / np.sqrt(len(few) - 1)
    exact = np.sum((few.mean(0) - mu) ** 2) + np.sum(centred ** 2) / (len(few) - 1) + np.trace(sigma) - 2 * cross
    assert fid.fid_features_vs_stats(few, mu, sigma) == pytest.approx(exact, rel=1e-12)
    assert fid.fid_from_stats(*fid.feature_stats(few), mu, sigma) == pytest.approx(exact, rel=1e-7)


@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_fid_scorer_caches_reference_stats_and_matches_pytorch_fid(folder, converted, float32_run, tmp_path,
                                                                     monkeypatch):
    tol = _tolerances(fixtures.config(folder))
    images = fixture_images(folder)
    model_dir, pth = converted(folder)["dir"], converted(folder)["pth"]
    # pytorch-fid's calculate_fid_given_paths case: images 0,1 against images 2.. (files of any size).
    reference = tmp_path / "reference"
    reference.mkdir()
    for item in fixtures.config(folder)["inputs"]["images"][2:]:
        shutil.copy(folder / item["png"], reference)
    batch = len(images)  # the batch size of the fixture run: no new compile
    options = {"model_dir": str(model_dir), "reference": str(reference), "cache_dir": str(tmp_path / "cache"),
               "batch_size": batch}
    scorer = build_scorer("fid", options)
    # score() takes same-size images, as `varejax eval` hands them over: images 0 and 1 in one call if they
    # have one size, else one call each.
    same_size = images[0].shape == images[1].shape
    calls = [np.stack(images[:2])] if same_size else [images[0][None], images[1][None]]
    scored = [scorer.score(c, [{"prompt": "p", "seed": i} for i in range(len(c))]) for c in calls]
    per_image = {"pool3": np.concatenate([s["pool3"] for s in scored])}
    _, pool3, _ = float32_run(folder)
    measured.check(f"{folder.name}/fid/scorer_pool3", np.abs(per_image["pool3"] - pool3[:2]).max(), tol["pool3"])
    summary = scorer.summarize(per_image, [])
    expected = float(np.load(folder / "fid.npz")["value__given_paths"])
    measured.check(f"{folder.name}/fid/scorer_given_paths", abs(summary["fid"] - expected) / expected,
                   tol["fid_singular_rtol"], what="relative error")
    settings = scorer.settings()
    assert settings["model_hash"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert settings["dims"] == 2048 and settings["reference_images"] == len(images) - 2
    assert settings["reference_id"] == fid.image_set_id(reference)
    cached = sorted((tmp_path / "cache").glob("*.npz"))
    assert [str(p) for p in cached] == [settings["reference_stats"]]

    # Cached: a second scorer of the same (set, model) computes nothing; the stats file works as a reference.
    def no_features(*args, **kwargs):
        raise AssertionError("reference features recomputed despite the cache")

    monkeypatch.setattr(fid, "extract_features", no_features)
    again = build_scorer("fid", options)
    assert again.summarize(per_image, [])["fid"] == summary["fid"]
    from_stats = build_scorer("fid", {**options, "reference": str(cached[0])})
    assert from_stats.summarize(per_image, [])["fid"] == summary["fid"]
    monkeypatch.undo()

    # A set against itself (a folder, named by the user): 0 up to float64 rounding of the traces.
    own = tmp_path / "own"
    own.mkdir()
    for item in fixtures.config(folder)["inputs"]["images"][:2]:
        shutil.copy(folder / item["png"], own)
    itself = build_scorer("fid", {**options, "reference": str(own), "reference_id": "fixture-first-two"})
    value = itself.summarize(per_image, [])["fid"]
    assert itself.settings()["reference_id"] == "fixture-first-two"
    scale = float(np.trace(itself.reference_stats().sigma))
    assert 0.0 <= value <= 1e-9 * scale, (value, scale)


def test_bad_fid_inputs_are_one_line_user_errors(tmp_path):
    from varejax.errors import UserError

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    read = fid.read_image_set(tmp_path / "images.npz")
    assert len(read) == 3 and all(np.array_equal(a, b) for a, b in zip(read, images, strict=True))
    np.savez(tmp_path / "other.npz", pictures=images)
    with pytest.raises(UserError, match=r"other.npz: an FID reference .npz needs `images`"):
        fid.read_image_set(tmp_path / "other.npz")
    (tmp_path / "one").mkdir()
    from varejax.images import save_image

    save_image(tmp_path / "one" / "a.png", images[0])
    with pytest.raises(UserError, match=r"one: an FID reference folder needs at least 2 images"):
        fid.read_image_set(tmp_path / "one")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.zeros((4, 3)))
    with pytest.raises(UserError, match=r"stats.npz: `mu` must be \[F\] and `sigma` \[F, F\]"):
        fid.reference_stats(tmp_path / "stats.npz", None, "hash")
    with pytest.raises(UserError, match=r"nowhere: no such FID reference"):
        fid.reference_stats(tmp_path / "nowhere", None, "hash")
    with pytest.raises(UserError, match=r"no config.json"):
        build_scorer("fid", {"model_dir": str(tmp_path), "reference": str(tmp_path / "images.npz")})
    # The folder id covers names and bytes: renaming or changing an image changes it.
    (tmp_path / "two").mkdir()
    save_image(tmp_path / "two" / "a.png", images[0])
    save_image(tmp_path / "two" / "b.png", images[1])
    first = fid.image_set_id(tmp_path / "two")
    (tmp_path / "two" / "b.png").rename(tmp_path / "two" / "c.png")
    assert fid.image_set_id(tmp_path / "two") != first
