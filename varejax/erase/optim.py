"""Which Infinity parameters S-VARE trains, and the official optimiser (torch fused AdamW + grad clipping).

Trainable selection (`trainable_mask`, modes in TRAINABLE_MODES):
  ca_ffn      the official default (enable_ca_layer=1, enable_ffn_layer=1): in every block
              ca.mat_q (kernel, bias), ca.mat_kv (kernel), ca.v_bias, ca.proj (kernel, bias),
              ffn.fc1 / ffn.fc2 (kernel, bias). Not ca_norm (it lives outside upstream's `ca`).
  ca_ffn_sa   + every self-attention parameter sa.* (= upstream enable_sa_layer=1, which is also exactly
              what upstream's enable_all_layer=1 trains).
  all         every parameter of the transformer (full fine-tuning; not an upstream option).
  lora        only the LoRA factors `lora_a` / `lora_b` (upstream enable_lora=1; the model must be built
              with `lora_rank > 0`, see `varejax.models.lora`). The base weights stay frozen.
The first three modes never select LoRA factors (they choose among upstream's own tensors).

Weight decay (`weight_decay_mask`) follows upstream's `filter_params` on the upstream state_dict name:
no decay for 1-D tensors, names ending in "bias" (so ca.v_bias and sa.q_bias/v_bias too) or names
containing a `nowd` key (cfg_uncond, pos_start, lvl_embed, ada_gss, scale_mul, text_proj_for_sos.ca.mat_q,
...); decay for the other trainable tensors (the 2-D kernels). LoRA factors are never decayed: the
optimiser groups of upstream's (unused) LoRA option are not recorded, and decaying A and B separately is
not a decay of the merged update scale * A @ B (it penalises |A|^2 + |B|^2 instead); at lr 2.3e-5 and
wd 0.005 the factor would be 1 - 1.2e-7 per step anyway.

Optimiser: `adamw_torch` reproduces torch.optim.AdamW(fused=True) step by step (checked bit-for-bit
against torch on CPU, see tests/test_svare_step.py):
    p   <- p * (1 - lr * wd)                               decoupled decay, BEFORE the Adam update
    m   <- m + (1 - b1) (g - m)                            (torch lerp)
    v   <- b2 v + (1 - b2) g g
    p   <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)  bc_i = 1 - b_i^t, eps OUTSIDE the sqrt
optax.adamw is the same formula up to float32 rounding (eps added to sqrt(v_hat) = sqrt(v)/sqrt(bc2),
decay as lr * wd * p), but rounds in a different order; `adamw_torch` keeps torch's order.
Low-precision parameters (bf16 storage, `config.train.bf16_params`, as upstream trains: `block.bfloat16()`
and fused AdamW on bf16 tensors): torch's fused kernel loads param, grad, exp_avg and exp_avg_sq into
float32, runs the arithmetic above in float32, and stores all three back rounded to bfloat16 (nearest,
ties to even); the moments live in the parameter dtype. `adamw_torch` does the same: moments are created
in each parameter's dtype, every step computes in float32 from the stored values, the new parameter is
round_bf16(p_new) (applied through a float32 update p' - p, exact for any step that keeps |p'| / |p|
within 2^16) and the moments are stored rounded. Every bf16 value (gradient, clipped gradient, moment,
parameter) is rounded explicitly by its bit pattern before float32 arithmetic reads it, because XLA may
otherwise carry it at float32 precision within one program. Checked against torch's clip_grad_norm_ +
fused AdamW on bf16 tensors (tests/test_lora.py). For float32 parameters nothing changes.
`clip_by_global_norm_torch` is torch.nn.utils.clip_grad_norm_: norm = ||(||g_i||)_i||_2 over the
trainable grads, coef = max_norm / (norm + 1e-6) clamped to <= 1 (a no-op when >= 1). With bf16
gradients torch's norms and coefficient are bf16 tensors; ours are rounded the same way (`all_bf16`).

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
from varejax.models.config import is_lora_path
from varejax.models.layers import round_to_bf16

F32 = jnp.float32
ParamPath = tuple[str, ...]  # a parameter's key path, e.g. ('blocks', '0', 'ca', 'mat_q', 'kernel')

# Upstream erase_train.build_model_optimizer (args.nowd >= 1).
NOWD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
             "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul", "text_proj_for_sos.ca.mat_q")

_CA_LEAVES = {("mat_q", "kernel"), ("mat_q", "bias"), ("mat_kv", "kernel"), ("v_bias",), ("proj", "kernel"),
              ("proj", "bias")}


def _block_part(path: ParamPath) -> tuple[str, ParamPath] | None:
    """('ca', ('mat_q', 'kernel')) for ('blocks', '3', 'ca', 'mat_q', 'kernel'); None outside blocks."""
    if len(path) >= 4 and path[0] == "blocks":
        return path[2], tuple(path[3:])
    return None


def _ca_ffn(path: ParamPath) -> bool:
    part = _block_part(path)
    return part is not None and not is_lora_path(path) and (
        (part[0] == "ca" and part[1] in _CA_LEAVES) or part[0] == "ffn")


def _ca_ffn_sa(path: ParamPath) -> bool:
    part = _block_part(path)
    return _ca_ffn(path) or (part is not None and part[0] == "sa" and not is_lora_path(path))


TRAINABLE_MODES: dict[str, Callable[[ParamPath], bool]] = {
    "ca_ffn": _ca_ffn,
    "ca_ffn_sa": _ca_ffn_sa,
    "all": lambda path: not is_lora_path(path),
    "lora": is_lora_path,
}


def _flat(state_or_flat: nnx.State | Mapping[ParamPath, Any]) -> Mapping[ParamPath, Any]:
    return state_or_flat if isinstance(state_or_flat, Mapping) and not isinstance(state_or_flat, nnx.State) \
        else flat_params(state_or_flat)


def _predicate(mode: str) -> Callable[[ParamPath], bool]:
    try:
        return TRAINABLE_MODES[mode]
    except KeyError:
        raise KeyError(f"unknown trainable mode {mode!r}; known: {sorted(TRAINABLE_MODES)}") from None


def trainable_mask(state_or_flat_params: nnx.State | Mapping[ParamPath, Any],
                   mode: str = "ca_ffn") -> dict[ParamPath, bool]:
    """{path: trainable?} for every parameter (paths as in `varejax.models.apply.flat_params`).

    Raises:
      ValueError: the mode selects nothing (e.g. "lora" on a model built without LoRA factors).
    """
    is_trainable = _predicate(mode)
    mask = {path: bool(is_trainable(path)) for path in _flat(state_or_flat_params)}
    if mask and not any(mask.values()):
        hint = (": the model has no LoRA factors; build or load it with lora_rank > 0 (config.train.lora_rank)"
                if mode == "lora" else "")
        raise ValueError(f"trainable mode {mode!r} selects no parameter{hint}")
    return mask


def upstream_name(path: ParamPath) -> str:
    """Upstream state_dict name of a parameter path, up to the block-chunk numbering (enough for nowd)."""
    return upstream_key(path, types.SimpleNamespace(blocks_per_chunk=1))[0]


def decays(path: ParamPath, ndim: int) -> bool:
    """Upstream filter_params: group 'D' (weight decay) unless 1-D, a *bias, or named by a nowd key."""
    if is_lora_path(path):
        return False
    name = upstream_name(path)
    return not (ndim == 1 or name.endswith("bias") or any(key in name for key in NOWD_KEYS))


def weight_decay_mask(state_or_flat_params: nnx.State | Mapping[ParamPath, Any],
                      mode: str = "ca_ffn") -> dict[ParamPath, bool]:
    """{path: decayed?} for every parameter: trainable and in upstream's decay group (the 2-D kernels)."""
    flat = _flat(state_or_flat_params)
    trainable = trainable_mask(flat, mode)
    return {path: trainable[path] and decays(path, len(value.shape)) for path, value in flat.items()}


