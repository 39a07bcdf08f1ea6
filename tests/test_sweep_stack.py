"""Stacked S-VARE runs (varejax.sweep.stack): R runs trained as one vmapped program equal each run alone.

Model: a small Infinity (1 block, width 64, 8-bit tokens, 3 scales) with random weights and condition
dropout 0.5 (so each run's PRNG keys matter); batches are synthetic arrays with the keys and shapes of
`TrajectoryBatches` (the stacking does not look at their values). Three runs differ in learning_rate and
weight_decay, runs 0 and 1 also in alpha, reg_lambda and summed_lambda (run 2 shares run 1's so that the
runs alone compile twice, not three times), all in seed and batches; run 0's prompts are shorter (its
text is padded to the stack's length by `stack_batches`).

Why not bit-identical: XLA:CPU picks its reduction order (softmax, norms, means) by the shape of the whole
array, and the vmapped program reduces [R, ...] arrays (matmuls come out bit-identical). The logits then
differ by float32 rounding (~1e-9 here), and Adam, which divides by sqrt(v) + eps, turns a rounding
difference of a near-zero gradient element into a larger step of that element. So the test holds:
  * every per-step metric (losses, norms, kept fractions, lr, Adam step) of every run to RELATIVE_METRIC
    (measured <= 1.7e-7: the kept fractions, lr and step counts are equal);
  * the trainable parameters after STEPS steps to PARAMS_REL_L2 of the run's own total change,
    ||p_stack - p_alone|| / ||p_alone - p_0|| (measured <= 2.5e-6, at XLA -O0 and the default level;
    the same runs with each other's PRNG keys give 0.7 - 0.8, `test_wrong_keys_are_seen`);
  * the largest element difference to PARAMS_MAX_OVER_LR times the run's learning rate (measured
    <= 4e-4 lr; empirical: Adam may move a near-zero-gradient element by up to ~lr per step on any
    rounding difference, so no a-priori bound is tighter than that).
The sharded stack (runs over a 3-device data axis, the base and each run's batch over a 2-device fsdp
axis) equals the unsharded stack to the same bounds (measured <= 2.1e-6).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import measured
from varejax.erase import optim
from varejax.erase.step import SvareConfig, alternating_update, init_opt_state, jit_step, summed_update
from varejax.models import apply
from varejax.models.config import InfinityConfig
from varejax.parallel import DEFAULT_RULES, make_mesh, shard_state, sharding_context
from varejax.sweep import stack as sk

CFG = InfinityConfig(depth=1, embed_dim=64, num_heads=4, text_channels=128, text_maxlen=16, codebook_dim=8,
                     block_chunks=1, pad_to_multiplier=1, cond_drop_rate=0.5,
                     compute_dtype="float32", matmul_precision="default", attention_impl="xla")
SCHEDULE = ((1, 1, 1), (1, 2, 2), (1, 3, 3))
STEPS = 3
BATCH = 2
TEXT_LENGTHS = (8, 16, 16)  # run 0's batches are padded to 16 in the stack
SEEDS = (0, 11, 22)
SCFGS = tuple(SvareConfig(alpha=a, reg_lambda=rl, summed_lambda=sl,
                          optim=optim.OptimConfig(learning_rate=lr, weight_decay=wd))
              for a, rl, sl, lr, wd in ((0.25, 0.5, 1.0, 3e-4, 0.005), (0.125, 1.0, 0.5, 1e-3, 0.0),
                                        (0.125, 1.0, 0.5, 1e-4, 0.05)))
UPDATES = {"alternating": alternating_update, "summed": summed_update}

RELATIVE_METRIC = 1e-5
PARAMS_REL_L2 = 1e-4
PARAMS_MAX_OVER_LR = 1e-2


@functools.cache
def _params():
    return apply.init_params(CFG, seed=3)


def _batch(run: int, step: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(1000 * run + step)
    length = sum(h * w for _, h, w in SCHEDULE)
    d = CFG.bits_per_token

    def text(n):
        lens = rng.randint(2, n + 1, size=BATCH)
        mask = (np.arange(n)[None] < lens[:, None]).astype(np.float32)
        return rng.randn(BATCH, n, CFG.text_channels).astype(np.float32) * mask[..., None], mask

    target_text, target_mask = text(TEXT_LENGTHS[run])
    anchor_text, anchor_mask = text(TEXT_LENGTHS[run])
    return {"target_text": target_text, "target_mask": target_mask, "anchor_text": anchor_text,
            "anchor_mask": anchor_mask, "x_BLC_wo_prefix": rng.randn(BATCH, length - 1, d).astype(np.float32) * 0.3,
            "gt_bits": rng.randint(0, 2, size=(BATCH, length, d)).astype(np.int8),
            "teacher_logits": rng.randn(BATCH, length, 2 * d).astype(np.float32) * 2}


def _key(run: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(SEEDS[run]), step)


@functools.cache
def _alone(mode: str):
    """Each run trained by itself with the trainer's step: (trainable params, [metrics per step]) per run."""
    step_fn = jit_step(UPDATES[mode])
    out = []
    for r, scfg in enumerate(SCFGS):
        params, opt_state, history = _params(), init_opt_state(_params(), scfg), []
        for k in range(STEPS):
            params, opt_state, metrics = step_fn(params, opt_state, _batch(r, k), _key(r, k), cfg=CFG,
                                                 schedule=SCHEDULE, scfg=scfg)
            history.append(jax.device_get(metrics))
        out.append((optim.trainable_params(params, scfg.optim.trainable), history))
    return out


