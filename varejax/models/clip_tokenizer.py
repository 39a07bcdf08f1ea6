"""The CLIP tokenizer (byte-level BPE) from local files, with the `tokenizers` package only.

Gives the ids HF `CLIPTokenizer(prompts, padding="max_length", max_length=77, truncation=True)` gives for
the same files: `<|startoftext|>`, up to 75 text tokens, `<|endoftext|>` (kept when a long prompt is cut),
then the pad token up to 77 (`<|endoftext|>` for OpenAI's files; `tokenizer_config.json` or
`special_tokens_map.json` next to the vocabulary may name another).

Sources, in order of preference inside a folder:
  * `tokenizer.json` (HF tokenizers format), used with its own normaliser and pre-tokeniser;
  * `vocab.json` + `merges.txt` (OpenAI / HF slow format), wrapped here in CLIP's pipeline: NFC, runs of
    whitespace -> one space, lower case; CLIP's split pattern (start/end tokens, English contractions,
    letter runs, single digits, runs of other symbols); byte-level mapping; BPE with the `</w>`
    end-of-word suffix.

Before either, every prompt gets CLIP's text cleanup here too (NFC, whitespace runs -> one space, strip,
lower case), so a `tokenizer.json` without a normaliser still sees CLIP's text. OpenAI's own tokenizer also
runs `ftfy.fix_text` and HTML-unescapes; HF's files (and this class) do not.

Guards (`TokenizerError`, a UserError naming the file): missing start/end tokens; a vocabulary larger than
the model's `vocab_size` (ids would index past the embedding); an end token the model does not pool at.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from varejax.errors import UserError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
# CLIP's pre-tokenisation pattern (OpenAI's simple_tokenizer; HF's tokenizer.json carries the same one).
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The Unicode White_Space characters (what `\s` means in the Rust regex of tokenizers; Python's `\s` also
# matches \x1c-\x1f, which would change ids).
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


class TokenizerError(UserError, ValueError):
    """The tokenizer files cannot be used with this CLIP model; the message names the file and why."""


def clean_text(text: str) -> str:
    """CLIP's cleanup: NFC, runs of whitespace -> one space, stripped, lower case."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip().lower()


