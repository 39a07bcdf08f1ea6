"""The T5 encoder against HF torch, its tokenizer against HF, and the text-feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (imported, not importorskip: requirements-dev.txt has it)

from tests import measured
from tests import t5_helpers as h
from varejax.models import apply, t5
from varejax.models.t5 import T5Config
from varejax.models.t5_tokenizer import T5Tokenizer, TokenizerError

FLAN_T5_XL_HF = {  # google/flan-t5-xl config.json (the fields that matter)
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 5120, "d_kv": 64, "d_model": 2048,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
    "num_decoder_layers": 24, "num_heads": 32, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "vocab_size": 32128,
}


# ---- config -----------------------------------------------------------------------------------------

def test_flan_t5_xl_preset_and_parameter_count():
    cfg = t5.get_preset("flan_t5_xl")
    assert T5Config.from_hf_config(FLAN_T5_XL_HF) == cfg
    n = apply.count_params(t5.abstract_params(cfg))
    assert n == t5.count_params_formula(cfg) == 1_223_527_424
    assert T5Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "model_type is 'bert'"),
    ({"model_type": "umt5"}, "umt5"),
    ({"is_decoder": True}, "decoder-only"),
    ({"feed_forward_proj": "gated-silu", "dense_act_fn": "silu"}, "not supported"),
    ({"dense_act_fn": "gelu"}, "does not match feed_forward_proj"),
])
def test_hf_config_rejections(change, message):
    with pytest.raises(ValueError, match=message):
        T5Config.from_hf_config({**FLAN_T5_XL_HF, **change})


@pytest.mark.parity
def test_relative_position_buckets_equal_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-1500, 1500)
    for buckets, distance in ((32, 128), (16, 20), (8, 12)):
        ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), True, buckets, distance).numpy()
        np.testing.assert_array_equal(t5.relative_position_bucket(rel, buckets, distance), ref)


# ---- encoder parity through the production converter --------------------------------------------------

VARIANTS = {
    # (HF config kwargs, lengths): default buckets with offsets past max_distance; relu with few buckets.
    "gated_gelu": (dict(feed_forward_proj="gated-gelu"), h.LENGTHS),
    "relu_small_buckets": (dict(feed_forward_proj="relu", num_buckets=16, max_distance=20), (48, 30, 1)),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{variant: (torch model, converted folder)}, each saved with save_pretrained (safetensors)."""
    out = {}
    for i, (name, (kw, _)) in enumerate(VARIANTS.items()):
        root = tmp_path_factory.mktemp(name)
        model = h.make_encoder(seed=i, **kw)
        model.save_pretrained(root / "hf")
        h.small_word_tokenizer().save(str(root / "hf" / "tokenizer.json"))
        h.convert(root / "hf", root / "model")
        out[name] = (model, root / "model")
    return out


