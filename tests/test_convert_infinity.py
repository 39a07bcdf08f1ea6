"""The strict, safe transformer converter: layouts, dry runs, and every failure mode a user meets."""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import fixtures
from varejax.checkpoint import load_infinity
from varejax.cli import main
from varejax.convert.arch import infinity_arch
from varejax.convert.infinity import convert_infinity
from varejax.convert.infinity_keys import expected_shapes
from varejax.convert.sources import CheckpointError
from varejax.models.config import get_preset

SHAPE_ONLY = fixtures.root() / "shape_only"
TINY = fixtures.root() / "infinity_tiny"
needs_tiny = fixtures.requires("infinity_tiny/config.json")
needs_shape_only = fixtures.requires("shape_only")


def _tiny_state_dict() -> collections.OrderedDict:
    return torch.load(fixtures.checkpoint_file(TINY, "transformer"), weights_only=True)


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_shape_only
@pytest.mark.parametrize("src, arch, n_tensors, n_params", [
    ("infinity_2b_reg.pth", "2b", 694, 2_204_564_032),
    ("infinity_8b_weights", "8b", 862, 8_375_791_824),
])
def test_dry_run_on_real_key_tables(src, arch, n_tensors, n_params, capsys):
    start = time.time()
    code, out, err = _run(["convert", "infinity", "--src", str(SHAPE_ONLY / src), "--arch", arch, "--dry-run"], capsys)
    assert code == 0, err
    assert f"all {n_tensors} tensors mapped" in out
    assert f"{n_params:,} parameters" in out
    assert time.time() - start < 60


@needs_shape_only
def test_wrong_arch_names_the_right_one(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = _run(["convert", "infinity", "--src", str(SHAPE_ONLY / "infinity_8b_weights"),
                           "--arch", "2b", "--out", str(out_dir)], capsys)
    assert code == 2
    assert "wrong --arch" in err and "infinity_8b" in err
    assert "expected [1, 1, 6, 2048], found [1, 1, 6, 3584]" in err
    assert "Traceback" not in err
    assert not out_dir.exists() and not list(tmp_path.iterdir())


def test_expected_tables_equal_upstream_shape_tables():
    for preset, name in (("infinity_2b", "infinity_2b_state_dict_shapes.json"),
                         ("infinity_8b", "infinity_8b_state_dict_shapes.json")):
        path = fixtures.require(fixtures.root() / name)
        upstream = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
        assert expected_shapes(get_preset(preset)) == upstream


@needs_tiny
def test_convert_roundtrip_and_config_record(tmp_path, capsys):
    out_dir = tmp_path / "model"
    src = fixtures.checkpoint_file(TINY, "transformer")
    code, out, err = _run(["convert", "infinity", "--src", str(src), "--arch", str(TINY / "config.json"),
                           "--out", str(out_dir)], capsys)
    assert code == 0, err
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["source"]["sha256"] == {src.name: fixtures.config(TINY)["checkpoints"][src.name]["sha256"]}
    assert meta["model"]["depth"] == fixtures.config(TINY)["transformer_config"]["depth"]
    cfg, params = load_infinity(str(out_dir))
    sd = _tiny_state_dict()
    kernel = np.asarray(params["blocks"][cfg.depth - 1]["ffn"]["fc1"]["kernel"][...])
    last = f"block_chunks.{cfg.block_chunks - 1}.module.{cfg.blocks_per_chunk - 1}.ffn.fc1.weight"
    np.testing.assert_array_equal(kernel, sd[last].numpy().T)
    np.testing.assert_array_equal(np.asarray(params["cfg_uncond"][...]), sd["cfg_uncond"].numpy())
    # An existing folder is never clobbered.
    code, _, err = _run(["convert", "infinity", "--src", str(src), "--arch", str(TINY / "config.json"),
                         "--out", str(out_dir)], capsys)
    assert code == 2 and "already exists" in err
    assert json.loads((out_dir / "config.json").read_text()) == meta


@needs_tiny
def test_training_checkpoint_and_bf16_storage(tmp_path):
    sd = _tiny_state_dict()
    wrapped = tmp_path / "ar-ckpt-giter001K.pth"
    torch.save({"trainer": {"gpt_fsdp": sd}, "epoch": 3}, wrapped)
    report = convert_infinity(str(wrapped), str(TINY / "config.json"), str(tmp_path / "m"), param_dtype="bfloat16",
                              progress=False)
    assert report.tensors == len(sd)
    cfg, params = load_infinity(str(tmp_path / "m"))
    assert cfg.param_dtype == "bfloat16"
    assert params["head"]["kernel"][...].dtype == np.dtype("bfloat16")


@needs_tiny
def test_hf_sharded_safetensors_folder(tmp_path):
    from safetensors.torch import save_file

    sd = _tiny_state_dict()
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for name, names in shards.items():
        save_file({k: sd[k].contiguous() for k in names}, str(folder / name))
        weight_map.update({k: name for k in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    convert_infinity(str(folder), str(TINY / "config.json"), str(tmp_path / "m"), progress=False)
    _, params = load_infinity(str(tmp_path / "m"))
    np.testing.assert_array_equal(np.asarray(params["pos_start"][...]), sd["pos_start"].numpy())

    # A shard the index names but the folder lacks.
    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="names shards that are not in"):
        convert_infinity(str(folder), str(TINY / "config.json"), None, dry_run=True)


class UnsafePayload:
    """An object torch.load could only restore by importing and running code."""


def _save(sd, path):
    torch.save(collections.OrderedDict(sd), path)
    return str(path)


@needs_tiny
@pytest.mark.parametrize("damage, expected", [
    ("drop_key", "truncated or a partial shard"),
    ("extra_key", "unexpected  block_chunks.0.module.0.sa.extra"),
    ("bad_shape", "shape  head.weight: expected [64, 128], found [64, 127]"),
    ("prefix", "starts with 'module.'"),
    ("nonzero_buffer", "expected all zeros"),
])
def test_damaged_state_dicts(damage, expected, tmp_path, capsys):
    sd = _tiny_state_dict()
    if damage == "drop_key":
        sd.pop("head.bias")
    elif damage == "extra_key":
        sd["block_chunks.0.module.0.sa.extra"] = torch.zeros(3)
    elif damage == "bad_shape":
        sd["head.weight"] = sd["head.weight"][:, :127].clone()
    elif damage == "prefix":
        sd = collections.OrderedDict((f"module.{k}", v) for k, v in sd.items())
    elif damage == "nonzero_buffer":
        sd["block_chunks.0.module.0.sa.zero_k_bias"] = torch.ones_like(sd["block_chunks.0.module.0.sa.zero_k_bias"])
    src = _save(sd, tmp_path / "bad.pth")
    out_dir = tmp_path / "out"
    code, _, err = _run(["convert", "infinity", "--src", src, "--arch", str(TINY / "config.json"),
                         "--out", str(out_dir)], capsys)
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]  # nothing left behind


@needs_tiny
def test_truncated_empty_and_unsafe_files(tmp_path, capsys):
    src = fixtures.checkpoint_file(TINY, "transformer")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"trainer": {"gpt_fsdp": _tiny_state_dict()}, "args": UnsafePayload()}, unsafe)
    for path, message in ((truncated, "truncated or corrupt"), (empty, "empty"),
                          (unsafe, "cannot be loaded safely"), (tmp_path / "absent.pth", "no such file")):
        code, _, err = _run(["convert", "infinity", "--src", str(path), "--arch", str(TINY / "config.json"),
                             "--dry-run"], capsys)
        assert code == 2, path
        assert message in err, err
        assert "Traceback" not in err


