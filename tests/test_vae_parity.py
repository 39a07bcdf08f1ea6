"""Parity of the BSQ-VAE tokenizer and the bitwise quantiser with upstream, through the production converter.

Tolerances (from the issue, never loosened): raw features <= 1e-5 max abs; every scale's bits
identical; z_quantized, summed codes and reconstructions <= 1e-4; teacher-forced next-scale inputs
<= 1e-6 with identical bit labels. Fixture arrays are channels-first; they are transposed here.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests import fixtures, measured
from varejax import images
from varejax.checkpoint import load_vae
from varejax.models import bitwise, bsq_vae
from varejax.parallel import DEFAULT_RULES, batch_sharding, make_mesh, shard_state, sharding_context

FOLDERS = fixtures.params_for_folders(fixtures.vae_folders(), "Infinity fixture folder with a tokenizer (vae.npz)")


def _nhwc(x: np.ndarray) -> np.ndarray:
    """[B, C, H, W] or [B, C, 1, H, W] -> [B, H, W, C]."""
    if x.ndim == 5:
        assert x.shape[2] == 1, x.shape
        x = x[:, :, 0]
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _vae_schedule(cfg: dict, key: str, latent_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The tokenizer-grid schedule for `key`: as stored, or doubled when the fixture patchifies."""
    sched = bitwise.scale_sizes(fixtures.schedule(cfg, key))
    if tuple(sched[-1]) == tuple(latent_hw):
        return sched
    doubled = bitwise.vae_schedule(sched, True)
    assert doubled[-1] == tuple(latent_hw), (sched, latent_hw)
    return doubled


def _max_err(ours, ref) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())


@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_tokenizer_end_to_end(folder, converted_vae):
    cfg_json = fixtures.config(folder)
    vae_cfg, params = load_vae(converted_vae(folder))
    assert vae_cfg.arch_dict() == bsq_vae.VAEConfig.from_upstream(cfg_json["vae_config"]).arch_dict()
    ref = np.load(folder / "vae.npz")
    image = _nhwc(ref["image"])

    raw = bsq_vae.encode_jit(params, image, cfg=vae_cfg)
    err = _max_err(raw, _nhwc(ref["raw_features"]))
    print(f"{folder.name} raw_features max abs err {err:.3g}")
    measured.check(f"{folder.name}/vae/raw_features", err, 1e-5)

    sched = _vae_schedule(cfg_json, "scale_schedule", raw.shape[1:3])
    result = bitwise.multiscale_quantize_jit(raw, sched)
    for s, bits in enumerate(result.bits):
        expected = ref[f"bits_s{s}"][:, 0]                       # [B, 1, h, w, d] -> [B, h, w, d]
        assert bits.dtype == np.int8
        mismatched = int((np.asarray(bits) != expected).sum())
        assert mismatched == 0, f"scale {s}: {mismatched} of {expected.size} bits differ"
    err = _max_err(result.z_quantized, _nhwc(ref["z_quantized"]))
    print(f"{folder.name} z_quantized max abs err {err:.3g}")
    measured.check(f"{folder.name}/vae/z_quantized", err, 1e-4)
    for s, area in enumerate(result.area_inputs, start=1):
        measured.check(f"{folder.name}/vae/var_input_area", _max_err(area, _nhwc(ref[f"var_input_area_s{s}"])), 1e-4,
                       what="max abs error (worst scale)")

    summed = bitwise.decode_bits_jit(result.bits, sched)
    err = _max_err(summed, _nhwc(ref["summed_codes_from_bits"]))
    print(f"{folder.name} summed_codes_from_bits max abs err {err:.3g}")
    measured.check(f"{folder.name}/vae/summed_codes_from_bits", err, 1e-4)

    # One decode program for both latents (same shapes): z and the summed codes of the bits.
    recon = np.asarray(bsq_vae.decode_jit(params, np.concatenate([result.z_quantized, summed]), cfg=vae_cfg))
    B = image.shape[0]
    for name, ours in (("recon_from_z", recon[:B]), ("recon_from_bits", recon[B:])):
        err = _max_err(ours, _nhwc(ref[name]))
        print(f"{folder.name} {name} max abs err {err:.3g}")
        measured.check(f"{folder.name}/vae/{name}", err, 1e-4)
    assert recon.min() >= -1.0 and recon.max() <= 1.0