def trainable_params(params: nnx.State, mode: str = "ca_ffn") -> dict[ParamPath, jax.Array]:
    """The flat dict {path: array} of the trainable parameters (what the optimiser updates)."""
    flat = flat_params(params)
    mask = trainable_mask(flat, mode)
    return {path: value for path, value in flat.items() if mask[path]}


def merge_trainable(params: nnx.State, trainable: Mapping[ParamPath, jax.Array]) -> nnx.State:
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


# ---- low-precision storage ------------------------------------------------------------------------


def _state_dtype(p: Any) -> jnp.dtype:
    """Moments live in the parameter's dtype (torch: zeros_like(param)); float32 for non-float leaves."""
    dtype = jnp.dtype(p.dtype)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(F32)


def round_to_dtype(x: jax.Array, dtype: Any) -> jax.Array:
    """float32 `x` rounded to `dtype` (nearest, ties to even), returned as float32.

    bfloat16 goes through `round_to_bf16` (bit pattern): XLA may remove an f32 -> bf16 -> f32 convert
    pair inside one program (excess precision), which would skip the rounding of a value that a later
    step of the same program (the preserve step after the erase step) reads back.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.dtype(F32):
        return x
    if dtype == jnp.dtype(jnp.bfloat16):
        return round_to_bf16(x)
    return x.astype(dtype).astype(F32)


def as_f32(x: jax.Array) -> jax.Array:
    """A stored low-precision value read as float32, rounded explicitly to its dtype first.

    Inside one program XLA may carry a bf16 result (a gradient, a clipped gradient) at float32 precision
    into its next use; torch stores it in bf16. The bit-pattern rounding is a no-op on true bf16 values.
    """
    return round_to_dtype(x.astype(F32), x.dtype)


def _store(x: jax.Array, dtype: Any) -> jax.Array:
    """A float32 result stored in `dtype`, rounded as torch's store (exactly representable first)."""
    return round_to_dtype(x, dtype).astype(dtype)


# ---- gradient clipping ------------------------------------------------------------------------------


