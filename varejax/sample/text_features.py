"""T5 text features of prompts, with an on-disk cache so sweeps never re-encode a prompt they have seen.

    enc = TextEncoder.from_dir("models/flan_t5_xl", cache_dir="runs/text_cache")
    features_BTC, mask_BT = enc.encode(["a photo of a cat", "a dog"])

`features` [B, T, d] float32 hold each prompt's `length` valid rows (EOS included) and zeros after them;
T is the longest length in the batch rounded up to a multiple of 8 (never above max_length). `mask`
[B, T] int32 marks the valid rows. Valid rows do not depend on T or on the other prompts of the batch
(padded keys get zero attention weight), so cached and fresh rows are interchangeable.

Cache: one `.npz` per (prompt, encoder, max_length) under `cache_dir/<2 hex>/<sha256>.npz`, holding only
the valid rows, written atomically (a temporary file renamed into place). The encoder is identified by
`checkpoint_hash(model_dir)` (the sha256s of the converted folder's source files and tokenizer, and the
stored parameter dtype) together with the compute numerics (compute dtype, matmul precision), since they
change the features too.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from varejax.batching import pad_rows, round_up
from varejax.models.t5 import T5Config
from varejax.models.t5_tokenizer import T5_VOCAB, T5Tokenizer
from varejax.paths import as_path, load_npz, local_copy, save_npz

LENGTH_MULTIPLE = 8


def checkpoint_hash(model_dir: str | os.PathLike) -> str:
    """Identity of a converted T5 folder: sha256 over its source files' sha256s and its parameter dtype."""
    from varejax.checkpoint import read_meta

    meta = read_meta(model_dir, "t5")
    ident = {"sha256": meta["source"]["sha256"], "param_dtype": meta["model"]["param_dtype"]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """{key: features [length, d] float32} as one .npz per entry under `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = as_path(directory)

    @staticmethod
    def key(prompt: str, encoder_id: str, max_length: int) -> str:
        return hashlib.sha256(json.dumps([prompt, encoder_id, int(max_length)]).encode()).hexdigest()

    def path(self, key: str) -> os.PathLike:
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str, prompt: str) -> np.ndarray | None:
        """The cached rows, or None (absent, unreadable, or stored for another prompt)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = load_npz(path, keys=("prompt", "features"))
            if str(data["prompt"]) != prompt:
                return None
            return np.asarray(data["features"], np.float32)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # a damaged entry is recomputed and rewritten

    def put(self, key: str, prompt: str, features: np.ndarray) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, features=np.asarray(features, np.float32), prompt=np.array(prompt),
                 length=np.int32(features.shape[0]))


