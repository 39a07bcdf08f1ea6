"""S-VARE steps: one official iteration against the PyTorch trainer (train_step.npz), and unit properties.

Parity (per fixture folder with train_step.npz, per lr/clip variant and the `sampled` anchor run), from the
converted Infinity model with the fixture inputs:

* clip coefficients: relative <= 1e-5; keep masks and token error rates exact.
* erase pass (on the common initial weights): student logits <= LOGITS_TOL = 1e-5 max abs (the fixture
  README's fp32 tolerance; measured 3.6e-6), pre-clip grad norm relative <= 1e-5 (measured 9.7e-7).
* preserve pass (on the weights AFTER the erase step, which carry the parameter difference
  delta1 = p1 - p1_official): logits <= LOGITS_TOL + 2 |J delta1| elementwise, J delta1 one forward-mode
  pass of our forward (the forward itself is held at LOGITS_TOL above). p1_official is stored in full
  (p0 + update_fce) or rebuilt in numpy from the stored official step-1 gradient with torch's AdamW
  formula (tolerances.adamw_first_step), and then our p1 is checked against it element by element
  (5 ulp + 8 eps |u1| + 2 S1: the lr 1e-3 runs had step-1 summaries only before); where no official
  gradient exists (the sampled run: the rebuild then starts from our gradient) the worst
  case sum_i |dz/dp_i| 2 S1_i of the unknown gradient difference is added, logit by logit. At lr 1e-3
  J delta1 reaches 3.2e-6 (logits error 7.5e-6): a fixed 1e-5 is exceeded on fixtures of other sizes.
  The pre-clip grad norm likewise: relative 1e-5 + 2 |(H g / ||g||) . delta1| / ||g|| (one Hessian-vector
  product).
* both losses: the first-order propagation of the measured logit errors through the official formulas'
  gradients w.r.t. the logits (closed forms in numpy, at the official logits) plus 4 eps |L|
  sqrt(log2 n) of float32 rounding (tolerances.loss_bound_from_logits). Measured <= 1.5e-8 against
  bounds 1.6e-7 .. 1.9e-6 (the relative 1e-5 before).
* frozen parameters bit-identical; the trainable set equals the official one.
* raw gradients (where stored): |g - g_ref| <= GRAD_AGREEMENT * max|g_ref| per tensor.
* parameters (where the updates are stored in full): |p - p_ref| <= 4 ulp(p_ref) + 8 eps |update_ref|
  + 2 S, with p_ref = before + update_fce (+ update_pre), kernels transposed. S is the first-order
  propagation of the gradient difference through torch's AdamW: S_i = sum_s |dp_i/dg_s,i| delta_s,i,
  from the closed form of the two AdamW steps in float64 numpy (tolerances.adam_sensitivities), evaluated
  at the official gradients where stored (else ours), with delta = |g - g_ref| where the official gradient
  is stored and GRAD_AGREEMENT * max|g| of the tensor where it is not: it depends on the fixture and the
  measured difference only, not on the optimiser under test. The factor 2 covers the second-order
  remainder. Why S is needed at all: Adam divides by sqrt(v) + eps, so
  the update of an element whose gradient is ~eps (1e-8) or whose second-step moment m2 = 0.09 g1 +
  0.1 g2 nearly cancels is as sensitive as lr / eps to its gradient; a float32 gradient difference of
  1e-10 (a different summation order: XLA vs torch's CPU GEMMs) then moves it far more than
  8 eps |update|. S is negligible elsewhere; the test prints how many elements need it (the 8 eps
  |update| was 1e-4 |update| before S was computed from the fixture: it also absorbed the gradient
  differences of well-conditioned elements; with the official gradients the worst element is at
  0.25 of the new bound, see test_optimizer_with_official_gradients).
* per-tensor summaries where only those exist (step1/2 delta absmax and sum): |absmax - ref| <= max_i tol_i
  and |sum - ref| <= sum_i tol_i, tol_i the per-element bound above (the sums are float64 sums of the
  float32 deltas in the fixture; the triangle inequality gives exactly these bounds).

The teacher: our teacher-forced conditional and unconditional logits each <= 1e-5 of the official ones;
`cfg_mix` of the official branches reproduces the official CFG logits to 1 ulp; our CFG logits are then
within the linear propagation 4 |dcond| + 3 |duncond| (+ 2 ulp) of the branch errors (the CFG mix
amplifies branch errors up to 7x, so it is not held to 1e-5 itself: see the printed max).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import fixtures, measured, svare_fixtures, tolerances
from varejax.checkpoint import load_infinity
from varejax.convert.infinity_keys import upstream_key
from varejax.erase import losses, optim, step
from varejax.models import apply
from varejax.models.config import InfinityConfig

REL = 1e-5
LOGITS_TOL = 1e-5
# The float32 rounding of an AdamW update: each side rounds m, v, sqrt, the division and the step (a
# handful of roundings of <= 1/2 ulp): 8 eps |update|, plus 4 ulp of the parameter for the final sums.
# It was 1e-4 |update| (840 eps), which also absorbed gradient differences: S does that now.
UPDATE_REL = 8 * tolerances.EPS32
GRAD_AGREEMENT = 5e-6  # measured <= 2.6e-6 of the tensor max on svare_tiny (XLA vs torch float32 reassociation)
SCHED = ((1, 1, 1), (1, 2, 2), (1, 4, 4))


def ulp(x):
    return np.spacing(np.abs(np.asarray(x, np.float32)))


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


# ---- fixture set-up ----------------------------------------------------------------------------------


def _variants():
    out = []
    for folder in svare_fixtures.folders_with("train_step.npz"):
        conf = fixtures.config(folder)
        names = list(conf.get("train_step", {}))
        if "train_step_sampled_anchor" in conf:
            names.append("sampled")
        out += [pytest.param(folder, v, id=f"{folder.name}-{v}") for v in names]
    missing = fixtures.missing_mark("no S-VARE fixture folder with train_step.npz")
    return out or [pytest.param(None, None, id="missing-fixture", marks=missing)]


def _trainable_mode(args: dict) -> str:
    if args.get("enable_lora"):
        pytest.fail("an official LoRA run cannot be checked: upstream's adapter initialisation and layout are "
                    "not recorded in the fixture")
    if args.get("enable_all_layer") or args.get("enable_sa_layer"):
        return "ca_ffn_sa"  # upstream's enable_all_layer trains sa + ca + ffn
    assert args.get("enable_ca_layer") and args.get("enable_ffn_layer")
    return "ca_ffn"


_SETUP: dict = {}


def _setup(folder, converted_infinity):
    if folder not in _SETUP:
        conf = fixtures.config(folder)
        common = conf["train_step_common"]
        args = common["args_used"]
        model_cfg, params = load_infinity(converted_infinity(svare_fixtures.model_folder(folder)))
        data = np.load(folder / "train_step.npz")
        anchor_text, anchor_mask = step.pad_compact_text(data["inputs__anchor_kv_compact"], data["inputs__anchor_lens"])
        target_text = data["inputs__target_text_feats_padded"]
        target_mask = svare_fixtures.text_mask(data["inputs__target_lens"], target_text.shape[1])
        b1, b2 = (float(x) for x in args["ada"].split("_"))
        ocfg = optim.OptimConfig(learning_rate=float(args["tlr"]), b1=b1, b2=b2, eps=float(args["oeps"]) or 1e-8,
                                 weight_decay=float(args["twd"]), max_grad_norm=float(args["tclip"]),
                                 trainable=_trainable_mode(args))
        scfg = step.SvareConfig(reg_lambda=float(args["reg_lambda"]), optim=ocfg)
        batch = dict(target_text=target_text, target_mask=target_mask, anchor_text=anchor_text,
                     anchor_mask=anchor_mask, x_BLC_wo_prefix=data["inputs__x_BLC_wo_prefix"],
                     gt_bits=data["inputs__gt_bits_BLd"], teacher_logits=data["teacher__logits_cfg"])
        _SETUP[folder] = dict(conf=conf, data=data, cfg=model_cfg, params=params, scfg=scfg, batch=batch,
                              sched=fixtures.schedule(common), teacher=common["teacher"])
    return _SETUP[folder]


def _student_logits(train, params, text, mask, x, schedule, cfg):
    return apply.forward(optim.merge_trainable(params, train), text, mask, x, schedule, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("schedule", "cfg"))
def _logit_sensitivity(train, params, text, mask, x, tol, index, *, schedule, cfg):
    """sum_i |d logits[index] / d p_i| tol_i: the first-order bound on how far one logit moves when the
    trainable parameters are off by at most `tol` elementwise (one reverse pass per logit)."""
    grad = jax.grad(lambda t: _student_logits(t, params, text, mask, x, schedule, cfg)[tuple(index)])(train)
    return sum(jnp.sum(jnp.abs(grad[k]) * tol[k]) for k in grad)


@functools.partial(jax.jit, static_argnames=("schedule", "cfg"))
def _logit_jvp(train, params, text, mask, x, delta, *, schedule, cfg):
    """J delta: the first-order change of every logit when the trainable parameters move by `delta`."""
    return jax.jvp(lambda t: _student_logits(t, params, text, mask, x, schedule, cfg), (train,), (delta,))[1]


@functools.partial(jax.jit, static_argnames=("schedule", "cfg", "reg_lambda"))
def _grad_norm_gradient(train, params, text, mask, x, teacher, grad, *, schedule, cfg, reg_lambda):
    """d ||g|| / dp = H g / ||g|| for the preservation loss (one Hessian-vector product)."""
    def loss(t):
        logits = _student_logits(t, params, text, mask, x, schedule, cfg)
        return losses.preservation_loss(logits, teacher, reg_lambda)[0]

    norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in grad.values()))
    return jax.jvp(jax.grad(loss), (train,), ({k: g / norm for k, g in grad.items()},))[1]


def _ref(data, name, path, cfg):
    key, transpose = upstream_key(path, cfg)
    if name.format(key=key) not in data:
        return None
    value = data[name.format(key=key)]
    return value.T if transpose else value


# ---- parity: one official iteration ------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("folder,variant", _variants())
def test_official_iteration(folder, variant, converted_infinity):
    s = _setup(folder, converted_infinity)
    conf, data, cfg, params, scfg = s["conf"], s["data"], s["cfg"], s["params"], s["scfg"]
    batch = dict(s["batch"])
    if variant == "sampled":
        info = conf["train_step_sampled_anchor"]
        teacher_key = info["teacher_used_for_training"].split()[0]
        batch.update(x_BLC_wo_prefix=data["sampled__x_BLC_wo_prefix"], gt_bits=data["sampled__gt_bits_BLd"],
                     teacher_logits=data[f"sampled__{teacher_key}"])
    else:
        info = conf["train_step"][variant]
    pre = f"{variant}__"
    record = f"{folder.name}/{variant}/"  # the prefix of this run's names in tests/measured.py
    opt_state = optim.set_hyperparams(step.init_opt_state(params, scfg), learning_rate=info["peak_lr"],
                                      max_grad_norm=info["tclip"])
    new, opt_state, m = step.alternating_iteration(params, opt_state, batch, cfg=cfg, schedule=s["sched"], scfg=scfg,
                                                   diagnostics=True)
    # -- exact quantities
    coefs = info.get("clip_coef_applied")
    if coefs is not None:
        for i, name in enumerate(("clip_coef_erase", "clip_coef_pre")):
            measured.check(record + name, rel(m[name], coefs[i]), REL, what="relative error")
    assert int(m["adam_step"]) == 2 and float(m["lr"]) == np.float32(info["peak_lr"])
    np.testing.assert_array_equal(np.asarray(m["keep_mask"]), data[pre + "fce_keep_mask"])
    np.testing.assert_array_equal(np.asarray(m["token_error_rate_BL"]), data[pre + "fce_token_error_rate"])
    assert int(np.asarray(m["keep_mask"]).sum()) == info["n_kept_tokens"]

    # -- frozen / trainable sets
    flat0, flat1, flat2 = apply.flat_params(params), m["trainable_after_erase"], apply.flat_params(new)
    mask = optim.trainable_mask(flat0, scfg.optim.trainable)
    assert {upstream_key(p, cfg)[0] for p, t in mask.items() if t} == set(data["trainable_param_names"].tolist())
    for path, trainable in mask.items():
        if not trainable:
            assert np.array_equal(np.asarray(flat2[path]), np.asarray(flat0[path])), f"frozen {path} changed"
        else:
            assert not np.array_equal(np.asarray(flat2[path]), np.asarray(flat0[path])), f"{path} unchanged"

    # -- gradient differences: measured where stored, else GRAD_AGREEMENT * max|g|
    report = {}
    g1 = {k: np.asarray(v) for k, v in m["grads_erase"].items()}
    g2 = {k: np.asarray(v) for k, v in m["grads_pre"].items()}
    step1_grads_pre = pre
    if variant != "sampled" and f"{pre}raw_grad_fce__{upstream_key(next(iter(g1)), cfg)[0]}" not in data:
        # Step 1 is identical in every lr/clip variant (same weights and inputs): reuse a stored one.
        for other, oinfo in conf["train_step"].items():
            if f"{other}__raw_grad_fce__{upstream_key(next(iter(g1)), cfg)[0]}" in data and all(
                    oinfo["per_tensor"][k]["raw_grad_fce_norm"] == info["per_tensor"][k]["raw_grad_fce_norm"]
                    for k in info["per_tensor"]):
                step1_grads_pre = f"{other}__"
                break

    def deltas(grads, name):
        """(|g - g_ref| or its bound, the reference gradient or ours where none is stored, worst measured)."""
        out, refs, ratios = {}, {}, []
        for path, g in grads.items():
            ref = _ref(data, name + "{key}", path, cfg)
            if ref is None:
                out[path], refs[path] = np.full_like(g, GRAD_AGREEMENT * np.abs(g).max()), g
            else:
                diff = np.abs(g - ref)
                ratios.append(float(diff.max() / np.abs(ref).max()))
                measured.check(record + name.split("__")[-2], ratios[-1], GRAD_AGREEMENT,
                               what="max abs error / max|g_ref| (worst tensor)")
                out[path], refs[path] = diff, ref
        return out, refs, (max(ratios) if ratios else None)

    d1, ref_g1, report["grad_fce_rel_to_max"] = deltas(g1, step1_grads_pre + "raw_grad_fce__")
    d2, ref_g2, report["grad_pre_rel_to_max"] = deltas(g2, pre + "raw_grad_pre__")
    # S: how far those gradient differences move the parameters through AdamW, from the closed form of
    # torch's update at the reference gradients (tolerances.adam_sensitivities: numpy, float64); the
    # clip coefficients are the official ones (checked above) where stored.
    c1, c2 = (float(x) for x in (coefs if coefs is not None else (m["clip_coef_erase"], m["clip_coef_pre"])))
    o, lr = scfg.optim, float(info["peak_lr"])
    S1, S2, Sd2 = {}, {}, {}
    for path in g1:
        S1[path], S2[path], Sd2[path] = tolerances.adam_sensitivities(
            c1 * ref_g1[path], c2 * ref_g2[path], c1 * d1[path], c2 * d2[path], lr, o.weight_decay, o.b1, o.b2, o.eps)

    # -- parameters in full where stored, per-tensor summaries everywhere
    n_strict_fail, n_extra_dominant, n_elems, worst = 0, 0, 0, 0.0
    for path in g1:
        key = upstream_key(path, cfg)[0]
        p0, p1, p2 = (np.asarray(x[path]) for x in (flat0, flat1, flat2))
        u1, u2 = _ref(data, pre + "update_fce__{key}", path, cfg), _ref(data, pre + "update_pre__{key}", path, cfg)
        checks = []
        if u1 is not None:
            r1 = p0 + u1
            checks.append((np.abs(p1 - r1), 4 * ulp(r1) + UPDATE_REL * np.abs(u1), 2 * S1[path]))
            if u2 is not None:
                r2 = r1 + u2
                checks.append((np.abs(p2 - r2), 4 * ulp(r2) + UPDATE_REL * (np.abs(u1) + np.abs(u2)), 2 * S2[path]))
        elif u2 is not None:  # only step 2 stored: compare the step-2 deltas
            checks.append((np.abs((p2 - p1) - u2), 4 * ulp(p1) + UPDATE_REL * np.abs(u2), 2 * Sd2[path]))
        for err, strict, extra in checks:
            measured.check_elementwise(record + "params", err, strict + extra,
                                       what="|p - p_ref| / (4 ulp + 8 eps |update| + 2 S), worst element")
            n_strict_fail += int((err > strict).sum())
            n_extra_dominant += int((extra > strict).sum())
            n_elems += err.size
            worst = max(worst, float((err / strict).max()))
        summary = info["per_tensor"][key]
        d1_ours, d2_ours = p1 - p0, p2 - p1
        tol1 = 4 * ulp(p1) + UPDATE_REL * np.abs(d1_ours) * (1 + 1e-3) + 2 * S1[path]
        tol2 = 4 * ulp(p2) + UPDATE_REL * np.abs(d2_ours) * (1 + 1e-3) + 2 * Sd2[path]
        for d, tol, i in ((d1_ours, tol1, 1), (d2_ours, tol2, 2)):
            err_max = abs(float(np.abs(d).max()) - summary[f"step{i}_delta_absmax"])
            err_sum = abs(float(d.astype(np.float64).sum()) - summary[f"step{i}_delta_sum"])
            measured.check_elementwise(record + f"step{i}_delta_absmax", err_max, tol.max(),
                                       what="abs error of a tensor's absmax / its bound (worst tensor)")
            measured.check_elementwise(record + f"step{i}_delta_sum", err_sum, tol.astype(np.float64).sum(),
                                       what="abs error of a tensor's sum / its bound (worst tensor)")
        for g, name in ((g1, "raw_grad_fce_norm"), (g2, "raw_grad_pre_norm")):
            measured.check(record + name, rel(np.linalg.norm(g[path].astype(np.float64)), summary[name]), REL,
                           what="relative error (worst tensor)")

    # -- logits and scalars. The erase pass runs on the common initial weights: pure forward rounding,
    # LOGITS_TOL. The preserve pass runs on the weights after the erase step, which differ from the
    # official ones by delta1 = p1 - p1_official: every logit may move by J delta1 (first order, one
    # forward-mode pass; doubled for the second order) on top of LOGITS_TOL.
    err_erase = np.abs(np.asarray(m["logits_erase"]) - data[pre + "student_logits_erase"])
    err_pre = np.abs(np.asarray(m["logits_pre"]) - data[pre + "student_logits_pre"])
    report["logits_erase"], report["logits_pre"] = float(err_erase.max()), float(err_pre.max())
    measured.check(record + "logits_erase", err_erase.max(), LOGITS_TOL)
    # The official weights after the erase step: stored in full (p0 + update_fce), else rebuilt from the
    # official step-1 gradient with torch's AdamW formula (numpy); `unknown` is the gradient-difference
    # allowance 2 S1 where no official gradient is stored (the rebuild then starts from ours).
    decay = {name: group["weight_decay"] for v in conf["train_step"].values() for group in v["param_groups"]
             for name in group["names"]}
    delta1, unknown, n_rebuilt_off, n_p1_rebuilt = {}, {}, 0, 0
    for path in g1:
        p0, p1 = np.asarray(flat0[path]), np.asarray(flat1[path])
        rebuilt = tolerances.adamw_first_step(p0, np.float32(c1) * ref_g1[path], lr,
                                              decay[upstream_key(path, cfg)[0]], o.b1, o.b2, o.eps)
        u1 = _ref(data, pre + "update_fce__{key}", path, cfg)
        if u1 is not None:  # the rebuild against the official weights (a check of the formula itself)
            n_rebuilt_off += int((rebuilt != p0 + u1).sum())
            measured.check_elementwise(record + "p1_rebuild_vs_official", np.abs(rebuilt - (p0 + u1)), ulp(p0 + u1),
                                       what="|numpy AdamW rebuild - official p1| / 1 ulp, worst element")
        else:  # no stored step-1 update: our p1 element by element against the rebuilt official one
            err = np.abs(p1 - rebuilt)  # the bound of the stored case, plus the rebuild's own 1 ulp
            measured.check_elementwise(record + "p1_vs_rebuilt_official", err,
                                       5 * ulp(rebuilt) + UPDATE_REL * np.abs(rebuilt - p0) + 2 * S1[path],
                                       what="|p1 - rebuilt official p1| / (5 ulp + 8 eps |update| + 2 S1), worst")
            n_p1_rebuilt += err.size
        official = p0 + u1 if u1 is not None else rebuilt
        delta1[path] = jnp.asarray(p1 - official)
        unknown[path] = jnp.asarray(0 * p1 if ref_g1[path] is not g1[path] else 2 * S1[path], jnp.float32)
    report["p1_rebuild_elements_off_by_1ulp"] = n_rebuilt_off
    report["p1_checked_against_rebuild"] = n_p1_rebuilt
    train1 = {k: jnp.asarray(v) for k, v in flat1.items()}
    params1 = optim.merge_trainable(params, train1)
    text, tmask, x = (batch[k] for k in ("anchor_text", "anchor_mask", "x_BLC_wo_prefix"))
    propagated = np.abs(np.asarray(_logit_jvp(train1, params1, text, tmask, x, delta1, schedule=s["sched"], cfg=cfg)))
    bound_pre = LOGITS_TOL + 2 * propagated
    if any(ref_g1[p] is g1[p] for p in g1):  # plus the worst case of the unknown part, logit by logit
        for index in [np.unravel_index(err_pre.argmax(), err_pre.shape), *map(tuple, np.argwhere(err_pre > bound_pre))]:
            bound_pre[index] += 2 * float(_logit_sensitivity(train1, params1, text, tmask, x, unknown,
                                                             np.asarray(index), schedule=s["sched"], cfg=cfg))
    report["logits_pre_propagated_max"] = float(propagated.max())
    report["logits_pre_over_bound"] = float((err_pre / bound_pre).max())
    measured.check_elementwise(record + "logits_pre", err_pre, bound_pre,
                               what="max abs error / (1e-5 + 2 |J delta1| (+ unknown part)), worst logit")
    # Losses: first-order propagation of the measured logit errors through the official formulas'
    # gradients w.r.t. the logits (at the official logits), plus the loss's own float32 rounding.
    reg_lambda = scfg.reg_lambda
    for name, ref_key, grad_z, err in (
            ("loss_erase", "loss_fce", tolerances.fce_logit_grad(
                data[pre + "student_logits_erase"], batch["gt_bits"], data[pre + "fce_keep_mask"]), err_erase),
            ("loss_pre", "loss_pre", tolerances.preservation_logit_grad(
                data[pre + "student_logits_pre"], batch["teacher_logits"], reg_lambda), err_pre)):
        ref = float(data[pre + ref_key])
        bound = tolerances.loss_bound_from_logits(grad_z, err, ref, terms=err.size)
        report[name] = abs(float(m[name]) - ref)
        report[name + "_bound"] = bound
        measured.check(record + name, report[name], bound, what="abs error")
    # Pre-clip gradient norms: the erase one at REL; the preserve one also inherits the parameter
    # difference through d||g||/dp = H g / ||g|| (one Hessian-vector product).
    report["grad_norm_erase"] = rel(m["grad_norm_erase"], data[pre + "grad_norm_fce_preclip"])
    measured.check(record + "grad_norm_erase", report["grad_norm_erase"], REL, what="relative error")
    norm_ref = float(data[pre + "grad_norm_pre_preclip"])
    hg = _grad_norm_gradient(train1, params1, text, tmask, x, batch["teacher_logits"],
                             {k: jnp.asarray(v) for k, v in g2.items()}, schedule=s["sched"], cfg=cfg,
                             reg_lambda=reg_lambda)
    known = abs(sum(float(jnp.vdot(hg[k], delta1[k])) for k in hg))
    unknown_worst = sum(float(jnp.sum(jnp.abs(hg[k]) * unknown[k])) for k in hg)  # 0 where official g1 stored
    report["grad_norm_pre"] = rel(m["grad_norm_pre"], norm_ref)
    report["grad_norm_pre_propagated_rel"] = known / norm_ref
    report["grad_norm_pre_unknown_rel"] = unknown_worst / norm_ref
    measured.check(record + "grad_norm_pre", abs(float(m["grad_norm_pre"]) - norm_ref),
                   REL * norm_ref + 2 * (known + unknown_worst), what="abs error (bound REL ||g|| + 2 |H g . delta1|)")

    report["params_checked_in_full"] = n_elems
    report["beyond_strict_bound"] = n_strict_fail
    report["S_term_larger_than_strict"] = n_extra_dominant
    report["max_err_over_strict_bound"] = worst
    print(f"{folder.name}-{variant}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in report.items()))
    # S is a correction for a few ill-conditioned elements, not a blanket loosening: where every gradient
    # difference is measured (not bounded by GRAD_AGREEMENT), few elements may need it (measured 245 of
    # 790528 on svare_tiny lr_default; with the step-2 gradients unstored, lr_1e_3 needs it in 1.8 %).
    if all(ref_g1[p] is not g1[p] and ref_g2[p] is not g2[p] for p in g1):
        measured.check(record + "params_beyond_strict_bound", n_strict_fail / max(n_elems, 1), 0.005,
                       what="fraction of elements beyond 4 ulp + 8 eps |update|")


@pytest.mark.parity
@pytest.mark.parametrize("folder", svare_fixtures.params_with("train_step.npz"))
def test_optimizer_with_official_gradients(folder, converted_infinity):
    """The stored official gradients through our clip + AdamW give the official parameters (strict bound)."""
    s = _setup(folder, converted_infinity)
    conf, data, cfg, params, scfg = s["conf"], s["data"], s["cfg"], s["params"], s["scfg"]
    train0 = optim.trainable_params(params, scfg.optim.trainable)
    key0 = upstream_key(next(iter(train0)), cfg)[0]
    ran = False
    for variant, info in conf["train_step"].items():
        stored = [k for k in ("fce", "pre") if f"{variant}__raw_grad_{k}__{key0}" in data]
        source = variant
        if "fce" not in stored:  # step-1 gradients are the same in every variant
            source = next((v for v in conf["train_step"] if f"{v}__raw_grad_fce__{key0}" in data), None)
            assert source is not None, f"{folder}: train_step.npz holds no official gradients (*__raw_grad_fce__*)"
            stored = ["fce"]
        tx = optim.make_optimizer(scfg.optim)
        state = optim.set_hyperparams(tx.init(train0), learning_rate=info["peak_lr"], max_grad_norm=info["tclip"])
        train, worst, exact = train0, 0.0, 0
        for i, kind in enumerate(stored):
            grads = {p: jnp.asarray(_ref(data, f"{source if kind == 'fce' else variant}__raw_grad_{kind}__{{key}}", p,
                                         cfg)) for p in train0}
            coef = optim.clip_coef_torch(optim.global_norm_torch(grads), info["tclip"])
            assert rel(coef, info["clip_coef_applied"][i]) <= REL
            updates, state = jax.jit(tx.update)(grads, state, train)
            new = optax.apply_updates(train, updates)
            for path in train:
                u = _ref(data, f"{variant}__update_{kind}__{{key}}", path, cfg)
                p_new, p_old = np.asarray(new[path]), np.asarray(train[path])
                if u is not None:
                    ref = p_old + u
                    err = np.abs(p_new - ref)
                    bound = 4 * ulp(ref) + UPDATE_REL * np.abs(u)
                    measured.check_elementwise(f"{folder.name}/{variant}/official_grads_params", err, bound,
                                               what="|p - p_ref| / (4 ulp + 8 eps |update|), worst element")
                    worst, exact = max(worst, float((err / bound).max())), exact + int((err == 0).sum())
                summary = info["per_tensor"][upstream_key(path, cfg)[0]]
                d = p_new - p_old
                tol = 4 * ulp(p_new) + UPDATE_REL * np.abs(d) * (1 + 1e-3)
                assert abs(float(np.abs(d).max()) - summary[f"step{i + 1}_delta_absmax"]) <= tol.max()
                assert abs(float(d.astype(np.float64).sum()) - summary[f"step{i + 1}_delta_sum"]) <= tol.sum()
            train = new
        ran = True
        what = f"worst err / strict bound {worst:.3g} ({exact} elements bit-exact)" if exact else "summaries only"
        print(f"{folder.name}-{variant}: steps {stored} with the official gradients: {what}")
    assert ran, f"{folder}: config.json lists no train_step variant"


@pytest.mark.parity
@pytest.mark.parametrize("folder", svare_fixtures.params_with("train_step.npz"))
def test_teacher_logits(folder, converted_infinity):
    s = _setup(folder, converted_infinity)
    data, cfg, params, batch = s["data"], s["cfg"], s["params"], s["batch"]
    guidance, tau = float(s["teacher"]["cfg"]), float(s["teacher"]["tau"])
    cond, uncond = (np.asarray(x) for x in step.teacher_branches_jit(
        params, batch["anchor_text"], batch["anchor_mask"], batch["x_BLC_wo_prefix"], s["sched"], cfg))
    err_c = np.abs(cond - data["teacher__logits_cond"])
    err_u = np.abs(uncond - data["teacher__logits_uncond"])
    measured.check(f"{folder.name}/teacher__logits_cond", err_c.max(), LOGITS_TOL)
    measured.check(f"{folder.name}/teacher__logits_uncond", err_u.max(), LOGITS_TOL)
    ref = data["teacher__logits_cfg"]
    mixed_ref = np.asarray(step.cfg_mix(data["teacher__logits_cond"], data["teacher__logits_uncond"], guidance, tau))
    assert np.all(np.abs(mixed_ref - ref) <= ulp(ref)), np.abs(mixed_ref - ref).max()
    ours = np.asarray(step.cfg_mix(cond, uncond, guidance, tau))
    err = np.abs(ours - ref)
    # Linear propagation of the branch errors, plus the float32 rounding of the two mixes (of the scaled
    # branches g*l_c, (1-g)*l_u and of their sum).
    c_ref, u_ref = data["teacher__logits_cond"] / tau, data["teacher__logits_uncond"] / tau
    rounding = 2 * (ulp(guidance * c_ref) + ulp((1 - guidance) * u_ref) + ulp(ref))
    bound = (abs(guidance) * err_c + abs(1 - guidance) * err_u) / tau + rounding
    measured.check_elementwise(f"{folder.name}/teacher__logits_cfg", err, bound,
                               what="max abs error / (linear propagation of the branch errors + rounding)")
    report = f"cond {err_c.max():.3g}, uncond {err_u.max():.3g}, cfg-mixed {err.max():.3g}"
    if "sampled__teacher_logits_cfg_teacher_forced" in data:
        sampled = np.asarray(step.teacher_logits_jit(params, batch["anchor_text"], batch["anchor_mask"],
                                                     data["sampled__x_BLC_wo_prefix"], s["sched"], cfg, guidance, tau))
        err_s = np.abs(sampled - data["sampled__teacher_logits_cfg_teacher_forced"]).max()
        err_ar = np.abs(sampled - data["sampled__teacher_logits_cfg_ar"]).max()
        # Only the mix is stored here: the branch tolerance propagated through the mix.
        measured.check(f"{folder.name}/sampled__teacher_logits_cfg_teacher_forced", err_s,
                       (abs(guidance) + abs(1 - guidance)) * LOGITS_TOL / tau)
        report += f"; sampled trajectory: vs teacher-forced {err_s:.3g}, vs autoregressive {err_ar:.3g}"
    print(f"{folder.name} teacher max abs err: {report}")


# ---- unit tests (no fixtures) ----------------------------------------------------------------------


CFG = InfinityConfig(block_chunks=2)


def _random_batch(cfg=CFG, seed=0, B=2, T_target=8, T_anchor=11):
    rng = np.random.default_rng(seed)
    L, d, C = 21, cfg.bits_per_token, cfg.text_channels

    def text(T, lens):
        return (rng.standard_normal((B, T, C)) * 0.25).astype(np.float32), svare_fixtures.text_mask(np.array(lens), T)

    target_text, target_mask = text(T_target, [8, 6])
    anchor_text, anchor_mask = text(T_anchor, [5, 11])
    return dict(target_text=target_text, target_mask=target_mask, anchor_text=anchor_text, anchor_mask=anchor_mask,
                x_BLC_wo_prefix=rng.standard_normal((B, L - 1, d)).astype(np.float32),
                gt_bits=rng.integers(0, 2, (B, L, d)).astype(np.int8),
                teacher_logits=(rng.standard_normal((B, L, 2 * d)) * 2).astype(np.float32))


@functools.lru_cache(maxsize=1)
def _model():
    return apply.init_params(CFG, seed=1)


def test_trainable_and_weight_decay_masks():
    flat = apply.flat_params(apply.abstract_params(InfinityConfig(depth=3, block_chunks=3)))
    per_block = {"ca_ffn": 10, "ca_ffn_sa": 10 + 6}
    for mode, n in per_block.items():
        mask = optim.trainable_mask(flat, mode)
        assert sum(mask.values()) == 3 * n, mode
        assert not any(mask[p] for p in mask if "ca_norm" in p or p[0] != "blocks")
    ca_ffn = optim.trainable_mask(flat, "ca_ffn")
    names = {upstream_key(p, InfinityConfig(depth=3, block_chunks=3))[0].split(".module.0.")[1]
             for p, t in ca_ffn.items() if t}
    assert names == {"ca.mat_q.weight", "ca.mat_q.bias", "ca.mat_kv.weight", "ca.v_bias", "ca.proj.weight",
                     "ca.proj.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias"}
    assert all(optim.trainable_mask(flat, "all").values())
    with pytest.raises(ValueError, match="no LoRA factors"):  # lora mode: see tests/test_lora.py
        optim.trainable_mask(flat, "lora")
    # Decay: exactly the 2-D kernels of the trainable tensors (upstream filter_params on upstream names).
    for mode in ("ca_ffn", "ca_ffn_sa", "all"):
        wd = optim.weight_decay_mask(flat, mode)
        trainable = optim.trainable_mask(flat, mode)
        for path, value in flat.items():
            name = upstream_key(path, InfinityConfig(depth=3, block_chunks=3))[0]
            upstream = trainable[path] and not (len(value.shape) == 1 or name.endswith("bias")
                                                or any(k in name for k in optim.NOWD_KEYS))
            assert wd[path] == upstream, (mode, path)
    wd = optim.weight_decay_mask(flat, "ca_ffn")
    assert {p[-1] for p, v in wd.items() if v} == {"kernel"}
    assert not wd[("blocks", "0", "ca", "v_bias")]
    wd_all = optim.weight_decay_mask(flat, "all")
    assert not wd_all[("text_proj_for_sos", "mat_q")] and not wd_all[("blocks", "0", "sa", "scale_mul_1H11")]
    assert wd_all[("text_proj_for_sos", "mat_kv", "kernel")] and not wd_all[("cfg_uncond",)]


def _torch_run(p0, grads, lr, wd, clip, b1=0.9, b2=0.97, eps=1e-8):
    import torch

    ps = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    groups = [{"params": [ps[k] for k in ps if p0[k].ndim > 1], "weight_decay": wd},
              {"params": [ps[k] for k in ps if p0[k].ndim == 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps, fused=True)
    out, norms = [], []
    for g in grads:
        for k in ps:
            ps[k].grad = torch.tensor(g[k])
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)))
        opt.step()
        out.append({k: v.detach().numpy().copy() for k, v in ps.items()})
    return out, norms


def test_adamw_and_clipping_match_torch_fused():
    rng = np.random.default_rng(0)
    shapes = {("blocks", "0", "ffn", "fc1", "kernel"): (64, 256), ("blocks", "0", "ffn", "fc1", "bias"): (256,),
              ("blocks", "0", "ca", "v_bias"): (64,)}
    p0 = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}
    # Gradients spanning many magnitudes (down to ~eps), three steps; clip 0.05 is active in step 2 only.
    scales = (1e-3, 1e-1, 1e-4)
    grads = [{k: (rng.standard_normal(s) * sc * 10.0 ** rng.uniform(-5, 0, s)).astype(np.float32)
              for k, s in shapes.items()} for sc in scales]
    lr, wd, clip = 1e-3, 0.005, 0.05
    ref, ref_norms = _torch_run(p0, grads, lr, wd, clip)
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=lr, weight_decay=wd, max_grad_norm=clip))
    state, train = tx.init(p0), dict(p0)
    # optax's own adamw (eps added to sqrt(v_hat), decay as lr*wd*p) after optax's global-norm clip.
    ox = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(lr, 0.9, 0.97, 1e-8, weight_decay=wd,
                                                                  mask=optim.decay_mask_of))
    ostate, otrain = ox.init(p0), dict(p0)
    update = jax.jit(tx.update)
    worst_ours, worst_optax = 0.0, 0.0
    for i, g in enumerate(grads):
        norm = float(optim.global_norm_torch(g))
        assert rel(norm, ref_norms[i]) <= 1e-6
        coef = float(optim.clip_coef_torch(norm, clip))
        assert (coef < 1) == (i == 1)
        updates, state = update(g, state, train)
        train = optax.apply_updates(train, updates)
        oupd, ostate = ox.update(g, ostate, otrain)
        otrain = optax.apply_updates(otrain, oupd)
        for k in p0:
            r = ref[i][k]
            u = r - (ref[i - 1][k] if i else p0[k])
            # Not UPDATE_REL: our clip coefficient may differ from torch's in its last bits (the global norm's
            # summation order), scaling the clipped step-2 gradient by (1 + ~eps); where m = b1 m1 + (1 - b1) g
            # nearly cancels (these gradients span five decades) the update moves by up to ~50 eps |u|
            # (measured), so this synthetic stress test keeps 1e-4 |u| (no S is computed here; the fixture
            # tests above hold the update to 8 eps |u| + 2 S).
            bound = 4 * ulp(r) + 1e-4 * np.abs(u)
            err = np.abs(np.asarray(train[k]) - r)
            assert np.all(err <= bound), (i, k, float((err / bound).max()))
            worst_ours = max(worst_ours, float((err / bound).max()))
            worst_optax = max(worst_optax, float((np.abs(np.asarray(otrain[k]) - r) / bound).max()))
    assert int(optim.adam_step_count(state)) == 3
    print(f"vs torch fused AdamW + clip_grad_norm_: max err / (4 ulp + 1e-4 |update|): ours {worst_ours:.3g}, "
          f"optax.clip_by_global_norm + optax.adamw {worst_optax:.3g}")


def test_clip_inactive_is_identity():
    rng = np.random.default_rng(1)
    g = {("a",): rng.standard_normal((8, 8)).astype(np.float32), ("b",): rng.standard_normal(8).astype(np.float32)}
    clip = optim.clip_by_global_norm_torch(1e6)
    out, _ = clip.update(g, clip.init(g))
    for k in g:
        np.testing.assert_array_equal(np.asarray(out[k]), g[k])
    clip = optim.clip_by_global_norm_torch(0.5)
    out, _ = clip.update(g, clip.init(g))
    assert float(optim.global_norm_torch(out)) == pytest.approx(0.5, rel=1e-5)


def test_iterations_frozen_state_and_summed_vs_alternating():
    params, batch = _model(), _random_batch()
    scfg = step.SvareConfig()
    kw = dict(cfg=CFG, schedule=SCHED, scfg=scfg, diagnostics=True)
    # lr 1e-3 so that the erase step visibly changes the preserve pass's loss.
    state0 = optim.set_hyperparams(step.init_opt_state(params, scfg), learning_rate=1e-3)
    trainable = optim.trainable_params(params)
    assert set(state0.inner_state[1].mu) == set(trainable)  # optimiser state only for trainable leaves

    new, state, m = step.alternating_iteration(params, state0, batch, **kw)
    assert int(m["adam_step"]) == 2 and float(m["lr"]) == np.float32(1e-3)
    flat0, flat2 = apply.flat_params(params), apply.flat_params(new)
    for path, value in flat0.items():
        same = np.array_equal(np.asarray(flat2[path]), np.asarray(value))
        assert same == (path not in trainable), path
    for key in ("loss_erase", "loss_pre", "grad_norm_erase", "grad_norm_pre", "kept_fraction", "token_error_rate"):
        assert np.isfinite(float(m[key])), key
    assert np.asarray(m["kept_fraction_per_scale"]).shape == (3,)

    # The alternating iteration is erase_step then preserve_step on the updated weights, one shared state.
    p1, s1, m1 = step.erase_step(params, state0, batch, **kw)
    p2, s2, m2 = step.preserve_step(p1, s1, batch, **kw)
    assert float(m1["loss_erase"]) == pytest.approx(float(m["loss_erase"]), rel=1e-6)
    assert float(m2["loss_pre"]) == pytest.approx(float(m["loss_pre"]), rel=1e-6)
    for path in trainable:
        np.testing.assert_allclose(np.asarray(apply.flat_params(p2)[path]), np.asarray(flat2[path]),
                                   rtol=0, atol=1e-7)

    # Summed: ONE step on grad(L_FCE) + summed_lambda * grad(KL_bit), both on the ORIGINAL weights;
    # KL_bit = 2 / reg_lambda * L_Pre, so its gradient is 4 x preserve_step's with the defaults.
    ps, ss, msum = step.summed_iteration(params, state0, batch, **kw)
    _, _, m_pre0 = step.preserve_step(params, state0, batch, **kw)
    assert int(msum["adam_step"]) == 1
    assert float(msum["loss_erase"]) == pytest.approx(float(m["loss_erase"]), rel=1e-6)
    assert float(msum["loss_pre"]) == pytest.approx(float(m_pre0["loss_pre"]), rel=1e-6)
    # Alternating runs the preserve pass on the weights after the erase step, summed on the original ones.
    assert float(msum["loss_pre"]) != pytest.approx(float(m["loss_pre"]), rel=1e-6)
    assert np.abs(np.asarray(msum["logits_pre"]) - np.asarray(m["logits_pre"])).max() > 1e-4
    factor = scfg.summed_lambda * 2 / scfg.reg_lambda
    assert float(msum["loss_total"]) == pytest.approx(float(msum["loss_erase"]) + factor * float(m_pre0["loss_pre"]),
                                                      rel=1e-5)
    combined = {k: np.asarray(m["grads_erase"][k]) + factor * np.asarray(m_pre0["grads_pre"][k]) for k in trainable}
    for k in trainable:
        np.testing.assert_allclose(np.asarray(msum["grads"][k]), combined[k], rtol=1e-4,
                                   atol=1e-6 * np.abs(combined[k]).max())
    tx = optim.make_optimizer(scfg.optim)
    updates, _ = jax.jit(tx.update)(msum["grads"], state0, trainable)
    want = optax.apply_updates(trainable, updates)
    for k in trainable:  # the same optimiser, compiled inside vs outside the step: a few ulp at most
        np.testing.assert_allclose(np.asarray(apply.flat_params(ps)[k]), np.asarray(want[k]), rtol=0,
                                   atol=float(4 * ulp(np.abs(np.asarray(want[k])).max())))
    assert not np.array_equal(np.asarray(apply.flat_params(ps)[k]), np.asarray(flat2[k]))


def test_clipping_in_step_and_dynamic_hyperparameters():
    params, batch = _model(), _random_batch(seed=3)
    scfg = step.SvareConfig()
    kw = dict(cfg=CFG, schedule=SCHED, scfg=scfg, diagnostics=True)
    state0 = step.init_opt_state(params, scfg)
    _, _, m_off = step.erase_step(params, state0, batch, **kw)
    n_compiled = step.erase_step.compiled._cache_size()
    tiny = 0.01 * float(m_off["grad_norm_erase"])
    state_on = optim.set_hyperparams(state0, max_grad_norm=tiny, learning_rate=1e-3)
    p_on, _, m_on = step.erase_step(params, state_on, batch, **kw)
    assert step.erase_step.compiled._cache_size() == n_compiled  # lr / clip are state, not static
    assert float(m_off["clip_coef_erase"]) == 1.0
    assert float(m_on["clip_coef_erase"]) == pytest.approx(tiny / (float(m_on["grad_norm_erase"]) + 1e-6), rel=1e-6)
    assert float(m_on["lr"]) == np.float32(1e-3)
    train = optim.trainable_params(params)
    coef = float(m_on["clip_coef_erase"])
    adam = optim.adamw_torch(1e-3, 0.9, 0.97, 1e-8, scfg.optim.weight_decay, optim.decay_mask_of)
    clipped = {k: np.asarray(v) * np.float32(coef) for k, v in m_on["grads_erase"].items()}
    updates, _ = jax.jit(adam.update)(clipped, adam.init(train), train)
    want = optax.apply_updates(train, updates)
    flat_on = apply.flat_params(p_on)
    for k in train:
        np.testing.assert_allclose(np.asarray(flat_on[k]), np.asarray(want[k]), rtol=0,
                                   atol=float(4 * ulp(np.abs(np.asarray(want[k])).max())))


def test_erase_loss_selection_in_step():
    params, batch = _model(), _random_batch(seed=4)
    scfg = step.SvareConfig(erase_loss="plain_ce")
    _, _, m = step.erase_step(params, step.init_opt_state(params, scfg), batch, cfg=CFG, schedule=SCHED, scfg=scfg,
                              diagnostics=True)
    want, _ = losses.get_erase_loss("plain_ce")({"student_logits": m["logits_erase"], "gt_bits": batch["gt_bits"]})
    assert float(m["loss_erase"]) == pytest.approx(float(want), rel=1e-5)
    assert float(m["kept_fraction"]) == 1.0
    with pytest.raises(KeyError):
        bad = dict(batch)
        del bad["teacher_logits"]
        step.preserve_step(params, step.init_opt_state(params, scfg), bad, cfg=CFG, schedule=SCHED, scfg=scfg)


def test_teacher_helpers():
    params = _model()
    batch = _random_batch(seed=5)
    null = np.asarray(step.uncond_text(params, batch["anchor_text"], batch["anchor_mask"], CFG))
    table = np.asarray(apply.flat_params(params)[("cfg_uncond",)])
    lens = batch["anchor_mask"].sum(1)
    for i, n in enumerate(lens):
        np.testing.assert_array_equal(null[i, :n], table[:n])
        assert np.all(null[i, n:] == 0)
    c, u = np.float32([[1.5, -2.0]]), np.float32([[0.5, 1.0]])
    np.testing.assert_array_equal(np.asarray(step.cfg_mix(c, u, 1.0, 1.0)), c)
    np.testing.assert_allclose(np.asarray(step.cfg_mix(c, u, 4.0, 2.0)), (4 * c - 3 * u) / 2, rtol=1e-6)
    text, mask = step.pad_compact_text(np.arange(12, dtype=np.float32).reshape(6, 2), np.array([2, 4]))
    assert text.shape == (2, 4, 2) and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    np.testing.assert_array_equal(text[1], np.arange(4, 12, dtype=np.float32).reshape(4, 2))
