"""Tolerances of the parity tests, derived from float32 rounding and from what propagates into a value.

A parity bound has two parts, both computed from the fixture (never from the code under test):

* rounding: two float32 implementations of the same formula that differ only in summation order
  differ by a few units of EPS32 times the scale of the quantity (the magnitude of the terms that are
  summed or cancelled), growing like the square root of the number of rounded terms (rounding errors
  of different summation orders are uncorrelated: a random walk). `rounding_bound` is that model
  with a small explicit factor k;
* propagation: a value computed from inputs that already differ (logits after a parameter update
  that differed, a loss of logits that differ) moves by its first-order sensitivity to those inputs
  times their difference. The sensitivities here are closed forms evaluated in float64 numpy on the
  fixture's reference values: the torch AdamW step (`adam_sensitivities`), the S-VARE losses'
  gradients w.r.t. the logits (`fce_logit_grad`, `preservation_logit_grad`).

Each test states next to a bound the value it measured on the shipped fixture, so that a reader sees
how much room is left; a plausible bug (a dropped term, a wrong scale, a missing bf16 cast) moves a
value by far more than these bounds.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: the float32 spacing at 1
BF16_OVER_F32_SPACING = 2.0 ** 16  # bfloat16 keeps 8 significant bits, float32 24


def ulp(x) -> np.ndarray:
    """Elementwise float32 spacing at |x|."""
    return np.spacing(np.abs(np.asarray(x, np.float32)))


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def rounding_bound(scale, terms: float = 1.0, k: float = 4.0):
    """k * EPS32 * scale * sqrt(terms): the summation-order difference of a float32 result.

    `scale` is the magnitude of what is rounded (e.g. max |reference|, or per element), `terms` the
    length of the reduction that produced it; k a small factor that each caller explains.
    """
    return k * EPS32 * np.asarray(scale, np.float64) * np.sqrt(float(terms))


def bf16_flip_rms_ratio(max_f32_ulps: float) -> float:
    """Expected rms(error of a bf16-rounding emulation) / rms(effect of the bf16 rounding itself).

    Upstream rounds a float32 tensor to bfloat16; we round our float32 value of it, which differs from
    upstream's by at most `max_f32_ulps` float32 ulps. Both round to the same bfloat16 value except
    where a bfloat16 rounding boundary falls between the two, with probability
    p = max_f32_ulps / 2**16 per element; there the results differ by one bfloat16 ulp. The rounding
    itself moves each element by a uniform error of rms ulp / sqrt(12). Through the same (linear, to
    first order) propagation to the logits, the ratio of the rms effects is sqrt(p * 12).
    """
    return float(np.sqrt(12.0 * max_f32_ulps / BF16_OVER_F32_SPACING))


# ---- the S-VARE losses' gradients w.r.t. the student logits, from the formulas (float64) -------------


def _pairs(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    return z.reshape(*z.shape[:-1], -1, 2)


def _softmax2(pairs: np.ndarray) -> np.ndarray:
    e = np.exp(pairs - pairs.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def fce_logit_grad(student_logits, gt_bits, keep_mask) -> np.ndarray:
    """dL_FCE/dz = keep[b,l] * (softmax(z) - onehot(gt)) / (32 L B) (fixture config: grad_L_FCE)."""
    pairs = _pairs(student_logits)
    B, L, d, _ = pairs.shape
    onehot = np.eye(2)[np.asarray(gt_bits, np.int64)]
    g = np.asarray(keep_mask, np.float64)[..., None, None] * (_softmax2(pairs) - onehot) / (d * L * B)
    return g.reshape(np.shape(student_logits))


def preservation_logit_grad(student_logits, teacher_logits, reg_lambda: float) -> np.ndarray:
    """dL_Pre/dz = reg_lambda * (q - p_t) / (64 L B) (fixture config: grad_L_Pre)."""
    q, p = _softmax2(_pairs(student_logits)), _softmax2(_pairs(teacher_logits))
    B, L, d, _ = q.shape
    return (reg_lambda * (q - p) / (2 * d * L * B)).reshape(np.shape(student_logits))


def loss_bound_from_logits(logit_grad, logits_err, loss_ref, terms: int, k: float = 4.0) -> float:
    """|L(z) - L(z_ref)| <= sum |dL/dz| |z - z_ref| (first order; the second order is below 1e-3 of it
    for logit errors ~1e-5, as both losses' Hessians are <= 1/4 per pair) plus the float32 rounding of
    the loss itself, a pairwise mean over `terms` entries: k eps |L| sqrt(log2 terms) (the rounding
    errors of the log2(terms) levels of a pairwise sum add as a random walk)."""
    first = float(np.sum(np.abs(logit_grad) * np.abs(np.asarray(logits_err, np.float64))))
    return 1.01 * first + float(rounding_bound(abs(float(loss_ref)), np.log2(terms), k))


# ---- torch AdamW: sensitivity of the updated parameters to the gradients (float64) -------------------


def adam_sensitivities(g1, g2, d1, d2, lr: float, wd: float, b1: float, b2: float, eps: float):
    """First-order bounds S(p1), S(p2), S(p2 - p1) on how far two torch AdamW steps (fresh state, the
    update of torch.optim.AdamW written out) move the parameters when the (clipped) gradients of step
    1 and 2 are off by at most d1, d2 elementwise: S = sum_s |dp/dg_s| d_s.

    Step 1: u1 = -lr g1 / (|g1| + eps) (bias corrections cancel at t = 1); its derivative
    lr eps / (|g1| + eps)^2 is taken at the smallest |g1| in [|g1| - d1, |g1| + d1], a rigorous
    bound. Step 2: u2 = -lr M / (s + eps), M = (b1 (1-b1) g1 + (1-b1) g2) / (1 - b1^2),
    s = sqrt((b2 (1-b2) g1^2 + (1-b2) g2^2) / (1 - b2^2)); its derivatives are taken at (g1, g2)
    (the callers double S for the second order). Decoupled weight decay multiplies p1 by
    (1 - lr wd) in step 2 (wd = 0 for the undecayed tensors).

    Evaluate at the fixture's reference gradients where they are stored: the bound then depends on
    the reference and on the measured difference only, not on the optimiser under test.
    """
    g1, g2, d1, d2 = (np.asarray(x, np.float64) for x in (g1, g2, d1, d2))
    du1_dg1 = lr * eps / (np.maximum(np.abs(g1) - d1, 0.0) + eps) ** 2
    c1, c2 = 1.0 - b1 ** 2, 1.0 - b2 ** 2
    M = (b1 * (1 - b1) * g1 + (1 - b1) * g2) / c1
    s = np.sqrt((b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2) / c2)
    # ds/dg_k = w_k g_k / (c2 s) with |g_k| / s <= sqrt(c2 / w_k): bounded, and 0/0 where s = 0.
    safe_s = np.where(s > 0, s, 1.0)
    ds1 = np.where(s > 0, b2 * (1 - b2) * g1 / (c2 * safe_s), np.sqrt(b2 * (1 - b2) / c2))
    ds2 = np.where(s > 0, (1 - b2) * g2 / (c2 * safe_s), np.sqrt((1 - b2) / c2))
    du2_dg1 = -lr * (b1 * (1 - b1) / c1 / (s + eps) - M / (s + eps) ** 2 * ds1)
    du2_dg2 = -lr * ((1 - b1) / c1 / (s + eps) - M / (s + eps) ** 2 * ds2)
    decay = 1.0 - lr * wd
    # dp1/dg1 = -du1_dg1 (sign irrelevant below: the chain through p1 enters p2 with factor `decay`).
    s_p1 = du1_dg1 * d1
    s_p2 = np.abs(-decay * du1_dg1 + du2_dg1) * d1 + np.abs(du2_dg2) * d2
    s_step2 = np.abs(lr * wd * du1_dg1 + du2_dg1) * d1 + np.abs(du2_dg2) * d2
    return s_p1, s_p2, s_step2


def adamw_first_step(p0, grad, lr: float, wd: float, b1: float, b2: float, eps: float) -> np.ndarray:
    """torch.optim.AdamW's first step from a fresh state, in numpy float32 in torch's order of operations:
    p *= 1 - lr wd; m = (1 - b1) g; v = (1 - b2) g^2; p -= lr / (1 - b1) * m / (sqrt(v) / sqrt(1 - b2) + eps).
    (Float32 matters: 1 - lr wd itself rounds, which moves p by up to ~25 ulp against a float64 rebuild.)
    Equals torch's result but for about one element in 10^4, by one ulp (measured on svare_tiny)."""
    f32 = np.float32
    g = np.asarray(grad, f32)
    p = np.asarray(p0, f32) * f32(1.0 - lr * wd)
    m, v = f32(1.0 - b1) * g, f32(1.0 - b2) * g * g
    denom = np.sqrt(v) / f32(np.sqrt(1.0 - b2)) + f32(eps)
    return (p - f32(lr / (1.0 - b1)) * m / denom).astype(f32)