class TextEncoder:
    """Tokenizer + T5 encoder parameters + config; `encode(prompts)` with an optional feature cache.

    Args:
      tokenizer: the T5 tokenizer.
      params: T5 encoder parameters (`nnx.State`, possibly sharded).
      cfg: their T5Config.
      checkpoint_hash: identity of the weights (see `checkpoint_hash`); required for the cache.
      cache_dir: folder of the feature cache; None disables caching.
      max_length: tokenizer max_length (Infinity: 512).
      max_batch: prompts per encoder call (larger requests are split).
    """

    def __init__(self, tokenizer: T5Tokenizer, params: Any, cfg: T5Config, *, checkpoint_hash: str | None = None,
                 cache_dir: str | os.PathLike | None = None, max_length: int = 512, max_batch: int = 64):
        if cache_dir is not None and not checkpoint_hash:
            raise ValueError("a feature cache needs the encoder's checkpoint_hash (see text_features.checkpoint_hash)")
        self.tokenizer, self.params, self.cfg = tokenizer, params, cfg
        self.checkpoint_hash = checkpoint_hash
        self.cache = FeatureCache(cache_dir) if cache_dir is not None else None
        self.max_length, self.max_batch = int(max_length), int(max_batch)
        self.model_calls = 0     # batches run through the encoder
        self.prompts_encoded = 0  # prompts those batches held (cache misses)
        self.cache_hits = 0

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 max_length: int = 512, min_vocab: int = T5_VOCAB, mesh=None, rules=None,
                 **overrides: Any) -> TextEncoder:
        """Loads a folder written by `varejax convert t5` (parameters, config, tokenizer.json)."""
        from varejax.checkpoint import TOKENIZER_FILE, load_t5

        cfg, params = load_t5(str(model_dir), mesh=mesh, rules=rules, **overrides)
        with local_copy(as_path(model_dir) / TOKENIZER_FILE) as tokenizer_file:  # tokenizers opens local files only
            tokenizer = T5Tokenizer.from_file(tokenizer_file, min_vocab=min_vocab)
        return cls(tokenizer, params, cfg, checkpoint_hash=checkpoint_hash(model_dir), cache_dir=cache_dir,
                   max_length=max_length)

    @property
    def encoder_id(self) -> str:
        """What the cache keys on besides prompt and max_length: the weights and the compute numerics."""
        return f"{self.checkpoint_hash}/{self.cfg.compute_dtype}/{self.cfg.matmul_precision}"

    def run_encoder(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The T5 encoder on one batch: [B, T] ids and mask -> [B, T, d] float32 (host)."""
        from varejax.models import t5

        self.model_calls += 1
        from varejax.models.lora import host_array  # a gather when the mesh spans processes

        return host_array(t5.encode(self.params, input_ids, attention_mask, self.cfg)).astype(np.float32)

    def _encode_uncached(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """Valid rows [length_i, d] of each prompt, in batches of at most max_batch."""
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = list(prompts[start:start + self.max_batch])
            ids, mask, lengths = self.tokenizer(chunk, max_length=self.max_length)
            T = min(self.max_length, round_up(int(lengths.max()), LENGTH_MULTIPLE))
            # Pad the batch to a power of two (rows of pads): fewer distinct shapes, fewer compilations.
            B = 1 << (len(chunk) - 1).bit_length()
            ids_p = np.full((B, T), self.tokenizer.pad_id, np.int32)
            mask_p = np.zeros((B, T), np.int32)
            ids_p[:len(chunk)], mask_p[:len(chunk)] = ids[:, :T], mask[:, :T]
            mask_p[len(chunk):, 0] = 1  # keep padding rows well defined (one visible key)
            features = self.run_encoder(ids_p, mask_p)
            out.extend(features[i, :lengths[i]] for i in range(len(chunk)))
            self.prompts_encoded += len(chunk)
        return out

    def encode(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Features and mask of `prompts` (see the module docstring).

        Returns:
          features [B, T, d] float32 (zeros past each length), mask [B, T] int32; T = the longest length
          rounded up to a multiple of 8, at most max_length.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        rows: dict[str, np.ndarray] = {}
        keys = {}
        if self.cache is not None:
            for prompt in dict.fromkeys(prompts):
                keys[prompt] = self.cache.key(prompt, self.encoder_id, self.max_length)
                hit = self.cache.get(keys[prompt], prompt)
                if hit is not None:
                    rows[prompt] = hit
                    self.cache_hits += 1
        unique = list(dict.fromkeys(prompts))
        missing = [p for p in unique if p not in rows]
        if jax.process_count() > 1:
            # Multi-host (called in lockstep): encode what ANY process misses, so that every process runs
            # the same encoder programs; one process writes the cache entries.
            from jax.experimental import multihost_utils

            hit = np.asarray([p in rows for p in unique], np.int32)
            hit_everywhere = np.asarray(multihost_utils.process_allgather(hit)).reshape(-1, len(unique)).min(0)
            missing = [p for p, h in zip(unique, hit_everywhere, strict=True) if not h]
        if missing:
            for prompt, value in zip(missing, self._encode_uncached(missing), strict=True):
                rows[prompt] = value  # fresh everywhere, so that every process holds the same rows
                if self.cache is not None and jax.process_index() == 0:
                    self.cache.put(keys[prompt], prompt, value)
        lengths = [rows[p].shape[0] for p in prompts]
        T = min(self.max_length, round_up(max(lengths), LENGTH_MULTIPLE))
        return pad_rows([rows[p] for p in prompts], T, np.float32)