@functools.cache
def _stacked(mode: str, mesh=None, key_shift: int = 0):
    """The three runs trained in one stack (on `mesh`, run axis over data, when given); with `key_shift`
    run r draws the PRNG keys of run r + key_shift (a wrong run: the negative control)."""
    params = _params() if mesh is None else shard_state(_params(), mesh, DEFAULT_RULES)
    step_fn = sk.stacked_step(UPDATES[mode])
    numerics = sk.stack_numerics(SCFGS)
    history = []
    with sharding_context(mesh, DEFAULT_RULES) if mesh is not None else _nothing():
        train_stack, opt_stack = sk.init_stack(params, SCFGS)
        for k in range(STEPS):
            batch = sk.stack_batches([_batch(r, k) for r in range(len(SCFGS))])
            keys = jnp.stack([_key((r + key_shift) % len(SCFGS), k) for r in range(len(SCFGS))])
            if mesh is not None:
                batch = sk.shard_batch_stack(batch, mesh, DEFAULT_RULES)
            train_stack, opt_stack, metrics = step_fn(params, train_stack, opt_stack, batch, keys, numerics, cfg=CFG,
                                                      schedule=SCHEDULE, scfg=SCFGS[0])
            history.append(metrics)
    return train_stack, opt_stack, history


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _rel_l2(a: dict, b: dict, origin: dict) -> float:
    diff = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in b)
    change = sum(float(np.sum((np.asarray(b[k], np.float64) - np.asarray(origin[k], np.float64)) ** 2)) for k in b)
    return float(np.sqrt(diff / change))


def _max_abs(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in b)


# ---- helpers ------------------------------------------------------------------------------------------

def test_stack_key_separates_static_settings():
    base = SvareConfig()
    numbers = base.replace(alpha=0.5, reg_lambda=2.0, summed_lambda=0.1,
                           optim=base.optim.replace(learning_rate=1.0, weight_decay=0.0, max_grad_norm=1.0))
    assert sk.stack_key(numbers) == sk.stack_key(base)
    hash(sk.stack_key(numbers))
    for other in (base.replace(erase_loss="esd"), base.replace(optim=base.optim.replace(trainable="ca_ffn_sa")),
                  base.replace(optim=base.optim.replace(b2=0.99)), base.replace(h_div_w_template=1.0)):
        assert sk.stack_key(other) != sk.stack_key(base)
    with pytest.raises(ValueError, match=r"optim\.trainable"):
        sk.check_stackable([base, base.replace(optim=base.optim.replace(trainable="all"))])


def test_stack_batches_pads_text_and_checks_shapes():
    batches = [_batch(0, 0), _batch(1, 0)]
    stacked = sk.stack_batches(batches)
    assert stacked["target_text"].shape == (2, BATCH, 16, CFG.text_channels)
    assert stacked["anchor_mask"].shape == (2, BATCH, 16)
    np.testing.assert_array_equal(stacked["target_text"][0, :, :8], batches[0]["target_text"])
    assert not stacked["target_text"][0, :, 8:].any() and not stacked["target_mask"][0, :, 8:].any()
    np.testing.assert_array_equal(stacked["gt_bits"][1], batches[1]["gt_bits"])
    assert sk.stack_batches(batches, text_length=24)["anchor_text"].shape[2] == 24
    bad = dict(batches[1], gt_bits=batches[1]["gt_bits"][:, :-1])
    with pytest.raises(ValueError, match="gt_bits"):
        sk.stack_batches([batches[0], bad])


