"""CLIP: the NNX port against transformers' torch CLIPModel, the tokenizer against CLIPTokenizer, the strict
converter's errors, CLIPImageProcessor-style preprocessing, and the CLIP score / zero-shot scorers.

Every model, tokenizer and image is built here (tiny random sizes, fixed seeds); nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import measured
from varejax.errors import UserError

# Parity bound of the float32 port (the task's stated bound). Measured (-O0 / XLA default): embeddings <= 1.1e-6 /
# 1.3e-6, logits_per_image <= 7.5e-7 / 1.7e-6, end-to-end cosines <= 1.3e-7.
PARITY_ATOL = 1e-5
# Words the tiny BPE vocabulary has merges for (other words fall back to byte tokens).
WORDS = "a photo of the church cat dog painting by vincent van gogh tench golf ball parachute".split()
PROMPTS = ["A photo of the Church", "  a   PAINTING by Vincent van Gogh!!  ", "tench, golf-ball & parachute 123",
           "café naïve — ünïcode 東京", "it's the dog's", "x " * 100, "<|endoftext|> cat", "a\x1cb\u3000c\u00a0d"]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def write_vocab(folder: Path) -> int:
    """A tiny CLIP-style byte-level BPE vocabulary: 256 bytes, 256 bytes + '</w>', merges spelling WORDS left
    to right, then the start and end tokens (last, as in OpenAI's). Returns the vocabulary size."""
    from tokenizers import pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens, merges = chars + [c + "</w>" for c in chars], []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        joined = pieces[0]
        for piece in pieces[1:]:
            if (joined, piece) not in merges:
                merges.append((joined, piece))
            joined += piece
            if joined not in tokens:
                tokens.append(joined)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(tokens)


def make_hf_clip(vocab_size: int, act: str = "quick_gelu", legacy_eos: bool = False, seed: int = 0):
    """A random transformers CLIPModel (eval mode) with norms and the logit scale away from their init."""
    import torch
    import transformers

    eos = 2 if legacy_eos else vocab_size - 1
    cfg = transformers.CLIPConfig(
        text_config=dict(TEXT, vocab_size=vocab_size, hidden_act=act, eos_token_id=eos, bos_token_id=vocab_size - 2),
        vision_config=dict(VISION, hidden_act=act), projection_dim=16, logit_scale_init_value=1.7)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny vocabulary, an HF CLIP folder (safetensors + the vocabulary) and its conversion."""
    from varejax.convert.clip import convert_clip

    root = tmp_path_factory.mktemp("clip")
    vocab = write_vocab(root / "hf")
    model = make_hf_clip(vocab)
    model.save_pretrained(root / "hf")
    report = convert_clip(str(root / "hf"), str(root / "converted"), progress=False)
    return dict(root=root, hf=root / "hf", converted=root / "converted", vocab=vocab, model=model, report=report)


def hf_tokenizer(folder: Path):
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def torch_features(model, ids, mask, pixels_nhwc):
    import torch

    with torch.no_grad():
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        pix_t = torch.tensor(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
        text = model.get_text_features(input_ids=ids_t, attention_mask=mask_t).pooler_output.numpy()
        image = model.get_image_features(pixel_values=pix_t).pooler_output.numpy()
        logits = model(input_ids=ids_t, attention_mask=mask_t, pixel_values=pix_t).logits_per_image.numpy()
    return text, image, logits


def params_of(folder: Path):
    """(cfg, params) of an HF folder straight through the converter's plan (no model folder written)."""
    from varejax.convert import strict
    from varejax.convert.clip import plan_clip, read_hf_config
    from varejax.convert.common import find_weights
    from varejax.convert.sources import open_checkpoint
    from varejax.models import clip

    cfg, _ = read_hf_config(folder)
    source = open_checkpoint(find_weights(folder))
    return cfg, clip.state_from_flat(cfg, strict.load_mapped(source, plan_clip(source, cfg)))


def check_parity(name, model, cfg, params, tokenizer):
    from varejax.models import clip

    ids, mask = tokenizer(PROMPTS[:3])
    pixels = np.random.RandomState(0).randn(2, cfg.image_size, cfg.image_size, 3).astype(np.float32)
    want_text, want_image, want_logits = torch_features(model, ids, mask, pixels)
    text = np.asarray(clip.text_features(params, ids, mask, cfg=cfg))
    image = np.asarray(clip.image_features(params, pixels, cfg=cfg))
    logits = np.asarray(clip.similarity_logits(image, text, params["logit_scale"][...]))
    measured.check(f"clip/{name}/text_embeds", np.abs(text - want_text).max(), PARITY_ATOL)
    measured.check(f"clip/{name}/image_embeds", np.abs(image - want_image).max(), PARITY_ATOL)
    measured.check(f"clip/{name}/logits_per_image", np.abs(logits - want_logits).max(), PARITY_ATOL)
    # Not a trivially small comparison: features of order 1, logits spread over several units.
    assert np.abs(want_text).max() > 0.3 and np.ptp(want_logits) > 0.1


@pytest.mark.parity
def test_parity_quick_gelu_through_a_converted_folder(world):
    from varejax.convert.clip import load_clip
    from varejax.models.clip_tokenizer import CLIPTokenizer

    assert "all 78 tensors" in world["report"].summary()
    cfg, params = load_clip(world["converted"])
    assert cfg.text_act == cfg.vision_act == "quick_gelu" and not cfg.legacy_argmax_pooling
    tokenizer = CLIPTokenizer.from_folder(world["converted"])  # the converter copied vocab.json + merges.txt
    tokenizer.check_model(cfg.vocab_size, cfg.eos_token_id, cfg.bos_token_id)
    check_parity("quick_gelu", world["model"], cfg, params, tokenizer)


@pytest.mark.parity
def test_parity_gelu_with_legacy_argmax_pooling(world, tmp_path):
    from varejax.models.clip_tokenizer import CLIPTokenizer

    model = make_hf_clip(world["vocab"], act="gelu", legacy_eos=True, seed=3)
    model.save_pretrained(tmp_path)
    cfg, params = params_of(tmp_path)
    assert cfg.text_act == "gelu" and cfg.legacy_argmax_pooling
    tokenizer = CLIPTokenizer.from_folder(world["hf"], model_vocab_size=cfg.vocab_size)
    tokenizer.check_model(cfg.vocab_size, cfg.eos_token_id)  # argmax pooling: the end token has the largest id
    check_parity("gelu_legacy_eos", model, cfg, params, tokenizer)


def test_presets_have_the_real_sizes():
    import transformers

    from varejax.models import clip
    from varejax.models.state import count_params

    # Parameter counts of openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14.
    for name, count in (("vit_b_32", 151_277_313), ("vit_l_14", 427_616_513)):
        cfg = clip.get_preset(name)
        assert count_params(clip.abstract_params(cfg)) == clip.count_params_formula(cfg) == count
    large = transformers.CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14), projection_dim=768)
    parsed = clip.CLIPConfig.from_hf_config(large.to_dict())
    assert parsed.arch_dict() == clip.get_preset("vit_l_14").arch_dict()
    assert clip.CLIPConfig.from_hf_config({"model_type": "clip"}).arch_dict() == clip.get_preset("vit_b_32").arch_dict()