def _clip_pipeline(model):
    """A `tokenizers.Tokenizer` around a BPE `model` with CLIP's normaliser, pre-tokeniser and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    # invert=True: the pattern's matches are the pieces; what lies between them (whitespace) is dropped.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _special_names(folder: Path) -> dict[str, str]:
    """bos/eos/pad token strings named by tokenizer_config.json / special_tokens_map.json, when present."""
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in HF
        path = folder / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{path}: not valid JSON ({err})") from None
        for role in ("bos_token", "eos_token", "pad_token"):
            value = data.get(role)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str):
                names[role] = value
    return names


class CLIPTokenizer:
    """Prompts -> (input_ids [B, L] int32, attention_mask [B, L] int32) as CLIP models take them.

    Attributes:
      bos_id, eos_id, pad_id: ids of the start, end and pad tokens.
      vocab_size: entries of the vocabulary (added tokens included).
      source: the file(s) it was read from, for messages and settings.
    """

    def __init__(self, tokenizer, *, source: str, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str | None = None, model_vocab_size: int | None = None):
        self.source = source
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        pad_token = eos_token if pad_token is None else pad_token
        ids = {name: tokenizer.token_to_id(name) for name in (bos_token, eos_token, pad_token)}
        absent = [name for name, i in ids.items() if i is None]
        if absent:
            raise TokenizerError(f"{source}: no token {absent} in the vocabulary (CLIP needs {BOS!r} and {EOS!r}); "
                                 f"is this a CLIP tokenizer?")
        self.bos_id, self.eos_id, self.pad_id = (int(ids[n]) for n in (bos_token, eos_token, pad_token))
        self.tokens = dict(bos=bos_token, eos=eos_token, pad=pad_token)
        if model_vocab_size is not None and self.vocab_size > model_vocab_size:
            raise TokenizerError(f"{source}: the vocabulary has {self.vocab_size} entries, more than the model's "
                                 f"vocab_size {model_vocab_size} (ids would index past the token embedding); "
                                 f"the tokenizer belongs to another model")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer

    # ---- constructors ----

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> CLIPTokenizer:
        """Reads a `tokenizer.json`."""
        from tokenizers import Tokenizer

        path = str(path)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such file")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as err:  # the Rust side raises plain Exceptions for malformed files
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({err})") from None
        return cls(tokenizer, source=path, **kwargs)

    @classmethod
    def from_vocab_merges(cls, vocab: str | os.PathLike, merges: str | os.PathLike, **kwargs) -> CLIPTokenizer:
        """Reads `vocab.json` + `merges.txt` and wraps them in CLIP's pipeline."""
        from tokenizers import AddedToken
        from tokenizers.models import BPE

        vocab, merges = str(vocab), str(merges)
        for path in (vocab, merges):
            if not os.path.isfile(path):
                raise TokenizerError(f"{path}: no such file")
        try:
            table, merge_list = BPE.read_file(vocab, merges)
        except Exception as err:
            raise TokenizerError(f"{vocab} / {merges}: not a readable vocab.json + merges.txt ({err})") from None
        eos = kwargs.get("eos_token", EOS)
        if eos not in table:
            raise TokenizerError(f"{vocab}: no token {eos!r} in the vocabulary (CLIP needs {BOS!r} and {EOS!r}); "
                                 f"is this a CLIP tokenizer?")
        model = BPE(table, merge_list, unk_token=eos, continuing_subword_prefix="", end_of_word_suffix="</w>",
                    fuse_unk=False)
        tokenizer = _clip_pipeline(model)
        specials = [kwargs.get("bos_token", BOS), eos, kwargs.get("pad_token") or eos]
        # Special tokens in a prompt's text map to their ids (not to BPE pieces), as in HF.
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)
                                      if t in table])
        return cls(tokenizer, source=f"{vocab} + {Path(merges).name}", **kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **kwargs) -> CLIPTokenizer:
        """The tokenizer of a folder: `tokenizer.json`, else `vocab.json` + `merges.txt`; special token names
        from `tokenizer_config.json` / `special_tokens_map.json` when present (keyword arguments win)."""
        folder = Path(folder)
        names = {**_special_names(folder), **kwargs}
        if (folder / "tokenizer.json").is_file():
            return cls.from_file(folder / "tokenizer.json", **names)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_vocab_merges(folder / "vocab.json", folder / "merges.txt", **names)
        raise TokenizerError(f"{folder}: no tokenizer.json or vocab.json + merges.txt (copy them from the HF CLIP "
                             f"download into this folder)")

    # ---- use ----

    def check_model(self, vocab_size: int, eos_token_id: int, bos_token_id: int | None = None) -> None:
        """Raises TokenizerError unless ids fit a model with these settings (a `CLIPConfig`'s).

        eos_token_id == 2 is HF's legacy argmax pooling: then the end token must have the largest id.
        """
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"{self.source}: the vocabulary has {self.vocab_size} entries, more than the "
                                 f"model's vocab_size {vocab_size}; the tokenizer belongs to another model")
        if eos_token_id == 2:
            if self.eos_id != self.vocab_size - 1:
                raise TokenizerError(f"{self.source}: the model pools at the largest id (its config says "
                                     f"eos_token_id 2, HF's legacy rule) but {self.tokens['eos']!r} has id "
                                     f"{self.eos_id}, not {self.vocab_size - 1}")
            return
        if self.eos_id != eos_token_id:
            raise TokenizerError(f"{self.source}: {self.tokens['eos']!r} has id {self.eos_id} but the model pools at "
                                 f"eos_token_id {eos_token_id}; the tokenizer belongs to another model")
        if bos_token_id is not None and bos_token_id >= 0 and self.bos_id != bos_token_id:
            raise TokenizerError(f"{self.source}: {self.tokens['bos']!r} has id {self.bos_id} but the model's "
                                 f"bos_token_id is {bos_token_id}")

    def encode_text(self, prompt: str) -> list[int]:
        """The BPE ids of a prompt's text, without start/end tokens and without truncation."""
        return list(self._tok.encode(clean_text(prompt), add_special_tokens=False).ids)

    def __call__(self, prompts: str | Sequence[str], max_length: int = CONTEXT_LENGTH
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenises `prompts`: [start] + text ids (cut to max_length - 2) + [end], padded to `max_length`.

        Returns:
          input_ids [B, max_length] int32, attention_mask [B, max_length] int32 (1 on start, text and end).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start and end tokens), got {max_length}")
        ids = np.full((len(prompts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), max_length), np.int32)
        encodings = self._tok.encode_batch([clean_text(p) for p in prompts], add_special_tokens=False)
        for row, enc in enumerate(encodings):
            seq = [self.bos_id, *enc.ids[:max_length - 2], self.eos_id]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()
