"""The multi-scale bit quantiser against torch's own resampling ops, and its self-correction and patchify paths.

torch (CPU) is the reference for `F.interpolate(mode='area')`, `'trilinear'` with T = 1 and
pixel_(un)shuffle, called on upstream's layout [B, d, 1, h, w].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import measured
from varejax.models import bitwise, patchify

F = torch.nn.functional


def _torch_resize(x_BHWC: np.ndarray, size, mode: str) -> np.ndarray:
    """torch F.interpolate on upstream's [B, C, 1, H, W] layout, back to [B, H, W, C]."""
    t = torch.from_numpy(np.ascontiguousarray(x_BHWC.transpose(0, 3, 1, 2)))[:, :, None]
    out = F.interpolate(t, size=(1,) + tuple(size), mode=mode)
    return out[:, :, 0].numpy().transpose(0, 2, 3, 1)


AREA_CASES = [((64, 64), (12, 12)), ((64, 64), (20, 20)), ((7, 7), (3, 3)), ((64, 48), (12, 20)),
              ((16, 16), (6, 6)), ((64, 64), (1, 1)), ((3, 5), (7, 4))]


@pytest.mark.parity
@pytest.mark.parametrize("src, dst", AREA_CASES)
def test_area_resize_matches_torch(src, dst):
    rng = np.random.RandomState(sum(src) + sum(dst))
    # Integer-valued inputs: every summation order is exact, so windows and divisors must match bit for bit.
    ints = rng.randint(-50, 50, size=(2,) + src + (5,)).astype(np.float32)
    ours = np.asarray(bitwise.area_resize(ints, dst))
    np.testing.assert_array_equal(ours, _torch_resize(ints, dst, "area"))
    # Real-valued inputs: only the summation order may differ (a few float32 ulps).
    x = rng.randn(2, *src, 5).astype(np.float32)
    err = np.abs(np.asarray(bitwise.area_resize(x, dst)) - _torch_resize(x, dst, "area")).max()
    measured.check("bitwise/area_resize_vs_torch", err, 1e-6, what="max abs error (worst of the sizes)")


BILINEAR_CASES = [((64, 64), (12, 12)), ((16, 16), (6, 6)), ((7, 7), (3, 3)), ((16, 16), (1, 1)),
                  ((1, 1), (16, 16)), ((2, 2), (16, 16)), ((6, 6), (16, 16)), ((3, 5), (7, 11)),
                  ((12, 20), (5, 8)), ((4, 4), (4, 4))]


@pytest.mark.parity
@pytest.mark.parametrize("src, dst", BILINEAR_CASES)
def test_bilinear_resize_matches_torch_trilinear(src, dst):
    x = np.random.RandomState(sum(src) * 7 + sum(dst)).randn(2, *src, 4).astype(np.float32)
    err = np.abs(np.asarray(bitwise.bilinear_resize(x, dst)) - _torch_resize(x, dst, "trilinear")).max()
    measured.check("bitwise/bilinear_resize_vs_torch_trilinear", err, 1e-6, what="max abs error (worst of the sizes)")


def test_bilinear_is_not_antialiased():
    # jax.image.resize antialiases when downsampling by default; upstream's torch call does not.
    x = np.random.RandomState(0).randn(1, 16, 16, 2).astype(np.float32)
    ours = np.asarray(bitwise.bilinear_resize(x, (4, 4)))
    aa = np.asarray(jax.image.resize(x, (1, 4, 4, 2), "bilinear", antialias=True))
    assert np.abs(ours - aa).max() > 1e-2