def test_run_axis_layout():
    """Runs go over `data` only when its size divides R; each run's rows then use `fsdp` alone."""
    from jax.sharding import PartitionSpec as P

    batch = {"gt_bits": np.zeros((3, 4, 5, 8), np.int8)}
    even, uneven = make_mesh((3, 2, 1)), make_mesh((2, 1, 1))
    assert sk.run_axis(even, 3) == "data" and sk.run_axis(uneven, 3) is None
    assert sk.batch_stack_specs(batch, even, DEFAULT_RULES)["gt_bits"] == P("data", "fsdp")
    assert sk.batch_stack_specs(batch, uneven, DEFAULT_RULES)["gt_bits"] == P(None, "data")
    assert dict(sk.inner_rules(even, DEFAULT_RULES, 3))["act_batch"] == ("fsdp",)
    train = {("blocks", "0", "ffn", "fc1", "kernel"): np.zeros((3, CFG.embed_dim, 128), np.float32)}
    specs = sk.stack_specs(train, _params(), even, DEFAULT_RULES)
    assert specs[("blocks", "0", "ffn", "fc1", "kernel")] == P("data", "fsdp")  # (embed, mlp); tensor has 1 device


def test_init_stack_is_each_runs_initial_state():
    params = _params()
    train_stack, opt_stack = sk.init_stack(params, SCFGS)
    expected = sk.stack([init_opt_state(params, s) for s in SCFGS])
    assert jax.tree.structure(opt_stack) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(opt_stack), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    trainable = optim.trainable_params(params)
    for r in range(len(SCFGS)):
        for path, value in sk.unstack(train_stack, r).items():
            np.testing.assert_array_equal(value, trainable[path])


# ---- stacked == alone ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(UPDATES))
def test_stacked_runs_equal_runs_alone(mode):
    train_stack, _, history = _stacked(mode)
    origin = optim.trainable_params(_params())
    for r, (alone_params, alone_history) in enumerate(_alone(mode)):
        for k in range(STEPS):
            got = sk.run_metrics(history[k], r)
            for name, want in alone_history[k].items():
                err = np.max(np.abs(got[name] - want) / np.maximum(np.abs(want), 1e-30))
                measured.check(f"sweep_stack/{mode}/metric_{name}", err, RELATIVE_METRIC, "relative error")
        params = sk.unstack(train_stack, r)
        rel = _rel_l2(params, alone_params, origin)
        worst = _max_abs(params, alone_params) / SCFGS[r].optim.learning_rate
        print(f"{mode} run {r}: ||stack - alone|| / ||alone - start|| = {rel:.3g}, "
              f"max |stack - alone| = {worst:.3g} lr")
        measured.check(f"sweep_stack/{mode}/params_rel_l2", rel, PARAMS_REL_L2, "||stack - alone|| / ||alone - p0||")
        measured.check(f"sweep_stack/{mode}/params_max_abs_over_lr", worst, PARAMS_MAX_OVER_LR,
                       "max |stack - alone| / lr")


def test_wrong_keys_are_seen():
    """The bound above is far below what a wrong run gives: the same stack with each other's PRNG keys."""
    train_stack, _, _ = _stacked("alternating", key_shift=1)
    origin = optim.trainable_params(_params())
    for r, (alone_params, _) in enumerate(_alone("alternating")):
        rel = _rel_l2(sk.unstack(train_stack, r), alone_params, origin)
        print(f"run {r} with run {(r + 1) % len(SCFGS)}'s keys: ||stack - alone|| / ||change|| = {rel:.3g}")
        assert rel > 100 * PARAMS_REL_L2


def test_sharded_stack_equals_unsharded_stack():
    """Runs over the mesh's data axis (3 devices), the base and each run's batch over fsdp (2)."""
    mesh = make_mesh((3, 2, 1))
    train_ref, opt_ref, history_ref = _stacked("alternating")
    train_stack, opt_stack, history = _stacked("alternating", mesh)
    leaf = train_stack[("blocks", "0", "ffn", "fc1", "kernel")]
    assert leaf.sharding.spec[0] == "data" and "fsdp" in leaf.sharding.spec
    assert history[0]["loss_erase"].sharding.is_fully_replicated
    origin = optim.trainable_params(_params())
    for r in range(len(SCFGS)):
        rel = _rel_l2(sk.unstack(train_stack, r), sk.unstack(train_ref, r), origin)
        print(f"sharded run {r}: ||sharded - unsharded|| / ||change|| = {rel:.3g}")
        measured.check("sweep_stack/sharded/params_rel_l2", rel, PARAMS_REL_L2, "||sharded - stack|| / ||change||")
        for name, want in sk.run_metrics(history_ref[-1], r).items():
            got = sk.run_metrics(history[-1], r)[name]
            err = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30))
            measured.check(f"sweep_stack/sharded/metric_{name}", err, RELATIVE_METRIC, "relative error")
    np.testing.assert_array_equal(opt_stack.inner_state[1].count, opt_ref.inner_state[1].count)
