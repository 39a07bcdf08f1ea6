"""LoRA adapters (config, init, trainable mode, merged exports, loading) and bf16 parameter storage.

Unit tests on a random tiny model (the config of tests/test_svare_step.py), and one short erase run on the
tiny fixture models through `run_erase` (trainable = "lora", with a resume from a checkpoint).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from tests import fixtures
from tests.test_svare_step import SCHED, _random_batch
from varejax.checkpoint import load_infinity
from varejax.convert.infinity_keys import expected_shapes, upstream_key
from varejax.erase import optim, step
from varejax.erase.export import apply_delta, delta_tensors, write_delta, write_erased_model
from varejax.models import apply, lora
from varejax.models.config import ARCH_FIELDS, LORA_FIELDS, InfinityConfig, get_preset
from varejax.models.layers import lora_a_init

BF16 = ml_dtypes.bfloat16
CFG = InfinityConfig(block_chunks=2)
LCFG = CFG.replace(lora_rank=4, lora_alpha=8.0)  # scale 2, official targets
LORA_SCFG = step.SvareConfig(optim=optim.OptimConfig(trainable="lora"))


def _np(x):
    return np.asarray(jax.device_get(x))


def _flat(params):
    return {k: _np(v) for k, v in apply.flat_params(params).items()}


@functools.cache
def _params(cfg):
    return apply.init_params(cfg, seed=1)


def _logits(params, cfg, batch):
    return _np(apply.forward_jit(params, batch["anchor_text"], batch["anchor_mask"], batch["x_BLC_wo_prefix"],
                                 SCHED, cfg=cfg))


# ---- config and key table ------------------------------------------------------------------------------


def test_config_fields_targets_and_key_table():
    assert not set(LORA_FIELDS) & set(ARCH_FIELDS)  # numerics: a converted checkpoint loads with LoRA added
    assert LCFG.lora_scale == 2.0 and CFG.replace(lora_rank=4).lora_scale == 1.0 and CFG.lora_scale == 0.0
    assert LCFG.lora_modules() == ("sa.mat_qkv", "sa.proj", "ca.mat_kv", "ca.proj")
    assert CFG.lora_modules() == ()  # rank 0: no adapters whatever the targets
    picked = CFG.replace(lora_rank=2, lora_targets=["ca.proj", "fc2", "mat_q"])  # a list (JSON) -> tuple
    assert picked.lora_targets == ("ca.proj", "fc2", "mat_q") and hash(picked)
    assert picked.lora_modules() == ("ca.mat_q", "ca.proj", "ffn.fc2")
    assert InfinityConfig.from_dict(picked.to_dict()) == picked
    assert picked.without_lora() == CFG
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        CFG.replace(lora_rank=4, lora_targets=("mat_qkv", "head"))
    with pytest.raises(ValueError, match=">= 0"):
        CFG.replace(lora_rank=-1)

    flat = apply.flat_params(apply.abstract_params(LCFG))
    factors = {k: v for k, v in flat.items() if k[-1] in ("lora_a", "lora_b")}
    assert len(factors) == 2 * 4 * LCFG.depth
    a, b = flat[("blocks", "1", "sa", "mat_qkv", "lora_a")], flat[("blocks", "1", "sa", "mat_qkv", "lora_b")]
    assert a.shape == (128, 4) and b.shape == (4, 384)
    # Logical axes: the kernel's input / output axes and the (never sharded) rank axis.
    state = apply.abstract_params(LCFG)
    var = state["blocks"][1]["sa"]["mat_qkv"]
    assert var["lora_a"].logical_axes == ("embed", "lora") and var["lora_b"].logical_axes == ("lora", "heads")
    # The upstream key table ignores the adapters: the 2B table (694 tensors in the dry run) is unchanged.
    base = get_preset("infinity_2b")
    every = base.replace(lora_rank=4, lora_targets=("mat_qkv", "mat_q", "mat_kv", "proj", "fc1", "fc2"))
    assert expected_shapes(every) == expected_shapes(base)


def test_lora_off_leaves_tree_and_logits_unchanged():
    off = CFG.replace(lora_alpha=8.0, lora_targets=("ffn.fc1",), lora_seed=5)  # rank 0: LoRA off
    plain, other = _flat(_params(CFG)), _flat(_params(off))
    assert plain.keys() == other.keys() and not any(k[-1].startswith("lora") for k in plain)
    for k in plain:
        np.testing.assert_array_equal(plain[k], other[k])
    batch = _random_batch()
    np.testing.assert_array_equal(_logits(_params(off), off, batch), _logits(_params(CFG), CFG, batch))


def test_fresh_adapters_equal_the_base_model_exactly():
    plain, with_lora = _flat(_params(CFG)), _flat(_params(LCFG))
    assert set(with_lora) - set(plain) == {k for k in with_lora if k[-1] in ("lora_a", "lora_b")}
    for k in plain:  # the adapters draw no random numbers from the model's rngs
        np.testing.assert_array_equal(plain[k], with_lora[k])
    for k, v in with_lora.items():
        if k[-1] == "lora_b":
            assert not v.any()
        elif k[-1] == "lora_a":
            np.testing.assert_array_equal(v, lora_a_init(LCFG.lora_seed, k, *v.shape))
            assert 0 < np.abs(v).max() <= 1 / np.sqrt(v.shape[0]) and v.std() > 0.25 / np.sqrt(v.shape[0])
    a = with_lora[("blocks", "0", "ca", "proj", "lora_a")]
    assert not np.array_equal(a, with_lora[("blocks", "1", "ca", "proj", "lora_a")])  # per path
    assert not np.array_equal(a, lora_a_init(7, ("blocks", "0", "ca", "proj", "lora_a"), *a.shape))  # per seed
    batch = _random_batch()
    np.testing.assert_array_equal(_logits(_params(LCFG), LCFG, batch), _logits(_params(CFG), CFG, batch))


# ---- training the adapters -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _lora_iteration():
    params = _params(LCFG)
    state0 = optim.set_hyperparams(step.init_opt_state(params, LORA_SCFG), learning_rate=1e-2)
    new, state, metrics = step.alternating_iteration(params, state0, _random_batch(), cfg=LCFG, schedule=SCHED,
                                                     scfg=LORA_SCFG, diagnostics=True)
    return params, state0, new, state, metrics


def test_lora_mode_trains_only_the_factors():
    flat = apply.flat_params(apply.abstract_params(LCFG))
    mask = optim.trainable_mask(flat, "lora")
    assert {k for k, v in mask.items() if v} == {k for k in flat if k[-1] in ("lora_a", "lora_b")}
    assert not any(optim.weight_decay_mask(flat, "lora").values())
    for mode in ("ca_ffn", "ca_ffn_sa", "all"):  # upstream selections never include the adapters
        assert not any(v for k, v in optim.trainable_mask(flat, mode).items() if k[-1].startswith("lora"))
    with pytest.raises(ValueError, match="no LoRA factors"):
        optim.trainable_mask(apply.flat_params(apply.abstract_params(CFG)), "lora")

    params, state0, new, state, m = _lora_iteration()
    assert set(state0.inner_state[1].mu) == {k for k, v in mask.items() if v}
    # B = 0: the erase step's gradient reaches B only; A moves in the preserve step.
    grads = m["grads_erase"]
    assert all(not np.any(_np(g)) for k, g in grads.items() if k[-1] == "lora_a")
    assert all(np.any(_np(g)) for k, g in grads.items() if k[-1] == "lora_b")
    before, after = _flat(params), _flat(new)
    for k in before:
        if k[-1] in ("lora_a", "lora_b"):
            assert not np.array_equal(before[k], after[k]), k
        else:
            np.testing.assert_array_equal(before[k], after[k], err_msg=str(k))
    assert int(m["adam_step"]) == 2 and np.isfinite(float(m["loss_pre"]))


def test_merged_deltas_export_and_apply(tmp_path):
    params, _, new, _, _ = _lora_iteration()
    tuned = _flat(new)
    deltas = delta_tensors(LCFG, new, params, "lora")
    kernels = {k[:-1] + ("kernel",) for k in tuned if k[-1] == "lora_a"}
    assert set(deltas) == {upstream_key(k, LCFG)[0] for k in kernels}
    for k in kernels:
        a, b = tuned[k[:-1] + ("lora_a",)].astype(np.float64), tuned[k[:-1] + ("lora_b",)].astype(np.float64)
        want = (LCFG.lora_scale * a @ b).T
        got = deltas[upstream_key(k, LCFG)[0]]
        assert got.dtype == np.float32 and got.shape == want.shape and np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert "block_chunks.0.module.0.ca.proj.weight" in deltas and "block_chunks.0.module.0.ffn.fc1.weight" not in deltas

    # base + delta.safetensors == the merged model, bit for bit; merged logits == adapter logits.
    write_delta(tmp_path / "delta.safetensors", LCFG, new, params, "lora")
    plain_cfg, merged = lora.merge(LCFG, new)
    assert plain_cfg == CFG
    rebuilt = _flat(apply_delta(CFG, _params(CFG), tmp_path / "delta.safetensors"))
    merged_flat = _flat(merged)
    assert rebuilt.keys() == merged_flat.keys()
    for k in rebuilt:
        np.testing.assert_array_equal(rebuilt[k], merged_flat[k], err_msg=str(k))
    batch = _random_batch()
    adapted = _logits(new, LCFG, batch)
    assert np.abs(adapted - _logits(_params(LCFG), LCFG, batch)).max() > 1e-4  # the iteration did something
    np.testing.assert_allclose(_logits(merged, CFG, batch), adapted, rtol=0, atol=2e-5)


def test_load_converted_model_with_adapters(converted_infinity, tmp_path):
    model_dir = converted_infinity(fixtures.first_infinity_folder())
    cfg, plain = load_infinity(model_dir)
    lcfg, adapted = load_infinity(model_dir, lora_rank=4, lora_targets=("mat_qkv", "ffn.fc2"), lora_seed=3)
    assert cfg.lora_rank == 0 and lcfg == cfg.replace(lora_rank=4, lora_targets=("mat_qkv", "ffn.fc2"), lora_seed=3)
    p, a = _flat(plain), _flat(adapted)
    assert set(a) - set(p) == {k for k in a if k[-1].startswith("lora")} and len(set(a) - set(p)) == 4 * cfg.depth
    for k, v in a.items():
        if k in p:
            np.testing.assert_array_equal(v, p[k])
        elif k[-1] == "lora_a":
            np.testing.assert_array_equal(v, lora_a_init(3, k, *v.shape))
        else:
            assert not v.any()
    again = _flat(load_infinity(model_dir, lora_rank=4, lora_targets=("mat_qkv", "ffn.fc2"), lora_seed=3)[1])
    assert all(np.array_equal(again[k], a[k]) for k in a)  # deterministic

    # Trained adapters: stored unmerged they load back as they are; asked without LoRA they are merged.
    rng = np.random.default_rng(0)
    trained = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in a.items() if k[-1] == "lora_b"}
    trained_state = optim.merge_trainable(adapted, trained)
    write_erased_model(tmp_path / "unmerged", lcfg, trained_state, merge_lora=False)
    back_cfg, back = load_infinity(str(tmp_path / "unmerged"))
    assert back_cfg.lora_rank == 4 and back_cfg.lora_modules() == ("sa.mat_qkv", "ffn.fc2")
    back_flat, trained_flat = _flat(back), _flat(trained_state)
    for k in trained_flat:
        np.testing.assert_array_equal(back_flat[k], trained_flat[k])
    _, merged = lora.merge(lcfg, trained_state)
    merged_flat = _flat(merged)
    _, as_plain = load_infinity(str(tmp_path / "unmerged"), lora_rank=0)
    write_erased_model(tmp_path / "merged", lcfg, trained_state)  # default: merged, a plain model
    plain_cfg, from_merged = load_infinity(str(tmp_path / "merged"))
    assert plain_cfg.lora_rank == 0
    for loaded in (_flat(as_plain), _flat(from_merged)):
        assert loaded.keys() == merged_flat.keys()
        for k in loaded:
            np.testing.assert_array_equal(loaded[k], merged_flat[k], err_msg=str(k))
    kernel = ("blocks", "0", "ffn", "fc2", "kernel")
    assert not np.array_equal(merged_flat[kernel], p[kernel])

    # Onto a mesh: the new factors are placed by the rules (rank axis replicated), values unchanged.
    from varejax.parallel import make_mesh
    _, sharded = load_infinity(model_dir, mesh=make_mesh((2, 2, 2)), lora_rank=4,
                               lora_targets=("mat_qkv", "ffn.fc2"), lora_seed=3)
    leaf = apply.flat_params(sharded)[("blocks", "0", "sa", "mat_qkv", "lora_a")]
    assert leaf.sharding.mesh.devices.size == 8
    np.testing.assert_array_equal(_np(leaf), a[("blocks", "0", "sa", "mat_qkv", "lora_a")])


# ---- bf16 parameter storage ----------------------------------------------------------------------------


def _bf16(x):
    return np.asarray(x, np.float32).astype(BF16)


def _bf16_ulp(x):
    """The bf16 spacing at |x| (float32 values that are bf16-representable)."""
    _, e = np.frexp(np.maximum(np.abs(x), np.float32(2.0 ** -126)))
    return np.ldexp(np.float32(1.0), e - 8).astype(np.float32)


def _ties_ok(got_bf16, want_f32, what, near_tie_only=True):
    """Number of elements where got != round_bf16(want); each must be one bf16 ulp off and (near_tie_only)
    `want` within 8 float32 ulp of the rounding midpoint, i.e. a float32 reassociation can flip it."""
    got = np.asarray(got_bf16).astype(np.float32)
    want_f32 = np.asarray(want_f32, np.float32)
    rounded = _bf16(want_f32).astype(np.float32)
    off = got != rounded
    if off.any():
        ulp = _bf16_ulp(rounded[off])
        assert np.all(np.abs(got[off] - rounded[off]) <= ulp), what
        if near_tie_only:
            mid = np.abs(np.abs(want_f32[off] - rounded[off]) - ulp / 2)
            assert np.all(mid <= 8 * np.spacing(np.abs(want_f32[off]))), what
    return int(off.sum())


def test_bf16_adamw_is_fp32_math_rounded_and_matches_torch_fused():
    import torch
    rng = np.random.default_rng(0)
    shapes = {("blocks", "0", "ffn", "fc1", "kernel"): (64, 256), ("blocks", "0", "ffn", "fc1", "bias"): (256,)}
    p0 = {k: _bf16(rng.standard_normal(s) * 0.05) for k, s in shapes.items()}
    grads = [{k: _bf16(rng.standard_normal(s) * sc * 10.0 ** rng.uniform(-4, 0, s)) for k, s in shapes.items()}
             for sc in (1e-3, 1e-1, 1e-4)]
    lr, wd, clip = 1e-3, 0.005, 0.05  # the clip is active in step 2 only

    # AdamW alone: the stored bf16 values are the float32 arithmetic on float32 copies, rounded.
    adam = optim.adamw_torch(lr, 0.9, 0.97, 1e-8, wd, optim.decay_mask_of)
    adam_update = jax.jit(adam.update)
    params, state = {k: jnp.asarray(v) for k, v in p0.items()}, adam.init(p0)
    assert all(v.dtype == jnp.bfloat16 for v in (*state.mu.values(), *state.nu.values()))
    for g in grads:
        up32 = {k: v.astype(jnp.float32) for k, v in params.items()}
        state32 = state._replace(mu={k: v.astype(jnp.float32) for k, v in state.mu.items()},
                                 nu={k: v.astype(jnp.float32) for k, v in state.nu.items()})
        u32, ref_state = adam_update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state32, up32)
        ref = optax.apply_updates(up32, u32)
        updates, state = adam_update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        assert all(u.dtype == jnp.float32 for u in updates.values())
        params = optax.apply_updates(params, updates)
        for k in p0:
            assert params[k].dtype == jnp.bfloat16 and state.mu[k].dtype == state.nu[k].dtype == jnp.bfloat16
            assert _ties_ok(params[k], _np(ref[k]), k) == 0
            assert _ties_ok(state.mu[k], _np(ref_state.mu[k]), k) == 0
            assert _ties_ok(state.nu[k], _np(ref_state.nu[k]), k) == 0

    # clip + AdamW (the trainer's optimiser) against torch: clip_grad_norm_ + fused AdamW on bf16 tensors.
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=lr, weight_decay=wd, max_grad_norm=clip))
    update = jax.jit(tx.update)
    params, state = {k: jnp.asarray(v) for k, v in p0.items()}, tx.init(p0)
    tps = {k: torch.nn.Parameter(torch.tensor(v.astype(np.float32)).bfloat16()) for k, v in p0.items()}
    opt = torch.optim.AdamW([{"params": [tps[k] for k in tps if p0[k].ndim > 1], "weight_decay": wd},
                             {"params": [tps[k] for k in tps if p0[k].ndim == 1], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.97), eps=1e-8, fused=True)
    differ = 0
    for i, g in enumerate(grads):
        gj = {k: jnp.asarray(v) for k, v in g.items()}
        norm, coef = optim.global_norm_torch(gj), optim.clip_coef_torch(optim.global_norm_torch(gj), clip, bf16=True)
        updates, state = update(gj, state, params)
        params = optax.apply_updates(params, updates)
        for k in g:
            tps[k].grad = torch.tensor(g[k].astype(np.float32)).bfloat16()
        torch_norm = torch.nn.utils.clip_grad_norm_(list(tps.values()), clip)
        assert torch_norm.dtype == torch.bfloat16 and float(norm) == float(torch_norm)
        assert (float(coef) < 1) == (i == 1)
        opt.step()
        for k in p0:
            torch_p = tps[k].detach().float().numpy()
            torch_m = opt.state[tps[k]]["exp_avg"].float().numpy()
            # The same values up to float32 reassociation, which can flip a bf16 rounding.
            differ += (_ties_ok(params[k], torch_p, k, near_tie_only=False)
                       + _ties_ok(state.inner_state[1].mu[k], torch_m, k, near_tie_only=False))
            assert np.any(np.asarray(params[k]) != p0[k])
    total = 2 * 3 * sum(int(np.prod(s)) for s in shapes.values())
    assert differ <= 1e-3 * total, differ
    print(f"bf16 clip + AdamW vs torch (bf16): {differ} of {total} stored values differ by one bf16 ulp")


def test_bf16_params_step_keeps_bf16_and_rounds_fp32_update():
    cfg = CFG.replace(param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(CFG))
    scfg = step.SvareConfig()
    state0 = optim.set_hyperparams(step.init_opt_state(params, scfg), learning_rate=1e-3)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(state0.inner_state[1].mu))
    new, state, m = step.erase_step(params, state0, _random_batch(seed=2), cfg=cfg, schedule=SCHED, scfg=scfg,
                                    diagnostics=True)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(new))
    assert all(v.dtype == jnp.bfloat16 for v in (*state.inner_state[1].mu.values(), *state.inner_state[1].nu.values()))
    train = optim.trainable_params(params)
    # The fp32 computation: torch AdamW on float32 copies with the step's clipped (bf16) gradients, rounded.
    coef = jnp.float32(m["clip_coef_erase"])
    clipped = {k: (g * coef.astype(g.dtype)).astype(jnp.float32) for k, g in m["grads_erase"].items()}
    adam = optim.adamw_torch(1e-3, 0.9, 0.97, 1e-8, scfg.optim.weight_decay, optim.decay_mask_of)
    up32 = {k: v.astype(jnp.float32) for k, v in train.items()}
    updates, _ = jax.jit(adam.update)(clipped, adam.init(up32), up32)
    want = optax.apply_updates(up32, updates)
    after, before = _flat(new), _flat(params)
    moved = 0
    for k, v in after.items():
        if k in train:
            assert _ties_ok(v, _np(want[k]), k) <= 2
            moved += int(np.sum(v != before[k]))
        else:
            np.testing.assert_array_equal(v, before[k])
    assert moved > 0


# ---- the trainer: trainable = "lora" and bf16_params end to end ------------------------------------------


LORA_OVERRIDES = {"train.trainable": "lora", "train.lora_rank": 4, "train.lora_alpha": 8.0,
                  "train.learning_rate": 1e-2, "train.steps": 6, "train.checkpoint_every": 3}


@pytest.fixture(scope="module")
def lora_run(tiny_model_dirs, tmp_path_factory):
    from tests.test_erase_trainer import CONFIG, _overrides, _pairs_file
    from varejax.configlib import load_config
    from varejax.erase.trainer import run_erase

    tmp = tmp_path_factory.mktemp("erase_lora")
    pairs = _pairs_file(tmp)
    config = load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **LORA_OVERRIDES))
    result = run_erase(config, tmp / "run")
    # The same run stopped after 3 steps and resumed from its checkpoint (which holds only the factors).
    first = load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **{**LORA_OVERRIDES, "train.steps": 3}))
    run_erase(first, tmp / "resumed")
    resumed = run_erase(config, tmp / "resumed")
    return config, result, resumed


def test_lora_erase_run_lowers_fce_and_exports_merged_model(lora_run, tiny_model_dirs):
    from tests.test_erase_trainer import _metrics

    config, result, resumed = lora_run
    assert result.cfg.lora_rank == 4 and result.cfg.lora_scale == 2.0 and result.cfg.lora_seed == config.seed
    metrics = _metrics(result.workdir)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert metrics[-1]["loss_erase"] < metrics[0]["loss_erase"]
    before, after = _flat(result.original_params), _flat(result.params)
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        assert changed == (k[-1] in ("lora_a", "lora_b")), k

    # model/ is a plain model holding the merged weights; base + delta.safetensors gives it bit for bit.
    plain_cfg, exported = load_infinity(str(result.workdir / "model"))
    assert plain_cfg.lora_rank == 0
    exported = _flat(exported)
    merged = _flat(lora.merge(result.cfg, result.params)[1])
    base_cfg, base = load_infinity(tiny_model_dirs["infinity"])
    rebuilt = _flat(apply_delta(base_cfg, base, result.workdir / "delta.safetensors"))
    assert exported.keys() == merged.keys() == rebuilt.keys()
    for k in exported:
        np.testing.assert_array_equal(exported[k], merged[k], err_msg=str(k))
        np.testing.assert_array_equal(rebuilt[k], exported[k], err_msg=str(k))
    from safetensors.numpy import load_file
    deltas = load_file(str(result.workdir / "delta.safetensors"))
    assert len(deltas) == 4 * result.cfg.depth and all(v.dtype == np.float32 for v in deltas.values())

    # Resuming from the step-3 checkpoint ends with the same parameters as the uninterrupted run.
    assert [m["step"] for m in _metrics(resumed.workdir)] == list(range(1, 7))
    again = _flat(resumed.params)
    for k in after:
        np.testing.assert_array_equal(again[k], after[k], err_msg=str(k))


def test_training_overrides_and_bf16_run(tiny_model_dirs, tmp_path):
    from tests.test_erase_trainer import CONFIG, _overrides, _pairs_file
    from varejax.configlib import load_config
    from varejax.erase.trainer import model_overrides, run_erase, training_overrides

    pairs = _pairs_file(tmp_path)
    default = load_config(CONFIG, _overrides(tiny_model_dirs, pairs))
    assert training_overrides(default) == {} and not default.train.bf16_params
    assert default.train.lora_rank == 4 and default.train.lora_targets == ("mat_qkv", "mat_kv", "proj")
    lora_config = load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **{"train.trainable": "lora", "seed": 3}))
    assert training_overrides(lora_config) == dict(lora_rank=4, lora_alpha=0.0, lora_targets=("mat_qkv", "mat_kv",
                                                                                             "proj"), lora_seed=3)
    bad = load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **{"train.trainable": "lora", "train.lora_rank": 0}))
    with pytest.raises(ValueError, match="lora_rank > 0"):
        training_overrides(bad)

    config = load_config(CONFIG, _overrides(tiny_model_dirs, pairs, **{"train.bf16_params": True, "train.steps": 2,
                                                                       "train.checkpoint_every": 1}))
    assert model_overrides(config)["param_dtype"] == "bfloat16"
    result = run_erase(config, tmp_path / "run")
    assert result.cfg.param_dtype == "bfloat16"
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(result.params))
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(result.original_params))
    # Float32 deltas, exact (differences of bf16 values), reproducing the bf16 erased model.
    from safetensors.numpy import load_file
    deltas = load_file(str(result.workdir / "delta.safetensors"))
    assert deltas and all(v.dtype == np.float32 for v in deltas.values())
    _, exported = load_infinity(str(result.workdir / "model"))
    exported = _flat(exported)
    rebuilt = _flat(apply_delta(result.cfg, result.original_params, result.workdir / "delta.safetensors"))
    for k, v in _flat(result.params).items():
        assert exported[k].dtype == BF16
        np.testing.assert_array_equal(exported[k], v, err_msg=str(k))
        np.testing.assert_array_equal(rebuilt[k], v, err_msg=str(k))
