"""The strict tokenizer converter: real key tables, both upstream naming schemes, the mask buffers, damage."""

from __future__ import annotations

import collections
import json
import time

import numpy as np
import pytest
import torch

from tests import fixtures
from varejax.checkpoint import load_vae
from varejax.cli import main
from varejax.convert.arch import ArchError, vae_arch
from varejax.convert.vae import convert_vae
from varejax.convert.vae_keys import MASK_KEYS, expected_shapes
from varejax.models.bsq_vae import VAEConfig, get_vae_preset

SHAPE_ONLY = fixtures.root() / "shape_only"
TINY = fixtures.root() / "infinity_tiny"
needs_tiny = fixtures.requires("infinity_tiny/vae.npz")
needs_shape_only = fixtures.requires("shape_only")


def _tiny_vae_state_dict() -> collections.OrderedDict:
    return torch.load(fixtures.checkpoint_file(TINY, "vae"), weights_only=True)["vae"]


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _plain_naming(sd) -> collections.OrderedDict:
    """The naming of unwrapped nn.Conv2d / nn.GroupNorm modules that upstream `load_cnn` also accepts."""
    return collections.OrderedDict((k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
                                    .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"), v)
                                   for k, v in sd.items())


@needs_shape_only
@pytest.mark.parametrize("src, arch, n_tensors, n_params", [
    ("infinity_vae_d32reg.pth", "d32", 270, 110_118_051),
    ("infinity_vae_d56_f8_14_patchify.pth", "d14", 226, 81_624_209),
])
def test_dry_run_on_real_key_tables(src, arch, n_tensors, n_params, capsys):
    start = time.time()
    code, out, err = _run(["convert", "vae", "--src", str(SHAPE_ONLY / src), "--arch", arch, "--dry-run"], capsys)
    elapsed = time.time() - start
    print(f"{src}: {out.strip()} (wall {elapsed:.1f}s)")
    assert code == 0, err
    assert f"all {n_tensors} tensors mapped" in out
    assert f"{n_params:,} parameters" in out and "2 buffers checked and dropped" in out
    assert elapsed < 60


@needs_shape_only
def test_wrong_arch_names_the_right_one(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, _, err = _run(["convert", "vae", "--src", str(SHAPE_ONLY / "infinity_vae_d56_f8_14_patchify.pth"),
                         "--arch", "d32", "--out", str(out_dir)], capsys)
    assert code == 2
    assert "wrong --arch" in err and "d14" in err
    assert "encoder.conv_out.conv.weight: expected [32, 512, 3, 3], found [14, 512, 3, 3]" in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_expected_tables_equal_upstream_shape_tables():
    for preset, name in (("d32", "vae_d32_state_dict_shapes.json"),
                         ("d14", "vae_d14_patchify_8b_state_dict_shapes.json")):
        path = fixtures.require(fixtures.root() / name)
        upstream = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
        assert expected_shapes(get_vae_preset(preset)) == upstream


@pytest.mark.parametrize("folder", fixtures.params_for_folders(fixtures.vae_folders()))
def test_expected_tables_equal_fixture_shape_tables(folder):
    cfg = fixtures.config(folder)
    upstream = {k: tuple(v) for k, v in cfg["vae_state_dict_shapes"].items()}
    assert expected_shapes(VAEConfig.from_upstream(cfg["vae_config"])) == upstream


@needs_tiny
def test_both_naming_schemes_give_the_same_parameters(tmp_path, capsys):
    arch = str(TINY / "config.json")
    src = fixtures.checkpoint_file(TINY, "vae")
    code, _, err = _run(["convert", "vae", "--src", str(src), "--arch", arch, "--out", str(tmp_path / "module")],
                        capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "module" / "config.json").read_text())
    assert meta["format"] == "varejax-vae/1"
    assert meta["source"]["sha256"] == {src.name: fixtures.config(TINY)["checkpoints"][src.name]["sha256"]}
    assert meta["model"]["codebook_dim"] == fixtures.config(TINY)["vae_config"]["codebook_dim"]

    sd = _tiny_vae_state_dict()
    plain = _plain_naming(sd)
    assert "encoder.conv_in.weight" in plain and "encoder.down.0.downsample.conv.weight" in plain
    assert "decoder.norm_out.weight" in plain and "encoder.down.0.block.0.norm1.bias" in plain
    torch.save({"vae": plain}, tmp_path / "plain.pth")
    report = convert_vae(str(tmp_path / "plain.pth"), arch, str(tmp_path / "plain"), progress=False)
    assert report.tensors == len(sd)

    cfg_a, a = load_vae(str(tmp_path / "module"))
    cfg_b, b = load_vae(str(tmp_path / "plain"))
    assert cfg_a == cfg_b
    from varejax.models.apply import flat_params
    flat_a, flat_b = flat_params(a), flat_params(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))
    # Conv weights arrive as [kh, kw, in, out].
    np.testing.assert_array_equal(np.asarray(flat_a[("encoder", "conv_in", "kernel")]),
                                  sd["encoder.conv_in.conv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(flat_a[("decoder", "up", "0", "block", "0", "norm1", "scale")]),
                                  sd["decoder.up.0.block.0.norm1.norm.weight"].numpy())

    # An existing folder is never clobbered; --overwrite replaces it.
    code, _, err = _run(["convert", "vae", "--src", str(src), "--arch", arch, "--out", str(tmp_path / "module")],
                        capsys)
    assert code == 2 and "already exists" in err
    # Architecture fields of a converted folder cannot be changed at load time.
    from varejax.checkpoint import ModelDirError
    with pytest.raises(ModelDirError, match="architecture fields"):
        load_vae(str(tmp_path / "module"), codebook_dim=16)


def _save(sd, path, wrapper="vae"):
    torch.save({wrapper: collections.OrderedDict(sd)} if wrapper else collections.OrderedDict(sd), path)
    return str(path)


@needs_tiny
@pytest.mark.parametrize("damage, expected", [
    ("drop_key", "truncated or a partial shard"),
    ("extra_key", "unexpected  encoder.mid.attn_1.q.conv.weight"),
    ("bad_shape", "shape  decoder.conv_out.conv.weight: expected [3, 32, 3, 3], found [3, 31, 3, 3]"),
    ("prefix", "starts with 'module.'"),
    ("bad_mask", "buffer 'quantize.lfq.mask': expected 2**arange(31..0)"),
    ("float_mask", "expected an integer buffer"),
    ("both_names", "both upstream naming schemes"),
])
def test_damaged_state_dicts(damage, expected, tmp_path, capsys):
    sd = _tiny_vae_state_dict()
    if damage == "drop_key":
        sd.pop("decoder.conv_out.conv.bias")
    elif damage == "extra_key":
        sd["encoder.mid.attn_1.q.conv.weight"] = torch.zeros(3)
    elif damage == "bad_shape":
        sd["decoder.conv_out.conv.weight"] = sd["decoder.conv_out.conv.weight"][:, :31].clone()
    elif damage == "prefix":
        sd = collections.OrderedDict((f"module.{k}", v) for k, v in sd.items())
    elif damage == "bad_mask":
        sd["quantize.lfq.mask"] = torch.flip(sd["quantize.lfq.mask"], (0,))
    elif damage == "float_mask":
        sd["quantizer.lfq.mask"] = sd["quantizer.lfq.mask"].float()
    elif damage == "both_names":
        sd["encoder.conv_in.weight"] = sd["encoder.conv_in.conv.weight"].clone()
    src = _save(sd, tmp_path / "bad.pth")
    out_dir = tmp_path / "out"
    for extra in (["--out", str(out_dir)], ["--dry-run"]):
        code, _, err = _run(["convert", "vae", "--src", src, "--arch", str(TINY / "config.json")] + extra, capsys)
        assert code == 2, extra
        assert expected in err, err
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]  # nothing left behind