@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_transformer_training_inputs(folder, converted_vae):
    """gt bits and x_BLC_wo_prefix of BitwiseSelfCorrection.flip_requant (no flips), both schedules."""
    cfg_json = fixtures.config(folder)
    train = np.load(folder / "transformer_train.npz")
    patchify = fixtures.patchify(cfg_json)
    vae_cfg, params = load_vae(converted_vae(folder))

    # The training step's raw features are the tokenizer's encoding of the training image.
    raw = bsq_vae.encode_jit(params, _nhwc(train["image"]), cfg=vae_cfg)
    err = _max_err(raw, _nhwc(train["fp32__raw_features"]))
    print(f"{folder.name} transformer_train raw_features max abs err {err:.3g}")
    measured.check(f"{folder.name}/vae/fp32__raw_features", err, 1e-5)

    for prefix, raw_key, sched_key in (("fp32__", "fp32__raw_features", "scale_schedule"),
                                       ("real__fp32__", "real__raw_features", "real_schedule")):
        assert f"{prefix}gt_bits_BLd" in train, f"{folder}: no {prefix}gt_bits_BLd in transformer_train.npz"
        raw = _nhwc(train[raw_key])
        sched = fixtures.schedule(cfg_json, sched_key)
        gt, x = bitwise.transformer_inputs_jit(raw, sched, apply_spatial_patchify=patchify)
        ref_gt, ref_x = train[f"{prefix}gt_bits_BLd"], train[f"{prefix}x_BLC_wo_prefix"]
        assert gt.dtype == np.int8 and gt.shape == ref_gt.shape
        mismatched = int((np.asarray(gt) != ref_gt).sum())
        err = _max_err(x, ref_x)
        print(f"{folder.name} {prefix}gt_bits mismatches {mismatched}, x_BLC_wo_prefix max abs err {err:.3g}")
        assert mismatched == 0
        measured.check(f"{folder.name}/vae/{prefix}x_BLC_wo_prefix", err, 1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("folder", FOLDERS)
def test_inference_decode_and_uint8(folder, converted_vae):
    """The sampler's tail: bits -> summed codes -> decode -> uint8, against transformer_infer.npz."""
    infer = np.load(fixtures.require(folder / "transformer_infer.npz"))
    cfg_json = fixtures.config(folder)
    patchify = fixtures.patchify(cfg_json)
    vae_cfg, params = load_vae(converted_vae(folder))
    sched = fixtures.schedule(cfg_json, "scale_schedule")
    sizes = bitwise.vae_schedule(sched, patchify)
    mode = "fp32__"

    # Running sum through the sampler's helper, from the sampled bits (tokenizer grid).
    @jax.jit
    def accumulate(bits_per_scale):
        summed, codes_per_scale = None, []
        for s, bits in enumerate(bits_per_scale):
            codes = bitwise.bits_to_codes(bits)
            codes_per_scale.append(codes)
            last = s == len(sizes) - 1
            summed, _ = bitwise.accumulate_and_next_input(summed, codes, None if last else sizes[s + 1], sizes[-1],
                                                          last, apply_spatial_patchify=patchify)
        return summed, codes_per_scale

    summed, codes = accumulate([infer[f"{mode}bits_s{s}"][:, 0] for s in range(len(sizes))])
    for s, c in enumerate(codes):
        measured.check(f"{folder.name}/vae/infer_{mode}codes", _max_err(c, _nhwc(infer[f"{mode}codes_s{s}"])), 1e-6,
                       what="max abs error (worst scale)")
    ref_summed = _nhwc(infer[f"{mode}summed_codes"])
    err = _max_err(summed, ref_summed)
    print(f"{folder.name} infer summed_codes max abs err {err:.3g}")
    measured.check(f"{folder.name}/vae/infer_{mode}summed_codes", err, 1e-4)

    decoded = np.asarray(bsq_vae.decode_jit(params, ref_summed, cfg=vae_cfg))
    ref_decoded = _nhwc(infer[f"{mode}decoded_img"])
    err = _max_err(decoded, ref_decoded)
    print(f"{folder.name} infer decoded_img max abs err {err:.3g}")
    measured.check(f"{folder.name}/vae/infer_{mode}decoded_img", err, 1e-4)
    # The conversion is upstream's (clamp, scale, truncate) and upstream's BGR is the flipped channels: exact
    # on upstream's own floats.
    ref_u8 = infer[f"{mode}img_uint8_bgr"][..., ::-1]
    np.testing.assert_array_equal(images.to_uint8(ref_decoded), ref_u8)
    # Our decoded image, converted, is upstream's picture: a pixel may differ only by one level, and only
    # where upstream's scaled value lies within our decode error (x 127.5) of a truncation step.
    ours_u8 = images.to_uint8(decoded).astype(int)
    differs = ours_u8 != ref_u8
    scaled = (np.clip(ref_decoded, -1, 1).astype(np.float64) + 1) * 127.5
    near_step = np.abs(scaled - np.round(scaled)) <= err * 127.5 + 1e-4
    print(f"{folder.name} our uint8 image: {int(differs.sum())} of {differs.size} values differ from upstream's")
    measured.check(f"{folder.name}/vae/infer_{mode}img_uint8", np.abs(ours_u8 - ref_u8).max(), 1,
                   what="max abs difference in uint8 levels")
    assert not (differs & ~near_step).any()


# ---- sharding ----------------------------------------------------------------------------------------

MICRO = bsq_vae.VAEConfig(codebook_dim=8, patch_size=4, ch_mult=(1, 2, 2), base_ch=32, num_res_blocks=1)


def test_sharded_encode_matches_single_device():
    assert len(jax.devices()) >= 8, "conftest.py must fake 8 CPU devices"
    params = bsq_vae.init_vae_params(MICRO, seed=1)
    x = np.random.RandomState(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    ref = np.asarray(bsq_vae.encode_jit(params, x, cfg=MICRO))

    mesh = make_mesh((8, 1, 1))
    sharded = shard_state(params, mesh)
    with sharding_context(mesh, DEFAULT_RULES):
        xs = jax.device_put(x, batch_sharding(mesh, DEFAULT_RULES, x.ndim))
        out = jax.jit(bsq_vae.encode, static_argnames=("cfg",))(sharded, xs, cfg=MICRO)
    assert len(xs.sharding.device_set) == 8
    assert out.sharding.spec[0] in ("data", ("data",), ("data", "fsdp"))
    assert out.shape == (8, 4, 4, MICRO.codebook_dim)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-5
    # Every tokenizer parameter is replicated (the tokenizer is data-parallel).
    for leaf in jax.tree.leaves(sharded):
        assert leaf.sharding.is_fully_replicated


@pytest.mark.parametrize("preset, image_hw, latent_hw", [("d32", (256, 384), (16, 24)), ("d14", (256, 256), (32, 32))])
def test_released_tokenizer_shapes(preset, image_hw, latent_hw):
    """The released sizes trace end to end (shapes only, no compile)."""
    cfg = bsq_vae.get_vae_preset(preset)
    params = bsq_vae.abstract_vae_params(cfg)
    image = jax.ShapeDtypeStruct((1, *image_hw, 3), np.float32)
    raw = jax.eval_shape(lambda p, x: bsq_vae.encode(p, x, cfg), params, image)
    assert raw.shape == (1, *latent_hw, cfg.codebook_dim) and raw.dtype == np.float32
    out = jax.eval_shape(lambda p, z: bsq_vae.decode(p, z, cfg), params, raw)
    assert out.shape == (1, *image_hw, 3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        jax.eval_shape(lambda p, x: bsq_vae.encode(p, x, cfg), params,
                       jax.ShapeDtypeStruct((1, image_hw[0] + 4, image_hw[1], 3), np.float32))


def test_pixel_unshuffle_packs_pixels_into_the_first_convolution():
    """pixel_unshuffle=f runs the convolutions at 1/f resolution, with the same latent grid; the packed
    encoder sees exactly the f x f block's pixels (torch pixel_unshuffle order) and the config round-trips."""
    from varejax.models.patchify import pixel_shuffle, pixel_unshuffle

    cfg = bsq_vae.VAEConfig(codebook_dim=8, patch_size=8, ch_mult=(1, 1, 1), base_ch=24, num_res_blocks=1,
                            pixel_unshuffle=2)
    assert cfg.num_downsamples == 2 and bsq_vae.VAEConfig.from_dict(cfg.to_dict()) == cfg
    params = bsq_vae.init_vae_params(cfg, seed=0)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    raw = bsq_vae.encode(params, x, cfg)
    assert raw.shape == (2, 4, 4, 8)
    assert bsq_vae.decode(params, raw, cfg).shape == (2, 32, 32, 3)
    # The same weights without packing (12 channels in and out, patch 4) are the same network: packing only
    # rearranges pixels, before the encoder and (inverse) after the decoder, so the results are bit-identical.
    plain = cfg.replace(pixel_unshuffle=1, patch_size=4, in_channels=12, out_channels=12)
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(bsq_vae.encode(params, pixel_unshuffle(x, 2), plain)))
    np.testing.assert_array_equal(np.asarray(bsq_vae.decode(params, raw, cfg)),
                                  np.asarray(pixel_shuffle(bsq_vae.decode(params, raw, plain), 2)))
    for bad in (3, 16):
        with pytest.raises(ValueError, match="pixel_unshuffle"):
            cfg.replace(pixel_unshuffle=bad)


# ---- image files ---------------------------------------------------------------------------------------

def test_image_files_and_upstream_conversions(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    u8 = rng.randint(0, 256, (2, 12, 20, 3)).astype(np.uint8)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    images.save_images(paths, u8)
    loaded = images.load_images(paths)
    assert loaded.shape == (2, 12, 20, 3) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, images.to_float(u8))
    np.testing.assert_array_equal(loaded, (u8.astype(np.float32) / 255) * 2 - 1)
    # RGB order is kept: Pillow reads back the channels we wrote.
    np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), u8[0])
    # to_uint8 truncates like upstream's .to(torch.uint8): a uint8 -> float -> uint8 trip may lose one level.
    back = images.to_uint8(loaded)
    assert np.all(back <= u8) and np.all(u8.astype(int) - back <= 1)
    np.testing.assert_array_equal(images.to_uint8(np.array([-2.0, -1.0, 1.0, 3.0, 0.999], np.float32)),
                                  [0, 0, 255, 255, 254])

    # Floats are written through to_uint8; JPEG and grey images load as RGB.
    images.save_image(tmp_path / "c.jpg", loaded[0])
    assert images.load_image(tmp_path / "c.jpg").shape == (12, 20, 3)
    Image.fromarray(u8[0, :, :, 0]).save(tmp_path / "grey.png")
    grey = images.load_image(tmp_path / "grey.png")
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    images.save_image(tmp_path / "small.png", u8[0, :8])
    with pytest.raises(ValueError, match="different sizes"):
        images.load_images([paths[0], tmp_path / "small.png"])


def test_preprocess_matches_upstream_cover_and_centre_crop(tmp_path):
    from PIL import Image

    # upstream run_infinity.transform: the relatively shorter side matches, the other is int()-truncated.
    assert images.cover_size(300, 200, 64, 64) == (96, 64)
    assert images.cover_size(200, 300, 64, 64) == (64, 96)
    assert images.cover_size(333, 250, 64, 128) == (128, 96)
    u8 = np.random.RandomState(1).randint(0, 256, (200, 300, 3)).astype(np.uint8)
    Image.fromarray(u8).save(tmp_path / "photo.png")
    out = images.load_image(tmp_path / "photo.png", size=(64, 64))
    assert out.shape == (64, 64, 3)
    expected = np.asarray(Image.fromarray(u8).resize((96, 64), resample=Image.LANCZOS))[:, 16:80]
    np.testing.assert_array_equal(out, images.to_float(expected))
