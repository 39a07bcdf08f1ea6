"""Tiny random HF T5 models, HF-style folders and tokenizers, built on the fly for the T5 tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The sizes of every tiny T5 in the tests (the feed-forward type and buckets vary).
SIZES = dict(vocab_size=200, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=96)
# Lengths that exercise every bucket kind with the default 32 buckets / max distance 128: exact (< 8),
# logarithmic, and beyond max_distance (offsets up to 159), plus padding.
LENGTHS = (160, 131, 7)
WORDS = ("a photo of the cat dog on red blue green house tree in with and big small painting style portrait "
         "at night sunset over river mountain city street car bird flower garden man woman child old young").split()


def hf_config(feed_forward_proj: str = "gated-gelu", num_buckets: int = 32, max_distance: int = 128, **kw):
    import transformers

    return transformers.T5Config(**{**SIZES, **kw}, feed_forward_proj=feed_forward_proj,
                                 relative_attention_num_buckets=num_buckets,
                                 relative_attention_max_distance=max_distance)


def randomise(model, seed: int) -> None:
    """Norm scales and the position bias away from their init, so that dropping one would show."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def make_encoder(seed: int = 0, full: bool = False, **config_kw):
    """A random `T5EncoderModel` (or `T5ForConditionalGeneration` with an untied lm_head), eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if full:
        model = transformers.T5ForConditionalGeneration(hf_config(tie_word_embeddings=False, **config_kw))
    else:
        model = transformers.T5EncoderModel(hf_config(**config_kw))
    randomise(model, seed)
    return model.eval()


def save_bin_shards(model, folder: Path, n_shards: int = 3) -> None:
    """config.json + `pytorch_model-0000i-of-0000n.bin` shards + `pytorch_model.bin.index.json`, as HF writes
    them with safe_serialization=False (transformers 5 only writes safetensors, so done by hand here)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = keys[i::n_shards]
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def inputs(lengths=LENGTHS, vocab: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids [B, max(lengths)] int32 (EOS id 1 last, pad id 0 after) and the mask."""
    rng = np.random.RandomState(seed)
    T = max(lengths)
    ids = rng.randint(2, vocab, size=(len(lengths), T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 1
        ids[row, n:] = 0
    return ids, mask


def torch_hidden(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    with torch.no_grad():
        out = encoder(input_ids=torch.from_numpy(ids.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


# ---- tokenizers ----------------------------------------------------------------------------------------

def t5_like_tokenizer(size: int = 32100, post_processor: bool = True):
    """A Unigram tokenizer shaped like T5's: <pad>=0, </s>=1, <unk>=2, Metaspace, "$A </s>" template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(f"\u2581{w}", -2.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'"]
    pieces += [(f"\u2581filler{i}", -12.0) for i in range(size - len(pieces))]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return tok


def small_word_tokenizer(post_processor: bool = True):
    """A WordLevel tokenizer whose ids fit the tiny models' vocabulary of 200 (<pad>=0, </s>=1, <unk>=2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for i in range(120 - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def convert(src: Path, out: Path, *extra: str) -> None:
    """Runs `varejax convert t5` (the CLI entry point)."""
    from varejax.cli import main

    code = main(["convert", "t5", "--src", str(src), "--out", str(out), *extra])
    assert code == 0, f"conversion of {src} failed"
