"""The S-VARE trainer end to end on tiny models: prepare, train, checkpoints, resume after a real kill,
non-finite losses, exports, validation images, and a sharded step equal to the single-device one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import fixtures, measured
from varejax.configlib import load_config
from varejax.data.pairs import PromptPair, write_pairs
from varejax.erase import optim
from varejax.erase.export import apply_delta, delta_tensors
from varejax.erase.identity import RunIdentityError
from varejax.erase.trainer import NonFiniteLossError, prepare_erase, run_erase

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "erase.py")
WORDS = ["red car", "blue house", "green tree", "small bird", "old man", "big dog"]


def _pairs_file(tmp_path: Path, n: int = 4) -> str:
    pairs = [PromptPair(f"a painting of a {WORDS[i % 6]} in the city at night",
                        f"a photo of a {WORDS[i % 6]} in the city", "painting") for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    write_pairs(pairs, path)
    return str(path)


def _overrides(dirs, pairs, **extra):
    schedule = fixtures.schedule(fixtures.config(dirs["fixture"]))
    items = {"model.infinity": dirs["infinity"], "model.t5": dirs["t5"], "model.vae": dirs["vae"],
             "model.min_vocab": 100, "pairs": (pairs,), "schedule": schedule, "prepare.batch_size": 2,
             "train.steps": 8, "train.batch_size": 2, "train.learning_rate": 1e-3, "train.checkpoint_every": 4,
             "train.remat": False, "train.cond_drop_rate": 0.0, "train.drop_path_rate": 0.0,
             "numerics.compute_dtype": "float32", "numerics.matmul_precision": "highest",
             "mesh.shape": (1, 1, 1), "validation.prompts": (), "validation.every": 0, **extra}
    return [f"config.{k}={v!r}" for k, v in items.items()]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("erase")
    config = load_config(CONFIG, _overrides(tiny_model_dirs, _pairs_file(tmp), **{
        "validation.prompts": ("a red car",), "validation.every": 4}))
    result = run_erase(config, tmp / "run")
    return config, result


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_fce_and_kept_fraction(finished_run):
    _, result = finished_run
    metrics = _metrics(result.workdir)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    first, last = metrics[0], metrics[-1]
    assert last["loss_erase"] < first["loss_erase"]
    assert last["kept_fraction"] < first["kept_fraction"]
    assert {"loss_pre", "grad_norm_erase", "grad_norm_pre", "lr", "kept_fraction_per_scale"} <= set(first)
    assert len(first["kept_fraction_per_scale"]) == len(fixtures.schedule(fixtures.config(
        fixtures.infinity_folders()[0])))
    assert any((result.workdir / "tb").iterdir())


def test_only_trainable_parameters_change_and_exports(finished_run):
    _, result = finished_run
    changed = optim.trainable_mask(result.params)
    from varejax.models.apply import flat_params
    before = {k: np.asarray(v) for k, v in flat_params(result.original_params).items()}
    after = {k: np.asarray(v) for k, v in flat_params(result.params).items()}
    for path, trainable in changed.items():
        if trainable:
            assert not np.array_equal(before[path], after[path]), path
        else:
            np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))
    # The erased model folder is the base plus the upstream-layout deltas, bit for bit, and the final
    # parameters up to a float32 rounding (where a float32 difference is not exact).
    from varejax.checkpoint import load_infinity
    _, exported = load_infinity(str(result.workdir / "model"))
    deltas = delta_tensors(result.cfg, result.params, result.original_params)
    assert "block_chunks.0.module.0.ca.mat_q.weight" in deltas
    assert "block_chunks.0.module.0.sa.proj.weight" not in deltas
    rebuilt = flat_params(apply_delta(result.cfg, result.original_params, result.workdir / "delta.safetensors"))
    for path, value in flat_params(exported).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(rebuilt[path]), err_msg=str(path))
        # one rounding of the difference (as large as the larger operand) and one of the sum
        ulp = np.spacing(np.maximum(np.abs(after[path]), np.abs(before[path])).astype(np.float32))
        assert np.all(np.abs(np.asarray(value) - after[path]) <= ulp), path


def test_trajectories_and_validation_images(finished_run):
    config, result = finished_run
    files = sorted((result.workdir / "trajectories").glob("*.npz"))
    assert len(files) == 4
    with np.load(files[0]) as data:
        L = sum(h * w for _, h, w in fixtures.schedule(fixtures.config(fixtures.infinity_folders()[0])))
        assert data["gt_bits"].shape == (L, result.cfg.bits_per_token)
        assert data["x_BLC_wo_prefix"].shape == (L - 1, result.cfg.bits_per_token)
        assert data["teacher_logits"].shape == data["concept_logits"].shape == (L, result.cfg.num_logits)
        assert json.loads(str(data["pair"]))["anchor"].startswith("a photo of")
    assert sorted(p.name for p in (result.workdir / "validation").glob("*.png")) == [
        "step_000000.png", "step_000004.png", "step_000008.png"]
    # prepare is resumable: a second call samples nothing and leaves the files untouched.
    from varejax.erase import prepare as prepare_module
    stamps = [os.stat(f).st_mtime_ns for f in files]  # epath's stat() has whole seconds only
    calls = []
    real = prepare_module.generate_jit
    prepare_module.generate_jit = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        prepare_erase(config, result.workdir)
    finally:
        prepare_module.generate_jit = real
    assert calls == [] and [os.stat(f).st_mtime_ns for f in files] == stamps


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dirs, tmp_path):
    pairs = _pairs_file(tmp_path)
    good = load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **{"train.steps": 2, "train.checkpoint_every": 1}))
    run_erase(good, tmp_path / "run")
    # Resume with an absurd learning rate: the first new step blows up.
    bad = load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **{
        "train.learning_rate": 1e30, "train.max_grad_norm": 1e30, "train.checkpoint_every": 1, "train.steps": 6}))
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss_\w+ = (nan|inf).*last good checkpoint \(step 2\)"):
        run_erase(bad, tmp_path / "run")
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 2
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2]


def test_rerun_with_other_inputs_is_refused_and_changes_nothing(finished_run, tiny_model_dirs, tmp_path):
    """A finished workdir re-run with another base model, other pairs or another seed stops with what
    differs (it would otherwise resume the old state), and leaves every file as it was."""
    config, result = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(result.workdir, workdir)
    files = sorted(p for p in workdir.rglob("*") if p.is_file())
    stamps = [(p.read_bytes(), os.stat(p).st_mtime_ns) for p in files]
    pairs = config.pairs[0]
    five_pairs = _pairs_file(tmp_path, n=5)
    cases = [
        ({"model.infinity": str(result.workdir / "model")},  # the erased model as the base
         r"trajectories of another run.*\n  base model: \d+ of \d+ parameter arrays hold other values"),
        ({"pairs_file": five_pairs}, r"trajectories of another run(.|\n)*pair_count: 4 saved, 5 now"),
        ({"seed": 1}, r"checkpoints of another run(.|\n)*seed: 0 saved, 1 now"),
    ]
    for change, message in cases:
        other = load_config(CONFIG, _overrides(tiny_model_dirs, change.pop("pairs_file", pairs), **change))
        with pytest.raises(RunIdentityError, match=message):
            run_erase(other, workdir)
    assert sorted(p for p in workdir.rglob("*") if p.is_file()) == files
    assert [(p.read_bytes(), os.stat(p).st_mtime_ns) for p in files] == stamps
    # The same run again resumes (its last checkpoint is the last step: nothing to train) and exports.
    again = run_erase(load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **{
        "validation.prompts": ("a red car",), "validation.every": 4})), workdir)
    assert [m["step"] for m in _metrics(workdir)] == list(range(1, 9))
    from varejax.models.apply import flat_params
    for path, value in flat_params(again.params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_params(result.params)[path]), str(path))


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.environ.get("VAREJAX_JAX_CACHE",
                                                                              str(REPO / ".jax_cache")),
               XLA_FLAGS="--xla_backend_optimization_level=0")
    return env


def _cli(workdir: Path, overrides: list[str], env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "varejax", "erase", "--config", CONFIG, "--workdir", str(workdir)]
    return subprocess.Popen(cmd + ["--" + o for o in overrides], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _cli_overrides(dirs, pairs, **extra) -> list[str]:
    return _overrides(dirs, pairs, **{"train.steps": 6, "train.checkpoint_every": 1, **extra})


@pytest.fixture(scope="module")
def cli_reference(tiny_model_dirs, tmp_path_factory):
    """`varejax erase` on the tiny model in one process (4 pairs, 6 steps, a checkpoint each step): the run
    that a killed-and-resumed run and a multi-process run must reproduce."""
    tmp = tmp_path_factory.mktemp("cli_reference")
    pairs = _pairs_file(tmp)
    reference = _cli(tmp / "reference", _cli_overrides(tiny_model_dirs, pairs), _cli_env())
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    return tmp / "reference", pairs


def test_killed_run_resumes_to_identical_parameters(tiny_model_dirs, cli_reference, tmp_path):
    reference, pairs = cli_reference
    overrides, env = _cli_overrides(tiny_model_dirs, pairs), _cli_env()
    victim = _cli(tmp_path / "killed", overrides, env)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        if checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 2 for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "model").exists()
    resumed = _cli(tmp_path / "killed", overrides, env)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    from varejax.checkpoint import restore_flat
    a, b = restore_flat(reference / "model"), restore_flat(tmp_path / "killed" / "model")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    steps = [m["step"] for m in _metrics(tmp_path / "killed")]
    assert steps == list(range(1, 7))


def _launch(n: int, workdir: Path, phase: str, overrides: list[str]) -> subprocess.CompletedProcess:
    import shlex

    command = shlex.join([sys.executable, "-m", "varejax", "erase", *([phase] if phase else []), "--config", CONFIG,
                          "--workdir", str(workdir), *("--" + o for o in overrides)])
    env = {**_cli_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["bash", str(REPO / "launch" / "local.sh"), str(n), command], cwd=REPO, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)


@pytest.mark.slow
def test_more_processes_than_pairs_prepare_and_two_processes_erase_like_one(tiny_model_dirs, cli_reference,
                                                                            tmp_path):
    """The real (converted) model on several processes joined by `launch/local.sh`: `varejax erase prepare`
    on 3 processes for 2 pairs (a process holds only padding) writes the one-process trajectories, and
    `varejax erase` on 2 processes (data parallel, the same global batch) ends with the one-process deltas."""
    from safetensors.numpy import load_file

    reference, pairs = cli_reference
    two_pairs = tmp_path / "two_pairs.jsonl"
    two_pairs.write_text("".join(open(pairs).readlines()[:2]))
    out = _launch(3, tmp_path / "three", "prepare", _cli_overrides(tiny_model_dirs, str(two_pairs), **{
        "mesh.shape": (3, 1, 1), "prepare.batch_size": 3, "train.batch_size": 3}))
    assert out.returncode == 0, out.stdout[-6000:]
    written = sorted(p.name for p in (tmp_path / "three" / "trajectories").iterdir())
    assert written == ["000000.npz", "000001.npz", "identity.json"], written  # no temporary or padding files
    for name in written[:2]:
        with np.load(reference / "trajectories" / name) as a, np.load(tmp_path / "three" / "trajectories" / name) as b:
            np.testing.assert_array_equal(a["gt_bits"], b["gt_bits"])
            diff = float(np.abs(a["x_BLC_wo_prefix"] - b["x_BLC_wo_prefix"]).max())
            print(f"3-process prepare, {name}: max |x difference| {diff:.3g}")
            measured.check("multihost/tiny_prepare_3proc_x_max_abs", diff, 1e-5,
                           "trajectory features, 3 processes (batch 3, one padded) vs 1 process (batch 2)")

    # The one-process trajectories, copied: the two-process run checks their identity (the base model's
    # fingerprint, reduced over another sharding, within its tolerance) and samples nothing.
    shutil.copytree(reference / "trajectories", tmp_path / "two" / "trajectories")
    out = _launch(2, tmp_path / "two", "", _cli_overrides(tiny_model_dirs, pairs, **{
        "mesh.shape": (2, 1, 1), "train.checkpoint_every": 6}))  # checkpoints do not change the numbers
    assert out.returncode == 0, out.stdout[-6000:]
    assert "anchor trajectories" not in out.stdout, "the copied trajectories were sampled again"
    a, b = load_file(str(reference / "delta.safetensors")), load_file(str(tmp_path / "two" / "delta.safetensors"))
    assert a.keys() == b.keys()
    largest = max(float(np.abs(v).max()) for v in a.values())
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"2-process erase, tiny model: max |delta difference| {diff:.3g} (largest delta {largest:.3g})")
    measured.check("multihost/tiny_erase_2proc_delta_max_abs", diff, 0.01 * largest,
                   "max |delta(2 processes) - delta(1 process)|, tiny Infinity, 6 steps")


def test_sharded_step_equals_single_device(finished_run):
    from varejax.erase.data import TrajectoryBatches, text_length
    from varejax.erase.step import SvareConfig, alternating_update, jit_step
    from varejax.parallel import DEFAULT_RULES, batch_sharding, make_mesh, shard_state, sharding_context

    _, result = finished_run
    files = sorted((result.workdir / "trajectories").glob("*.npz"))
    batch = TrajectoryBatches(files, 4, 0, text_length(files))[0]
    schedule = fixtures.schedule(fixtures.config(fixtures.infinity_folders()[0]))
    scfg = SvareConfig()
    step = jit_step(alternating_update)
    params = result.original_params
    ref_params, _, ref_metrics = step(params, optim.init_opt_state(params), batch, cfg=result.cfg,
                                      schedule=schedule, scfg=scfg)
    mesh = make_mesh((2, 2, 2))
    with sharding_context(mesh, DEFAULT_RULES):
        sharded = shard_state(params, mesh)
        opt_state = jax.jit(optim.init_opt_state)(sharded)
        sharded_batch = {k: jax.device_put(v, batch_sharding(mesh, DEFAULT_RULES, v.ndim)) for k, v in batch.items()}
        new_params, _, metrics = jit_step(alternating_update)(sharded, opt_state, sharded_batch, cfg=result.cfg,
                                                              schedule=schedule, scfg=scfg)
    assert abs(float(metrics["loss_erase"]) - float(ref_metrics["loss_erase"])) <= 1e-6
    from varejax.models.apply import flat_params
    ref = flat_params(ref_params)
    for path, value in flat_params(new_params).items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref[path]), atol=1e-6, err_msg=str(path))


def test_prefetched_batches_are_the_batches_in_step_order(finished_run):
    """The trainer's prefetching loader yields exactly batches[step] in order, and a failing load raises at
    its own step (earlier steps are delivered first)."""
    import threading

    from varejax.erase.data import TrajectoryBatches, prefetched, text_length

    _, result = finished_run
    files = sorted((result.workdir / "trajectories").glob("*.npz"))
    batches = TrajectoryBatches(files, 2, 0, text_length(files))
    got = list(prefetched(batches, range(3, 9), depth=3))
    assert [step for step, _ in got] == list(range(3, 9))
    for step, batch in got:
        reference = batches[step]
        assert set(batch) == set(reference)
        for key in reference:
            np.testing.assert_array_equal(batch[key], reference[key])

    class Failing:
        def __init__(self):
            self.loaded_by = set()

        def __getitem__(self, step):
            self.loaded_by.add(threading.current_thread().name)
            if step == 2:
                raise OSError(f"cannot read batch {step}")
            return {"step": step}

    failing, delivered = Failing(), []
    with pytest.raises(OSError, match="batch 2"):
        for _step, batch in prefetched(failing, range(5)):
            delivered.append(batch["step"])
    assert delivered == [0, 1]
    assert all(name.startswith("varejax-prefetch") for name in failing.loaded_by)  # loaded off the main thread