@needs_tiny
def test_mask_values_layouts_and_optional_masks(tmp_path):
    sd = _tiny_vae_state_dict()
    d = fixtures.config(TINY)["vae_config"]["codebook_dim"]
    for key in MASK_KEYS:
        assert sd[key].dtype == torch.int64
        np.testing.assert_array_equal(sd[key].numpy(), 2 ** np.arange(d - 1, -1, -1))
    arch = str(TINY / "config.json")
    # {'ema': sd} and a plain state_dict are read too; files without the (derived) masks are accepted.
    ema = _save(sd, tmp_path / "ema.pth", wrapper="ema")
    assert convert_vae(ema, arch, None, dry_run=True).layout == "ema"
    for key in MASK_KEYS:
        sd.pop(key)
    report = convert_vae(_save(sd, tmp_path / "plain_sd.pth", wrapper=None), arch, None, dry_run=True)
    assert report.layout == "state_dict" and report.dropped == 0 and report.tensors == len(sd)


class UnsafePayload:
    """An object torch.load could only restore by importing and running code."""


@needs_tiny
def test_truncated_empty_and_unsafe_files(tmp_path, capsys):
    src = fixtures.checkpoint_file(TINY, "vae")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"vae": _tiny_vae_state_dict(), "args": UnsafePayload()}, unsafe)
    for path, message in ((truncated, "truncated or corrupt"), (empty, "empty"),
                          (unsafe, "cannot be loaded safely"), (tmp_path / "absent.pth", "no such file")):
        code, _, err = _run(["convert", "vae", "--src", str(path), "--arch", str(TINY / "config.json"),
                             "--dry-run"], capsys)
        assert code == 2, path
        assert message in err, err
        assert "Traceback" not in err


def test_arch_resolution(tmp_path, capsys):
    assert vae_arch("d32") == get_vae_preset("2b") == VAEConfig()
    assert vae_arch("8b").arch_dict() == dict(codebook_dim=14, patch_size=8, ch_mult=(1, 2, 4, 4), base_ch=128,
                                                   num_res_blocks=2, in_channels=3, out_channels=3, pixel_unshuffle=1)
    ours = tmp_path / "ours.json"
    cfg = get_vae_preset("tiny").replace(compute_dtype="bfloat16")
    ours.write_text(json.dumps({"format": "varejax-vae/1", "model": cfg.to_dict()}))
    assert vae_arch(str(ours)) == cfg
    if (TINY / "config.json").exists():
        assert vae_arch(str(TINY / "config.json")).arch_dict() == get_vae_preset("tiny").arch_dict()
    with pytest.raises(ValueError, match="multiple of 32 or 24"):
        VAEConfig(base_ch=40)
    with pytest.raises(ValueError, match="downsamples"):
        VAEConfig(patch_size=32)
    with pytest.raises(KeyError, match="unknown VAE preset"):
        get_vae_preset("d16")
    with pytest.raises(ArchError, match="not 'varejax-vae/1'"):  # a transformer's config.json as --arch
        ours.write_text(json.dumps({"format": "varejax-infinity/1", "model": {}}))
        vae_arch(str(ours))
    code, _, err = _run(["convert", "vae", "--src", "x.pth", "--arch", "d99", "--dry-run"], capsys)
    assert code == 2 and "unknown VAE preset" in err and "Traceback" not in err
    code, _, err = _run(["convert", "vae", "--src", "x.pth", "--arch", "d32"], capsys)
    assert code == 2 and "--out is required" in err