@needs_tiny
def test_arch_config_mismatch_suggests_sizes(tmp_path, capsys):
    cfg = infinity_arch(str(TINY / "config.json"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg.replace(embed_dim=cfg.embed_dim * 2).to_dict()))
    code, _, err = _run(["convert", "infinity", "--src", str(fixtures.checkpoint_file(TINY, "transformer")),
                         "--arch", str(other), "--dry-run"], capsys)
    assert code == 2
    # Either a preset matches the file (then it is named), or the sizes are blamed.
    assert "wrong --arch; the file matches" in err or "other sizes" in err


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    from varejax import checkpoint

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_params", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_model_dir(tmp_path / "m", {("a",): np.zeros(2)}, {"format": "x"})
    assert list(tmp_path.iterdir()) == []


def test_missing_out_is_an_error(capsys):
    code, _, err = _run(["convert", "infinity", "--src", "x.pth", "--arch", "2b"], capsys)
    assert code == 2 and "--out is required" in err


def test_model_folder_checks(tmp_path):
    from varejax.checkpoint import ModelDirError

    with pytest.raises(ModelDirError, match="no config.json"):
        load_infinity(str(tmp_path))
    fixtures.require(TINY / "config.json")
    convert_infinity(str(fixtures.checkpoint_file(TINY, "transformer")), str(TINY / "config.json"),
                     str(tmp_path / "m"), progress=False)
    with pytest.raises(ModelDirError, match="architecture fields"):
        load_infinity(str(tmp_path / "m"), depth=3)
    shutil.rmtree(tmp_path / "m" / "params")
    with pytest.raises(ModelDirError, match="no params/"):
        load_infinity(str(tmp_path / "m"))


def test_paths_are_strings():
    assert isinstance(fixtures.root(), Path)
