"""benchmarks/vs_upstream.py's codec paths (vae_encode, vae_decode, t5_encode) at the tiny preset.

Ours alone always; with $VAREJAX_UPSTREAM_INFINITY (an upstream Infinity checkout) and torch +
transformers, also upstream's side: the same random weights on both sides must give the same outputs
(max abs error <= the config's tolerances, 1e-4), and a changed weight must fail that check.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from varejax.configlib import load_config
from varejax.models import schedules

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vs_upstream_benchmark", REPO / "benchmarks" / "vs_upstream.py")
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)

CODECS = "vae_encode,vae_decode,t5_encode"
TINY = str(REPO / "configs" / "vs_upstream.py") + ":tiny"
UPSTREAM = os.environ.get("VAREJAX_UPSTREAM_INFINITY")


def _run(tmp_path, *overrides) -> tuple[dict, dict]:
    out = tmp_path / "vs.json"
    result = vs.main(["--config", TINY, f"--config.paths={CODECS}", "--config.runs=1", "--config.steps=1",
                      "--config.bf16=False", f"--config.out={out}", *overrides])
    return result, json.loads(out.read_text())


def _tiny():
    """(config, transformer config, schedule, inputs) of the tiny preset, as the benchmark builds them."""
    config = load_config(TINY)
    cfg, schedule = vs.model_config(config), schedules.get_schedule(config.h_div_w, config.pn)
    return config, cfg, schedule, vs.make_inputs(config, cfg, schedule)


def test_tiny_codec_paths_ours_only(tmp_path, monkeypatch):
    monkeypatch.delenv("VAREJAX_UPSTREAM_INFINITY", raising=False)
    result, written = _run(tmp_path)
    assert written == result
    assert set(result["ms"]) == {"ours_fp32"} and "upstream_over_ours" not in result
    assert set(result["ms"]["ours_fp32"]) == set(CODECS.split(","))
    assert all(cell["median"] > 0 for cell in result["ms"]["ours_fp32"].values())
    assert result["codecs"]["vae"]["ch_mult"] == [1, 1, 1, 1, 1] and result["codecs"]["t5"]["d_model"] == 64
    assert result["codecs"]["token_length"] == 8 and "output_check_fp32" not in result

    # What the timed callables compute: shapes, ranges, and only the requested groups are built.
    config, cfg, schedule, inputs = _tiny()
    paths = vs.our_paths(config, cfg, schedule, inputs, vs.CODEC_PATHS)
    assert set(paths) == set(vs.CODEC_PATHS)
    raw, images, hidden = (np.asarray(paths[name]()) for name in vs.CODEC_PATHS)
    assert raw.shape == (2, 2, 2, 32) and images.shape == (2, 32, 32, 3) and hidden.shape == (2, 8, 64)
    assert np.isfinite(raw).all() and np.isfinite(hidden).all()
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.01
    # summed codes: the sum over scales (1x1, 2x2) of +-1/sqrt(d) codes; token ids: EOS last, pad after
    assert np.allclose(np.abs(inputs["summed_codes"]).max(), 2 / np.sqrt(32), atol=1e-6)
    lengths = inputs["token_mask"].sum(1)
    assert lengths.tolist() == [5, 8] and (inputs["token_ids"][[0, 1], lengths - 1] == 1).all()
    assert (inputs["token_ids"][0, 5:] == 0).all()


def test_unknown_path_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--config.paths=vae_encode,vae_decoder")


@pytest.mark.parity
@pytest.mark.skipif(not UPSTREAM, reason="set VAREJAX_UPSTREAM_INFINITY to an upstream Infinity checkout")
def test_codec_outputs_equal_upstream_with_the_same_weights(tmp_path):
    pytest.importorskip("transformers")
    result, _ = _run(tmp_path)
    check = result["output_check_fp32"]
    assert set(check) == set(CODECS.split(","))
    for name, cell in check.items():
        print(f"{name}: max abs err {cell['max_abs_err']:.3g} (max |upstream| {cell['max_abs_upstream']:.3g})")
        assert cell["tolerance"] == 1e-4 and cell["max_abs_err"] <= cell["tolerance"]
        assert cell["max_abs_upstream"] > 0.1  # not a comparison of zeros
    assert set(result["upstream_over_ours"]["ours_fp32"]) == set(CODECS.split(","))

    # The check fails when the two sides do not compute the same function: one weight of ours changed.
    config, cfg, schedule, inputs = _tiny()
    models = vs.upstream_codec_models(config, UPSTREAM)
    params = vs.codec_params(config, models)
    params["vae"]["decoder"]["conv_out"]["bias"][...] += 1e-3
    params["t5"]["final_norm"]["scale"][...] *= 1.001
    ours = vs.our_paths(config, cfg, schedule, inputs, vs.CODEC_PATHS, params)
    upstream = vs.upstream_paths(config, cfg, schedule, inputs, UPSTREAM, vs.CODEC_PATHS, models)
    assert set(vs.check_codec_outputs(config, ours, upstream, inputs, ["vae_encode"])) == {"vae_encode"}
    for name in ("vae_decode", "t5_encode"):
        with pytest.raises(AssertionError, match=f"{name}: ours differs from upstream"):
            vs.check_codec_outputs(config, ours, upstream, inputs, [name])
