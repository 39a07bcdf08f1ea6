"""`varejax sample`: text -> T5 -> sampler -> tokenizer decoder -> PNG + records, on tiny converted models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests import fixtures
from varejax.cli import main
from varejax.configlib import load_config
from varejax.sample.pipeline import Pipeline, image_grid, plan_images
from varejax.sample.sampler import SamplingConfig, sample_bits

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "sample.py")
pytestmark = fixtures.missing_mark("no Infinity fixture folder") if not fixtures.infinity_folders() else []


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dirs):
    return tiny_model_dirs


def _overrides(dirs, **extra):
    items = {"model.infinity": dirs["infinity"], "model.vae": dirs["vae"], "model.t5": dirs["t5"],
             "model.min_vocab": 100, "pn": "0.06M", "numerics.compute_dtype": "float32",
             "numerics.matmul_precision": "highest", "numerics.remat": False, **extra}
    return [f"config.{k}={v!r}" if isinstance(v, str) else f"config.{k}={v}" for k, v in items.items()]


def test_sample_command_writes_images_records_grid_and_resumes(model_dirs, tmp_path, capsys, monkeypatch):
    prompts = ("a red car in the city", "a small bird on a tree")
    args = ["sample", "--config", CONFIG, "--workdir", str(tmp_path)]
    args += ["--" + o for o in _overrides(model_dirs, prompts=prompts, images_per_prompt=2, batch_size=3, seed=7)]
    assert main(args) == 0, capsys.readouterr().err
    pngs = sorted((tmp_path / "images").glob("*.png"))
    assert len(pngs) == 4 and (tmp_path / "grid.png").exists()
    record = json.loads((tmp_path / "images" / "00003.json").read_text())
    assert record["prompt"] == prompts[1] and record["seed"] == 10
    assert record["schedule"][-1] == [1, 16, 16] and set(record["models"]) == {"infinity", "vae", "t5"}
    assert record["guidance"] == [4.0] and record["top_p"] == 0.97

    calls = []
    monkeypatch.setattr(Pipeline, "generate", lambda *a, **k: calls.append(1))
    assert main(args) == 0
    assert calls == []  # every image was already there
    # Another guidance: the kept images are another run's; refused before sampling, nothing rewritten.
    stamps = [os.stat(p).st_mtime_ns for p in pngs]
    capsys.readouterr()
    assert main(args + ["--config.sampling.guidance=(3.0,)"]) == 2 and calls == []
    err = capsys.readouterr().err
    assert "00000.json was made with guidance [4.0], this run uses [3.0]" in err, err
    assert [os.stat(p).st_mtime_ns for p in pngs] == stamps


def test_seeds_batches_greedy_and_negative_prompts(model_dirs, tmp_path):
    config = load_config(CONFIG, _overrides(model_dirs))
    pipe = Pipeline.from_dirs(model_dirs["infinity"], model_dirs["vae"], model_dirs["t5"], min_vocab=100,
                              compute_dtype="float32", matmul_precision="highest")
    from varejax.models import schedules
    schedule = schedules.get_schedule(1.0, "0.06M")
    sampling = SamplingConfig(guidance=(3.0,), tau=(1.0,), top_p=0.97)
    prompts = ["a red car", "a blue house"]
    pair = pipe.generate(prompts, [1, 2], sampling, schedule)
    assert pair.shape == (2, 256, 256, 3) and pair.dtype == np.uint8
    # An image depends on its own seed, not on the rest of its batch.
    alone = pipe.generate(prompts[1:], [2], sampling, schedule)
    assert np.abs(alone[0].astype(int) - pair[1].astype(int)).max() <= 1
    other_seed = pipe.generate(prompts[1:], [3], sampling, schedule)
    assert np.abs(other_seed[0].astype(int) - pair[1].astype(int)).max() > 10
    greedy = SamplingConfig(guidance=(3.0,), tau=(1.0,), greedy=True)
    g1, g2 = pipe.generate(prompts, [1, 2], greedy, schedule), pipe.generate(prompts, [5, 6], greedy, schedule)
    np.testing.assert_array_equal(g1, g2)
    negative = pipe.generate(prompts, [1, 2], greedy, schedule, negative_prompt="a green tree")
    assert np.abs(negative.astype(int) - g1.astype(int)).max() > 10
    assert config.sampling.top_k == 900


def test_missing_models_and_bad_overrides_are_clear(tmp_path, capsys):
    # Some models given but not all: say which is missing (none given means the embedded toy world).
    assert main(["sample", "--config", CONFIG, "--workdir", str(tmp_path), "--config.model.t5=/somewhere"]) == 2
    assert "config.model.infinity is empty" in capsys.readouterr().err
    assert main(["sample", "--config", CONFIG, "--workdir", str(tmp_path), "--config.nope=1"]) == 2
    assert "no such field" in capsys.readouterr().err


def test_top_p_and_top_k_per_bit():
    import jax
    import jax.numpy as jnp

    logits = jnp.array([[[0.0, 5.0], [0.0, 1.0], [2.0, 2.0]]])  # p(small) = 0.0067, 0.27, 0.5
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = np.stack([np.asarray(sample_bits(logits, k, 0, 0.97, False)) for k in keys[:400]])
    assert (draws[:, 0, 0] == 1).all()                 # the 0.7 % class is cut by top_p 0.97
    assert 0.6 < draws[:, 0, 1].mean() < 0.85          # p(1) = 0.73 survives
    assert 0.35 < draws[:, 0, 2].mean() < 0.65
    np.testing.assert_array_equal(np.asarray(sample_bits(logits, keys[0], 1, 0.0, False))[0], [1, 1, 0])


def test_plan_and_grid():
    assert plan_images(["a", "b"], 2, 10) == [("a", 10), ("a", 11), ("b", 12), ("b", 13)]
    grid = image_grid(np.ones((5, 2, 3, 3), np.uint8))
    assert grid.shape == (4, 9, 3) and grid[2:, 6:].sum() == 0 and grid[:2].all()
