"""Parity of the KV-cache CFG sampler with upstream `autoregressive_infer_cfg` (greedy, fp32 mode).

Per scale: raw head logits and CFG-mixed logits <= 1e-4, bits identical; summed codes and the decoded
image <= 1e-3; for the tiny schedule and the full 7-scale 0.06M generation (`real__`).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import fixtures
from varejax.checkpoint import load_infinity, load_vae
from varejax.images import to_uint8
from varejax.models.bsq_vae import decode_jit
from varejax.sample.sampler import SamplingConfig, generate_jit

pytestmark = pytest.mark.parity
FOLDERS = fixtures.params_for_folders(fixtures.infinity_folders())


def _run(folder, converted_infinity, prefix):
    infer = np.load(folder / "transformer_infer.npz")
    config = fixtures.config(folder)
    key, sched_key = ("infer_real", "real_schedule") if prefix else ("infer", "scale_schedule")
    assert f"{prefix}fp32__bits_s0" in infer and key in config, f"{folder}: no {prefix or 'main'} generation"
    cfg, params = load_infinity(converted_infinity(folder))
    schedule = fixtures.schedule(config, sched_key)
    sampling = SamplingConfig(cfg=tuple(config[key]["cfg_list"]), tau=tuple(config[key]["tau_list"]), top_k=1)
    template = None if prefix else float(config["h_div_w_template"])
    out = generate_jit(params, infer["text__text_feats_padded"], infer["text__text_mask"], schedule, cfg=cfg,
                       sampling=sampling, h_div_w_template=template)
    return infer, schedule, out


@pytest.mark.parametrize("prefix", ["", "real__"])
@pytest.mark.parametrize("folder", FOLDERS)
def test_greedy_generation_matches_upstream(folder, prefix, converted_infinity, converted_vae):
    infer, schedule, out = _run(folder, converted_infinity, prefix)
    worst_logits = 0.0
    for s in range(len(schedule)):
        ref_bits = infer[f"{prefix}fp32__bits_s{s}"][:, 0]          # [B, h, w, d]
        np.testing.assert_array_equal(np.asarray(out.bits[s]), ref_bits, err_msg=f"bits of scale {s}")
        err = np.abs(np.asarray(out.cfg_logits[s]) - infer[f"{prefix}fp32__cfg_logits_s{s}"]).max()
        worst_logits = max(worst_logits, float(err))
        assert err <= 1e-4, (s, err)
        # upstream stores the head logits (and the uint8 image, below) of the main generation only
        assert prefix or f"fp32__head_logits_2B_s{s}" in infer, f"{folder}: no fp32__head_logits_2B_s{s}"
        if f"{prefix}fp32__head_logits_2B_s{s}" in infer:
            err = np.abs(np.asarray(out.head_logits[s]) - infer[f"{prefix}fp32__head_logits_2B_s{s}"]).max()
            assert err <= 1e-4, (s, err)
    ref_summed = infer[f"{prefix}fp32__summed_codes"].transpose(0, 2, 3, 1)  # [B, d, H, W] -> [B, H, W, d]
    err_summed = np.abs(np.asarray(out.summed_codes) - ref_summed).max()
    print(f"{folder.name} {prefix or 'main '}: cfg logits {worst_logits:.3g}, summed codes {err_summed:.3g}")
    assert err_summed <= 1e-3

    assert (folder / "vae.npz").exists(), f"{folder}: an Infinity fixture holds its tokenizer (vae.npz)"
    vae_cfg, vae_params = load_vae(converted_vae(folder))
    image = np.asarray(decode_jit(vae_params, out.summed_codes, vae_cfg))
    ref_image = infer[f"{prefix}fp32__decoded_img"].transpose(0, 2, 3, 1)
    err_image = np.abs(image - ref_image).max()
    print(f"  decoded image {err_image:.3g}")
    assert err_image <= 1e-3
    assert prefix or "fp32__img_uint8_bgr" in infer, f"{folder}: no fp32__img_uint8_bgr"
    if f"{prefix}fp32__img_uint8_bgr" in infer:  # upstream writes BGR; ours is RGB
        assert np.abs(to_uint8(image).astype(int) - infer[f"{prefix}fp32__img_uint8_bgr"][..., ::-1]).max() <= 1
