"""VARE: the fixed auxiliary trajectories S-VARE is trained on (`varejax erase prepare`).

For every prompt pair (c*, c) the frozen model samples one trajectory from the anchor prompt c (CFG on
logits, tau, top-p per bit; seeded per pair). Stored per pair, in `WORKDIR/trajectories/NNNNNN.npz`:

* `x_BLC_wo_prefix` [L-1, d]: the next-scale inputs of the trajectory (the teacher-forcing input r^ori);
* `gt_bits` [L, d] int8: the sampled bits (the erasure targets of L_FCE);
* `teacher_logits` [L, 2d]: the CFG-mixed, tau-scaled logits before top-p (the L_Pre targets);
* `concept_logits` [L, 2d]: the frozen model's CFG-mixed logits under c* on the same trajectory
  (teacher-forced; only the ESD-style baseline uses them);
* `target_text` / `anchor_text` [len, C]: T5 features of c* and c (valid rows only), so training needs no
  text encoder;
* `pair` (JSON: target, anchor, concept, source) and `seed`.

Files are written atomically; a re-run skips pairs already done (resumable). With several processes
(multi-host) every process runs the same programs on the same batches (the mesh splits each batch over
the devices; process 0 decides which pairs are missing, so all agree), and pair i is written by process
i mod process_count alone; a barrier at the end makes every file visible to all before training reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from varejax.batching import padded_batches
from varejax.data.pairs import PromptPair
from varejax.erase.step import teacher_logits_jit
from varejax.models import schedules
from varejax.models.config import InfinityConfig
from varejax.paths import as_path, load_npz, save_npz
from varejax.sample.sampler import SamplingConfig, generate_jit

TextEncodeFn = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig:
    """How the frozen model samples the anchor trajectories (official S-VARE: cfg 4, tau 1, top-p 0.97)."""

    guidance: float = 4.0
    tau: float = 1.0
    top_k: int = 900
    top_p: float = 0.97
    seed: int = 42
    same_seed_for_all_pairs: bool = False  # official: every pair re-seeded with 42
    batch_size: int = 2

    def seed_of(self, index: int) -> int:
        return self.seed if self.same_seed_for_all_pairs else self.seed + index

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(guidance=(self.guidance,), tau=(self.tau,), top_k=self.top_k, top_p=self.top_p)


def trajectory_path(directory: str | os.PathLike, index: int) -> epath.Path:
    return as_path(directory) / f"{index:06d}.npz"


def prepare_trajectories(pairs: Sequence[PromptPair], *, params: Any, cfg: InfinityConfig,
                         encode_text: TextEncodeFn, schedule: schedules.Schedule, tcfg: TrajectoryConfig,
                         out_dir: str | os.PathLike, h_div_w_template: float | None = None,
                         process_index: int | None = None, process_count: int | None = None,
                         progress: bool = True) -> list[epath.Path]:
    """Samples and stores the anchor trajectory of every pair this process owns; returns all paths.

    Args:
      pairs: the prompt pairs (index i -> file NNNNNN.npz).
      params, cfg: the frozen transformer (dropout settings of cfg are ignored: sampling is eval).
      encode_text: prompts -> (features [B, T, C], mask [B, T]).
      schedule: the scale schedule to sample.
      tcfg: sampling settings and seeds.
      out_dir: the trajectories folder.
    """
    from tqdm import tqdm

    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from varejax.models.lora import host_array
    from varejax.parallel.distributed import sync

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    todo = _missing(out_dir, len(pairs))
    sampler_cfg = cfg.replace(cond_drop_rate=0.0, drop_path_rate=0.0)
    batch = max(1, tcfg.batch_size)
    for idx, count in tqdm(list(padded_batches(len(todo), batch)), desc="anchor trajectories", unit="batch",
                           disable=not (progress and todo)):
        padded = [todo[k] for k in idx]  # full batches (the last repeats its final pair): one compile
        chunk = padded[:count]
        anchor_text, anchor_mask = encode_text([pairs[i].anchor for i in padded])
        target_text, target_mask = encode_text([pairs[i].target for i in padded])
        keys = jax.vmap(jax.random.key)(np.asarray([tcfg.seed_of(i) for i in padded], np.uint32))
        out = generate_jit(params, anchor_text, anchor_mask, schedule, cfg=sampler_cfg, sampling=tcfg.sampling(),
                           rng=keys, h_div_w_template=h_div_w_template)
        x = host_array(out.x_BLC_wo_prefix()).astype(np.float32)  # collectives: every process, same order
        bits = host_array(out.bits_BLd(sampler_cfg)).astype(np.int8)
        logits = host_array(out.logits_BLV()).astype(np.float32)
        concept = host_array(teacher_logits_jit(params, target_text, target_mask, out.x_BLC_wo_prefix(), schedule,
                                                sampler_cfg, tcfg.guidance, tcfg.tau, h_div_w_template)
                             ).astype(np.float32)
        for b, i in enumerate(chunk):
            if i % process_count != process_index:
                continue  # one writer per file
            pair = pairs[i]
            save_npz(trajectory_path(out_dir, i), x_BLC_wo_prefix=x[b], gt_bits=bits[b], teacher_logits=logits[b],
                         concept_logits=concept[b],
                         anchor_text=np.asarray(anchor_text[b][anchor_mask[b].astype(bool)], np.float32),
                         target_text=np.asarray(target_text[b][target_mask[b].astype(bool)], np.float32),
                         pair=np.asarray(json.dumps({**pair.to_dict(), "source": pair.source})),
                         seed=np.asarray(tcfg.seed_of(i)), schedule=np.asarray(schedule, np.int32))
    sync("varejax:prepare_trajectories")
    return [trajectory_path(out_dir, i) for i in range(len(pairs))]


def _missing(out_dir: os.PathLike, count: int) -> list[int]:
    """Indices of the pairs without a trajectory file, as process 0 sees them (every process agrees)."""
    done = np.asarray([trajectory_path(out_dir, i).exists() for i in range(count)], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return [i for i in range(count) if not done[i]]


def load_trajectory(path: str | os.PathLike) -> dict[str, Any]:
    """One stored trajectory as a dict of arrays (plus the decoded `pair`)."""
    out = load_npz(path)
    out["pair"] = json.loads(str(out["pair"]))
    return out
