"""benchmarks/vs_upstream.py's codec paths (vae_encode, vae_decode, t5_encode) at the tiny preset.

Ours at the tiny preset, and the check the benchmark runs before timing (the same random weights on both
sides must give the same outputs, max abs error <= 1e-4; a changed weight fails it) against HF's T5. The
check against upstream's tokenizer needs an Infinity checkout, which CI has not: the benchmark runs it on
every run with $VAREJAX_UPSTREAM_INFINITY and records it (`output_check_fp32` in benchmarks/results/).
"""

from __future__ import annotations

import importlib.util
import json
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
def test_codec_output_check_compares_the_same_function():
    """Before timing, the benchmark refuses two different functions. HF's T5 encoder (torch, what upstream
    encodes prompts with) with its random weights converted into ours gives the same hidden states (upstream's
    tokenizer needs the Infinity checkout, so here its branch of the check gets our own output, channels first;
    our tokenizer's numerics against upstream's golden outputs are tests/test_vae_parity.py's); a changed
    weight of ours, or a tokenizer output off by 1e-3, fails the check."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import upstream_shims

    config, cfg, schedule, inputs = _tiny()
    _, t5_cfg = vs.codec_configs(config)
    hf = upstream_shims.build_t5_encoder(t5_cfg, config.seed)
    params = vs.codec_params(config, {"t5": hf})
    ours = vs.our_paths(config, cfg, schedule, inputs, vs.CODEC_PATHS, params)
    upstream = vs._upstream_codec_paths(inputs, {"vae": None, "t5": hf})
    channels_first = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())  # noqa: E731
    for name in ("vae_encode", "vae_decode"):
        upstream[name] = lambda name=name: channels_first(ours[name]())
    report = vs.check_codec_outputs(config, ours, upstream, inputs, vs.CODEC_PATHS)
    assert report["t5_encode"]["max_abs_err"] <= 1e-4 < report["t5_encode"]["max_abs_upstream"] * 1e-2
    assert report["vae_decode"]["max_abs_err"] == 0.0

    params["t5"]["final_norm"]["scale"][...] *= 1.001
    changed = vs.our_paths(config, cfg, schedule, inputs, vs.CODEC_PATHS, params)
    with pytest.raises(AssertionError, match="t5_encode: ours differs from upstream"):
        vs.check_codec_outputs(config, changed, upstream, inputs, ["t5_encode"])
    upstream["vae_decode"] = lambda: channels_first(np.asarray(ours["vae_decode"]()) + 1e-3)
    with pytest.raises(AssertionError, match="vae_decode: ours differs from upstream"):
        vs.check_codec_outputs(config, ours, upstream, inputs, ["vae_decode"])
