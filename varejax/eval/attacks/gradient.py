"""A gradient attack in the spirit of UnlearnDiffAtk: a soft prompt in T5-feature space, optimised through
the differentiable model under attack to bring the concept back.

UnlearnDiffAtk (Zhang et al., 2024) optimises prompt tokens so that the unlearned diffusion model denoises
towards an image showing the concept. Here, for a visual autoregressive model:

* targets: token trajectories that show the concept (`target_trajectories`): the ORIGINAL model's own
  samples for concept prompts, kept when the judge (the toy oracle) confirms the concept;
* soft prompt: T5 features [T, C] with a fixed validity mask, initialised from a neutral prompt's
  features (one that leaves the concept unsaid);
* objective: the teacher-forced bit cross entropy (Infinity's training loss, `bit_loss.training_loss`) of
  the target trajectories under the ATTACKED model's parameters with the soft prompt as text, minimised
  with optax Adam for `steps` steps (one soft prompt for all targets: a universal prompt);
* judgement: the attacked model samples with the optimised features (fresh seeds) and the judge reads
  the images (`asr.py`).

It is a white-box attack on the text features (it skips the T5 encoder), so it is an upper bound on what
token-level attacks reach; its budget is the steps, the targets and the learning rate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from varejax.models import apply, schedules
from varejax.models.bit_loss import training_loss


@dataclasses.dataclass(frozen=True)
class GradientAttackConfig:
    """steps: Adam steps; learning_rate; targets: target trajectories (concept images) the soft prompt is
    fitted to; init_prompt: the neutral prompt whose features start the search; seed: of the targets."""

    steps: int = 40
    learning_rate: float = 0.05
    targets: int = 8
    init_prompt: str = "an image of a shape"
    seed: int = 0


def target_trajectories(pipeline: Any, params: Any, prompts: list[str], seeds: list[int], sampling: Any,
                        schedule: Any, judge, text_length: int) -> dict[str, np.ndarray]:
    """Trajectories of `params` (the original model) for `prompts`, kept where `judge(images)` is True.

    Returns {"x": next-scale inputs [N, L-1, d], "bits": [N, L, d] int8, "shown": [len(prompts)] bool}.
    """
    from varejax import images as image_io
    from varejax.models.bsq_vae import decode_jit
    from varejax.sample.sampler import generate_jit

    cfg = pipeline.infinity_cfg  # as `Pipeline.generate` passes it: the same compiled sampler
    text, mask = pad_text(*pipeline.text_encoder.encode(prompts), text_length)
    keys = jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))
    out = generate_jit(params, text, mask, schedules.as_schedule(schedule), cfg=cfg, sampling=sampling, rng=keys)
    images = image_io.to_uint8(np.asarray(decode_jit(pipeline.vae_params, out.summed_codes, pipeline.vae_cfg)))
    shown = np.asarray(judge(images), bool)
    return {"x": np.asarray(out.x_BLC_wo_prefix(), np.float32)[shown],
            "bits": np.asarray(out.bits_BLd(cfg), np.int8)[shown], "shown": shown}


def pad_text(features: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Text features [B, T, C] and mask [B, T] zero-padded to `length` rows (one sampler shape for all)."""
    T = features.shape[1]
    if T > length:
        raise ValueError(f"text has {T} rows, more than the attack's text length {length}")
    return (np.pad(features, ((0, 0), (0, length - T), (0, 0))), np.pad(mask, ((0, 0), (0, length - T))))


def _loss(features_TC, mask_T, params, x, bits, schedule, cfg):
    n = x.shape[0]
    text = jnp.broadcast_to(features_TC[None], (n, *features_TC.shape))
    mask = jnp.broadcast_to(mask_T[None], (n, *mask_T.shape))
    logits = apply.forward(params, text, mask, x, schedule, cfg=cfg)
    return training_loss(logits, bits, schedule)


_loss_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnames=("schedule", "cfg"))


def optimise_soft_prompt(params: Any, cfg: Any, init_features: np.ndarray, mask: np.ndarray,
                         targets: dict[str, np.ndarray], schedule: Any, steps: int, learning_rate: float
                         ) -> dict[str, Any]:
    """Adam on the soft prompt [T, C] (valid rows only move) to minimise the targets' bit CE under `params`.

    Returns {"features" [T, C], "mask" [T], "loss" (per step, before each update, and after the last)}.
    """
    import optax

    if len(targets["x"]) == 0:
        raise ValueError("no target trajectory: the judge saw the concept in none of the original's images")
    cfg = cfg.replace(cond_drop_rate=0.0, drop_path_rate=0.0)
    schedule = schedules.as_schedule(schedule)
    features = jnp.asarray(init_features, jnp.float32)
    mask_j = jnp.asarray(mask, jnp.int32)
    valid = mask_j[:, None].astype(jnp.float32)  # padded rows are ignored by the model: keep them at zero
    x, bits = jnp.asarray(targets["x"]), jnp.asarray(targets["bits"])
    optimiser = optax.adam(learning_rate)
    state = optimiser.init(features)
    losses = []
    for _ in range(int(steps)):
        loss, grad = _loss_and_grad(features, mask_j, params, x, bits, schedule, cfg)
        updates, state = optimiser.update(grad * valid, state, features)
        features = optax.apply_updates(features, updates)
        losses.append(float(loss))
    losses.append(float(_loss_and_grad(features, mask_j, params, x, bits, schedule, cfg)[0]))
    return {"features": np.asarray(features), "mask": np.asarray(mask_j), "loss": losses}
