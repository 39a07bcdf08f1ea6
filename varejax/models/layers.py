"""Small building blocks shared by the models: dense layers with logical axes, norms, activations.

Every parameter carries `logical_axes` metadata (one logical name per dimension); `varejax.parallel`
maps those names to mesh axes. Matmuls run in the configured compute dtype and precision; norms are
always computed in float32, as upstream does under autocast.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("varejax_shapes_only", default=False)


def shapes_only_active() -> bool:
    return _SHAPES_ONLY.get()


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Inside `jax.eval_shape`: skip tracing random initialisers (only shapes and dtypes matter)."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], dtype: str,
          std: float = 0.0, fill: float = 0.0) -> nnx.Param:
    """A parameter with logical axes: truncated normal with `std`, or the constant `fill` when std == 0."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    if std > 0 and not _SHAPES_ONLY.get():
        value = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, tuple(shape), F32) * std
    else:
        value = jnp.full(tuple(shape), fill, F32)
    return nnx.Param(value.astype(dtype_of(dtype)), logical_axes=tuple(axes))


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] (torch Linear weights are transposed on import).

    With `lora_rank` r > 0 the layer also holds LoRA factors `lora_a` [in, r] and `lora_b` [r, out]
    and returns x @ kernel + bias + ((x @ lora_a) @ lora_b) * lora_scale, every matmul in the compute
    dtype (PEFT's order: the adapter term is added to the biased base output). Both factors are created
    as zeros here; `lora_a_init` gives A its values (`Infinity` does that by path, from its
    `lora_seed`), and B = 0 makes the initial layer equal the base layer exactly.
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 rngs: nnx.Rngs, param_dtype: str = "float32", compute_dtype: str = "float32",
                 precision: str = "highest", use_bias: bool = True, std: float | None = None,
                 lora_rank: int = 0, lora_scale: float = 1.0):
        std = math.sqrt(1.0 / (3.0 * in_features)) if std is None else std
        self.kernel = param(rngs, (in_features, out_features), axes, param_dtype, std=std)
        self.bias = param(rngs, (out_features,), (axes[1],), param_dtype) if use_bias else None
        self.lora_a = param(None, (in_features, lora_rank), (axes[0], "lora"), param_dtype) if lora_rank else None
        self.lora_b = param(None, (lora_rank, out_features), ("lora", axes[1]), param_dtype) if lora_rank else None
        self.lora_scale = float(lora_scale)
        self.compute_dtype = compute_dtype
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = dtype_of(self.compute_dtype)
        x = x.astype(dtype)
        y = jnp.matmul(x, self.kernel[...].astype(dtype), precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.lora_a is not None:
            low = jnp.matmul(x, self.lora_a[...].astype(dtype), precision=self.precision)
            update = jnp.matmul(low, self.lora_b[...].astype(dtype), precision=self.precision)
            y = y + update * jnp.asarray(self.lora_scale, dtype)
        return y


def lora_a_init(seed: int, path: Sequence[str], in_features: int, rank: int) -> np.ndarray:
    """The initial LoRA `lora_a` [in, r] of the layer at `path`: float32, deterministic in (seed, path).

    PEFT's (and loralib's) default: torch `kaiming_uniform_(A, a=sqrt(5))` on A^T [r, in], which is
    U(-1/sqrt(in), 1/sqrt(in)). Drawn on the host from numpy's PCG64 seeded by (seed, crc32(path)), so
    a layer's factor does not depend on which other layers have adapters or on device placement.
    """
    key = zlib.crc32(".".join(str(p) for p in path).encode())
    bound = 1.0 / math.sqrt(in_features)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, key])
    return rng.uniform(-bound, bound, size=(in_features, rank)).astype(np.float32)


def materialize_cotangent(x: jax.Array, mode: str = "auto") -> jax.Array:
    """Identity whose backward pass materialises the incoming gradient (a fusion boundary).

    XLA fuses the residual stream's gradient (a running sum over every later sub-layer, through each
    layer norm's backward) into each of its consumers and recomputes the chain once per consumer, in the
    transposed layout the weight gradients read: measured on CPU (issue-16 sizes), 54 such fusions
    took 95 of the ~545 ms of the gradient; with this boundary after each sub-layer, 28 ms.
    `mode`: "on", "off" or "auto" (on for the CPU backend only: on GPU the boundary, a conditional,
    would cost a device-to-host sync of its predicate).
    """
    if mode == "auto":
        mode = "on" if jax.default_backend() == "cpu" else "off"
    return _cotangent_boundary(x) if mode == "on" else x


@jax.custom_jvp
def _cotangent_boundary(x: jax.Array) -> jax.Array:
    return x


@_cotangent_boundary.defjvp
def _boundary_jvp(primals, tangents):
    # The tangent map is a conditional; reverse mode transposes it into a conditional on the cotangent,
    # a boundary no XLA fusion crosses (XLA:CPU drops optimization barriers before fusion). Its predicate
    # (a primal value) cannot be folded, and its branches differ, so they are not merged: when the
    # activation's first entry is not finite, derivatives come out NaN (they would be poisoned anyway).
    # A custom_jvp rather than a custom_vjp keeps forward-mode derivatives (jvp, Hessian products) working.
    (x,), (t,) = primals, tangents
    finite = jnp.isfinite(x.reshape(-1)[0])
    return x, jax.lax.cond(finite, lambda u: u, lambda u: u * jnp.nan, t)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, in float32."""
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps)


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps), in float32."""
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class LayerNorm(nnx.Module):
    """Affine LayerNorm (torch `nn.LayerNorm` with weight and bias), computed in float32."""

    def __init__(self, features: int, eps: float, *, param_dtype: str = "float32"):
        self.scale = param(None, (features,), ("norm",), param_dtype, fill=1.0)
        self.bias = param(None, (features,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps) * self.scale[...].astype(F32) + self.bias[...].astype(F32)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale, computed in float32."""

    def __init__(self, features: int, eps: float, *, param_dtype: str = "float32"):
        self.scale = param(None, (features,), ("norm",), param_dtype, fill=1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.eps) * self.scale[...].astype(F32)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (torch `GELU(approximate='tanh')`)."""
    return jax.nn.gelu(x, approximate=True)


def round_to_bf16(x: jax.Array) -> jax.Array:
    """Rounds float32 values to the nearest bfloat16 (ties to even), returned as float32.

    Emulates a bf16 kernel boundary. Done on the bit pattern: XLA may drop an f32->bf16->f32 convert
    pair (it allows excess precision by default), which would silently skip the rounding.
    """
    x = x.astype(F32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    lsb = (bits >> 16) & jnp.uint32(1)
    rounded = (bits + jnp.uint32(0x7FFF) + lsb) & jnp.uint32(0xFFFF0000)
    return jnp.where(jnp.isnan(x), x, jax.lax.bitcast_convert_type(rounded, F32))


def drop_path(x: jax.Array, rate: float | jax.Array, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth per sample (timm DropPath: keep with 1 - rate, rescale by 1 / (1 - rate))."""
    # A traced rate (blocks under lax.scan) always draws: a rate of 0 then keeps every sample.
    if rng is None or (isinstance(rate, (int, float)) and rate <= 0.0):
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (mask.astype(x.dtype) / keep)
