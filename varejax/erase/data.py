"""Training batches of S-VARE from the stored trajectories, as a random-access grain dataset.

`TrajectoryBatches(files, batch_size, seed, text_len)[step]` is the batch of training step `step`: the
pairs shuffled with the seed, repeated, and cut into global batches (text padded to one length for the
whole run, so the step compiles once); on several processes each loads only its rows of each batch, so
the batches do not depend on the number of processes. Because batches are addressed by step, the data
iterator's state *is* the step number: a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from varejax.batching import pad_rows, round_up
from varejax.erase.prepare import load_trajectory
from varejax.paths import load_npz

BATCH_KEYS = ("target_text", "target_mask", "anchor_text", "anchor_mask", "x_BLC_wo_prefix", "gt_bits",
              "teacher_logits", "frozen_concept_logits")


def text_length(files: Sequence[str | os.PathLike], multiple: int = 8) -> int:
    """The padded text length of a run: the longest prompt of any pair, rounded up to `multiple`."""
    longest = 1
    for path in files:
        data = load_npz(path, keys=("anchor_text", "target_text"))
        longest = max(longest, data["anchor_text"].shape[0], data["target_text"].shape[0])
    return round_up(longest, multiple)


class TrajectoryBatches:
    """Random-access training batches (dict of numpy arrays) by step number.

    `batch_size` is the GLOBAL batch: batch k is the same rows whatever the number of processes. A
    process of a multi-host run loads only its share, `rows` (a slice of the global batch; default all).
    """

    def __init__(self, files: Sequence[str | os.PathLike], batch_size: int, seed: int, text_len: int,
                 rows: slice | None = None):
        import grain

        self.files = [str(f) for f in files]
        self.text_len = text_len
        self.batch_size = batch_size
        self.rows = range(batch_size)[rows if rows is not None else slice(None)]
        if not self.files:
            raise ValueError("no trajectories to train on")
        files = self.files
        if len(files) < batch_size:
            # Fewer pairs than a batch: repeat them so every batch is full.
            files = [files[i % len(files)] for i in range(batch_size)]
        # Paths only: a process loads just the rows of each batch it holds.
        self.paths = grain.MapDataset.source(files).shuffle(seed=seed).repeat(None)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - the instance lives for the whole run
    def _cached(self, path: str) -> dict[str, Any]:
        data = load_trajectory(path)
        text, mask = pad_rows([data["target_text"], data["anchor_text"]], self.text_len, np.float32)
        return {"target_text": text[0], "target_mask": mask[0], "anchor_text": text[1], "anchor_mask": mask[1],
                "x_BLC_wo_prefix": data["x_BLC_wo_prefix"], "gt_bits": data["gt_bits"],
                "teacher_logits": data["teacher_logits"], "frozen_concept_logits": data["concept_logits"]}

    @staticmethod
    def _collate(items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {k: np.stack([item[k] for item in items]) for k in BATCH_KEYS}

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of training step `step`."""
        return self._collate([self._cached(self.paths[step * self.batch_size + r]) for r in self.rows])


def prefetched(batches: TrajectoryBatches, steps: Sequence[int], depth: int = 2
               ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, batches[step]) for every step in order, each loaded up to `depth` steps ahead by one background
    thread, so that reading and collating the next batches overlaps the device step (JAX dispatches the
    step asynchronously; the loop blocks only on its metrics). A loading error is raised at its step;
    leaving the loop early waits for the (at most `depth`) loads in flight."""
    from concurrent.futures import ThreadPoolExecutor

    todo = iter(steps)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="varejax-prefetch") as pool:
        pending = collections.deque((step, pool.submit(batches.__getitem__, step))
                                    for step in itertools.islice(todo, max(1, depth)))
        while pending:
            step, loading = pending.popleft()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(batches.__getitem__, following)))
            yield step, loading.result()
