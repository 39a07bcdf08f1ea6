"""Portable erasure outputs: delta.safetensors metadata (base hash, method, config), `varejax merge` (round
trip bit for bit, several deltas summed, refusals), and a LoRA run's factors (lora.safetensors).

Two short real runs on the tiny fixture model (2 steps each, sharing one trajectory folder): full fine-tuning
with bf16 parameters and LoRA, whose deltas are exact, so merging them gives the run's model/ bit for bit;
synthetic float32 deltas written by `write_delta` for the rest (their float32 differences are not all exact:
the test checks that merge misses exactly the elements the metadata counts).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import varejax
from varejax.checkpoint import load_infinity, read_config
from varejax.cli import main
from varejax.erase import optim
from varejax.erase.export import LORA_FORMAT, params_sha256, read_metadata, write_delta
from varejax.erase.merge import factor_deltas
from varejax.models import apply

RUN = {"train.steps": 2, "train.checkpoint_every": 2}
FULL = {**RUN, "train.bf16_params": True}
LORA = {**RUN, "train.trainable": "lora", "train.lora_rank": 2, "train.lora_alpha": 4.0,
        "train.learning_rate": 1e-2}


def _flat(params):
    return {k: np.asarray(jax.device_get(v)) for k, v in apply.flat_params(params).items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory):
    """{"full": (config, result), "lora": (config, result)}: 2-step erase runs on the tiny model."""
    from tests.test_erase_trainer import CONFIG, _overrides, _pairs_file
    from varejax.configlib import load_config
    from varejax.erase.trainer import run_erase

    tmp = tmp_path_factory.mktemp("merge")
    pairs = _pairs_file(tmp, n=2)
    out = {}
    for name, extra in (("full", FULL), ("lora", LORA)):
        config = load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **extra,
                                                **{"prepare.trajectory_dir": str(tmp / "trajectories")}))
        out[name] = config, run_erase(config, tmp / name)
    return out


@pytest.fixture(scope="module")
def base(tiny_model_dirs):
    """(folder, cfg, params, params_sha256) of the tiny base model."""
    cfg, params = load_infinity(tiny_model_dirs["infinity"])
    return tiny_model_dirs["infinity"], cfg, params, params_sha256(params)


def _synthetic_delta(path, base, seed: int, base_hash: str | None = None, scale: float = 1e-3):
    """A float32 delta of the ca_ffn tensors (random bumps) recorded as made on `base_hash` (default: the
    base's) -> (its tensors, the bumped parameters)."""
    _, cfg, params, sha = base
    rng = np.random.default_rng(seed)
    # Decay and noise, as an optimiser step does (a plain p + noise would give exact differences: Fast2Sum).
    bumped = optim.merge_trainable(params, {
        k: v * np.float32(0.99) + np.float32(scale) * rng.standard_normal(v.shape).astype(np.float32)
        for k, v in optim.trainable_params(params, "ca_ffn").items()})
    write_delta(path, cfg, bumped, params, "ca_ffn", {"base_params_sha256": base_hash or sha,
                                                      "param_dtype": cfg.param_dtype})
    return load_file(str(path)), bumped


def _merge(capsys, *argv) -> tuple[int, str]:
    status = main(["merge", *map(str, argv)])
    return status, capsys.readouterr().err


# ---- metadata ------------------------------------------------------------------------------------------


def test_params_sha256_is_stable_and_content_defined(base):
    folder, cfg, params, sha = base
    assert len(sha) == 64 and params_sha256(load_infinity(folder)[1]) == sha
    # bf16 values hash the same whatever dtype holds them; a changed element changes the hash.
    _, as_bf16 = load_infinity(folder, param_dtype="bfloat16")
    _, widened = load_infinity(folder, param_dtype="float32")
    assert params_sha256(widened) == sha
    rounded = {k: np.asarray(v).astype(np.float32) for k, v in _flat(as_bf16).items()}
    assert params_sha256(rounded) == params_sha256(as_bf16) != sha
    flat = _flat(params)
    key = sorted(flat)[0]
    flat[key] = flat[key].copy()
    flat[key].flat[0] += 1
    assert params_sha256(flat) != sha
    # LoRA factors are not part of the base.
    _, adapted = load_infinity(folder, lora_rank=2)
    assert params_sha256(adapted) == sha


def _bf16_base_sha256(base) -> str:
    return params_sha256(load_infinity(base[0], param_dtype="bfloat16")[1])


def test_delta_metadata_records_base_method_and_config(runs, base):
    config, result = runs["full"]
    meta = read_metadata(result.workdir / "delta.safetensors")
    assert meta["format"] == "varejax-delta/1" and meta["varejax"] == varejax.__version__
    # The base as the run trained from it: the float32 folder rounded to bf16 (bf16_params).
    assert meta["base_params_sha256"] == _bf16_base_sha256(base) != base[3]
    assert meta["base_params_sha256"] == params_sha256(result.original_params)
    assert read_config(result.workdir / "model")["source"]["base_params_sha256"] == meta["base_params_sha256"]
    method = json.loads(meta["method"])
    assert method["erase_loss"] == "fce" and method["mode"] == "alternating" and method["trainable"] == "ca_ffn"
    assert method["alpha"] == config.train.alpha and method["learning_rate"] == config.train.learning_rate
    assert method["steps"] == 2 and method["seed"] == config.seed and method["pairs"] == list(config.pairs)
    assert json.loads(meta["config"]) == json.loads(config.to_json())
    assert method["bf16_params"] is True and meta["param_dtype"] == "bfloat16" and meta["trainable"] == "ca_ffn"
    assert meta["exact"] == "true" and meta["inexact_elements"] == "0"  # differences of bf16 values


# ---- merge ---------------------------------------------------------------------------------------------


def test_merge_reproduces_the_erased_model(runs, base, tmp_path, capsys):
    """base + delta.safetensors through `varejax merge` == the model/ the trainer wrote, bit for bit (a bf16 run:
    the base is loaded in bf16, as the run saw it, and the merged folder is bf16 like model/)."""
    _, result = runs["full"]
    delta = result.workdir / "delta.safetensors"
    status, err = _merge(capsys, "--base", base[0], delta, "--out", tmp_path / "merged")
    assert status == 0, err
    merged = _flat(load_infinity(str(tmp_path / "merged"))[1])
    erased = _flat(load_infinity(str(result.workdir / "model"))[1])
    _assert_same(merged, erased)
    source = read_config(tmp_path / "merged")["source"]
    base_hash = _bf16_base_sha256(base)
    assert source["merged"]["base_params_sha256"] == base_hash and not source["merged"]["forced"]
    assert source["params_sha256"] == params_sha256(erased)
    [record] = source["merged"]["deltas"]
    assert record["path"] == str(delta) and record["base_params_sha256"] == base_hash
    assert record["method"]["erase_loss"] == "fce" and len(record["file_sha256"]) == 64


def test_float32_deltas_miss_exactly_the_counted_elements(base, tmp_path, capsys):
    """A float32 difference of float32 parameters is exact only where it fits float32 (e.g. the two values
    within a factor 2): the metadata counts the other elements, and merge misses exactly those, by one
    rounding of the delta."""
    deltas, bumped = _synthetic_delta(tmp_path / "d.safetensors", base, seed=5)
    meta = read_metadata(tmp_path / "d.safetensors")
    status, err = _merge(capsys, "--base", base[0], tmp_path / "d.safetensors", "--out", tmp_path / "m")
    assert status == 0, err
    merged, want = _flat(load_infinity(str(tmp_path / "m"))[1]), _flat(bumped)
    misses = sum(int(np.count_nonzero(merged[k].view(np.uint32) != want[k].view(np.uint32))) for k in merged)
    print(f"float32 synthetic delta (0.99 p + N(0, 1e-3)), tiny model: {misses} of "
          f"{sum(v.size for v in deltas.values())} delta elements not exact")
    assert misses == int(meta["inexact_elements"]) > 0 and meta["exact"] == "false"
    worst = max(float(np.abs(merged[k].astype(np.float64) - want[k]).max()) for k in merged)
    assert worst <= 2 ** -23 * max(float(np.abs(v).max()) for v in deltas.values())


def test_two_deltas_are_summed_in_order(base, tmp_path, capsys):
    _, cfg, params, sha = base
    first, _ = _synthetic_delta(tmp_path / "a.safetensors", base, seed=1)
    second, _ = _synthetic_delta(tmp_path / "b.safetensors", base, seed=2)
    status, err = _merge(capsys, "--base", base[0], tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                         "--out", tmp_path / "ab")
    assert status == 0, err
    from varejax.convert.infinity_keys import upstream_key
    want = _flat(params)
    for path in want:
        key, transpose = upstream_key(path, cfg)
        if key in first:
            total = first[key] + second[key]
            want[path] = (want[path].astype(np.float32) + (total.T if transpose else total)).astype(want[path].dtype)
    _assert_same(_flat(load_infinity(str(tmp_path / "ab"))[1]), want)
    records = read_config(tmp_path / "ab")["source"]["merged"]["deltas"]
    assert [r["path"] for r in records] == [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert all(r["base_params_sha256"] == sha and not r["forced"] for r in records)


def test_refuses_a_delta_of_another_base_unless_forced(base, tmp_path, capsys):
    other = "0" * 64
    _synthetic_delta(tmp_path / "other.safetensors", base, seed=3, base_hash=other)
    status, err = _merge(capsys, "--base", base[0], tmp_path / "other.safetensors", "--out", tmp_path / "x")
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert other in err and base[3] in err and "--force" in err
    assert not (tmp_path / "x").exists()

    status, err = _merge(capsys, "--base", base[0], tmp_path / "other.safetensors", "--out", tmp_path / "x",
                         "--force")
    assert status == 0, err
    merged = read_config(tmp_path / "x")["source"]["merged"]
    assert merged["forced"] and merged["deltas"][0]["forced"] and merged["deltas"][0]["base_params_sha256"] == other


def test_refuses_keys_or_shapes_that_do_not_fit_and_an_existing_out(base, tmp_path, capsys):
    from safetensors.numpy import save_file

    good, _ = _synthetic_delta(tmp_path / "good.safetensors", base, seed=4)
    key = sorted(good)[0]
    meta = read_metadata(tmp_path / "good.safetensors")
    save_file({"no.such.weight": np.zeros(3, np.float32), key: np.zeros((2, 2), np.float32)},
              str(tmp_path / "bad.safetensors"), metadata=meta)
    status, err = _merge(capsys, "--base", base[0], tmp_path / "bad.safetensors", "--out", tmp_path / "y", "--force")
    assert status == 2 and err.count("\n") == 1
    assert "no.such.weight is not a parameter" in err and f"{key} has shape (2, 2)" in err
    assert not (tmp_path / "y").exists()

    (tmp_path / "taken").mkdir()
    status, err = _merge(capsys, "--base", base[0], tmp_path / "good.safetensors", "--out", tmp_path / "taken")
    assert status == 2 and "--overwrite" in err
    status, err = _merge(capsys, "--base", base[0], tmp_path / "good.safetensors", "--out", tmp_path / "taken",
                         "--overwrite")
    assert status == 0, err
    assert (tmp_path / "taken" / "config.json").is_file()


# ---- LoRA factors ------------------------------------------------------------------------------------


def test_lora_factors_round_trip(runs, base, tmp_path, capsys):
    """lora.safetensors: PEFT-named factors whose scale * B @ A is delta.safetensors bit for bit; merging the
    factors or the delta gives the run's (merged) model/ bit for bit."""
    config, result = runs["lora"]
    factors_file, delta_file = result.workdir / "lora.safetensors", result.workdir / "delta.safetensors"
    factors, deltas = load_file(str(factors_file)), load_file(str(delta_file))
    meta = read_metadata(factors_file)
    info = json.loads(meta["lora"])
    assert meta["format"] == LORA_FORMAT and meta["base_params_sha256"] == base[3]
    assert info["rank"] == 2 and float(info["scale"]) == result.cfg.lora_scale == 2.0
    assert info["targets"] == list(result.cfg.lora_modules())
    assert json.loads(meta["method"])["trainable"] == "lora"
    module = "block_chunks.0.module.0.sa.mat_qkv"
    width = result.cfg.embed_dim
    assert factors[f"{module}.lora_A.weight"].shape == (2, width)
    assert factors[f"{module}.lora_B.weight"].shape == (3 * width, 2)
    assert len(factors) == 2 * len(deltas) and read_metadata(delta_file)["exact"] == "true"

    rebuilt = factor_deltas(factors, float(info["scale"]))
    _assert_same(rebuilt, deltas)

    erased = _flat(load_infinity(str(result.workdir / "model"))[1])
    for name, delta in (("from_factors", factors_file), ("from_delta", delta_file)):
        status, err = _merge(capsys, "--base", base[0], delta, "--out", tmp_path / name)
        assert status == 0, err
        _assert_same(_flat(load_infinity(str(tmp_path / name))[1]), erased)


# ---- several processes -------------------------------------------------------------------------------


def test_two_processes_merge_like_one(base, tmp_path, capsys):
    """`launch/local.sh 2 "varejax merge ..."`: process 0 alone writes (the same arrays as one process), the
    other returns its status; a refusal on process 0 fails both."""
    import sys

    from tests.test_multihost import _launch
    from varejax.checkpoint import restore_flat

    _synthetic_delta(tmp_path / "d.safetensors", base, seed=6)
    _synthetic_delta(tmp_path / "other.safetensors", base, seed=7, base_hash="f" * 64)
    status, err = _merge(capsys, "--base", base[0], tmp_path / "d.safetensors", "--out", tmp_path / "one")
    assert status == 0, err
    cmd = f"{sys.executable} -m varejax.cli merge --base {base[0]}"
    out = _launch(2, f"{cmd} {tmp_path / 'd.safetensors'} --out {tmp_path / 'two'}", 300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "[1] process 1: merge ran on process 0 (status 0)" in out.stdout
    one, two = restore_flat(tmp_path / "one"), restore_flat(tmp_path / "two")
    _assert_same(one, two)
    assert read_config(tmp_path / "one")["source"] == read_config(tmp_path / "two")["source"]
    refused = _launch(2, f"{cmd} {tmp_path / 'other.safetensors'} --out {tmp_path / 'three'}", 300)
    assert refused.returncode == 2 and "[0] error:" in refused.stdout and "f" * 64 in refused.stdout, refused.stdout
    assert not (tmp_path / "three").exists()