# ---- tokenizer ------------------------------------------------------------------------------------------

@pytest.mark.parity
def test_tokenizer_matches_transformers(world, tmp_path):
    import transformers

    from varejax.models.clip_tokenizer import CLIPTokenizer

    slow = hf_tokenizer(world["hf"])  # from vocab.json + merges.txt
    slow.save_pretrained(tmp_path)  # writes tokenizer.json
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path))
    pairs = [(CLIPTokenizer.from_folder(world["hf"]), slow), (CLIPTokenizer.from_folder(tmp_path), fast),
             (CLIPTokenizer.from_file(tmp_path / "tokenizer.json"), slow)]
    for ours, theirs in pairs:
        want = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
        ids, mask = ours(PROMPTS)
        np.testing.assert_array_equal(ids, want["input_ids"])
        np.testing.assert_array_equal(mask, want["attention_mask"])
    ids, mask = pairs[0][0](PROMPTS)
    long_row = PROMPTS.index("x " * 100)
    assert mask[long_row].all() and ids[long_row, -1] == pairs[0][0].eos_id  # cut to 77, end token kept
    assert ids[0, 0] == pairs[0][0].bos_id and len(set(ids[0])) > 4  # merges used, not only bytes
    assert pairs[0][0].decode(ids[0]) == "a photo of the church"