@pytest.mark.parity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_matches_hf_torch(variant, converted):
    from varejax.checkpoint import load_t5

    model, folder = converted[variant]
    cfg, params = load_t5(str(folder))
    ids, mask = h.inputs(VARIANTS[variant][1])
    ours = np.asarray(t5.encode(params, ids, mask, cfg))
    ref = h.torch_hidden(model, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = float(np.max(np.abs(ours - ref)))
    print(f"{variant}: max |jax - torch| = {err:.2e} (all rows), scale {np.max(np.abs(ref)):.2f}")
    measured.check(f"t5/{variant}/last_hidden_state", err, 1e-5)


def test_sharded_encode_equals_single_device(converted):
    import jax

    from varejax.checkpoint import load_t5
    from varejax.parallel import make_mesh, sharding_context

    _, folder = converted["gated_gelu"]
    cfg, params = load_t5(str(folder))
    ids, mask = h.inputs(h.LENGTHS)
    ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])[:, ::-1].copy()  # B = 6
    single = np.asarray(t5.encode(params, ids, mask, cfg))
    mesh = make_mesh((2, 2, 2))
    _, sharded = load_t5(str(folder), mesh=mesh)
    assert sharded["blocks"][0]["ffn"]["wi_0"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor")
    with sharding_context(mesh):
        out = jax.jit(t5.forward, static_argnames="cfg")(sharded, ids, mask, cfg)
    np.testing.assert_allclose(np.asarray(out), single, atol=2e-5, rtol=0)


# ---- tokenizer --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    h.t5_like_tokenizer().save(str(path))
    return path


PROMPTS = ["a photo of a cat", "", "portrait of an old man at sunset, painting style!",
           " ".join(["a big red house"] * 160),           # 640 words: truncated to 511 + </s>
           " ".join(["tree"] * 511), " ".join(["tree"] * 512)]


def test_tokenizer_equals_hf(t5_tokenizer_file):
    """Padding, truncation and EOS conventions as HF's fast tokenizer (the ids themselves come from the same
    `tokenizers` engine in both: test_tokenizer_known_ids checks them independently)."""
    from transformers import PreTrainedTokenizerFast

    tok = T5Tokenizer.from_file(t5_tokenizer_file)
    assert (tok.pad_id, tok.eos_id, tok.vocab_size, tok.appends_eos) == (0, 1, 32100, True)
    ids, mask, lengths = tok(PROMPTS, max_length=512)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(t5_tokenizer_file), pad_token="<pad>", eos_token="</s>",
                                 unk_token="<unk>")
    ref = hf(PROMPTS, max_length=512, padding="max_length", truncation=True)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"]))
    assert ids.dtype == mask.dtype == lengths.dtype == np.int32 and ids.shape == (len(PROMPTS), 512)
    assert lengths.tolist()[:2] == [6, 1] and lengths.tolist()[3:] == [512, 512, 512]
    for row, n in enumerate(lengths):
        assert ids[row, n - 1] == 1 and (ids[row, n:] == 0).all() and mask[row].sum() == n
        assert (ids[row, : n - 1] != 1).all()  # one EOS, never doubled


