"""S-VARE losses (and the baselines of the paper's ablations) as pure functions on logits.

Layout (as everywhere in varejax): logits [B, L, 2d] are read as [B, L, d, 2], bit k of a token using
entries (2k, 2k + 1) = (class 0, class 1). L counts the tokens of ALL scales, the 1x1 scale included.
Every loss is computed in float32 and returns `(scalar loss, aux dict)`.

Official S-VARE (erase_trainer.InfinityTrainer.train_step), reproduced exactly:

  L_FCE = mean_b (1/L) sum_l keep[b,l] * mean_k ce[b,l,k]
      ce    per-bit 2-class cross entropy of the gt bit,
      wrong = ce > ln 2 (strict, in float32: an exact tie, ce == float32(ln 2), is NOT wrong),
      keep  = mean_k wrong >= alpha (alpha 0.25: >= 8 of 32 bits wrong), a constant (no gradient).
  L_Pre = reg_lambda * mean_b (1/L) sum_l mean_{64 entries} KL_terms
      KL_terms = xlogy(p_t, p_t) - p_t * log_softmax(student) per entry (torch F.kl_div, forward
      KL(teacher || student)); the mean over the 2d entries is half the per-bit KL. reg_lambda 0.5.

Baselines (`get_erase_loss(name)`), all teacher-forced on the same anchor trajectory, all with the
uniform signature `fn(arrays, *, schedule=None, num_tokens=None, **hyper) -> (loss, aux)` where
`arrays` is a dict with (as needed):

  student_logits         [B, L, 2d]  the model being fine-tuned, text c* (erase pass)
  gt_bits                [B, L, d]   the anchor trajectory's bits
  teacher_logits         [B, L, 2d]  the frozen model on the anchor text c (S-VARE: CFG-mixed)
  frozen_concept_logits  [B, L, 2d]  the frozen model on the target text c* (ESD only)

  plain_ce          CE to the gt bits with every token kept (= fce with alpha 0).
  fce               S-VARE's filtered CE (alpha from the keyword, default 0.25).
  vare_basic        VARE "Eq. 7": per bit, || p_student(.|c*) - p_teacher(.|c) ||_2^2 over the 2 classes
                    (= 2 (p1_s - p1_t)^2), mean over the d bits, (1/L) sum over tokens, mean over batch.
  esd               ESD-style negative guidance on logits: per bit the target distribution is
                    softmax(l_c - eta (l_c* - l_c)) with l_c = teacher_logits (frozen, anchor c),
                    l_c* = frozen_concept_logits (frozen, concept c*), eta = 1.0 by default; loss =
                    KL(target || p_student(.|c*)), mean over bits, (1/L) sum over tokens, mean over batch.
  concept_ablation  Concept Ablation (model-based anchor): KL(p_teacher(.|c) || p_student(.|c*)) with the
                    frozen anchor distribution as soft target, same reduction as esd.

All reductions divide by L (all scales; `num_tokens` overrides the divisor), never by kept tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from varejax.models import schedules
from varejax.models.bit_loss import bit_cross_entropy, bit_logits

F32 = jnp.float32
# The official threshold: python math.log(2.0) compared with a float32 tensor (rounded to float32).
LN2_F32 = float(np.float32(math.log(2.0)))

Aux = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Aux]]


def _divisor(logits_BLV: jax.Array, num_tokens: int | None) -> int:
    return int(logits_BLV.shape[1] if num_tokens is None else num_tokens)


def _token_mean(per_token_BL: jax.Array, num_tokens: int) -> jax.Array:
    """mean_b sum_l x[b, l] * (1/L), in the official order (multiply by 1/L, then sum, then mean)."""
    return jnp.mean(jnp.sum(per_token_BL * (1.0 / num_tokens), axis=-1))


def per_scale_mean(values_BL: jax.Array, schedule: schedules.Schedule) -> jax.Array:
    """[num_scales] mean of values over the batch and over the tokens of each scale."""
    schedule = schedules.as_schedule(schedule)
    ids = schedules.scale_ids(schedule)
    if values_BL.shape[1] != ids.shape[0]:
        raise ValueError(f"{values_BL.shape[1]} tokens, but schedule {schedule} has {ids.shape[0]}")
    counts = np.bincount(ids, minlength=len(schedule)).astype(np.float32) * values_BL.shape[0]
    sums = jax.ops.segment_sum(jnp.sum(values_BL.astype(F32), axis=0), jnp.asarray(ids), len(schedule))
    return sums / jnp.asarray(counts)


def fce_loss(student_logits_BLV: jax.Array, gt_bits_BLd: jax.Array, alpha: float = 0.25,
             num_tokens: int | None = None, schedule: schedules.Schedule | None = None) -> tuple[jax.Array, Aux]:
    """S-VARE's filtered cross entropy L_FCE (see the module docstring).

    Args:
      student_logits_BLV: [B, L, 2d] logits of the model under the target text c*.
      gt_bits_BLd: [B, L, d] integer bits of the anchor trajectory.
      alpha: keep a token when its fraction of wrong bits is >= alpha (0 keeps every token).
      num_tokens: the divisor L (default: the logits' L).
      schedule: when given, aux has the kept fraction per scale.

    Returns:
      (loss, aux): aux has bit_ce [B, L, d], bit_wrong [B, L, d] (bool), token_error_rate [B, L],
      keep_mask [B, L] (float 0/1), kept_fraction and mean_token_error_rate (scalars), and
      kept_fraction_per_scale [num_scales] when a schedule is given.
    """
    ce = bit_cross_entropy(student_logits_BLV, gt_bits_BLd)
    pairs = jax.lax.stop_gradient(bit_logits(student_logits_BLV.astype(F32)))
    # An exact tie has ce == float32(ln 2) upstream (not wrong); the explicit tie test keeps that true on
    # backends whose log(2) is not correctly rounded.
    wrong = (jax.lax.stop_gradient(ce) > LN2_F32) & (pairs[..., 0] != pairs[..., 1])
    error_rate = jnp.mean(wrong.astype(F32), axis=-1)
    keep = jax.lax.stop_gradient((error_rate >= alpha).astype(F32))
    loss = _token_mean(jnp.mean(ce, axis=-1) * keep, _divisor(student_logits_BLV, num_tokens))
    aux = {"bit_ce": ce, "bit_wrong": wrong, "token_error_rate": error_rate, "keep_mask": keep,
           "kept_fraction": jnp.mean(keep), "mean_token_error_rate": jnp.mean(error_rate)}
    if schedule is not None:
        aux["kept_fraction_per_scale"] = per_scale_mean(keep, schedule)
    return loss, aux


def preservation_kl_terms(student_logits_BLV: jax.Array, teacher_logits_BLV: jax.Array) -> jax.Array:
    """[B, L, d, 2] entries of KL(teacher || student) per bit: xlogy(p_t, p_t) - p_t log q (teacher constant)."""
    teacher = jax.lax.stop_gradient(bit_logits(teacher_logits_BLV.astype(F32)))
    p_t = jax.nn.softmax(teacher, axis=-1)
    log_q = jax.nn.log_softmax(bit_logits(student_logits_BLV.astype(F32)), axis=-1)
    return jax.scipy.special.xlogy(p_t, p_t) - p_t * log_q


def preservation_loss(student_logits_BLV: jax.Array, teacher_logits_BLV: jax.Array, reg_lambda: float = 0.5,
                      num_tokens: int | None = None) -> tuple[jax.Array, Aux]:
    """S-VARE's preservation loss L_Pre (official scaling: mean over the 2d entries, times reg_lambda).

    Teacher probabilities that underflow to 0 contribute exactly 0 (torch's xlogy semantics).

    Returns:
      (loss, aux): aux has kl_token [B, L] (mean over the 2d entries, before 1/L and reg_lambda) and
      kl_bit (scalar: mean_b (1/L) sum_l mean_k KL_k, i.e. the unscaled per-bit KL).
    """
    kl = preservation_kl_terms(student_logits_BLV, teacher_logits_BLV)
    B, L = kl.shape[:2]
    kl_token = jnp.mean(kl.reshape(B, L, -1), axis=-1)
    unscaled = _token_mean(kl_token, _divisor(student_logits_BLV, num_tokens))
    return unscaled * reg_lambda, {"kl_token": kl_token, "kl_bit": 2.0 * unscaled}


# ---- baselines -------------------------------------------------------------------------------------


def _soft_target_kl(student_logits_BLV: jax.Array, target_logits_Bld2: jax.Array, num_tokens: int) -> jax.Array:
    """mean_b (1/L) sum_l mean_k KL(softmax(target) || softmax(student)) per bit (target constant)."""
    target = jax.lax.stop_gradient(target_logits_Bld2.astype(F32))
    p_t = jax.nn.softmax(target, axis=-1)
    log_q = jax.nn.log_softmax(bit_logits(student_logits_BLV.astype(F32)), axis=-1)
    kl_bit = jnp.sum(jax.scipy.special.xlogy(p_t, p_t) - p_t * log_q, axis=-1)
    return _token_mean(jnp.mean(kl_bit, axis=-1), num_tokens)


def _require(arrays: Mapping[str, jax.Array], name: str, *keys: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"erase loss {name!r} needs arrays {missing}; got {sorted(arrays)}")


def _fce_entry(arrays: Mapping[str, jax.Array], *, schedule=None, num_tokens=None, alpha: float = 0.25):
    _require(arrays, "fce", "student_logits", "gt_bits")
    return fce_loss(arrays["student_logits"], arrays["gt_bits"], alpha, num_tokens, schedule)


def _plain_ce_entry(arrays: Mapping[str, jax.Array], *, schedule=None, num_tokens=None):
    _require(arrays, "plain_ce", "student_logits", "gt_bits")
    return fce_loss(arrays["student_logits"], arrays["gt_bits"], 0.0, num_tokens, schedule)


def _vare_basic_entry(arrays: Mapping[str, jax.Array], *, schedule=None, num_tokens=None):
    _require(arrays, "vare_basic", "student_logits", "teacher_logits")
    student = arrays["student_logits"]
    p_s = jax.nn.softmax(bit_logits(student.astype(F32)), axis=-1)
    p_t = jax.lax.stop_gradient(jax.nn.softmax(bit_logits(arrays["teacher_logits"].astype(F32)), axis=-1))
    sq = jnp.sum(jnp.square(p_s - p_t), axis=-1)  # [B, L, d]
    return _token_mean(jnp.mean(sq, axis=-1), _divisor(student, num_tokens)), {"sq_dist_bit": sq}


def esd_target_logits(anchor_logits_BLV: jax.Array, concept_logits_BLV: jax.Array, eta: float = 1.0) -> jax.Array:
    """[B, L, d, 2] ESD negative-guidance target logits l_c - eta (l_c* - l_c), per bit."""
    anchor = bit_logits(anchor_logits_BLV.astype(F32))
    return anchor - eta * (bit_logits(concept_logits_BLV.astype(F32)) - anchor)


def _esd_entry(arrays: Mapping[str, jax.Array], *, schedule=None, num_tokens=None, eta: float = 1.0):
    _require(arrays, "esd", "student_logits", "teacher_logits", "frozen_concept_logits")
    student = arrays["student_logits"]
    target = esd_target_logits(arrays["teacher_logits"], arrays["frozen_concept_logits"], eta)
    return _soft_target_kl(student, target, _divisor(student, num_tokens)), {}


def _concept_ablation_entry(arrays: Mapping[str, jax.Array], *, schedule=None, num_tokens=None):
    _require(arrays, "concept_ablation", "student_logits", "teacher_logits")
    student = arrays["student_logits"]
    return _soft_target_kl(student, bit_logits(arrays["teacher_logits"]), _divisor(student, num_tokens)), {}


ERASE_LOSSES: dict[str, LossFn] = {
    "fce": _fce_entry,
    "plain_ce": _plain_ce_entry,
    "vare_basic": _vare_basic_entry,
    "esd": _esd_entry,
    "concept_ablation": _concept_ablation_entry,
}
# Which optional arrays each loss reads (beyond student_logits).
REQUIRED_ARRAYS: dict[str, tuple[str, ...]] = {
    "fce": ("gt_bits",),
    "plain_ce": ("gt_bits",),
    "vare_basic": ("teacher_logits",),
    "esd": ("teacher_logits", "frozen_concept_logits"),
    "concept_ablation": ("teacher_logits",),
}


def get_erase_loss(name: str) -> LossFn:
    """The erase loss `name` (see ERASE_LOSSES): fn(arrays, *, schedule=None, num_tokens=None, **hyper)."""
    try:
        return ERASE_LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown erase loss {name!r}; known: {sorted(ERASE_LOSSES)}") from None
