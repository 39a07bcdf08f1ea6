"""Which Infinity parameters S-VARE trains, and the official optimiser (torch fused AdamW + grad clipping).

Trainable selection (`trainable_mask`, modes in TRAINABLE_MODES):
  ca_ffn      the official default (enable_ca_layer=1, enable_ffn_layer=1): in every block
              ca.mat_q (kernel, bias), ca.mat_kv (kernel), ca.v_bias, ca.proj (kernel, bias),
              ffn.fc1 / ffn.fc2 (kernel, bias). Not ca_norm (it lives outside upstream's `ca`).
  ca_ffn_sa   + every self-attention parameter sa.* (= upstream enable_sa_layer=1, which is also exactly
              what upstream's enable_all_layer=1 trains).
  all         every parameter of the transformer (full fine-tuning; not an upstream option).
A LoRA mode would register its own predicate in TRAINABLE_MODES and wrap the Dense layers; it is not
implemented.

Weight decay (`weight_decay_mask`) follows upstream's `filter_params` on the upstream state_dict name:
no decay for 1-D tensors, names ending in "bias" (so ca.v_bias and sa.q_bias/v_bias too) or names
containing a `nowd` key (cfg_uncond, pos_start, lvl_embed, ada_gss, scale_mul, text_proj_for_sos.ca.mat_q,
...); decay for the other trainable tensors (the 2-D kernels).

Optimiser: `adamw_torch` reproduces torch.optim.AdamW(fused=True) step by step (checked bit-for-bit
against torch on CPU, see tests/test_svare_step.py):
    p   <- p * (1 - lr * wd)                               decoupled decay, BEFORE the Adam update
    m   <- m + (1 - b1) (g - m)                            (torch lerp)
    v   <- b2 v + (1 - b2) g g
    p   <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)  bc_i = 1 - b_i^t, eps OUTSIDE the sqrt
optax.adamw is the same formula up to float32 rounding (eps added to sqrt(v_hat) = sqrt(v)/sqrt(bc2),
decay as lr * wd * p), but rounds in a different order; `adamw_torch` keeps torch's order.
`clip_by_global_norm_torch` is torch.nn.utils.clip_grad_norm_: norm = ||(||g_i||)_i||_2 over the
trainable grads, coef = max_norm / (norm + 1e-6) clamped to <= 1 (a no-op when >= 1).

The optimiser works on the flat dict {path: array} of the trainable parameters only (`trainable_params`),
so frozen parameters have no optimiser state and are never touched. learning_rate, weight_decay and
max_grad_norm are injected hyperparameters (optax.inject_hyperparams): they live in the optimiser state
and can change between steps without recompiling (`set_hyperparams`).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from varejax.convert.infinity_keys import upstream_key
from varejax.models.apply import flat_params

F32 = jnp.float32
Path = tuple[str, ...]

# Upstream erase_train.build_model_optimizer (args.nowd >= 1).
NOWD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
             "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul", "text_proj_for_sos.ca.mat_q")

_CA_LEAVES = {("mat_q", "kernel"), ("mat_q", "bias"), ("mat_kv", "kernel"), ("v_bias",), ("proj", "kernel"),
              ("proj", "bias")}


def _block_part(path: Path) -> tuple[str, Path] | None:
    """('ca', ('mat_q', 'kernel')) for ('blocks', '3', 'ca', 'mat_q', 'kernel'); None outside blocks."""
    if len(path) >= 4 and path[0] == "blocks":
        return path[2], tuple(path[3:])
    return None


def _ca_ffn(path: Path) -> bool:
    part = _block_part(path)
    return part is not None and ((part[0] == "ca" and part[1] in _CA_LEAVES) or part[0] == "ffn")


def _ca_ffn_sa(path: Path) -> bool:
    part = _block_part(path)
    return _ca_ffn(path) or (part is not None and part[0] == "sa")


TRAINABLE_MODES: dict[str, Callable[[Path], bool]] = {
    "ca_ffn": _ca_ffn,
    "ca_ffn_sa": _ca_ffn_sa,
    "all": lambda path: True,
    # LoRA hook: register a predicate over the adapter parameters here once adapters exist.
}


def _flat(state_or_flat: nnx.State | Mapping[Path, Any]) -> Mapping[Path, Any]:
    return state_or_flat if isinstance(state_or_flat, Mapping) and not isinstance(state_or_flat, nnx.State) \
        else flat_params(state_or_flat)


def _predicate(mode: str) -> Callable[[Path], bool]:
    if mode == "lora":
        raise NotImplementedError("LoRA fine-tuning is not implemented (hook: TRAINABLE_MODES in varejax.erase.optim)")
    try:
        return TRAINABLE_MODES[mode]
    except KeyError:
        raise KeyError(f"unknown trainable mode {mode!r}; known: {sorted(TRAINABLE_MODES)}") from None


def trainable_mask(state_or_flat_params: nnx.State | Mapping[Path, Any], mode: str = "ca_ffn") -> dict[Path, bool]:
    """{path: trainable?} for every parameter (paths as in `varejax.models.apply.flat_params`)."""
    is_trainable = _predicate(mode)
    return {path: bool(is_trainable(path)) for path in _flat(state_or_flat_params)}


def upstream_name(path: Path) -> str:
    """Upstream state_dict name of a parameter path, up to the block-chunk numbering (enough for nowd)."""
    return upstream_key(path, types.SimpleNamespace(blocks_per_chunk=1))[0]


def decays(path: Path, ndim: int) -> bool:
    """Upstream filter_params: group 'D' (weight decay) unless 1-D, a *bias, or named by a nowd key."""
    name = upstream_name(path)
    return not (ndim == 1 or name.endswith("bias") or any(key in name for key in NOWD_KEYS))


def weight_decay_mask(state_or_flat_params: nnx.State | Mapping[Path, Any], mode: str = "ca_ffn") -> dict[Path, bool]:
    """{path: decayed?} for every parameter: trainable and in upstream's decay group (the 2-D kernels)."""
    flat = _flat(state_or_flat_params)
    trainable = trainable_mask(flat, mode)
    return {path: trainable[path] and decays(path, len(value.shape)) for path, value in flat.items()}


