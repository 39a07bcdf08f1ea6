"""The toy world: generator, prompts, tokenizer, the shipped oracle and models, and the smoke training run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from varejax.toy import world

ROOT = Path(__file__).resolve().parents[1]

# Bounds of the reduced main job (configs/toy_circle.py:ci); the full job meets them comfortably (README).
ERASURE_BEFORE_MAX = 0.4       # the base model shows a circle for most circle prompts (measured 0.28)
ERASURE_GAIN_MIN = 0.1         # erasure rate on seen prompts rises by at least this much
PRESERVATION_DROP_MAX = 0.1    # oracle accuracy on prompts without circles drops by at most this much
PROMPT_FOLLOWING_MIN = 0.65    # the base model's accuracy on the attributes its prompts ask for (0.74)


def _says(prompt: str, phrase: str) -> bool:
    return re.search(rf"(^|\s){re.escape(phrase)}(\s|$)", prompt) is not None


def test_generator_is_deterministic():
    a, b = world.dataset(6, seed=3), world.dataset(6, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.prompts == b.prompts and a.families == b.families
    for name in world.ATTRIBUTE_NAMES:
        np.testing.assert_array_equal(a.labels[name], b.labels[name])
    c = world.dataset(6, seed=4)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (6, 64, 64, 3) and a.images.dtype == np.uint8


def test_render_draws_the_shape_in_its_colour():
    rng = np.random.default_rng(0)
    for colour in world.Colour:
        attrs = world.Attributes(world.Shape.SQUARE, colour, world.Background.PLAIN)
        image = world.render(attrs, rng).reshape(-1, 3).astype(int)
        target = np.asarray(world.SHAPE_RGB[colour])
        close = np.abs(image - target).max(axis=1) <= world.SHAPE_JITTER + 1
        assert close.mean() > 0.1  # the square covers (1.6 r)^2 >= 576 of the 4096 pixels (r >= 15)


def test_prompts_agree_with_labels():
    data = world.dataset(300, seed=11)
    for i, text in enumerate(data.prompts):
        family = world.PROMPT_FAMILIES[data.families[i]]
        for a, name in enumerate(world.ATTRIBUTE_NAMES):
            value = int(data.labels[name][i])
            words = family.words[name]
            said = [v for v, synonyms in words.items() if any(_says(text, s) for s in synonyms)]
            if name == "background":
                said += [v for v, nouns in family.bg_nouns.items() if any(_says(text, s) for s in nouns)]
            if data.mentions[i, a]:
                assert set(said) == {value}, (text, name, value)
            else:
                assert not said, (text, name)


def test_families_are_disjoint_and_pairs_match():
    for name in world.ATTRIBUTE_NAMES:
        seen = {s for v in world.SEEN.words[name].values() for s in v}
        para = {s for v in world.PARAPHRASE.words[name].values() for s in v}
        assert not seen & para
    # only the bare "{obj}" template is shared (the object phrases themselves differ)
    assert set(world.SEEN.templates_bg + world.SEEN.templates) & set(
        world.PARAPHRASE.templates_bg + world.PARAPHRASE.templates) == {"{obj}"}
    assert not set(world.enumerate_prompts("seen")) & set(world.enumerate_prompts("paraphrase"))
    assert "a red circle on a striped background" in world.enumerate_prompts("seen", "circle")
    assert "a crimson disk with stripes behind it" in world.enumerate_prompts("paraphrase", "circle")
    for family in world.FAMILIES:
        pairs = world.anchor_pairs("circle", family=family, n=20, seed=1)
        assert all(p.attrs.shape == world.Shape.CIRCLE and p.anchor_attrs.shape == world.Shape.SQUARE for p in pairs)
        assert all(p.attrs.replace(shape=world.Shape.SQUARE) == p.anchor_attrs for p in pairs)
        # same template: the texts differ only in the concept's words
        for p in pairs:
            assert p.prompt != p.anchor and len(set(p.prompt.split()) ^ set(p.anchor.split())) <= 6
    striped = world.anchor_pairs("striped", family="seen", n=5, seed=0)
    assert all(_says(p.prompt, "striped") and _says(p.anchor, "plain") for p in striped)
    assert world.to_anchor("a crimson disk with stripes behind it", "circle") == "a crimson box with stripes behind it"
    assert world.to_anchor("a red circle on a striped background", "red", "orange") == \
        "an orange circle on a striped background"
    assert world.parse_concept("Circle") == ("shape", world.Shape.CIRCLE)
    with pytest.raises(ValueError, match="unknown concept"):
        world.parse_concept("dragon")


def test_tokenizer_covers_every_prompt():
    from varejax.models.t5_tokenizer import T5Tokenizer
    from varejax.toy.spec import TEXT_LENGTH, TOY_MIN_VOCAB
    from varejax.toy.train import build_tokenizer

    tok = T5Tokenizer(build_tokenizer(), min_vocab=TOY_MIN_VOCAB)
    assert (tok.pad_id, tok.eos_id, tok.appends_eos) == (0, 1, True)
    prompts = world.enumerate_prompts("seen") + world.enumerate_prompts("paraphrase")
    ids, _, lengths = tok(prompts, max_length=64)
    assert not (ids == 2).any(), "a world word is missing from the toy vocabulary"
    assert lengths.max() <= TEXT_LENGTH


# ---- the shipped models ------------------------------------------------------------------------------

def _assets_or_skip():
    from varejax.toy.assets import asset_dir

    if not (asset_dir() / "world.json").is_file():
        pytest.skip("toy assets not installed (varejax toy train --config.install=True)")
    return asset_dir()


def test_shipped_oracle_is_accurate_on_fresh_images():
    from varejax.toy import oracle
    from varejax.toy.assets import load_toy_oracle

    root = _assets_or_skip()
    params = load_toy_oracle()
    data = world.dataset(256, seed=987654)  # seeds the training never used
    acc = oracle.accuracy(params, data.images, data.labels, batch=128)
    assert min(acc.values()) >= 0.99, acc
    stored = json.loads((root / "oracle" / "config.json").read_text())["accuracy"]
    assert min(stored.values()) >= 0.99
    feats = oracle.features(params, data.images[:8])
    assert feats.shape == (8, oracle.config_from_params(params).feature_dim)
    float_ids = oracle.classify(params, data.images[:8].astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(float_ids["shape"], data.labels["shape"][:8])


def test_shipped_models_follow_prompts():
    """Well above chance on every attribute (chance: 1/6 shape and colour, 1/4 background); the measured
    figures are in world.json and README ("The toy world")."""
    from varejax.sample.sampler import SamplingConfig
    from varejax.toy.assets import TOY_SCHEDULE, load_toy_oracle, load_toy_pipeline, toy_world_info
    from varejax.toy.oracle import classify_batched

    _assets_or_skip()
    info = toy_world_info()
    assert info["schedule"] == [list(s) for s in TOY_SCHEDULE]
    assert min(info["oracle_accuracy"].values()) >= 0.99
    pipeline = load_toy_pipeline()
    pipeline.check_compatible()
    rng = np.random.default_rng(2024)
    attrs = [world.sample_attributes(rng) for _ in range(32)]
    prompts = [world.prompt(a, rng, world.FAMILIES[i % 2], mention="all") for i, a in enumerate(attrs)]
    sampling = SamplingConfig(cfg=(4.0,), tau=(1.0,), top_p=0.97)
    images = pipeline.generate(prompts, list(range(len(prompts))), sampling, TOY_SCHEDULE)
    assert images.shape == (32, 64, 64, 3) and images.dtype == np.uint8
    predicted = classify_batched(load_toy_oracle(), images)
    accuracy = {name: float(np.mean(np.asarray(predicted[name]) == [int(getattr(a, name)) for a in attrs]))
                for name in world.ATTRIBUTE_NAMES}
    assert accuracy["colour"] >= 0.9 and accuracy["background"] >= 0.4 and accuracy["shape"] >= 0.2, accuracy


def test_shipped_world_is_what_the_default_config_trains():
    """world.json records the config its models were trained with: the default of configs/toy_train.py
    (so `varejax toy train --config.install=True` reproduces the shipped assets)."""
    from varejax.configlib import load_config
    from varejax.toy.assets import toy_world_info
    from varejax.toy.spec import TOY_PATCHIFY, TOY_VAE_SCHEDULE

    _assets_or_skip()
    info = toy_world_info()
    run_only = ("install", "quiet", "reuse_dir", "reuse_t2i")
    recorded = {k: v for k, v in info["config"].items() if k not in run_only}
    default = json.loads(load_config(str(ROOT / "configs" / "toy_train.py")).to_json())
    assert recorded == {k: v for k, v in default.items() if k not in run_only}
    assert info["spatial_patchify"] == TOY_PATCHIFY and info["vae_schedule"] == [list(s) for s in TOY_VAE_SCHEDULE]
    assert not info["reused_stages"]  # trained end to end in one run


# ---- the smoke training run ----------------------------------------------------------------------------

def test_smoke_training_writes_loadable_folders(tmp_path):
    from varejax.cli import main
    from varejax.sample.pipeline import Pipeline
    from varejax.toy.oracle import classify, load_oracle
    from varejax.toy.spec import TOY_MIN_VOCAB

    code = main(["toy", "train", "--workdir", str(tmp_path), "--config", str(ROOT / "configs" / "toy_train.py:smoke"),
                 "--config.quiet=True", "--config.eval.n=0"])
    assert code == 0
    models = tmp_path / "models"
    pipeline = Pipeline.from_dirs(str(models / "infinity"), str(models / "vae"), str(models / "t5"),
                                  min_vocab=TOY_MIN_VOCAB)
    pipeline.check_compatible()
    features, mask = pipeline.text_encoder.encode(["a red circle on a striped background"])
    assert features.shape[-1] == pipeline.infinity_cfg.text_channels and mask.sum() == 8
    ids = classify(load_oracle(str(models / "oracle")), np.zeros((2, 64, 64, 3), np.uint8))
    assert set(ids) == set(world.ATTRIBUTE_NAMES)
    summary = json.loads((models / "world.json").read_text())
    assert summary["prompt_following"] is None
    # tokens hold 2x2 latent patches: transformer scales up to 4x4 over the tokenizer's 8x8 grid
    assert summary["spatial_patchify"] and summary["schedule"][-1] == [1, 4, 4]
    assert summary["vae_schedule"] == [[1, 2, 2], [1, 4, 4], [1, 6, 6], [1, 8, 8]]
    assert pipeline.infinity_cfg.apply_spatial_patchify and pipeline.infinity_cfg.bits_per_token == 64
    # every stage ran: the oracle was adapted to decoded images, the decoder refined
    from varejax.checkpoint import read_config
    from varejax.toy.oracle import read_oracle_config

    assert read_oracle_config(str(models / "oracle"))["adaptation"]["steps"] == 2
    assert set(summary["oracle_accuracy_on_reconstructions"]) == set(world.ATTRIBUTE_NAMES)
    assert read_config(models / "vae")["training"]["decoder_refinement"]["steps"] == 2
    assert read_config(models / "infinity")["training"]["cycles"] == 1
    assert (tmp_path / "train.log").is_file()


def test_toy_tokenizer_packs_pixels_and_round_trips(tmp_path):
    """The toy tokenizer (2x2 pixel-unshuffle: convolutions at 32x32) trains at smoke size, is written and
    read back with its pixel_unshuffle, and keeps the 8x8 latent grid of 16 bits."""
    import ml_collections

    from varejax.configlib import load_config
    from varejax.checkpoint import load_vae
    from varejax.toy import train

    vae = load_config(str(ROOT / "configs" / "toy_train.py")).vae
    assert vae.pixel_unshuffle == 2
    config = ml_collections.ConfigDict(vae.to_dict())
    config.base_ch, config.steps, config.batch_size, config.log_every = 24, 2, 4, 1
    data = world.dataset(8, seed=5)
    logged = []
    cfg, params, record = train.train_vae(config, data, logged.append, seed=0)
    assert cfg.pixel_unshuffle == 2 and cfg.num_downsamples == 2 and len(logged) == 2
    train.write_vae(tmp_path / "vae", cfg, params, record, seed=0)
    loaded_cfg, loaded = load_vae(str(tmp_path / "vae"))
    assert loaded_cfg == cfg
    raw = train.encode_raw(loaded_cfg, loaded, data.images, batch=8)
    assert raw.shape == (8, 8, 8, 16)
    np.testing.assert_array_equal(raw, train.encode_raw(cfg, params, data.images, batch=8))


def test_decoder_refinement_trains_the_decoder_only():
    import ml_collections

    from varejax.models import bsq_vae
    from varejax.toy import train

    cfg = bsq_vae.VAEConfig(codebook_dim=16, patch_size=8, ch_mult=(1, 1, 1, 1), base_ch=24, num_res_blocks=1)
    params = bsq_vae.init_vae_params(cfg, seed=0)
    data = world.dataset(8, seed=5)
    codes = train.summed_codes(train.encode_raw(cfg, params, data.images, batch=8), batch=8)
    assert codes.shape == (8, 8, 8, 16)
    config = ml_collections.ConfigDict(dict(refine_learning_rate=1e-3, warmup=1, refine_steps=2, weight_decay=0.0,
                                            refine_batch_size=4, log_every=1))
    logged = []
    refined, record = train.refine_decoder(config, cfg, params, codes, data.images, logged.append, seed=0)
    before, after = train._host(train._flat(params)), train._host(train._flat(refined))
    assert before.keys() == after.keys() and record["steps"] == 2 and len(logged) == 2
    for key in before:
        if key[0] == "encoder":
            np.testing.assert_array_equal(before[key], after[key])  # the bits of every image are unchanged
    assert any(not np.array_equal(before[k], after[k]) for k in before if k[0] == "decoder")


# ---- the main job, reduced ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_job(tmp_path_factory):
    from varejax.cli import main

    _assets_or_skip()
    workdir = tmp_path_factory.mktemp("toy_job")
    assert main(["erase", "--config", str(ROOT / "configs" / "toy_circle.py:ci"), "--workdir", str(workdir)]) == 0
    return workdir, json.loads((workdir / "results.json").read_text())


def test_reduced_main_job_erases_and_preserves(toy_job):
    workdir, results = toy_job
    for key in ("erasure_rate_seen_before", "erasure_rate_seen_after", "erasure_rate_paraphrase_before",
                "erasure_rate_paraphrase_after", "preservation_before", "preservation_after", "toy_fid",
                "prompt_following", "wall_time_s"):
        assert key in results, key
    # The base model draws circles when asked, and the erased one stops doing so (seen and paraphrased).
    assert results["erasure_rate_seen_before"] <= ERASURE_BEFORE_MAX
    assert results["erasure_rate_seen_after"] >= results["erasure_rate_seen_before"] + ERASURE_GAIN_MIN
    assert results["erasure_rate_paraphrase_after"] > results["erasure_rate_paraphrase_before"]
    # Other prompts keep what they ask for.
    assert results["preservation_after"] >= results["preservation_before"] - PRESERVATION_DROP_MAX
    assert results["prompt_following"] >= PROMPT_FOLLOWING_MIN
    assert results["toy_fid"] >= 0


def test_reduced_main_job_writes_its_report(toy_job):
    workdir, results = toy_job
    report = (workdir / "report.md").read_text()
    assert "erasure rate, seen prompts" in report and "![losses](figures/losses.png)" in report
    for name in ("circle_seen.png", "circle_paraphrase.png", "others.png", "losses.png"):
        assert (workdir / "figures" / name).stat().st_size > 1000, name
    pairs = [json.loads(line) for line in (workdir / "pairs_circle.jsonl").read_text().splitlines()]
    assert pairs and all("circle" in p["target"] and "circle" not in p["anchor"] for p in pairs)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == results["train_steps"]
