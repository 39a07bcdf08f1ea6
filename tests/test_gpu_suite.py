"""benchmarks/gpu_suite.py: the CPU rehearsal of the one-GPU suite writes every stage with consistent numbers,
skips what its time budget no longer allows, and benchmarks/gpu_suite.sh resolves its python and command."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from varejax.configlib import load_config
from varejax.models.config import get_preset

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_suite_benchmark", REPO / "benchmarks" / "gpu_suite.py")
gpu_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_suite)

STAGES = {"device", "sampling", "svare_step", "memory", "upstream", "cudnn_trace"}
# The rehearsal at its smallest: 3 scales (64 px), one sampling batch of 2, deferred until after the S-VARE step
# (the 2B run samples batch 1 first and batch 4 after it; every sampler compile costs ~5 s on a CPU).
REHEARSAL = ["config.num_scales=3", "config.sampling.batches=(2,)", "config.sampling.deferred_batches=(2,)"]
# cudnn asked for on a CPU: both stages must record the kernel's failure and fall back, as a GPU run would.
CUDNN = ["config.sampling.attention_impl=cudnn", "config.svare.attention_impl=cudnn"]


def _config(*overrides):
    return load_config(f"{REPO / 'configs' / 'gpu_suite.py'}:tiny", [*REHEARSAL, *overrides])


def _is_median(value, times):
    return len(times) == 3 and value == pytest.approx(statistics.median(times), abs=1e-5)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    os.environ.pop("VAREJAX_UPSTREAM_INFINITY", None)   # the upstream stage must say why it did not run
    out = tmp_path_factory.mktemp("gpu_suite") / "gpu_suite.json"
    results = gpu_suite.run_suite(_config(*CUDNN), str(out), cache_dir=None)
    return results, json.loads(out.read_text())


def test_rehearsal_writes_every_stage(rehearsal):
    results, on_disk = rehearsal
    assert on_disk == json.loads(json.dumps(results, default=str))
    assert on_disk["finished"] is True and on_disk["size"] == "tiny"
    assert set(on_disk["stages"]) == STAGES
    for name, stage in on_disk["stages"].items():
        assert stage["status"] in ("ok", "skipped", "failed_trace"), (name, stage)
        assert stage.get("wall_s", 0) >= 0
    device = on_disk["stages"]["device"]
    assert device["platform"] == "cpu" and device["bf16_dense_peak_tflops"] is None
    summary = on_disk["summary"]
    assert summary["per_image_s"] == {"batch_2": on_disk["stages"]["sampling"]["runs"]["batch_2"]["per_image_s"]}
    assert summary["svare_step_s"] == on_disk["stages"]["svare_step"]["step_s"] > 0
    assert summary["svare_mfu"] is None and summary["meets_mfu_target"] is None   # no CPU peak
    assert summary["meets_latency_target"] is None   # targets are judged for the 2b size only


def test_summary_judges_the_targets_for_2b_only():
    stages = {"sampling": {"runs": {"batch_1": {"status": "ok", "per_image_s": 0.3, "decode": "on"},
                                    "batch_4": {"status": "error"}}},
              "svare_step": {"step_s": 2.0, "mfu": 0.41, "attention_impl": "cudnn"}}
    summary = gpu_suite.summarise(stages, "2b")
    assert summary["per_image_s"] == {"batch_1": 0.3} and summary["decode_included"] == {"batch_1": True}
    assert summary["meets_latency_target"] is True and summary["meets_mfu_target"] is False
    tiny = gpu_suite.summarise(stages, "tiny")
    assert tiny["meets_latency_target"] is None and tiny["meets_mfu_target"] is None


def test_rehearsal_sampling_numbers_are_consistent(rehearsal):
    _, out = rehearsal
    sampling = out["stages"]["sampling"]
    assert sampling["status"] == "ok"
    assert (sampling["schedule_scales"], sampling["L"], sampling["pixels"]) == (3, 1 + 4 + 16, [64, 64])
    assert sampling["param_dtype"] == "bfloat16"
    assert set(sampling["runs"]) == {"batch_2"}
    for key, run in sampling["runs"].items():
        batch = run["batch"]
        assert key == f"batch_{batch}" and run["status"] == "ok" and run["attention_impl"] == "xla"
        assert set(run["attention_error"]) == {"cudnn"}   # the fallback kernel ran after cudnn failed
        assert run["compile_s"] > 0 and run["decode_compile_s"] > 0
        for field in ("sampler", "decode", "latency"):
            assert run[f"{field}_s"] > 0 and _is_median(run[f"{field}_s"], run[f"{field}_times_s"]), (key, field)
        assert run["image_shape"] == [batch, 64, 64, 3]
        assert run["per_image_s"] == pytest.approx(run["latency_s"] / batch, abs=1e-5)
        assert run["images_per_s"] == pytest.approx(batch / run["latency_s"], rel=1e-2)
        assert run["sampler_memory"]["argument_bytes"] > 0
    # Batch 2 ran after the S-VARE step (deferred), so its memory snapshot comes last.
    assert list(out["stages"]["memory"]["snapshots"]) == ["start", "after_svare_step", "after_sampling_batch_2"]


def test_rehearsal_svare_step_flops_and_mfu_fields(rehearsal):
    _, out = rehearsal
    step = out["stages"]["svare_step"]
    assert step["status"] == "ok" and step["attention_impl"] == "chunked" and step["remat"] is True
    assert set(step["attention_error"]) == {"cudnn"}
    assert (step["mode"], step["batch"], step["L"]) == ("alternating", 2, 21)
    assert step["step_s"] > 0 and _is_median(step["step_s"], step["step_times_s"])
    assert 0 < step["trainable_params"] < step["params"]
    model_flops = step["analytic_flops"]["model_flops_per_iteration"]
    assert model_flops > 0 and step["xla_cost_analysis_flops"] > 0
    assert step["analytic_flops"]["executed_estimate_flops_per_iteration"] > model_flops   # padding, remat
    assert step["model_tflops_per_s"] == pytest.approx(model_flops / step["step_s"] / 1e12, rel=1e-2, abs=1e-4)
    assert step["mfu"] is None and step["xla_flops_utilisation"] is None   # no bf16 peak known for a CPU
    assert all(v is not None and v == v for v in (step["loss_erase"], step["loss_pre"]))   # finite, not NaN
    assert out["stages"]["memory"]["peak_bytes_in_use"] is None   # XLA:CPU reports no memory_stats()


def test_rehearsal_upstream_and_cudnn_trace_say_what_happened(rehearsal):
    _, out = rehearsal
    upstream = out["stages"]["upstream"]
    assert upstream["status"] == "skipped" and "VAREJAX_UPSTREAM_INFINITY" in upstream["reason"]
    traces = out["stages"]["cudnn_trace"]["traces"]
    assert set(traces) == {"sampling", "svare_step"}
    assert (out["stages"]["cudnn_trace"]["status"] == "ok") == all(v == "ok" for v in traces.values())


def test_exhausted_budget_skips_the_stages_and_still_finishes(tmp_path):
    out = tmp_path / "suite.json"
    gpu_suite.run_suite(_config("config.budget_s=0"), str(out), cache_dir=None)
    stages = json.loads(out.read_text())["stages"]
    assert json.loads(out.read_text())["finished"] is True and stages["device"]["status"] == "ok"
    for name in ("sampling", "svare_step", "upstream", "cudnn_trace"):
        assert stages[name]["status"] == "skipped", name
    assert all(r["reason"].startswith("time budget") for r in stages["sampling"]["runs"].values())


def test_random_params_on_host_and_on_device_keep_shapes_and_dtypes():
    import jax
    import jax.numpy as jnp
    import numpy as np

    abstract = {"w": jax.ShapeDtypeStruct((3, 5), jnp.bfloat16), "b": jax.ShapeDtypeStruct((5,), jnp.float32)}
    for host_limit in (1 << 26, 0):   # numpy on the host (small states), the device program (2B)
        values = gpu_suite.random_params(abstract, seed=1, host_limit=host_limit)
        for name, spec in abstract.items():
            array = np.asarray(values[name], np.float32)
            assert values[name].shape == spec.shape and values[name].dtype == spec.dtype
            assert np.all(np.abs(array) <= 0.025) and np.unique(array).size > array.size // 2, (name, host_limit)


def test_a_failing_stage_is_recorded_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "suite.json"
    gpu_suite.run_suite(_config("config.sampling.batches=()", "config.sampling.deferred_batches=()",
                                "config.svare.mode=no_such_mode", "config.cudnn_trace_check=False"),
                        str(out), cache_dir=None)
    results = json.loads(out.read_text())
    step = results["stages"]["svare_step"]
    assert step["status"] == "error" and "no_such_mode" in step["error"] and step["traceback_tail"]
    assert results["finished"] is True and results["stages"]["upstream"]["status"] == "skipped"
    assert "cudnn_trace" not in results["stages"]


def test_2b_on_a_cpu_stops_after_the_device_stage(tmp_path):
    out = tmp_path / "suite.json"
    gpu_suite.run_suite(load_config(f"{REPO / 'configs' / 'gpu_suite.py'}:2b"), str(out), cache_dir=None)
    results = json.loads(out.read_text())
    assert set(results["stages"]) == {"device", "memory"} and "accelerator" in results["stopped"]
    assert results["finished"] is False


def test_bf16_peak_table():
    assert gpu_suite.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_suite.bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_suite.bf16_peak_flops("NVIDIA H200") == 989e12
    assert gpu_suite.bf16_peak_flops("cpu") is None and gpu_suite.bf16_peak_flops("TPU v5 lite") is None


def test_analytic_flops_count_visible_pairs_and_scale_with_batch():
    cfg = get_preset("tiny")
    schedule = ((1, 1, 1), (1, 2, 2), (1, 4, 4))
    one = gpu_suite.svare_model_flops(cfg, schedule, batch=1, text_len=8)
    two = gpu_suite.svare_model_flops(cfg, schedule, batch=2, text_len=8)
    assert one["visible_attention_pairs"] == 1 * 1 + 4 * 5 + 16 * 21
    assert (one["L"], one["L_padded"]) == (21, 128)
    model = one["model"]
    assert model["per_iteration"] == 2 * (model["forward_per_pass"] + model["backward_per_pass"])
    assert two["model_flops_per_iteration"] == 2 * one["model_flops_per_iteration"]
    assert gpu_suite.svare_model_flops(cfg, schedule, batch=1, text_len=8, trainable="all") is None


def test_shell_script_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_SUITE_DRY_RUN": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--size", "tiny"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    command = next(line for line in done.stdout.splitlines() if line.startswith("command: "))
    assert "benchmarks/gpu_suite.py" in command and command.endswith("--size tiny")
    assert f"--out {tmp_path}/gpu_suite.json" in command and "--config.budget_s=" in command
    assert "compilation cache" in (tmp_path / "gpu_suite.log").read_text()