def test_tokenizer_known_ids(t5_tokenizer_file):
    """Ids worked out by hand from t5_like_tokenizer's piece table, not by a second wrapper of the same
    `tokenizers` engine: <pad> 0, </s> 1, <unk> 2, "▁" 3, "▁"+WORDS[i] 4 + i (score -2), then the
    characters a-z 0-9 , . ! ? ' from 41 (score -5). Unigram keeps the best total score: "an" is "▁a" + "n"
    (-7, not "▁" + "a" + "n" = -13); an unknown word is "▁" and its letters."""
    tok = T5Tokenizer.from_file(t5_tokenizer_file)
    words = {w: 4 + i for i, w in enumerate(h.WORDS)}
    char = {c: 41 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz0123456789,.!?'")}
    expected = [
        [words[w] for w in "a photo of a cat".split()] + [1],
        [1],
        [words["portrait"], words["of"], words["a"], char["n"], words["old"], words["man"], words["at"],
         words["sunset"], char[","], words["painting"], words["style"], char["!"], 1],
        [3, *(char[c] for c in "zebra?"), 1],
        [words["a"], words["photo"], words["of"], 1],         # truncated to max_length, </s> kept
    ]
    assert expected[0] == [4, 5, 6, 4, 8, 1]
    prompts = ["a photo of a cat", "", "portrait of an old man at sunset, painting style!", "zebra?"]
    ids, mask, lengths = tok(prompts, max_length=16)
    assert lengths.tolist() == [len(e) for e in expected[:4]]
    for row, want in enumerate(expected[:4]):
        assert ids[row].tolist() == want + [0] * (16 - len(want)), prompts[row]
        assert mask[row].tolist() == [1] * len(want) + [0] * (16 - len(want))
    assert tok(prompts[:1], max_length=4)[0].tolist() == [expected[4]]


def test_tokenizer_without_post_processor_appends_eos(tmp_path, t5_tokenizer_file):
    bare = tmp_path / "bare.json"
    h.t5_like_tokenizer(post_processor=False).save(str(bare))
    plain = T5Tokenizer.from_file(bare)
    assert not plain.appends_eos
    expected = T5Tokenizer.from_file(t5_tokenizer_file)(PROMPTS, max_length=40)
    for ours, ref in zip(plain(PROMPTS, max_length=40), expected, strict=True):
        np.testing.assert_array_equal(ours, ref)
    ids, _, lengths = plain(["a cat"], max_length=1)
    assert ids.tolist() == [[1]] and lengths.tolist() == [1]


def test_tokenizer_refuses_small_vocabularies(tmp_path):
    path = tmp_path / "small.json"
    h.small_word_tokenizer().save(str(path))
    with pytest.raises(TokenizerError, match=r"small\.json: the vocabulary has 120 entries, fewer than "
                                             r"min_vocab=32100"):
        T5Tokenizer.from_file(path)
    tok = T5Tokenizer.from_file(path, min_vocab=100)
    ids, mask, lengths = tok(["a cat", "zebra"], max_length=8)
    assert ids.tolist()[1] == [2, 1, 0, 0, 0, 0, 0, 0] and lengths.tolist() == [3, 2]
    with pytest.raises(TokenizerError, match="no such file"):
        T5Tokenizer.from_file(tmp_path / "absent.json")


# ---- text features and their cache -------------------------------------------------------------------------

def _text_encoder(folder, **kw):
    from varejax.sample.text_features import TextEncoder

    return TextEncoder.from_dir(folder, min_vocab=100, **kw)


def test_text_encoder_trims_and_matches_the_encoder(converted):
    model, folder = converted["gated_gelu"]
    enc = _text_encoder(folder, max_length=16)
    prompts = ["a photo of a cat", "dog", " ".join(["tree"] * 30)]
    features, mask = enc.encode(prompts)
    assert features.shape == (3, 16, 64) and features.dtype == np.float32 and mask.dtype == np.int32
    assert mask.sum(1).tolist() == [6, 2, 16]  # the long prompt is cut at max_length (EOS last)
    features2, mask2 = enc.encode(prompts[:2])
    assert features2.shape == (2, 8, 64)  # longest 6 -> 8
    np.testing.assert_allclose(features2, features[:2, :8], atol=2e-6)
    ids, ref_mask, _ = enc.tokenizer(prompts, max_length=16)
    ref = h.torch_hidden(model, ids, ref_mask) * ref_mask[..., None]
    np.testing.assert_allclose(features, ref, atol=1e-5, rtol=0)
    assert (features[1, 2:] == 0).all()


def test_feature_cache_hits_and_misses(converted, tmp_path):
    from varejax.sample.text_features import TextEncoder, checkpoint_hash

    _, folder = converted["gated_gelu"]
    cache = tmp_path / "cache"
    enc = _text_encoder(folder, cache_dir=cache, max_length=32)
    prompts = ["a photo of a cat", "a dog on a tree", "a photo of a cat"]
    first, mask = enc.encode(prompts)
    assert enc.model_calls == 1 and enc.prompts_encoded == 2  # duplicates encoded once
    files = sorted(cache.rglob("*.npz"))
    assert len(files) == 2 and not list(cache.rglob("*.tmp"))
    with np.load(files[0]) as entry:
        assert entry["features"].shape[0] == int(entry["length"]) == 6  # only the valid rows

    second, mask2 = enc.encode(list(reversed(prompts)))
    assert enc.model_calls == 1 and enc.cache_hits == 2  # nothing re-encoded
    np.testing.assert_array_equal(second, first[::-1])
    np.testing.assert_array_equal(mask2, mask[::-1])

    fresh = _text_encoder(folder, cache_dir=cache, max_length=32)  # a new process, same cache
    fresh.encode(prompts + ["red car"])
    assert fresh.model_calls == 1 and fresh.prompts_encoded == 1

    other = TextEncoder(enc.tokenizer, enc.params, enc.cfg, checkpoint_hash="0" * 64, cache_dir=cache,
                        max_length=32)
    other.encode(prompts)
    assert other.model_calls == 1 and other.prompts_encoded == 2  # another checkpoint misses
    assert checkpoint_hash(folder) == enc.checkpoint_hash != converted_hash(converted["relu_small_buckets"][1])

    files[0].write_bytes(b"damaged")
    again = _text_encoder(folder, cache_dir=cache, max_length=32)
    redone, _ = again.encode(prompts)
    assert again.prompts_encoded == 1
    np.testing.assert_allclose(redone, first, atol=2e-6)


def converted_hash(folder) -> str:
    from varejax.sample.text_features import checkpoint_hash

    return checkpoint_hash(folder)


def test_cache_requires_a_checkpoint_hash(converted, tmp_path):
    from varejax.sample.text_features import TextEncoder

    enc = _text_encoder(converted["gated_gelu"][1])
    with pytest.raises(ValueError, match="checkpoint_hash"):
        TextEncoder(enc.tokenizer, enc.params, enc.cfg, cache_dir=tmp_path)
