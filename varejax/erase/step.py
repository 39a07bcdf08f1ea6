"""S-VARE optimisation steps on an Infinity parameter state: pure functions, jitted.

All steps are teacher-forced on the anchor trajectory (one parallel forward over all scales, no
rollout) and take `(params, opt_state, batch, rng)`:

  params     the full `nnx.State` of the transformer; only the trainable leaves (SvareConfig.optim.trainable,
             default CA + FFN) get gradients and updates, frozen leaves are returned untouched.
  opt_state  `init_opt_state(params, scfg)`: torch-exact clip + AdamW over the trainable leaves, with
             learning_rate / weight_decay / max_grad_norm injected (change them with
             `varejax.erase.optim.set_hyperparams`, no recompilation).
  batch      dict of arrays:
               target_text [B, T*, Ct5], target_mask [B, T*]   c*  (the concept prompt; erase pass)
               anchor_text [B, T, Ct5],  anchor_mask [B, T]    c   (the anchor prompt; preserve pass)
               x_BLC_wo_prefix [B, L-1, d]   next-scale inputs of the anchor trajectory r^ori
               gt_bits [B, L, d]             its sampled bits (erase targets)
               teacher_logits [B, L, 2d]     the frozen model's CFG-mixed logits under c (`teacher_logits`)
               frozen_concept_logits [B, L, 2d]  (optional; only the `esd` baseline needs it)
  rng        PRNG key for condition dropout / drop path (when the model config enables them), or None.

Steps (each returns `(params, opt_state, metrics)`):
  erase_step             L_FCE (or the configured baseline) on the target text -> clip -> AdamW.
  preserve_step          L_Pre on the anchor text -> clip -> AdamW.
  alternating_iteration  the official iteration: erase_step, then preserve_step on the UPDATED weights,
                         one shared AdamW state (its step count is 2 after the iteration).
  summed_iteration       one step on L_FCE + summed_lambda * KL_bit, where KL_bit = mean_b (1/L) sum_l
                         mean_k KL(p_teacher || p_student)_k is the true per-bit KL. summed_lambda = 1 is
                         the paper's equal weighting "L_FCE + L_Pre"; the official alternating code weighs
                         the KL by reg_lambda * 1/2 = 0.25 (mean over the 64 logit entries) instead.

`jit_step(update_fn, donate=True)` gives a variant that donates params and opt_state (full-size runs).

Metrics: loss_erase / loss_pre (official units: L_Pre includes reg_lambda and the 64-entry mean),
grad_norm_* (pre-clip global norms over the trainable grads, as clip_grad_norm_ returns), clip_coef_*,
kept_fraction, kept_fraction_per_scale, token_error_rate, lr, adam_step; summed_iteration adds
kl_bit and loss_total. With `diagnostics=True` the student logits, the pre-clip gradients (flat dicts of
the trainable leaves), the keep mask and (alternating_iteration) the trainable leaves after the erase step
come back too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from varejax.batching import pad_rows
from varejax.erase import optim
from varejax.erase.losses import REQUIRED_ARRAYS, get_erase_loss, preservation_loss
from varejax.models import apply, schedules
from varejax.models.config import InfinityConfig

F32 = jnp.float32
Batch = Mapping[str, jax.Array]
OPTIONAL_BATCH_KEYS = ("gt_bits", "teacher_logits", "frozen_concept_logits")


@dataclasses.dataclass(frozen=True)
class SvareConfig:
    """Static settings of the S-VARE steps (hashable: a static jit argument).

    Attributes:
      alpha: L_FCE keeps a token when >= alpha of its bits are wrong (0.25 = 8 of 32).
      reg_lambda: the official weight of L_Pre (on the mean over the 2d logit entries).
      erase_loss: name in `varejax.erase.losses.ERASE_LOSSES` used by the erase pass ('fce' = S-VARE).
      erase_loss_kwargs: extra keywords of that loss, e.g. (("eta", 1.0),) for 'esd'.
      summed_lambda: weight of the per-bit KL in `summed_iteration` (1.0 = the paper's equal weighting).
      h_div_w_template: rope aspect template (None: nearest to the last scale).
      optim: optimiser settings; its learning_rate / weight_decay / max_grad_norm are only the initial
        values put into the optimiser state by `init_opt_state`.
    """

    alpha: float = 0.25
    reg_lambda: float = 0.5
    erase_loss: str = "fce"
    erase_loss_kwargs: tuple[tuple[str, Any], ...] = ()
    summed_lambda: float = 1.0
    h_div_w_template: float | None = None
    optim: optim.OptimConfig = optim.OptimConfig()

    def replace(self, **changes: Any) -> SvareConfig:
        return dataclasses.replace(self, **changes)

    def loss_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.erase_loss_kwargs)
        if self.erase_loss == "fce":
            kwargs.setdefault("alpha", self.alpha)
        return kwargs

    def static(self) -> SvareConfig:
        """What a compiled step depends on (the optimiser's injected hyperparameters are state)."""
        return dataclasses.replace(self, optim=self.optim.static())


def init_opt_state(params: nnx.State, scfg: SvareConfig = SvareConfig()) -> optax.OptState:
    """The shared optimiser state of the trainable parameters (initial lr / wd / clip from scfg.optim)."""
    return optim.init_opt_state(params, scfg.optim)


# ---- teacher ------------------------------------------------------------------------------------------


def uncond_text(params: nnx.State, text_BTC: jax.Array, text_mask_BT: jax.Array, cfg: InfinityConfig) -> jax.Array:
    """The null text of each prompt: cfg_uncond[:len_i] in its valid rows (upstream's negative_label=None)."""
    T = text_BTC.shape[1]
    null = apply.bind(params, cfg).cfg_uncond[...][:T].astype(text_BTC.dtype)
    return jnp.where(text_mask_BT.astype(bool)[..., None], null[None], jnp.zeros_like(text_BTC))


def teacher_branches(params: nnx.State, anchor_text: jax.Array, anchor_mask: jax.Array, x: jax.Array,
                     schedule: schedules.Schedule, cfg: InfinityConfig, h_div_w_template: float | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """The frozen model's teacher-forced (conditional, unconditional) logits, each [B, L, 2d].

    One forward on the batch [cond | uncond] as upstream runs it; uncond text = cfg_uncond[:len_i].
    """
    B = anchor_text.shape[0]
    text = jnp.concatenate([anchor_text, uncond_text(params, anchor_text, anchor_mask, cfg)], axis=0)
    mask = jnp.concatenate([anchor_mask, anchor_mask], axis=0)
    logits = apply.forward(params, text, mask, jnp.concatenate([x, x], axis=0), schedule, cfg=cfg,
                           h_div_w_template=h_div_w_template)
    return logits[:B], logits[B:]


def cfg_mix(cond_logits: jax.Array, uncond_logits: jax.Array, guidance: float | jax.Array = 4.0,
            tau: float | jax.Array = 1.0) -> jax.Array:
    """Upstream's CFG on logits: l * (1/tau), then guidance * l_cond + (1 - guidance) * l_uncond."""
    inv_tau = 1.0 / jnp.asarray(tau, F32)
    guidance = jnp.asarray(guidance, F32)
    return guidance * (cond_logits * inv_tau) + (1.0 - guidance) * (uncond_logits * inv_tau)


def teacher_logits(params: nnx.State, anchor_text: jax.Array, anchor_mask: jax.Array, x: jax.Array,
                   schedule: schedules.Schedule, cfg: InfinityConfig, guidance: float | jax.Array = 4.0,
                   tau: float | jax.Array = 1.0, h_div_w_template: float | None = None) -> jax.Array:
    """The frozen model's CFG-mixed, tau-scaled teacher-forced logits [B, L, 2d] (S-VARE's preservation target).

    S-VARE's preprocessing stores exactly this (gt_logits_BLVs_wo_inf, cfg 4, tau 1), collected while
    sampling the anchor trajectory; teacher forcing on that trajectory gives the same logits.
    """
    cond, uncond = teacher_branches(params, anchor_text, anchor_mask, x, schedule, cfg, h_div_w_template)
    return cfg_mix(cond, uncond, guidance, tau)


teacher_logits_jit = jax.jit(teacher_logits, static_argnames=("schedule", "cfg", "h_div_w_template"))
teacher_branches_jit = jax.jit(teacher_branches, static_argnames=("schedule", "cfg", "h_div_w_template"))


def pad_compact_text(kv_compact: np.ndarray, lens: np.ndarray, max_len: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's compact text (rows of all prompts concatenated, + lengths) -> padded [B, T, C] and mask [B, T]."""
    lens = [int(n) for n in np.asarray(lens)]
    if sum(lens) != kv_compact.shape[0]:
        raise ValueError(f"lengths {lens} do not fit {kv_compact.shape[0]} compact rows")
    return pad_rows(np.split(kv_compact, np.cumsum(lens)[:-1]), max_len)


# ---- objectives -----------------------------------------------------------------------------------------


def _split_rng(rng: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    if rng is None:
        return None, None
    first, second = jax.random.split(rng)
    return first, second


def _student(train, params, text, mask, batch, rng, cfg, schedule, scfg) -> jax.Array:
    return apply.forward(optim.merge_trainable(params, train), text, mask, batch["x_BLC_wo_prefix"], schedule,
                         cfg=cfg, h_div_w_template=scfg.h_div_w_template, rng=rng)


def _erase_objective(train, params, batch, rng, cfg, schedule, scfg):
    logits = _student(train, params, batch["target_text"], batch["target_mask"], batch, rng, cfg, schedule, scfg)
    arrays = {"student_logits": logits, **{k: batch[k] for k in OPTIONAL_BATCH_KEYS if k in batch}}
    loss, aux = get_erase_loss(scfg.erase_loss)(arrays, schedule=schedule, **scfg.loss_kwargs())
    return loss, (logits, aux)


def _preserve_objective(train, params, batch, rng, cfg, schedule, scfg, reg_lambda):
    logits = _student(train, params, batch["anchor_text"], batch["anchor_mask"], batch, rng, cfg, schedule, scfg)
    loss, aux = preservation_loss(logits, batch["teacher_logits"], reg_lambda)
    return loss, (logits, aux)


def _check_batch(batch: Batch, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; it has {sorted(batch)}")


def _erase_keys(scfg: SvareConfig) -> tuple[str, ...]:
    return ("target_text", "target_mask", "x_BLC_wo_prefix") + REQUIRED_ARRAYS[scfg.erase_loss]


_PRESERVE_KEYS = ("anchor_text", "anchor_mask", "x_BLC_wo_prefix", "teacher_logits")


def _apply_grads(params, opt_state, train, grads, scfg):
    """clip + AdamW on the trainable dict; returns (params, opt_state, pre-clip norm, clip coef, lr)."""
    hyper = opt_state.hyperparams
    norm = optim.global_norm_torch(grads)
    coef = optim.clip_coef_torch(norm, hyper["max_grad_norm"], bf16=optim.all_bf16(grads))
    updates, opt_state = optim.make_optimizer(scfg.optim).update(grads, opt_state, train)
    new_params = optim.merge_trainable(params, optax.apply_updates(train, updates))
    return new_params, opt_state, norm, coef, hyper["learning_rate"]


def _keep_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {}
    for src, dst in (("kept_fraction", "kept_fraction"), ("kept_fraction_per_scale", "kept_fraction_per_scale"),
                     ("mean_token_error_rate", "token_error_rate")):
        if src in aux:
            out[dst] = aux[src]
    return out


def erase_update(params: nnx.State, opt_state: optax.OptState, batch: Batch, rng: jax.Array | None = None, *,
                 cfg: InfinityConfig, schedule: schedules.Schedule, scfg: SvareConfig = SvareConfig(),
                 diagnostics: bool = False) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
    """One erase step (un-jitted; `erase_step` is the jitted one)."""
    _check_batch(batch, _erase_keys(scfg))
    train = optim.trainable_params(params, scfg.optim.trainable)
    (loss, (logits, aux)), grads = jax.value_and_grad(_erase_objective, has_aux=True)(
        train, params, batch, rng, cfg, schedule, scfg)
    params, opt_state, norm, coef, lr = _apply_grads(params, opt_state, train, grads, scfg)
    metrics = {"loss_erase": loss, "grad_norm_erase": norm, "clip_coef_erase": coef, "lr": lr,
               "adam_step": optim.adam_step_count(opt_state), **_keep_metrics(aux)}
    if diagnostics:
        metrics.update(logits_erase=logits, grads_erase=grads)
        if "keep_mask" in aux:
            metrics["keep_mask"] = aux["keep_mask"]
            metrics["token_error_rate_BL"] = aux["token_error_rate"]
    return params, opt_state, metrics


def preserve_update(params: nnx.State, opt_state: optax.OptState, batch: Batch, rng: jax.Array | None = None, *,
                    cfg: InfinityConfig, schedule: schedules.Schedule, scfg: SvareConfig = SvareConfig(),
                    diagnostics: bool = False) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
    """One preserve step (un-jitted; `preserve_step` is the jitted one)."""
    _check_batch(batch, _PRESERVE_KEYS)
    train = optim.trainable_params(params, scfg.optim.trainable)
    (loss, (logits, aux)), grads = jax.value_and_grad(_preserve_objective, has_aux=True)(
        train, params, batch, rng, cfg, schedule, scfg, scfg.reg_lambda)
    params, opt_state, norm, coef, lr = _apply_grads(params, opt_state, train, grads, scfg)
    metrics = {"loss_pre": loss, "grad_norm_pre": norm, "clip_coef_pre": coef, "lr": lr,
               "adam_step": optim.adam_step_count(opt_state), "kl_bit": aux["kl_bit"]}
    if diagnostics:
        metrics.update(logits_pre=logits, grads_pre=grads)
    return params, opt_state, metrics


def alternating_update(params: nnx.State, opt_state: optax.OptState, batch: Batch, rng: jax.Array | None = None, *,
                       cfg: InfinityConfig, schedule: schedules.Schedule, scfg: SvareConfig = SvareConfig(),
                       diagnostics: bool = False) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
    """The official iteration (un-jitted): erase step, then preserve step on the updated weights."""
    rng_erase, rng_pre = _split_rng(rng)
    kw = dict(cfg=cfg, schedule=schedule, scfg=scfg, diagnostics=diagnostics)
    params, opt_state, m_erase = erase_update(params, opt_state, batch, rng_erase, **kw)
    if diagnostics:
        m_erase["trainable_after_erase"] = optim.trainable_params(params, scfg.optim.trainable)
    params, opt_state, m_pre = preserve_update(params, opt_state, batch, rng_pre, **kw)
    return params, opt_state, {**m_erase, **m_pre}


def summed_update(params: nnx.State, opt_state: optax.OptState, batch: Batch, rng: jax.Array | None = None, *,
                  cfg: InfinityConfig, schedule: schedules.Schedule, scfg: SvareConfig = SvareConfig(),
                  diagnostics: bool = False) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
    """One step on L_FCE + summed_lambda * KL_bit, both passes on the same weights (un-jitted)."""
    _check_batch(batch, _erase_keys(scfg) + _PRESERVE_KEYS)
    rng_erase, rng_pre = _split_rng(rng)
    train = optim.trainable_params(params, scfg.optim.trainable)

    def objective(train):
        loss_erase, (logits_erase, aux_erase) = _erase_objective(train, params, batch, rng_erase, cfg, schedule, scfg)
        kl64, (logits_pre, aux_pre) = _preserve_objective(train, params, batch, rng_pre, cfg, schedule, scfg, 1.0)
        total = loss_erase + scfg.summed_lambda * aux_pre["kl_bit"]
        return total, (loss_erase, kl64, aux_pre["kl_bit"], logits_erase, logits_pre, aux_erase)

    (total, (loss_erase, kl64, kl_bit, logits_erase, logits_pre, aux)), grads = jax.value_and_grad(
        objective, has_aux=True)(train)
    params, opt_state, norm, coef, lr = _apply_grads(params, opt_state, train, grads, scfg)
    metrics = {"loss_total": total, "loss_erase": loss_erase, "loss_pre": scfg.reg_lambda * kl64, "kl_bit": kl_bit,
               "grad_norm": norm, "clip_coef": coef, "lr": lr, "adam_step": optim.adam_step_count(opt_state),
               **_keep_metrics(aux)}
    if diagnostics:
        metrics.update(logits_erase=logits_erase, logits_pre=logits_pre, grads=grads)
        if "keep_mask" in aux:
            metrics["keep_mask"] = aux["keep_mask"]
    return params, opt_state, metrics


_STATIC = ("cfg", "schedule", "scfg", "diagnostics")


def jit_step(update_fn, *, donate: bool = False):
    """Jits one of the `*_update` functions with cfg / schedule / scfg / diagnostics static.

    The returned step normalises `scfg` (its optimiser hyperparameters are state, so changing them does
    not recompile). With `donate=True` params and opt_state are donated (their buffers are reused for
    the outputs; do not use the inputs afterwards), which a full-size run wants.
    """
    compiled = jax.jit(update_fn, static_argnames=_STATIC, donate_argnums=(0, 1) if donate else ())

    @functools.wraps(update_fn)
    def step(params, opt_state, batch, rng=None, *, cfg, schedule, scfg=SvareConfig(), diagnostics=False):
        return compiled(params, opt_state, dict(batch), rng, cfg=cfg, schedule=schedules.as_schedule(schedule),
                        scfg=scfg.static(), diagnostics=diagnostics)

    step.__doc__ = f"Jitted `{update_fn.__name__}` (cfg, schedule, scfg, diagnostics static)."
    step.compiled = compiled
    return step


erase_step = jit_step(erase_update)
preserve_step = jit_step(preserve_update)
alternating_iteration = jit_step(alternating_update)
summed_iteration = jit_step(summed_update)