def trainable_params(params: nnx.State, mode: str = "ca_ffn") -> dict[Path, jax.Array]:
    """The flat dict {path: array} of the trainable parameters (what the optimiser updates)."""
    flat = flat_params(params)
    mask = trainable_mask(flat, mode)
    return {path: value for path, value in flat.items() if mask[path]}


def merge_trainable(params: nnx.State, trainable: Mapping[Path, jax.Array]) -> nnx.State:
    """`params` with the arrays of `trainable` substituted (frozen leaves are passed through as they are)."""
    out, used = [], 0
    for path, var in nnx.to_flat_state(params):
        key = tuple(str(p) for p in path)
        if key in trainable:
            var = var.replace(trainable[key])
            used += 1
        out.append((path, var))
    if used != len(trainable):
        unknown = sorted(set(trainable) - {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(params)})
        raise KeyError(f"trainable paths not in params: {unknown[:5]}")
    return nnx.from_flat_state(out)


# ---- gradient clipping ------------------------------------------------------------------------------


def global_norm_torch(tree: Any) -> jax.Array:
    """torch clip_grad_norm_'s total norm: the 2-norm of the per-tensor 2-norms (float32)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((), F32)
    norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(g.astype(F32)))) for g in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(norms)))


def clip_coef_torch(norm: jax.Array, max_norm: jax.Array | float) -> jax.Array:
    """min(max_norm / (norm + 1e-6), 1); clipping disabled (coef 1) when max_norm <= 0."""
    coef = jnp.minimum(jnp.asarray(max_norm, F32) / (norm + jnp.float32(1e-6)), 1.0)
    return jnp.where(jnp.asarray(max_norm, F32) > 0, coef, jnp.ones((), F32))


def clip_by_global_norm_torch(max_norm: float | jax.Array) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_ as an optax transformation (stateless)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        coef = clip_coef_torch(global_norm_torch(updates), max_norm)
        return jax.tree_util.tree_map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---- AdamW in torch's rounding order ------------------------------------------------------------------


class AdamWTorchState(NamedTuple):
    count: jax.Array  # int32 number of steps taken (torch's `step`)
    mu: Any  # exp_avg
    nu: Any  # exp_avg_sq


def _bias_correction(beta: float, t: jax.Array) -> jax.Array:
    """1 - beta^t in float32 without cancellation: -expm1(t log beta), log beta taken in float64."""
    return -jnp.expm1(t * jnp.float32(math.log(beta)))


def adamw_torch(learning_rate: float | jax.Array, b1: float = 0.9, b2: float = 0.97, eps: float = 1e-8,
                weight_decay: float | jax.Array = 0.005,
                decay_mask: Any | Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """torch.optim.AdamW (fused) with decoupled weight decay on the leaves where `decay_mask` is True.

    `decay_mask`: a pytree of bools like the params, or a callable params -> such a pytree; None =
    decay every leaf. The returned updates are `new_param - param`, so `optax.apply_updates` gives
    torch's new parameter (exactly, where the difference is exact: Sterbenz).
    """

    def init_fn(params):
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, F32), params)
        return AdamWTorchState(jnp.zeros((), jnp.int32), zeros, jax.tree_util.tree_map(jnp.copy, zeros))

    def update_fn(grads, state, params):
        if params is None:
            raise ValueError("adamw_torch needs the parameters")
        count = optax.safe_int32_increment(state.count)
        t = count.astype(F32)
        lr = jnp.asarray(learning_rate, F32)
        step_size = lr / _bias_correction(b1, t)
        bc2_sqrt = jnp.sqrt(_bias_correction(b2, t))
        decay_factor = 1.0 - lr * jnp.asarray(weight_decay, F32)
        mask = decay_mask(params) if callable(decay_mask) else decay_mask
        if mask is None:
            mask = jax.tree_util.tree_map(lambda _: True, params)

        def one(g, m, v, p, decay):
            g = g.astype(F32)
            p32 = p.astype(F32)
            decayed = p32 * decay_factor if decay else p32
            m = m + (1.0 - b1) * (g - m)
            v = v * b2 + (1.0 - b2) * g * g
            denom = jnp.sqrt(v) / bc2_sqrt + eps
            new = decayed - step_size * m / denom
            return (new - p32).astype(p.dtype), m, v

        treedef = jax.tree_util.tree_structure(params)
        flat = [jax.tree_util.tree_leaves(x) for x in (grads, state.mu, state.nu, params)]
        masks = treedef.flatten_up_to(mask)
        results = [one(g, m, v, p, bool(d)) for g, m, v, p, d in zip(*flat, masks, strict=True)]
        updates, mu, nu = (treedef.unflatten([r[i] for r in results]) for i in range(3))
        return updates, AdamWTorchState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# ---- the official optimiser -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The official optimiser settings (erase_train.py defaults).

    learning_rate = ac * tblr * glb_bs / 256 = 6e-3 / 256 (constant: lin0 schedule, no warm-up, within
    the first 5 % of its 1000 epochs); weight_decay 0.005 (group D only); clip 5.0 per step.
    learning_rate, weight_decay and max_grad_norm are only initial values of the optimiser state.
    """

    learning_rate: float = 2.34375e-5
    b1: float = 0.9
    b2: float = 0.97
    eps: float = 1e-8
    weight_decay: float = 0.005
    max_grad_norm: float = 5.0
    trainable: str = "ca_ffn"

    def static(self) -> OptimConfig:
        """The part a compiled step depends on (the injected hyperparameters reset to defaults)."""
        defaults = OptimConfig()
        return dataclasses.replace(self, learning_rate=defaults.learning_rate, weight_decay=defaults.weight_decay,
                                   max_grad_norm=defaults.max_grad_norm)

    def replace(self, **changes: Any) -> OptimConfig:
        return dataclasses.replace(self, **changes)


