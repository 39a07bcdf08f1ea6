"""`varejax convert t5`: HF folder layouts, full T5 checkpoints, dry runs, and every failure a user meets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers  # noqa: F401  (imported, not importorskip: requirements-dev.txt has it)

from tests import measured
from tests import t5_helpers as h
from varejax.checkpoint import FORMATS, load_t5
from varejax.cli import main
from varejax.convert.t5_keys import expected_shapes
from varejax.models import t5


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def encoder():
    """The gated-GELU tiny encoder (same sizes and inputs as test_t5's, so jitted programs are shared)."""
    return h.make_encoder(seed=0)


@pytest.fixture()
def hf_folder(encoder, tmp_path):
    folder = tmp_path / "hf"
    encoder.save_pretrained(folder)
    return folder


def _assert_parity(model, out_dir, name, lengths=h.LENGTHS):
    cfg, params = load_t5(str(out_dir))
    ids, mask = h.inputs(lengths)
    err = float(np.max(np.abs(np.asarray(t5.encode(params, ids, mask, cfg)) - h.torch_hidden(model, ids, mask))))
    measured.check(f"t5/{name}/last_hidden_state", err, 1e-5)
    return err


def test_key_table_matches_hf_state_dict(encoder):
    cfg = t5.T5Config.from_hf_config(encoder.config.to_dict())
    hf = {k: tuple(v.shape) for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert expected_shapes(cfg) == hf
    relu = h.make_encoder(feed_forward_proj="relu")
    cfg = t5.T5Config.from_hf_config(relu.config.to_dict())
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in relu.state_dict().items()
                                    if k != "encoder.embed_tokens.weight"}


def test_dry_run_writes_nothing(hf_folder, tmp_path, capsys):
    code, out, err = _run(["convert", "t5", "--src", str(hf_folder), "--dry-run"], capsys)
    assert code == 0, err
    assert "all 21 encoder tensors mapped" in out and "82,880 parameters" in out and "dry run" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parity
def test_sharded_bin_folder_with_tied_copy(encoder, tmp_path, capsys):
    folder = tmp_path / "bin"
    h.save_bin_shards(encoder, folder)  # state_dict() also holds encoder.embed_tokens.weight (tied)
    h.small_word_tokenizer().save(str(folder / "tokenizer.json"))
    code, out, err = _run(["convert", "t5", "--src", str(folder), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    assert "(sharded)" in out and "embed_tokens.weight checked equal to shared.weight" in out
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == FORMATS["t5"] and meta["model"]["num_layers"] == 2
    assert meta["tokenizer"] == "tokenizer.json"
    assert set(meta["source"]["sha256"]) == {"pytorch_model.bin.index.json", "config.json", "tokenizer.json",
                                             *(f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3))}
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    _assert_parity(encoder, tmp_path / "m", "sharded_bin_with_tied_copy")


@pytest.mark.parity
def test_full_t5_checkpoint_drops_decoder(tmp_path, capsys):
    full = h.make_encoder(seed=0, full=True)
    full.save_pretrained(tmp_path / "hf")
    n_decoder = sum(1 for k in full.state_dict() if k.startswith(("decoder.", "lm_head.")))
    code, out, err = _run(["convert", "t5", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    assert "lm_head tensors of a full T5 checkpoint dropped" in out and "no tokenizer.json" in out
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
        saved = sum(1 for k in f.keys() if k.startswith(("decoder.", "lm_head.")))  # noqa: SIM118
    assert saved > 0 and f"{saved} decoder/lm_head" in out and saved <= n_decoder
    _assert_parity(full, tmp_path / "m", "full_seq2seq_checkpoint")


def test_folder_with_both_formats_prefers_safetensors(encoder, hf_folder, tmp_path, capsys):
    h.save_bin_shards(encoder, hf_folder)
    encoder.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    shutil.copytree(tmp_path / "sharded", hf_folder, dirs_exist_ok=True)
    (hf_folder / "model.safetensors").unlink()  # now: two index files, no single file
    code, out, err = _run(["convert", "t5", "--src", str(hf_folder), "--dry-run"], capsys)
    assert code == 0, err
    assert "(sharded)" in out
    from varejax.convert.common import find_weights
    from varejax.convert.sources import open_checkpoint
    assert find_weights(hf_folder).name == "model.safetensors.index.json"
    assert all(f.endswith((".safetensors", ".index.json")) for f in open_checkpoint(find_weights(hf_folder)).files)


def test_bf16_storage_and_overwrite(hf_folder, tmp_path, capsys):
    from varejax.sample.text_features import checkpoint_hash

    out_dir = tmp_path / "m"
    assert _run(["convert", "t5", "--src", str(hf_folder), "--out", str(out_dir)], capsys)[0] == 0
    f32_hash = checkpoint_hash(out_dir)
    code, _, err = _run(["convert", "t5", "--src", str(hf_folder), "--out", str(out_dir)], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = _run(["convert", "t5", "--src", str(hf_folder), "--out", str(out_dir), "--overwrite",
                         "--param-dtype", "bfloat16"], capsys)
    assert code == 0, err
    cfg, params = load_t5(str(out_dir))
    assert cfg.param_dtype == "bfloat16" and params["shared"][...].dtype == np.dtype("bfloat16")
    assert checkpoint_hash(out_dir) != f32_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m"]  # no temporary folders left


def _rewrite(folder, change):
    """Re-saves folder/model.safetensors after `change(state)` (a dict of numpy arrays)."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("damage, expected", [
    ("drop_key", "missing  encoder.block.1.layer.1.layer_norm.weight"),
    ("bad_shape", "shape  encoder.block.0.layer.0.SelfAttention.q.weight: expected [64, 64], found [64, 63]"),
    ("other_model", "not a T5 encoder checkpoint"),
    ("wrapped", "every key starts with 'module.'"),
    ("relu_config", "config.json says feed_forward_proj 'relu' but the weights are 'gated-gelu'"),
    ("more_layers", "config.json says num_layers 3 but the weights hold 2 encoder blocks"),
    ("fewer_layers", "config.json says num_layers 1 but the weights hold 2 encoder blocks"),
    ("bigger_config", "config.json and the weights are of different T5 sizes"),
    ("untied", "differs from shared.weight"),
    ("no_config", "no config.json"),
    ("bert_config", "model_type is 'bert'"),
    ("decoder_config", "decoder-only"),
    ("no_weights", "no PyTorch/safetensors weights"),
    ("truncated", "not a readable safetensors file"),
])
def test_damaged_folders(damage, expected, hf_folder, tmp_path, capsys):
    config = hf_folder / "config.json"
    hf = json.loads(config.read_text())
    if damage == "drop_key":
        _rewrite(hf_folder, lambda s: s.pop("encoder.block.1.layer.1.layer_norm.weight"))
    elif damage == "bad_shape":
        key = "encoder.block.0.layer.0.SelfAttention.q.weight"
        _rewrite(hf_folder, lambda s: s.update({key: np.ascontiguousarray(s[key][:, :63])}))
    elif damage == "other_model":
        _rewrite(hf_folder, lambda s: [s.clear(), s.update({"head.weight": np.zeros((4, 4), np.float32)})])
    elif damage == "wrapped":
        _rewrite(hf_folder, lambda s: [s.update({f"module.{k}": s.pop(k) for k in list(s)})])
    elif damage == "relu_config":
        config.write_text(json.dumps({**hf, "feed_forward_proj": "relu", "dense_act_fn": "relu"}))
    elif damage == "more_layers":
        config.write_text(json.dumps({**hf, "num_layers": 3}))
    elif damage == "fewer_layers":
        config.write_text(json.dumps({**hf, "num_layers": 1}))
    elif damage == "bigger_config":
        config.write_text(json.dumps({**hf, "d_ff": 128}))
    elif damage == "untied":
        _rewrite(hf_folder, lambda s: s.update({"encoder.embed_tokens.weight": s["shared.weight"] + 1}))
    elif damage == "no_config":
        config.unlink()
    elif damage == "bert_config":
        config.write_text(json.dumps({**hf, "model_type": "bert"}))
    elif damage == "decoder_config":
        config.write_text(json.dumps({**hf, "is_decoder": True}))
    elif damage == "no_weights":
        (hf_folder / "model.safetensors").unlink()
    elif damage == "truncated":
        data = (hf_folder / "model.safetensors").read_bytes()
        (hf_folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in hf_folder.iterdir())
    out_dir = tmp_path / "out"
    code, _, err = _run(["convert", "t5", "--src", str(hf_folder), "--out", str(out_dir)], capsys)
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing left behind
    assert sorted(p.name for p in hf_folder.iterdir()) == before


def test_cli_argument_errors(tmp_path, capsys):
    code, _, err = _run(["convert", "t5", "--src", str(tmp_path)], capsys)
    assert code == 2 and "--out is required" in err
    code, _, err = _run(["convert", "t5", "--src", str(tmp_path / "absent"), "--dry-run"], capsys)
    assert code == 2 and "not a folder" in err


def test_model_folder_checks(hf_folder, tmp_path):
    from varejax.checkpoint import ModelDirError
    from varejax.convert.t5 import convert_t5

    with pytest.raises(ModelDirError, match="no config.json"):
        load_t5(str(tmp_path))
    convert_t5(str(hf_folder), str(tmp_path / "m"), progress=False)
    with pytest.raises(ModelDirError, match="architecture fields"):
        load_t5(str(tmp_path / "m"), num_layers=3)
    cfg, _ = load_t5(str(tmp_path / "m"), compute_dtype="bfloat16")
    assert cfg.compute_dtype == "bfloat16"
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**meta, "format": "varejax-infinity/1"}))
    with pytest.raises(ModelDirError, match="expected 'varejax-t5/1'"):
        load_t5(str(tmp_path / "m"))
