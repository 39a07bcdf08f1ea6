"""Behaviour of the Flax Infinity port beyond fixture parity: structure, masks, padding, training knobs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import fixtures
from varejax.models import apply, attention, bit_loss, patchify, rope, schedules
from varejax.models.config import PRESETS, InfinityConfig, count_params_formula, get_preset

CFG = InfinityConfig(depth=2, embed_dim=64, num_heads=4, text_channels=128, text_maxlen=12, codebook_dim=8,
                     block_chunks=1, pad_to_multiplier=16)
SCHEDULE = ((1, 1, 1), (1, 2, 2), (1, 3, 3))
L = 14


@pytest.fixture(scope="module")
def setup():
    params = apply.init_params(CFG, seed=0)
    rng = np.random.RandomState(0)
    text = rng.randn(2, 10, CFG.text_channels).astype(np.float32)
    mask = (np.arange(10)[None] < np.array([[4], [10]])).astype(np.int32)
    x = rng.randn(2, L - 1, CFG.bits_per_token).astype(np.float32)
    return params, text, mask, x


def _fwd(params, text, mask, x, cfg=CFG, **kw):
    return np.asarray(apply.forward_jit(params, text, mask, x, SCHEDULE, cfg=cfg, **kw))


def test_upstream_parameter_counts():
    for preset, table in (("infinity_2b", "infinity_2b_state_dict_shapes.json"),
                          ("infinity_8b", "infinity_8b_state_dict_shapes.json")):
        path = fixtures.require(fixtures.root() / table)
        shapes = json.loads(path.read_text())
        upstream = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith("zero_k_bias"))
        cfg = get_preset(preset)
        assert apply.count_params(apply.abstract_params(cfg)) == upstream == count_params_formula(cfg)
    assert round(count_params_formula(get_preset("2b")) / 1e9, 4) == 2.2046
    assert round(count_params_formula(get_preset("8b")) / 1e9, 4) == 8.3758


def test_derived_dimensions():
    assert InfinityConfig(embed_dim=96, num_heads=4).ffn_hidden == 512  # banker's rounding of 1.5
    cfg8 = PRESETS["infinity_8b"]
    assert (cfg8.pool_heads, cfg8.pool_head_dim, cfg8.bits_per_token, cfg8.num_logits) == (16, 224, 56, 112)
    cfg2 = PRESETS["infinity_2b"]
    assert (cfg2.pool_heads, cfg2.pool_head_dim, cfg2.ffn_hidden, cfg2.blocks_per_chunk) == (16, 128, 8192, 4)
    with pytest.raises(ValueError, match="not divisible"):
        InfinityConfig(embed_dim=100, num_heads=3)


def test_schedules_and_templates():
    assert len(schedules.TEMPLATES) == 15
    assert schedules.sequence_length(schedules.get_schedule(1.0, "1M")) == 10521
    assert schedules.sequence_length(schedules.get_schedule(1.0, "0.25M")) == 2521
    assert schedules.sequence_length(schedules.get_schedule(1.0, "0.06M")) == 521
    assert schedules.padded_length(schedules.get_schedule(1.0, "1M"), 128) == 10624
    assert schedules.get_schedule(0.5, "1M")[-1] == (1, 45, 90)
    assert schedules.nearest_template(0.52) == 0.5 and schedules.nearest_template(1.4) == 1.333
    assert schedules.pixel_size(schedules.get_schedule(2.0, "1M")) == (1440, 720)
    with pytest.raises(ValueError, match="start with"):
        schedules.as_schedule([(1, 2, 2)])


def test_rope_positions_round_half_to_even():
    sched = schedules.get_schedule(0.5, "0.06M")
    pos = rope.grid_positions(sched, 0.5)
    # Scale (2, 4) of template 0.5 (final grid 45 x 90): y = round(i * 22.5) -> 0, 22.
    start = sum(h * w for _, h, w in sched[:2])
    assert sorted(set(pos[start:start + 8, 0])) == [0, 22]
    assert sorted(set(pos[start:start + 8, 1])) == [0, 22, 45, 68]  # 22.5 -> 22, 67.5 -> 68


def test_block_causal_mask_and_padding_rows():
    mask = np.asarray(attention.block_causal_mask(SCHEDULE, 16))[0, 0]
    ids = schedules.scale_ids(SCHEDULE)
    assert mask[:L, :L].tolist() == (ids[None, :] <= ids[:, None]).tolist()
    assert not mask[:L, L:].any()                     # real tokens never see padding
    assert mask[L:, 0].all() and not mask[L:, 1:].any()  # padding rows see only token 0


def test_earlier_scales_do_not_see_later_ones(setup):
    params, text, mask, x = setup
    base = _fwd(params, text, mask, x)
    changed = x.copy()
    changed[:, 4:] += 1.0  # inputs of the last scale (tokens 5..13)
    out = _fwd(params, text, mask, changed)
    np.testing.assert_allclose(out[:, :5], base[:, :5], atol=1e-6)
    assert np.abs(out[:, 5:] - base[:, 5:]).max() > 1e-3


def test_text_beyond_length_is_ignored(setup):
    params, text, mask, x = setup
    noisy = text.copy()
    noisy[0, 4:] = 100.0
    np.testing.assert_allclose(_fwd(params, noisy, mask, x), _fwd(params, text, mask, x), atol=1e-6)


def test_padding_changes_nothing(setup):
    params, text, mask, x = setup
    np.testing.assert_allclose(_fwd(params, text, mask, x, cfg=CFG.replace(pad_to_multiplier=1)),
                               _fwd(params, text, mask, x), atol=2e-6)


def test_remat_gives_identical_loss_and_gradients(setup):
    params, text, mask, x = setup
    bits = (np.random.RandomState(1).rand(2, L, CFG.bits_per_token) > 0.5).astype(np.int8)
    outs = [bit_loss.loss_and_grad_jit(params, text, mask, x, bits, SCHEDULE, cfg=cfg)
            for cfg in (CFG, CFG.replace(remat=True))]
    assert float(outs[0][0]) == pytest.approx(float(outs[1][0]), abs=1e-7)
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_condition_dropout_uses_cfg_uncond(setup):
    params, text, mask, x = setup
    cfg = CFG.replace(cond_drop_rate=1.0)
    dropped = _fwd(params, text, mask, x, cfg=cfg, rng=jax.random.key(0))
    uncond = np.asarray(params["cfg_uncond"][...])[None, :10] * mask[..., None]
    np.testing.assert_allclose(dropped, _fwd(params, np.broadcast_to(uncond, text.shape), mask, x), atol=1e-5)


def test_drop_path_is_seeded(setup):
    params, text, mask, x = setup
    cfg = CFG.replace(drop_path_rate=0.5)
    a = _fwd(params, text, mask, x, cfg=cfg, rng=jax.random.key(1))
    b = _fwd(params, text, mask, x, cfg=cfg, rng=jax.random.key(1))
    c = _fwd(params, text, mask, x, cfg=cfg, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0
    np.testing.assert_array_equal(_fwd(params, text, mask, x, cfg=cfg), _fwd(params, text, mask, x))


def test_bf16_compute_is_close_to_fp32(setup):
    params, text, mask, x = setup
    out = _fwd(params, text, mask, x, cfg=CFG.replace(compute_dtype="bfloat16"))
    ref = _fwd(params, text, mask, x)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 1e-2


def test_shape_errors_are_explained(setup):
    params, text, mask, x = setup
    with pytest.raises(ValueError, match=r"expected \[B, 13, 8\]"):
        _fwd(params, text, mask, x[:, :-1])
    with pytest.raises(ValueError, match="more than text_maxlen"):
        _fwd(params, np.zeros((2, 20, CFG.text_channels), np.float32), np.ones((2, 20)), x)


def test_pixel_shuffle_matches_torch_channel_order():
    import torch
    x = np.random.RandomState(0).randn(2, 3, 4, 12).astype(np.float32)  # [B, h, w, 4d], d = 3
    ours = np.asarray(patchify.pixel_shuffle(jnp.asarray(x)))
    ref = torch.nn.functional.pixel_shuffle(torch.from_numpy(x).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, ref)
    back = np.asarray(patchify.pixel_unshuffle(jnp.asarray(ours)))
    ref_back = torch.nn.functional.pixel_unshuffle(torch.from_numpy(ref).permute(0, 3, 1, 2), 2)
    np.testing.assert_array_equal(back, ref_back.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(back, x)


def test_patchified_model_predicts_4d_bits():
    cfg = CFG.replace(apply_spatial_patchify=True, codebook_dim=4)
    params = apply.init_params(cfg)
    out = apply.forward_jit(params, np.zeros((1, 3, CFG.text_channels), np.float32), np.ones((1, 3)),
                            np.zeros((1, L - 1, 16), np.float32), SCHEDULE, cfg=cfg)
    assert out.shape == (1, L, 32)


def test_chunked_attention_equals_xla(setup):
    params, text, mask, x = setup
    from varejax.models import attention as attn

    sched = schedules.get_schedule(1.0, "0.06M")
    Lp = schedules.padded_length(sched, 128)
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(2, Lp, 2, 8).astype(np.float32)) for _ in range(3))
    m = attn.block_causal_mask(sched, Lp)
    loss = lambda impl: lambda q: (attn.dot_product_attention(q, k, v, m, scale=0.3, implementation=impl) ** 2).sum()
    np.testing.assert_allclose(np.asarray(jax.grad(loss("chunked"))(q)), np.asarray(jax.grad(loss("xla"))(q)),
                               atol=1e-5)
    np.testing.assert_allclose(_fwd(params, text, mask, x, cfg=CFG.replace(attention_impl="chunked")),
                               _fwd(params, text, mask, x), atol=1e-5)


def test_scale_blocked_attention_equals_masked_xla(setup):
    """`scales` (no mask, no padding, big scales chunked) == the masked, padded `xla` path on real tokens."""
    params, text, mask, x = setup
    from varejax.models import attention as attn

    sched = schedules.get_schedule(1.0, "0.06M")  # 7 scales, L = 521; the last (256) is one chunk of 128 x 2
    L, Lp = schedules.sequence_length(sched), schedules.padded_length(sched, 128)
    rng = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rng.randn(2, L, 2, 8).astype(np.float32)) for _ in range(3))
    pad = lambda a: jnp.pad(a, ((0, 0), (0, Lp - L), (0, 0), (0, 0)))
    masked = lambda q, k, v: attn.dot_product_attention(pad(q), pad(k), pad(v), attn.block_causal_mask(sched, Lp),
                                                        scale=0.3)[:, :L]
    blocks = attn.ScaleBlocks(tuple(schedules.scale_lengths(sched)))
    # Small scales merged into masked groups (default 128: 1+4+16+36+64 | 144 | 256), every scale alone, all one.
    assert attn.scale_groups(blocks.lengths, 128) == [(0, 121), (121, 265), (265, 521)]
    assert attn.scale_groups(blocks.lengths, 0) == [(0, 1), (1, 5), (5, 21), (21, 57), (57, 121), (121, 265),
                                                    (265, 521)]
    assert attn.scale_groups(blocks.lengths, 10_000) == [(0, 521)]
    for merge in (None, 0, 10_000):
        blocked = lambda q, k, v, merge=merge: attn.scale_blocked_attention(q, k, v, blocks, scale=0.3, chunk=128,
                                                                             merge=merge)
        # Only float32 summation order differs (measured: values 4e-7, gradients 6e-6 on gradients of size ~5).
        np.testing.assert_allclose(np.asarray(blocked(q, k, v)), np.asarray(masked(q, k, v)), atol=2e-6)
        grads = [jax.grad(lambda *a, f=f: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v) for f in (blocked, masked)]
        for ours, reference in zip(*grads, strict=True):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=2e-5)
    blocked = lambda q, k, v: attn.dot_product_attention(q, k, v, blocks, scale=0.3, implementation="scales",
                                                         chunk=128)
    with pytest.raises(ValueError, match="do not add up"):
        blocked(q[:, :-1], k[:, :-1], v[:, :-1])
    np.testing.assert_allclose(_fwd(params, text, mask, x, cfg=CFG.replace(attention_impl="xla")),
                               _fwd(params, text, mask, x, cfg=CFG.replace(attention_impl="scales")), atol=1e-5)


def test_grad_boundaries_change_no_gradient_and_stay_in_the_cpu_program(setup):
    """The residual-gradient boundary is an identity: the same loss and gradients with it on and off;
    on CPU it survives compilation as a conditional (what keeps XLA from recomputing the chain)."""
    params, text, mask, x = setup
    from varejax.models.layers import materialize_cotangent

    bits = (np.random.RandomState(3).rand(2, L, CFG.bits_per_token) > 0.5).astype(np.int32)
    results, programs = {}, {}
    for mode in ("on", "off"):
        cfg = CFG.replace(grad_boundaries=mode)
        fn = jax.jit(jax.value_and_grad(lambda p, cfg=cfg: bit_loss.loss_fn(p, text, mask, x, bits, SCHEDULE,
                                                                             cfg=cfg)))
        results[mode] = jax.tree.leaves(fn(params))
        programs[mode] = fn.lower(params).compile().as_text()
    for with_boundary, without in zip(results["on"], results["off"], strict=True):
        np.testing.assert_array_equal(np.asarray(with_boundary), np.asarray(without))  # an identity: bit-exact
    assert programs["on"].count(" conditional(") == 3 * CFG.depth
    assert " conditional(" not in programs["off"]
    # "auto" is on for the CPU backend; a non-finite first activation makes the whole gradient NaN, never finite.
    g = jax.grad(lambda v: (materialize_cotangent(v, "auto") * jnp.array([1.0, 2.0])).sum())(jnp.ones(2))
    np.testing.assert_array_equal(np.asarray(g), [1.0, 2.0])
    bad = jax.grad(lambda v: (materialize_cotangent(v * jnp.array([jnp.inf, 2.0]), "on")).sum())(jnp.ones(2))
    assert np.isnan(np.asarray(bad)).all()
    # forward mode works too (tests/test_svare_step.py propagates updates with jax.jvp)
    tangent = jax.jvp(lambda v: materialize_cotangent(jnp.sin(v), "on"), (jnp.ones(2),), (jnp.ones(2),))[1]
    np.testing.assert_allclose(np.asarray(tangent), np.cos(np.ones(2)), rtol=1e-6)
    with pytest.raises(ValueError, match="grad_boundaries"):
        CFG.replace(grad_boundaries="sometimes")


def test_scanned_blocks_equal_the_unrolled_loop(setup):
    """`scan_blocks` (one lax.scan over the stacked block parameters) gives the unrolled loop's loss and
    gradients, with drop path (per-block rates and rngs scanned along) and with remat; and traces one block."""
    params, text, mask, x = setup
    bits = (np.random.RandomState(4).rand(2, L, CFG.bits_per_token) > 0.5).astype(np.int32)
    rng = jax.random.key(7)
    for remat in (False, True):
        results = {}
        for scan in (False, True):
            cfg = CFG.replace(drop_path_rate=0.3, remat=remat, scan_blocks=scan)
            fn = jax.jit(jax.value_and_grad(lambda p, cfg=cfg: bit_loss.loss_fn(p, text, mask, x, bits, SCHEDULE,
                                                                                 cfg=cfg, rng=rng)))
            results[scan] = jax.tree.leaves(fn(params))
        for scanned, unrolled in zip(results[True], results[False], strict=True):
            # measured 5.6e-9 (float32 rounding of the scan body's fusions); a wrong drop mask gives ~1e-3
            np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=0, atol=1e-7)
    # Drop path really acts (the rates are not silently zero inside the scan): another rng, another loss.
    cfg = CFG.replace(drop_path_rate=0.3, scan_blocks=True)
    losses = {float(bit_loss.loss_fn(params, text, mask, x, bits, SCHEDULE, cfg=cfg, rng=jax.random.key(k)))
              for k in range(4)}
    assert len(losses) > 1
    deep = CFG.replace(depth=6, scan_blocks=True)
    program = jax.jit(lambda p: apply.forward(p, text, mask, x, SCHEDULE, cfg=deep)).lower(
        apply.abstract_params(deep)).as_text()
    assert program.count("dot_general") == jax.jit(lambda p: apply.forward(p, text, mask, x, SCHEDULE, cfg=CFG.replace(
        depth=1))).lower(apply.abstract_params(CFG.replace(depth=1))).as_text().count("dot_general")


def test_splash_attention_equals_the_masked_path_in_interpret_mode(setup):
    """`splash` (JAX's Pallas kernel under our static block-causal mask; Pallas interpret mode off TPU) gives
    the masked `xla` attention on every real token, values and gradients, and the whole model forward."""
    params, text, mask, x = setup
    from varejax.models import splash

    lengths = (1, 4, 9, 16, 36, 64)  # 130 tokens, padded to 256: two 128-row blocks, padding rows included
    Lp = 256
    visible = splash.block_causal_numpy(lengths, Lp)
    np.testing.assert_array_equal(visible, np.asarray(attention.block_causal_mask(
        tuple((1, int(round(n ** 0.5)), int(round(n ** 0.5))) for n in lengths), Lp))[0, 0])
    rng = np.random.RandomState(2)
    q, k, v = (jnp.asarray(rng.randn(2, Lp, 2, 16).astype(np.float32)) for _ in range(3))
    blocks = attention.ScaleBlocks(lengths)
    ours = lambda q, k, v: attention.dot_product_attention(q, k, v, blocks, scale=0.4, implementation="splash")
    masked = lambda q, k, v: attention.dot_product_attention(q, k, v, jnp.asarray(visible)[None, None], scale=0.4)
    real = slice(0, sum(lengths))
    # measured: values 1.0e-6, gradients 1.4e-5 on gradients up to ~24 (the kernel's online softmax sums in
    # another order)
    np.testing.assert_allclose(np.asarray(ours(q, k, v))[:, real], np.asarray(masked(q, k, v))[:, real], atol=5e-6)
    grads = [jax.grad(lambda *a, f=f: (f(*a)[:, real] ** 2).sum(), argnums=(0, 1, 2))(q, k, v) for f in (ours, masked)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 128"):
        ours(q[:, :200], k[:, :200], v[:, :200])
    np.testing.assert_allclose(_fwd(params, text, mask, x, cfg=CFG.replace(attention_impl="splash")),
                               _fwd(params, text, mask, x, cfg=CFG.replace(attention_impl="xla")), atol=1e-5)