def test_sign_at_zero_is_bit_zero():
    x = jnp.array([[0.0, -0.0, 1e-30, -1e-30, 2.0, -3.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(bitwise.quantize_bits(x)), [[0, 0, 1, 0, 1, 0]])
    bits, q = bitwise.quantize(x)
    np.testing.assert_array_equal(np.asarray(bits), [[0, 0, 1, 0, 1, 0]])
    s = float(bitwise.codebook_scale(6))
    np.testing.assert_allclose(np.asarray(q), [[-s, -s, s, -s, s, -s]], rtol=1e-6)
    zeros = jnp.zeros((2, 3, 3, 4))  # an all-zero vector: l2norm must not divide by zero
    bits, q = bitwise.quantize(zeros)
    assert int(bits.sum()) == 0 and np.all(np.isfinite(np.asarray(q)))


@pytest.mark.parametrize("d", [14, 32, 56])
def test_bits_to_codes(d):
    bits = np.random.RandomState(d).randint(0, 2, size=(3, 2, 2, d)).astype(np.int8)
    codes = np.asarray(bitwise.bits_to_codes(bits))
    # Upstream indices_to_codes: bits * 2s - s, then F.normalize (which moves d = 56 by an ulp).
    s = 1 / np.sqrt(d)
    ref = F.normalize(torch.from_numpy(bits).float() * s * 2 - s, dim=-1).numpy()
    np.testing.assert_allclose(codes, ref, rtol=0, atol=3e-8)
    np.testing.assert_allclose(codes, (2.0 * bits - 1) / np.sqrt(d), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(bitwise.quantize_bits(codes)), bits)


SCHED = ((1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 5, 5), (1, 8, 8))


def _torch_flip_requant(raw_BHWd: np.ndarray, sizes, patchify_: bool):
    """A torch reference of the no-flip training inputs written from docs/infinity.md section 5."""
    raw = torch.from_numpy(np.ascontiguousarray(raw_BHWd.transpose(0, 3, 1, 2)))[:, :, None]  # B d 1 H W
    d = raw.shape[1]
    s = 1 / np.sqrt(d)
    cum = torch.zeros_like(raw)
    labels, inputs = [], []
    for si, hw in enumerate(sizes):
        r = raw - cum
        if si != len(sizes) - 1:
            r = F.interpolate(r, size=(1,) + tuple(hw), mode="area")
        bits = (r > 0).to(torch.int8)                                                        # B d 1 h w
        q = torch.where(r > 0, torch.tensor(s, dtype=torch.float32), torch.tensor(-s, dtype=torch.float32))
        cum = cum + F.interpolate(q, size=(1,) + tuple(sizes[-1]), mode="trilinear")
        b = bits[:, :, 0]
        if patchify_:
            b = F.pixel_unshuffle(b.float(), 2).to(torch.int8)
        labels.append(b.flatten(2).transpose(1, 2))
        if si != len(sizes) - 1:
            nxt = F.interpolate(cum, size=(1,) + tuple(sizes[si + 1]), mode="trilinear")[:, :, 0]
            if patchify_:
                nxt = F.pixel_unshuffle(nxt, 2)
            inputs.append(nxt.flatten(2).transpose(1, 2))
    return torch.cat(labels, 1).numpy(), torch.cat(inputs, 1).numpy()


@pytest.mark.parametrize("apply_patchify", [False, True])
def test_transformer_inputs_match_torch_reference(apply_patchify):
    sizes = bitwise.vae_schedule(SCHED, apply_patchify)
    raw = np.random.RandomState(3).randn(2, *sizes[-1], 6).astype(np.float32)
    gt, x = bitwise.transformer_inputs_jit(raw, SCHED, apply_spatial_patchify=apply_patchify)
    ref_gt, ref_x = _torch_flip_requant(raw, sizes, apply_patchify)
    L = sum(h * w for _, h, w in SCHED)
    D = 6 * (4 if apply_patchify else 1)
    assert gt.shape == (2, L, D) and x.shape == (2, L - 1, D)
    np.testing.assert_array_equal(np.asarray(gt), ref_gt)
    assert np.abs(np.asarray(x) - ref_x).max() <= 1e-6

    # The sampler's helper rebuilds the same inputs from the label bits, scale by scale.
    @jax.jit
    def rebuild(gt_BLD):
        summed, pieces, offset = None, [], 0
        for si, (_, h, w) in enumerate(SCHED):
            bits_grid = bitwise.bits_from_tokens(gt_BLD[:, offset: offset + h * w], (h, w), apply_patchify)
            offset += h * w
            assert bits_grid.shape[1:3] == sizes[si]
            last = si == len(SCHED) - 1
            summed, nxt = bitwise.accumulate_and_next_input(summed, bitwise.bits_to_codes(bits_grid),
                                                            None if last else sizes[si + 1], sizes[-1], last,
                                                            apply_spatial_patchify=apply_patchify)
            if nxt is not None:
                pieces.append(nxt)
        return summed, jnp.concatenate(pieces, 1)

    summed, x_rebuilt = rebuild(gt)
    assert np.abs(np.asarray(x_rebuilt) - ref_x).max() <= 1e-6
    assert summed.shape == (2, *sizes[-1], 6)


def test_patchify_round_trip_and_torch_order():
    x = np.random.RandomState(1).randn(2, 6, 8, 5).astype(np.float32)
    up = patchify.pixel_unshuffle(jnp.asarray(x), 2)
    assert up.shape == (2, 3, 4, 20)
    np.testing.assert_array_equal(np.asarray(patchify.pixel_shuffle(up, 2)), x)
    ref = F.pixel_unshuffle(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 2).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(up), ref)
    bits = np.random.RandomState(2).randint(0, 2, (2, 3 * 4, 20)).astype(np.int8)
    grid = bitwise.bits_from_tokens(bits, (3, 4), apply_spatial_patchify=True)
    assert grid.shape == (2, 6, 8, 5)
    np.testing.assert_array_equal(np.asarray(bitwise.tokens(grid, apply_spatial_patchify=True)), bits)


def test_multiscale_quantize_and_decode_bits_agree():
    raw = np.random.RandomState(4).randn(2, 8, 8, 6).astype(np.float32)
    result = bitwise.multiscale_quantize_jit(raw, SCHED)
    assert [tuple(b.shape[1:3]) for b in result.bits] == [s[1:] for s in SCHED]
    summed = bitwise.decode_bits_jit(result.bits, SCHED)
    assert np.abs(np.asarray(summed) - np.asarray(result.z_quantized)).max() <= 1e-6
    with pytest.raises(ValueError, match="last scale"):
        bitwise.multiscale_quantize(raw, SCHED[:-1])


# ---- bitwise self-correction -----------------------------------------------------------------------

def test_flip_rate_follows_the_requested_strength():
    bits = jnp.zeros((200_000,), jnp.int8)
    flip = jax.jit(bitwise.flip_bits, static_argnames=("strength",))
    probs = []
    for seed in range(40):
        flipped, p = flip(bits, jax.random.key(seed), strength=0.3)
        p = float(p)
        probs.append(p)
        rate = float(flipped.astype(jnp.float32).mean())
        assert abs(rate - p) <= 0.005, (seed, rate, p)
    # p = randint(0, 31) * 0.01: a grid in [0, 0.30], and several different values across seeds.
    assert all(0.0 <= p <= 0.3 + 1e-7 and abs(p * 100 - round(p * 100)) < 1e-4 for p in probs)
    assert len({round(p, 2) for p in probs}) >= 10
    _, p = flip(bits, jax.random.key(0), strength=0.0)
    assert float(p) == 0.0


def test_self_correction_is_seeded_and_keeps_labels_consistent():
    raw = np.random.RandomState(5).randn(2, 8, 8, 6).astype(np.float32)
    clean_gt, clean_x = bitwise.transformer_inputs_jit(raw, SCHED)
    run = lambda seed, layers=3: bitwise.transformer_inputs_jit(  # noqa: E731
        raw, SCHED, noise_apply_layers=layers, noise_apply_strength=0.3, rng=jax.random.key(seed))
    gt_a, x_a = run(7)
    gt_b, x_b = run(7)
    np.testing.assert_array_equal(np.asarray(gt_a), np.asarray(gt_b))
    np.testing.assert_array_equal(np.asarray(x_a), np.asarray(x_b))
    # Scale 0's label is the sign of the raw average: flips never change it.
    np.testing.assert_array_equal(np.asarray(gt_a)[:, :1], np.asarray(clean_gt)[:, :1])
    # Across seeds the flipped inputs differ from the clean ones (p = 0 for all 3 scales has tiny odds).
    changed = [not np.array_equal(np.asarray(run(seed)[1]), np.asarray(clean_x)) for seed in range(4)]
    assert any(changed)
    # No noise layers (upstream's -1) or zero strength: exactly the clean program, no rng needed.
    clean_program = str(jax.make_jaxpr(lambda r: bitwise.transformer_inputs(r, SCHED))(raw))
    for layers, strength in ((0, 0.3), (-1, 0.3), (3, 0.0)):
        program = jax.make_jaxpr(lambda r, n=layers, p=strength: bitwise.transformer_inputs(
            r, SCHED, noise_apply_layers=n, noise_apply_strength=p))(raw)
        assert str(program) == clean_program
    with pytest.raises(ValueError, match="rng"):
        bitwise.transformer_inputs(raw, SCHED, noise_apply_layers=2, noise_apply_strength=0.3)


def test_schedule_validation():
    assert bitwise.scale_sizes([(1, 2, 3), (4, 5)]) == ((2, 3), (4, 5))
    assert bitwise.vae_schedule(((1, 1, 1), (1, 2, 3)), True) == ((2, 2), (4, 6))
    with pytest.raises(ValueError, match="t = 1"):
        bitwise.scale_sizes([(2, 4, 4)])
    with pytest.raises(ValueError, match="latent size"):
        bitwise.transformer_inputs(np.zeros((1, 4, 4, 3), np.float32), ((1, 1, 1), (1, 2, 2)))
