"""`varejax sweep` on the toy world: grid expansion, stacking, a stacked run equal to the same run trained
alone, a crashed sweep resuming its stack, finished runs never redone, and the results table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests import measured
from varejax.configlib import load_config
from varejax.errors import ConfigError
from varejax.sweep.grid import expand
from varejax.sweep.runner import Sweep, group_stacks, stack_key

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "sweep_toy.py")
CIRCLE = "({'name': 'circle', 'toy.concepts': ('circle',), 'toy.anchors': ('',)},)"
# The toy sweep made small: 4 pairs, 4 steps, 4 prompts per evaluation set.
SMALL = ["config.base.train.steps=4", "config.base.train.checkpoint_every=2", "config.base.toy.pairs_per_concept=4",
         "config.base.prepare.batch_size=4", "config.base.eval.concept_prompts=4", "config.base.eval.other_prompts=4",
         "config.base.eval.following_prompts=4", "config.base.eval.batch_size=4"]


def _config(seeds=(0, 1), stack_size=2):
    return load_config(CONFIG + ":ci", SMALL + [f"config.grid=(('concept', {CIRCLE}), ('seed', {tuple(seeds)!r}))",
                                                 f"config.stack_size={stack_size}"])


def test_the_toy_grid_expands_into_named_runs_and_stacks_by_method():
    config = load_config(CONFIG + ":ci")
    runs = expand(config.base, config.grid)
    assert len(runs) == 2 * 3 * 2 * 2 and len({r.name for r in runs}) == len(runs)
    first = runs[0]
    assert first.name == "concept=circle,method=svare,learning_rate=0.0003,seed=0"
    assert first.grid == {"concept": "circle", "method": "svare", "learning_rate": "0.0003", "seed": "0"}
    assert first.config.toy.anchors == ("",) and first.config.train.erase_loss == "fce"  # "": the world's default
    esd = next(r for r in runs if r.grid["method"] == "esd" and r.grid["concept"] == "striped")
    assert esd.config.train.mode == "erase_only" and esd.config.toy.concepts == ("striped",)
    assert esd.config.toy.anchors == ("plain",) and config.base.train.erase_loss == "fce"  # base untouched
    stacks = group_stacks(runs, 8)
    assert [len(s) for s in stacks] == [8, 8, 8]
    for members in stacks:  # a stack holds one method, both concepts, both rates and seeds
        assert len({r.grid["method"] for r in members}) == 1 and len({r.grid["concept"] for r in members}) == 2
    assert [len(s) for s in group_stacks(runs, 3)] == [3, 3, 2] * 3
    assert stack_key(runs[0].config) != stack_key(esd.config)


def test_grid_errors_name_the_field_or_the_clash():
    base = load_config(CONFIG + ":ci").base
    with pytest.raises(ConfigError, match="train.learning_rat"):
        expand(base, (("train.learning_rat", (1e-3,)),))
    with pytest.raises(ConfigError, match="both named"):
        expand(base, (("method", ({"name": "a", "train.alpha": 0.1}, {"name": "a", "train.alpha": 0.2})),))
    with pytest.raises(ConfigError, match="at least one value"):
        expand(base, (("seed", ()),))


def _deltas(workdir: Path, name: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "runs" / name / "delta.safetensors"))


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """Two runs (seeds 0 and 1) trained in one stack, uninterrupted."""
    workdir = tmp_path_factory.mktemp("sweep") / "stacked"
    rows = Sweep(_config(), str(workdir), "test").run(verbose=False)
    return workdir, rows


@pytest.mark.slow
def test_a_run_in_a_stack_ends_as_it_does_alone(stacked, tmp_path):
    """Seed 1 trained alone by the ordinary trainer (stack_size 1) against seed 1 trained in the stack beside
    seed 0: the same deltas up to the float32 rounding of the vmapped step, the same evaluation."""
    workdir, rows = stacked
    Sweep(_config(seeds=(1,), stack_size=1), str(tmp_path), "test").run(verbose=False)
    name = "concept=circle,seed=1"
    alone, in_stack = _deltas(tmp_path, name), _deltas(workdir, name)
    assert alone.keys() == in_stack.keys()
    largest = max(float(np.abs(v).max()) for v in alone.values())
    diff = max(float(np.abs(alone[k] - in_stack[k]).max()) for k in alone)
    print(f"stacked vs alone: max |delta difference| {diff:.3g} (largest delta {largest:.3g})")
    # Empirical: 3e-8 to 4e-8 measured (4 steps); the vmapped matmuls round differently, nothing else.
    measured.check("sweep/toy_stacked_vs_alone_delta_max_abs", diff, 1e-4 * largest,
                   "max |delta(run in a stack of 2) - delta(run alone)|, toy, 4 steps")
    seeds_differ = max(float(np.abs(_deltas(workdir, "concept=circle,seed=0")[k] - in_stack[k]).max()) for k in alone)
    assert seeds_differ > 100 * diff  # the two runs of the stack really are different runs
    alone_row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    stacked_row = next(r for r in rows if r["name"] == name)
    for key in ("erasure_rate_seen_before", "preservation_before", "toy_fid_noise_floor"):
        assert alone_row["metrics"][key] == stacked_row["metrics"][key]


@pytest.mark.slow
def test_a_crashed_sweep_resumes_its_stack_to_the_same_parameters(stacked, tmp_path, monkeypatch):
    """The stack's training dies right after its step-2 checkpoint; the same sweep started again resumes
    from that checkpoint and ends with the uninterrupted stack's deltas, bit for bit."""
    from varejax.erase.checkpoints import Checkpoints

    save = Checkpoints.save

    def save_then_crash(self, step, state):
        save(self, step, state)
        if step == 2:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")

    monkeypatch.setattr(Checkpoints, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        Sweep(_config(), str(tmp_path), "test").run(verbose=False)
    assert not list(tmp_path.glob("runs/*/results.json"))
    monkeypatch.setattr(Checkpoints, "save", save)
    Sweep(_config(), str(tmp_path), "test").run(verbose=False)
    reference, _ = stacked
    for name in ("concept=circle,seed=0", "concept=circle,seed=1"):
        a, b = _deltas(reference, name), _deltas(tmp_path, name)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
        log = (tmp_path / "runs" / name / "metrics.jsonl").read_text()
        steps = [json.loads(line)["step"] for line in log.splitlines()]
        assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_finished_runs_are_never_redone_and_added_points_run(stacked, tmp_path):
    """A finished sweep started again with one more seed trains only the new run; the table has every run."""
    import shutil

    reference, _ = stacked
    workdir = tmp_path / "grown"
    shutil.copytree(reference, workdir)
    finished = {p: os.stat(p).st_mtime_ns for p in workdir.glob("runs/*/results.json")}
    assert len(finished) == 2
    rows = Sweep(_config(seeds=(0, 1, 2)), str(workdir), "test").run(verbose=False)
    assert {p: os.stat(p).st_mtime_ns for p in finished} == finished
    plan = json.loads((workdir / "sweep.json").read_text())
    assert plan["finished_before_this_start"] == ["concept=circle,seed=0", "concept=circle,seed=1"]
    assert [s["runs"] for s in plan["stacks"]] == [["concept=circle,seed=2"]]
    assert sorted(r["name"] for r in rows) == [f"concept=circle,seed={s}" for s in range(3)]
    import csv
    table = list(csv.DictReader((workdir / "results.csv").read_text().splitlines()))
    assert [r["name"] for r in table] == [f"concept=circle,seed={s}" for s in range(3)]
    assert all(0.0 <= float(r["erasure_rate_seen_after"]) <= 1.0 for r in table)
    assert "## circle" in (workdir / "report.md").read_text() and (workdir / "figures" / "pareto.png").is_file()
    # The shared trajectories were prepared once: the grown sweep reused them.
    assert len(list((workdir / "shared" / "trajectories").iterdir())) == 1
    result = json.loads((workdir / "runs" / "concept=circle,seed=2" / "results.json").read_text())
    assert result["grid"] == {"concept": "circle", "seed": "2"} and result["train_steps"] == 4


@pytest.mark.slow
def test_the_infinity_sweep_config_runs_on_the_tiny_converted_model(tiny_model_dirs, tmp_path):
    """configs/sweep.py (the Infinity-2B sweep) with the tiny converted model and 2 pairs per concept: two
    concepts in one stack whose run axis is split over the mesh's data axis (2 of the 8 test devices);
    each run a normal erase workdir (model/, delta.safetensors, results.json) scored by its training
    metrics, and the trajectories prepared once per concept."""
    from tests import fixtures

    schedule = fixtures.schedule(fixtures.config(tiny_model_dirs["fixture"]))
    grid = ("(('concept', ({'name': 'church', 'pairs': ('pairs/church.jsonl',)}, "
            "{'name': 'van_gogh', 'pairs': ('pairs/van_gogh.jsonl',)})),)")
    overrides = {"model.infinity": tiny_model_dirs["infinity"], "model.t5": tiny_model_dirs["t5"],
                 "model.min_vocab": 100, "max_pairs_per_concept": 2, "schedule": schedule,
                 "prepare.batch_size": 2, "train.steps": 2, "train.batch_size": 2, "train.checkpoint_every": 2,
                 "train.learning_rate": 1e-3, "train.remat": False, "train.cond_drop_rate": 0.0,
                 "train.drop_path_rate": 0.0, "numerics.compute_dtype": "float32", "mesh.shape": (2, 1, 1)}
    config = load_config(str(REPO / "configs" / "sweep.py"), [f"config.base.{k}={v!r}" for k, v in overrides.items()]
                         + [f"config.grid={grid}"])
    rows = Sweep(config, str(tmp_path), "test").run(config_dir=str(REPO / "configs"), verbose=False)
    assert sorted(r["name"] for r in rows) == ["concept=church", "concept=van_gogh"]
    assert len({r["stack"] for r in rows}) == 1
    for row in rows:
        run = tmp_path / "runs" / row["name"]
        assert (run / "model" / "config.json").is_file() and (run / "delta.safetensors").is_file()
        assert np.isfinite(row["metrics"]["final_loss_erase"]) and row["steps"] == 2
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    church, van_gogh = _deltas(tmp_path, "concept=church"), _deltas(tmp_path, "concept=van_gogh")
    assert max(float(np.abs(church[k] - van_gogh[k]).max()) for k in church) > 0  # each run its own pairs
    assert len(list((tmp_path / "shared" / "trajectories").iterdir())) == 2


@pytest.mark.slow
def test_two_processes_sweep_like_one(stacked, tmp_path):
    """The same sweep under `launch/local.sh 2` (mesh (2, 1, 1): the stack's run axis split over the two
    processes, one run each) gives the one-process table: the same erasure rates, preservation and prompt
    following, the toy-FID noise floor to float32 rounding (the base model's images are sampled before any
    training, as in the toy job), deltas equal up to float32 rounding (the erased models' toy FID moves with
    them), and the rows written once, by process 0."""
    import shlex
    import subprocess
    import sys

    reference, rows = stacked
    overrides = [*SMALL, f"config.grid=(('concept', {CIRCLE}), ('seed', (0, 1)))", "config.stack_size=2",
                 "config.base.mesh.shape=(2, 1, 1)"]
    command = shlex.join([sys.executable, "-m", "varejax", "sweep", "--config", CONFIG + ":ci", "--workdir",
                          str(tmp_path), *(f"--{o}" for o in overrides)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("VAREJAX_JAX_CACHE", str(REPO / ".jax_cache")),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "2", command], cwd=REPO, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:]
    assert "[1] 2 runs finished" not in out.stdout and "[0] 2 runs finished" in out.stdout
    two = {r["name"]: r for r in (json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())}
    one = {r["name"]: r for r in rows}
    assert two.keys() == one.keys()
    for name, row in one.items():
        for key in ("erasure_rate_seen_before", "erasure_rate_seen_after", "erasure_rate_paraphrase_after",
                    "preservation_before", "preservation_after", "prompt_following"):
            assert two[name]["metrics"][key] == row["metrics"][key], (name, key)
        # The noise floor is a Frechet distance of 4 samples in the oracle's 128 feature dimensions: the oracle
        # is compiled for another device count here (1 device per process against 8 test devices), and float32
        # rounding of its features comes out amplified (measured 1.4e-6 relative).
        floor_one, floor_two = row["metrics"]["toy_fid_noise_floor"], two[name]["metrics"]["toy_fid_noise_floor"]
        assert abs(floor_two - floor_one) <= 1e-5 * floor_one, (name, floor_one, floor_two)
        a, b = _deltas(reference, name), _deltas(tmp_path, name)
        largest = max(float(np.abs(v).max()) for v in a.values())
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        print(f"{name}: 2 processes vs 1, max |delta difference| {diff:.3g} (largest {largest:.3g}); toy FID "
              f"{two[name]['metrics']['toy_fid']:.2f} vs {row['metrics']['toy_fid']:.2f}")
        measured.check("sweep/toy_2proc_vs_1proc_delta_max_abs", diff, 0.01 * largest,
                       "max |delta(sweep on 2 processes) - delta(1 process)|, toy, stack of 2, 4 steps")
