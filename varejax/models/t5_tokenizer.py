"""The T5 tokenizer from a `tokenizer.json`, with the `tokenizers` package only.

Behaves as HF `tokenizer(prompts, max_length=512, padding='max_length', truncation=True)` does for a T5
`tokenizer.json` (what Infinity calls): the EOS `</s>` ends every sequence and is counted in its length,
truncation keeps the EOS last, padding (right) uses the pad id (0 for T5) up to `max_length`.

transformers' AutoTokenizer is deliberately not used: offline, it can silently build an empty T5
tokenizer. A vocabulary smaller than `min_vocab` (Flan-T5's has 32100 entries) is refused for the same
reason; small test tokenizers pass a smaller `min_vocab` explicitly.

    tok = T5Tokenizer.from_file("models/flan_t5_xl/tokenizer.json")
    input_ids, attention_mask, lengths = tok(["a photo of a cat"], max_length=512)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from varejax.errors import UserError

T5_VOCAB = 32100


class TokenizerError(UserError, ValueError):
    """The tokenizer file cannot be used as a T5 tokenizer; the message says why."""


class T5Tokenizer:
    """A `tokenizers.Tokenizer` with T5's EOS, truncation and padding conventions.

    Attributes:
      pad_id, eos_id: ids of the pad and EOS tokens.
      vocab_size: entries of the vocabulary (added tokens included).
      appends_eos: whether the file's post-processor already appends the EOS (T5's does: "$A </s>").
    """

    def __init__(self, tokenizer, *, source: str = "<tokenizer>", min_vocab: int = T5_VOCAB,
                 pad_token: str = "<pad>", eos_token: str = "</s>"):
        self.source = source
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        if self.vocab_size < min_vocab:
            raise TokenizerError(
                f"{source}: the vocabulary has {self.vocab_size} entries, fewer than min_vocab={min_vocab} "
                f"(Flan-T5's tokenizer has {T5_VOCAB}); this is not a T5 tokenizer.json (an empty or placeholder "
                f"file?). Pass a smaller min_vocab only for a deliberately small tokenizer.")
        ids = {name: tokenizer.token_to_id(name) for name in (pad_token, eos_token)}
        absent = [name for name, i in ids.items() if i is None]
        if absent:
            raise TokenizerError(f"{source}: no token {absent} in the vocabulary (T5 uses '<pad>' and '</s>')")
        self.pad_id, self.eos_id = int(ids[pad_token]), int(ids[eos_token])
        self._tok = tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        probe = tokenizer.encode("", add_special_tokens=True).ids
        self.appends_eos = bool(probe) and probe[-1] == self.eos_id

    @classmethod
    def from_file(cls, path: str | os.PathLike, min_vocab: int = T5_VOCAB, **kwargs) -> T5Tokenizer:
        """Reads a `tokenizer.json` (HF tokenizers format)."""
        from tokenizers import Tokenizer

        path = str(path)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such file; a converted T5 folder holds tokenizer.json when the source "
                                 f"folder had one (copy it from the HF download)")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as err:  # the Rust side raises plain Exceptions for malformed files
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({err})") from None
        return cls(tokenizer, source=path, min_vocab=min_vocab, **kwargs)

    def __call__(self, prompts: str | Sequence[str], max_length: int = 512
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokenises `prompts`.

        Returns:
          input_ids [B, max_length] int32 (pad id after each sequence), attention_mask [B, max_length] int32,
          lengths [B] int32 (tokens including the EOS; at most max_length).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        # The tokenizers library counts the post-processor's special tokens when truncating and keeps them.
        self._tok.enable_truncation(max_length if self.appends_eos else max_length - 1)
        try:
            encodings = self._tok.encode_batch(list(prompts), add_special_tokens=True)
        finally:
            self._tok.no_truncation()
        ids = np.full((len(prompts), max_length), self.pad_id, np.int32)
        lengths = np.zeros(len(prompts), np.int32)
        for row, enc in enumerate(encodings):
            seq = list(enc.ids) if self.appends_eos else list(enc.ids) + [self.eos_id]
            ids[row, :len(seq)] = seq
            lengths[row] = len(seq)
        mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
        return ids, mask, lengths

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