def decay_mask_of(tree: Mapping[Path, Any]) -> dict[Path, bool]:
    """{path: decayed?} of a flat dict of trainable parameters (the optimiser's decay mask)."""
    return {path: decays(path, len(value.shape)) for path, value in tree.items()}


def _svare_chain(learning_rate, weight_decay, max_grad_norm, b1, b2, eps):
    return optax.chain(clip_by_global_norm_torch(max_grad_norm),
                       adamw_torch(learning_rate, b1, b2, eps, weight_decay, decay_mask_of))


def make_optimizer(ocfg: OptimConfig = OptimConfig()) -> optax.GradientTransformation:
    """clip (torch) -> AdamW (torch) over the trainable flat dict, lr / wd / clip injected into the state."""
    return optax.inject_hyperparams(_svare_chain, static_args=("b1", "b2", "eps"),
                                     hyperparam_dtype=F32)(
        learning_rate=ocfg.learning_rate, weight_decay=ocfg.weight_decay, max_grad_norm=ocfg.max_grad_norm,
        b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps)


def init_opt_state(params: nnx.State, ocfg: OptimConfig = OptimConfig()) -> optax.OptState:
    """Optimiser state for the trainable parameters of `params` (none for frozen ones)."""
    return make_optimizer(ocfg).init(trainable_params(params, ocfg.trainable))


def hyperparams(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """The injected hyperparameters: learning_rate, weight_decay, max_grad_norm."""
    return dict(opt_state.hyperparams)


def set_hyperparams(opt_state: optax.OptState, **values: float) -> optax.OptState:
    """A copy of the optimiser state with some injected hyperparameters changed (e.g. a new lr)."""
    unknown = set(values) - set(opt_state.hyperparams)
    if unknown:
        raise KeyError(f"unknown hyperparameters {sorted(unknown)}; known: {sorted(opt_state.hyperparams)}")
    new = dict(opt_state.hyperparams)
    for name, value in values.items():
        new[name] = jnp.asarray(value, dtype=jnp.asarray(new[name]).dtype)
    return opt_state._replace(hyperparams=new)


def adam_step_count(opt_state: optax.OptState) -> jax.Array:
    """torch's `step` of the shared AdamW state (2 after one official iteration)."""
    return opt_state.inner_state[1].count
