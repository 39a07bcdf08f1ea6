"""benchmarks/erase_memory.py compiles the program training runs, and its breakdown adds up to XLA's totals."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import jax
import pytest

from varejax.configlib import load_config
from varejax.erase.defaults import base_config

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("erase_memory_benchmark", ROOT / "benchmarks" / "erase_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset's estimate (one compile) and the script module."""
    script = _script()
    config = load_config(str(ROOT / "configs" / "erase_memory.py") + ":tiny")
    return script, config, script.estimate(config, keep_hlo=True)


def test_compiles_the_training_numerics(tiny):
    _, _, result = tiny
    training = base_config(())
    settings = result["settings"]
    # The same fields `varejax erase` reads, not a copy that could drift.
    assert settings["attention_impl"] == training.numerics.attention_impl == "chunked"
    assert settings["compute_dtype"] == training.numerics.compute_dtype
    assert settings["remat"] is bool(training.train.remat)
    assert settings["param_dtype"] == ("bfloat16" if training.train.bf16_params else "float32")
    # Chunked attention is a lax.map over blocks of 256 queries: while loops that run ceil(Lp / 256) times
    # in the compiled program (the other loops, of the threefry PRNG, run 5 times).
    chunks = -(-result["L_padded"] // 256)
    assert chunks != 5
    chunk_loops = re.findall(rf'known_trip_count":{{"n":"{chunks}"}}', result["hlo"])
    assert len(chunk_loops) >= 2 * 2 * 2  # self- and cross-attention, 2 blocks, 2 passes
    # and the traced program has more loops than the PRNG's alone (full-matrix `xla` attention has none).
    assert result["stablehlo"].count("stablehlo.while") > result["stablehlo"].count("func.func private @threefry")


def test_breakdown_matches_xla_totals(tiny):
    _, _, result = tiny
    parts, xla = result["per_device_bytes"], result["per_device_bytes"]["xla"]
    params = parts["params_trainable"] + parts["params_frozen"]
    rng_bytes = 8  # one threefry key
    # Arguments: parameters + optimiser state + the batch fields the step reads + the key, to the byte.
    assert xla["argument"] == params + parts["opt_state"] + parts["batch"] + rng_bytes
    # Donation: parameters and optimiser state come back in their input buffers.
    assert xla["alias"] == params + parts["opt_state"]
    # The only other outputs are the scalar metrics.
    assert 0 < xla["output"] - xla["alias"] < 4096
    # Adam keeps two moments per trainable parameter (same dtype) plus a few scalars.
    assert 0 <= parts["opt_state"] - 2 * parts["params_trainable"] < 64
    # Every gradient is live at once (the global-norm clip reads them all before the update).
    assert xla["temp"] >= parts["grads"]
    assert parts["peak"] == xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    gib = result["per_device_GiB"]
    assert gib["temp_rest"] == pytest.approx((xla["temp"] - parts["grads"] - parts["saved_activations_est"])
                                             / 1024 ** 3, abs=1e-3)
    assert result["fits_80gb_by_cpu_compile"] is (parts["peak"] / 1024 ** 3 <= result["budget_GiB"])
    assert result["params"]["trainable"] + result["params"]["frozen"] == result["params"]["total"]
    assert result["platform"] == jax.devices()[0].platform


def test_saved_activations_match_the_traced_program(tiny):
    """The analytic count of what remat keeps agrees with the residuals JAX saves for the backward pass."""
    _, _, result = tiny
    parts = result["per_device_bytes"]
    assert result["settings"]["remat"] is True
    assert parts["saved_activations_jax"] == pytest.approx(parts["saved_activations_est"], rel=0.05)
    # The compiler's temporaries hold them, the gradients and the working set.
    assert parts["saved_activations_jax"] + parts["grads"] < parts["xla"]["temp"]


def test_remat_model_adds_up(tiny):
    script, config, result = tiny
    result = dict(result)
    script.add_remat_model(result, result, config)  # the estimate as its own probe: only the arithmetic
    parts, xla = result["per_device_bytes"], result["per_device_bytes"]["xla"]
    model = result["remat_model"]
    working_set = xla["temp"] - parts["grads"] - parts["saved_activations_est"]
    expected = xla["argument"] + xla["output"] - xla["alias"] + parts["grads"] + parts["saved_activations_jax"] \
        + working_set
    assert model["peak_GiB"] == pytest.approx(expected / 1024 ** 3, abs=1e-3)
    assert result["fits_80gb"] is (expected / 1024 ** 3 <= result["budget_GiB"])


def test_opt_state_placement(tiny):
    """Steady state: AdamW moments sharded like their parameters; the trainer's init: replicated (first step)."""
    script, _, _ = tiny
    from varejax.configlib import rules_tuple
    from varejax.erase import optim
    from varejax.erase.trainer import svare_config
    from varejax.models import apply
    from varejax.parallel import abstract_sharded_state, make_mesh

    config = load_config(f"{ROOT / 'configs' / 'erase_memory.py'}:tiny", ["config.mesh.shape=(1, 2, 4)"])
    mesh, rules, scfg = make_mesh((1, 2, 4)), rules_tuple(config.mesh.rules), svare_config(config)
    params = abstract_sharded_state(apply.abstract_params(script.training_model_config(config)), mesh, rules)
    steady = script.abstract_opt_state(params, scfg, mesh, rules, "steady")
    first = script.abstract_opt_state(params, scfg, mesh, rules, "trainer_init")
    train = optim.trainable_params(params, scfg.optim.trainable)
    mu = steady.inner_state[1].mu
    assert all(mu[path].sharding == leaf.sharding for path, leaf in train.items())
    assert any(not leaf.sharding.is_fully_replicated for leaf in train.values())
    assert script.per_device_bytes(steady) < script.per_device_bytes(first)
    with pytest.raises(ValueError, match="opt_state_sharding"):
        script.abstract_opt_state(params, scfg, mesh, rules, "sharded")