def all_bf16(tree: Any) -> bool:
    """Whether every leaf of a (non-empty) gradient tree is bfloat16 (bf16 parameter storage)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(leaves) and all(jnp.dtype(g.dtype) == jnp.dtype(jnp.bfloat16) for g in leaves)


def global_norm_torch(tree: Any) -> jax.Array:
    """torch clip_grad_norm_'s total norm: the 2-norm of the per-tensor 2-norms (float32).

    For bf16 gradients torch's norms are bf16 tensors (float accumulation, rounded result), so each
    per-tensor norm and the total are rounded to bf16 (returned as float32).
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((), F32)
    rounding = round_to_bf16 if all_bf16(tree) else (lambda x: x)
    norms = rounding(jnp.stack([jnp.sqrt(jnp.sum(jnp.square(as_f32(g)))) for g in leaves]))
    return rounding(jnp.sqrt(jnp.sum(jnp.square(norms))))


def clip_coef_torch(norm: jax.Array, max_norm: jax.Array | float, bf16: bool = False) -> jax.Array:
    """min(max_norm / (norm + 1e-6), 1); clipping disabled (coef 1) when max_norm <= 0.

    `bf16`: torch's arithmetic on a bf16 total norm (norm + 1e-6 and the quotient rounded to bf16).
    """
    rounding = round_to_bf16 if bf16 else (lambda x: x)
    max_norm = jnp.asarray(max_norm, F32)
    coef = jnp.minimum(rounding(max_norm / rounding(norm + jnp.float32(1e-6))), 1.0)
    return jnp.where(max_norm > 0, coef, jnp.ones((), F32))


def clip_by_global_norm_torch(max_norm: float | jax.Array) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_ as an optax transformation (stateless)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        coef = clip_coef_torch(global_norm_torch(updates), max_norm, bf16=all_bf16(updates))

        def scale(g):
            if jnp.dtype(g.dtype) == jnp.dtype(F32):
                return g * coef
            return _store(as_f32(g) * coef, g.dtype)  # torch: product in float, stored rounded

        return jax.tree_util.tree_map(scale, updates), state

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
    decay every leaf. The returned updates are float32 `new_param - param`, so `optax.apply_updates`
    gives torch's new parameter (exactly, where the difference is exact: Sterbenz). The moments have
    the parameters' dtype; for bfloat16 parameters (and moments) the arithmetic is float32 and the
    stored results are rounded to bfloat16, as torch's fused kernel does (see the module docstring).
    """

    def init_fn(params):
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, _state_dtype(p)), params)
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

        def one(g, m_stored, v_stored, p, decay):
            g = as_f32(g)
            p32 = p.astype(F32)
            m, v = m_stored.astype(F32), v_stored.astype(F32)
            decayed = p32 * decay_factor if decay else p32
            m = m + (1.0 - b1) * (g - m)
            v = v * b2 + (1.0 - b2) * g * g
            denom = jnp.sqrt(v) / bc2_sqrt + eps
            new = decayed - step_size * m / denom
            return (round_to_dtype(new, p.dtype) - p32, _store(m, m_stored.dtype), _store(v, v_stored.dtype))

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


def decay_mask_of(tree: Mapping[ParamPath, Any]) -> dict[ParamPath, bool]:
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



def opt_state_shardings(params: nnx.State, ocfg: OptimConfig = OptimConfig()) -> Any:
    """The shardings of `init_opt_state(params, ocfg)` laid out like the parameters: each moment as its
    parameter, scalars (step count, injected hyperparameters) replicated. `params` may be arrays or
    ShapeDtypeStructs with shardings; None when they carry none (then nothing needs laying out)."""
    train = trainable_params(params, ocfg.trainable)
    shardings = [s for s in (getattr(leaf, "sharding", None) for leaf in train.values()) if s is not None]
    if not shardings:
        return None
    first = shardings[0]
    replicated = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
                  if isinstance(first, jax.sharding.NamedSharding) else first)

    def like_its_parameter(path, leaf):
        for entry in reversed(path):  # mu / nu are dicts keyed by the parameter's path
            key = getattr(entry, "key", None)
            if isinstance(key, tuple) and key in train and tuple(train[key].shape) == tuple(leaf.shape):
                return train[key].sharding
        return replicated

    return jax.tree_util.tree_map_with_path(like_its_parameter, jax.eval_shape(make_optimizer(ocfg).init, train))


def init_opt_state_sharded(params: nnx.State, ocfg: OptimConfig = OptimConfig()) -> optax.OptState:
    """`init_opt_state` compiled so that every moment is laid out like its parameter.

    Under plain `jax.jit` the zeros of AdamW's moments depend on no sharded input, so XLA makes them
    replicated: for the 8B model on an FSDP x tensor mesh that was 45.9 GiB of moments on every device
    (benchmarks/results/erase_memory_8b_first_step.json, measured before this fix) instead of their shard.
    """
    return jax.jit(lambda p: init_opt_state(p, ocfg), out_shardings=opt_state_shardings(params, ocfg))(params)