def test_tokenizer_guards(world, tmp_path):
    from varejax.models.clip_tokenizer import CLIPTokenizer, TokenizerError

    with pytest.raises(TokenizerError, match=r"vocab\.json.*565 entries, more than the model's vocab_size 100"):
        CLIPTokenizer.from_folder(world["hf"], model_vocab_size=100)
    tok = CLIPTokenizer.from_folder(world["hf"])
    with pytest.raises(TokenizerError, match="more than the model's vocab_size 500"):
        tok.check_model(500, 499)
    with pytest.raises(TokenizerError, match="has id 564 but the model pools at eos_token_id 7"):
        tok.check_model(world["vocab"], 7)
    vocab = json.loads((world["hf"] / "vocab.json").read_text())
    del vocab["<|startoftext|>"]
    shutil.copy(world["hf"] / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(TokenizerError, match=rf"{tmp_path}/vocab\.json.*no token \['<\|startoftext\|>'\]"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.json or vocab.json"):
        CLIPTokenizer.from_folder(tmp_path / "nothing")


# ---- converter errors ----------------------------------------------------------------------------------

def _variant(world, folder: Path, change) -> Path:
    """A copy of the HF folder whose tensors went through `change(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir()
    shutil.copy(world["hf"] / "config.json", folder / "config.json")
    save_file(change(load_file(str(world["hf"] / "model.safetensors"))), str(folder / "model.safetensors"))
    return folder


def test_converter_errors_name_file_and_key(world, tmp_path):
    from varejax.cli import main
    from varejax.convert.clip import convert_clip
    from varejax.convert.sources import CheckpointError

    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    missing = _variant(world, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=rf"(?s){missing}/model\.safetensors.*1 missing, 0 unexpected, "
                                              rf"0 mis-shaped.*truncated.*missing  {key}"):
        convert_clip(str(missing), None, dry_run=True)
    wrong = _variant(world, tmp_path / "wrong", lambda t: {**t, key: np.zeros((64, 16), np.float32)})
    with pytest.raises(CheckpointError, match=rf"(?s)1 mis-shaped.*shape  {key}: expected \[64, 32\], found "
                                              rf"\[64, 16\]"):
        convert_clip(str(wrong), None, dry_run=True)
    extra = _variant(world, tmp_path / "extra", lambda t: {**t, "text_model.pooler.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"(?s)0 missing, 1 unexpected.*unexpected  text_model\.pooler\.weight"):
        convert_clip(str(extra), None, dry_run=True)
    bad_ids = _variant(world, tmp_path / "ids", lambda t: {**t, "vision_model.embeddings.position_ids":
                                                            np.arange(17)[None, ::-1].copy()})
    with pytest.raises(CheckpointError, match=r"position_ids.*expected the positions 0\.\.16"):
        convert_clip(str(bad_ids), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    # An old file with a correct buffer converts (the buffer checked and dropped).
    ok = _variant(world, tmp_path / "ok", lambda t: {**t, "text_model.embeddings.position_ids": np.arange(77)[None]})
    assert "1 position_ids buffers checked and dropped" in convert_clip(str(ok), None, dry_run=True).summary()
    config = json.loads((world["hf"] / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "relu"
    (ok / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{ok}/config\.json: .*activation 'relu' is not supported"):
        convert_clip(str(ok), None, dry_run=True)
    assert main(["convert", "clip", "--src", str(missing), "--dry-run"]) == 2
    assert main(["convert", "clip", "--src", str(world["hf"]), "--dry-run"]) == 0


# ---- preprocessing and scorers ---------------------------------------------------------------------------

@pytest.mark.parity
def test_preprocess_matches_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from varejax.eval.clip_metrics import preprocess

    rng = np.random.RandomState(1)
    processor = CLIPImageProcessorPil()  # OpenAI's settings: shortest edge 224 bicubic, crop 224, CLIP mean/std
    for shape in ((300, 200), (97, 150), (224, 224), (256, 256)):
        image = rng.randint(0, 256, size=shape + (3,), dtype=np.uint8)
        want = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = preprocess(image[None])[0]
        assert ours.shape == (224, 224, 3)
        # Bit for bit: the same PIL resize of the uint8 image, then the same float64 -> float32 steps.
        measured.check(f"clip/preprocess/{shape[0]}x{shape[1]}", np.abs(ours - want).max(), 0.0)


class ColourEmbedder:
    """Embeddings we control: an image's is its mean RGB colour; a text's is the colour it names (or minus
    the colour, for 'not <colour>'). Cosines are then known by hand."""

    COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}

    def embed_images(self, images):
        mean = images.reshape(len(images), -1, 3).mean(axis=1) + 1e-3
        return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)

    def embed_texts(self, texts):
        out = []
        for text in texts:
            colour = next(c for c in self.COLOURS if c in text)
            out.append(np.asarray(self.COLOURS[colour]) * (-1.0 if "not " in text else 1.0))
        return np.asarray(out, np.float32)

    def settings(self):
        return {"model": "colours"}


def solid(*colours) -> np.ndarray:
    table = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    return np.stack([np.full((8, 8, 3), table[c], np.uint8) for c in colours])


def test_zero_shot_accuracies_and_clip_score_on_known_inputs():
    from varejax.eval.clip_metrics import CLIPScore, ZeroShotClassifier, classification_summary

    classes = ["red", "green", "blue"]
    scorer = ZeroShotClassifier(ColourEmbedder(), classes, ["a photo of {}.", "something {}"], erased_class="red")
    images = solid("red", "green", "green", "blue", "red")
    rows = [{"prompt": "p", "class": c} for c in ("red", "red", "green", "blue", "blue")]
    per_image = scorer.score(images, rows)
    np.testing.assert_array_equal(per_image["predicted"], [0, 1, 1, 2, 0])
    summary = scorer.summarize(per_image, rows)
    # red rows: red (hit), green (miss) -> 1/2; other rows: green hit, blue hit, red image for "blue" miss -> 2/3.
    assert summary["ACC_e"] == 0.5 and summary["ACC_i"] == pytest.approx(2 / 3) and summary["accuracy"] == 0.6
    assert summary["per_class_accuracy"] == {"red": 0.5, "green": 1.0, "blue": 0.5}
    assert scorer.settings()["classes"] == classes and scorer.settings()["templates"][1] == "something {}"
    # A pure colour has cosine 0 with both other classes; the stable ranking puts the earlier class second.
    top2 = ZeroShotClassifier(ColourEmbedder(), classes, ["{}"], erased_class="red", topk=2)
    summary2 = top2.summarize(top2.score(images, rows), rows)
    assert summary2["ACC_e"] == 1.0 and summary2["ACC_i"] == pytest.approx(2 / 3)  # red,green | green,red
    # Any classifier: ranked names in, the same definitions out.
    assert classification_summary([["blue"], ["red"]], rows[3:], classes, "blue") == {
        "accuracy": 0.5, "images": 2, "per_class_accuracy": {"blue": 0.5}, "per_class_images": {"blue": 2},
        "erased_class": "blue", "ACC_e": 0.5, "ACC_i": None, "images_erased_class": 2, "images_other_classes": 0}
    with pytest.raises(UserError, match=r"row 1 .*class 'purple' is not one of"):
        scorer.score(images[:2], [{"class": "red"}, {"class": "purple"}])
    with pytest.raises(UserError, match="erased_class 'church' is not one of"):
        ZeroShotClassifier(ColourEmbedder(), classes, ["{}"], erased_class="church")

    clip_score = CLIPScore(ColourEmbedder())
    prompts = [{"prompt": p} for p in ("a red car", "a blue car", "not red", "green")]
    per_image = clip_score.score(solid("red", "red", "red", "red"), prompts)
    np.testing.assert_allclose(per_image["clip_cosine"], [1, 0, -1, 0], atol=1e-5)
    np.testing.assert_allclose(per_image["clip_score"], [100, 0, 0, 0], atol=1e-3)
    summary = clip_score.summarize(per_image, prompts)
    assert summary["clip_score"] == pytest.approx(25.0, abs=1e-3)
    assert summary["clip_score_unclamped"] == pytest.approx(0.0, abs=1e-3) and summary["negative_cosines"] == 1


@pytest.mark.parity
def test_registered_scorers_match_transformers_end_to_end(world):
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from varejax.eval.scorers import build_scorer

    rng = np.random.RandomState(2)
    images = rng.randint(0, 256, size=(3, 40, 48, 3), dtype=np.uint8)  # resized to 32 x 38, cropped to 32
    rows = [{"prompt": "a photo of the church", "class": "church"}, {"prompt": "a dog", "class": "tench"},
            {"prompt": "van gogh", "class": "golf ball"}]
    scorer = build_scorer("clip_score", {"model_dir": str(world["converted"]), "batch_size": 2})  # 3 = 2 + padded 1
    cos = scorer.score(images, rows)["clip_cosine"]

    model, tokenizer = world["model"], hf_tokenizer(world["hf"])
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output

        def text(prompts):
            enc = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            return model.get_text_features(**enc).pooler_output

        unit = lambda x: x / x.norm(dim=-1, keepdim=True)
        want = (unit(image) * unit(text([r["prompt"] for r in rows]))).sum(-1).numpy()
        classes, templates = ["tench", "church", "golf ball"], ["a photo of a {}.", "a painting of the {}."]
        by_class = unit(unit(text([t.format(c) for c in classes for t in templates]).reshape(3, 2, -1)).mean(1))
        want_class_cos = (unit(image) @ by_class.T).numpy()
    measured.check("clip/clip_score_pipeline/cosine", np.abs(cos - want).max(), PARITY_ATOL)

    zero_shot = build_scorer("clip_zero_shot", {"model_dir": str(world["converted"]), "classes": classes,
                                                 "templates": templates, "erased_class": "church"})
    per_image = zero_shot.score(images, rows)
    measured.check("clip/zero_shot_pipeline/class_cosine", np.abs(per_image["class_cosine"] - want_class_cos).max(),
                   PARITY_ATOL)
    np.testing.assert_array_equal(per_image["predicted"], want_class_cos.argmax(1))
    settings = zero_shot.settings()
    assert settings["classes"] == classes and settings["templates"] == templates
    assert settings["model"]["source_weights_sha256"]["model.safetensors"] == json.loads(
        (world["converted"] / "config.json").read_text())["source"]["sha256"]["model.safetensors"]
    assert settings["preprocessing"]["resize_shorter_side"] == 32 and "custom" in settings["protocol"]
    with pytest.raises(UserError, match="no CLIP model folder"):
        build_scorer("clip_score", {"model_dir": str(world["root"] / "absent")})
    with pytest.raises(UserError, match="unknown protocol 'birds'"):
        build_scorer("clip_zero_shot", {"model_dir": str(world["converted"]), "protocol": "birds"})
