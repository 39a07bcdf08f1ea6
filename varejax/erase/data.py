"""Training batches of S-VARE from the stored trajectories, as a random-access grain dataset.

`TrajectoryBatches(files, batch_size, seed)[step]` is the batch of training step `step`: the pairs are
sharded over processes, shuffled per epoch with the seed, repeated, and batched (text padded to one
length for the whole run, so the step compiles once). Because batches are addressed by step, the data
iterator's state *is* the step number: a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from varejax.batching import pad_rows, round_up
from varejax.erase.prepare import load_trajectory

BATCH_KEYS = ("target_text", "target_mask", "anchor_text", "anchor_mask", "x_BLC_wo_prefix", "gt_bits",
              "teacher_logits", "frozen_concept_logits")


def text_length(files: Sequence[str | os.PathLike], multiple: int = 8) -> int:
    """The padded text length of a run: the longest prompt of any pair, rounded up to `multiple`."""
    longest = 1
    for path in files:
        with np.load(path) as data:
            longest = max(longest, data["anchor_text"].shape[0], data["target_text"].shape[0])
    return round_up(longest, multiple)


class TrajectoryBatches:
    """Random-access training batches (dict of numpy arrays, process-local) by step number."""

    def __init__(self, files: Sequence[str | os.PathLike], batch_size: int, seed: int, text_len: int,
                 process_index: int = 0, process_count: int = 1):
        import grain

        self.files = [str(f) for f in files]
        self.text_len = text_len
        local = self.files[process_index::process_count]
        if not local:
            raise ValueError(f"process {process_index} of {process_count} has no pairs ({len(self.files)} in all)")
        if len(local) < batch_size:
            # Fewer pairs than a batch: repeat them so every batch is full.
            local = [local[i % len(local)] for i in range(batch_size)]
        self.dataset = (grain.MapDataset.source(local).shuffle(seed=seed).repeat(None)
                        .map(self._load).batch(batch_size, batch_fn=self._collate))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - the instance lives for the whole run
    def _cached(self, path: str) -> dict[str, Any]:
        data = load_trajectory(path)
        text, mask = pad_rows([data["target_text"], data["anchor_text"]], self.text_len, np.float32)
        return {"target_text": text[0], "target_mask": mask[0], "anchor_text": text[1], "anchor_mask": mask[1],
                "x_BLC_wo_prefix": data["x_BLC_wo_prefix"], "gt_bits": data["gt_bits"],
                "teacher_logits": data["teacher_logits"], "frozen_concept_logits": data["concept_logits"]}

    def _load(self, path: str) -> dict[str, Any]:
        return self._cached(path)

    @staticmethod
    def _collate(items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {k: np.stack([item[k] for item in items]) for k in BATCH_KEYS}

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        return self.dataset[step]
