"""The FID Inception network (pytorch-fid's `InceptionV3` with `use_fid_inception=True`) in Flax NNX.

FID numbers are only comparable when every step matches the network the reference statistics were made
with, so this port follows pytorch-fid 0.3.0 exactly:

* input: uint8 RGB, divided by 255 in float32 (torchvision `ToTensor`), resized to 299x299 with
  bilinear interpolation, align_corners=False and NO antialiasing, also when downsampling (torch
  `F.interpolate` semantics, `resize_bilinear_torch`), then normalised to 2x - 1 (`preprocess`);
* `BasicConv2d` = conv without bias -> BatchNorm with running statistics and eps 1e-3 -> ReLU;
* the A/C/E_1 blocks' pool branch averages 3x3 windows that do NOT count the zero padding
  (`avg_pool_3x3_same`), and Mixed_7c's pool branch is a 3x3 MAX pool (a quirk of the 2015 TF graph
  that FID keeps);
* pool3 = mean of Mixed_7c over space: the 2048-d features FID uses.

Layout is NHWC (channels last); parameter paths mirror the torch names (`Mixed_5b.branch1x1.conv.kernel`
for torch `Mixed_5b.branch1x1.conv.weight`), so the converter (`varejax.convert.inception`) derives the
whole key table from this module. The fc layer (1008 classes) is kept for `logits`, not used by FID.

Every function computes in the dtype of its input: float32 normally, float64 for an exact comparison
with a float64 reference (with `with jax.enable_x64(True):`, parameters cast by `cast_params`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from varejax.models.layers import shapes_only_active
from varejax.models.state import bind, graph_and_abstract_state

INPUT_SIZE = 299
FEATURE_DIMS = 2048
BN_EPS = 1e-3
# Names of the blocks whose outputs `InceptionV3.__call__` reports (channel means), in execution order:
# block0 = after the first stem max pool (64 x 73 x 73), block1 = after the second (192 x 35 x 35).
BLOCK_NAMES = ("block0", "block1", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
               "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """The FID Inception network has one architecture; `num_classes` is the size of its (unused) fc layer."""

    num_classes: int = 1008

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InceptionConfig:
        return cls(**d)


DEFAULT_CONFIG = InceptionConfig()


# ---- preprocessing (numpy, exactly as torch) ---------------------------------------------------------

def _source_indices(in_size: int, out_size: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                              np.ndarray]:
    """torch's bilinear source indices and weights along one axis (align_corners=False), computed in `dtype`
    like torch does for that input dtype: (i0, i1, w0, w1) with out[j] = w0[j] x[i0[j]] + w1[j] x[i1[j]]."""
    scale = dtype.type(in_size) / dtype.type(out_size)
    src = scale * (np.arange(out_size).astype(dtype) + dtype.type(0.5)) - dtype.type(0.5)
    src = np.maximum(src, dtype.type(0))  # torch clamps negative coordinates to the first pixel
    i0 = src.astype(np.int64)  # truncation = floor for src >= 0
    i1 = i0 + (i0 < in_size - 1)  # the last pixel is replicated at the far edge
    w1 = np.clip(src - i0.astype(dtype), dtype.type(0), dtype.type(1))
    return i0, i1, dtype.type(1) - w1, w1


def resize_bilinear_torch(images: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """[N, H, W, C] float32/float64 -> [N, size, size, C]: torch `F.interpolate(mode="bilinear",
    align_corners=False)` without antialiasing (only the 2x2 nearest source pixels count, also when
    downsampling), width first then height as torch's CPU kernel. A size x size input comes back unchanged."""
    x = np.asarray(images)
    dtype = x.dtype
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"resize expects float32 or float64 images, got {dtype}")
    h0, h1, hw0, hw1 = _source_indices(x.shape[1], size, dtype)
    c0, c1, cw0, cw1 = _source_indices(x.shape[2], size, dtype)
    rows = x[:, :, c0, :] * cw0[None, None, :, None] + x[:, :, c1, :] * cw1[None, None, :, None]
    return rows[:, h0] * hw0[None, :, None, None] + rows[:, h1] * hw1[None, :, None, None]


def preprocess(images: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """uint8 RGB [N, H, W, 3] -> the network input [N, 299, 299, 3] in `dtype` (float32 or float64).

    As pytorch-fid: x / 255 in float32 (ToTensor; done here in numpy because XLA may rewrite a division by
    a constant into a multiplication, 1 ulp off), upcast to `dtype`, bilinear resize to 299, then 2x - 1.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images [N, H, W, 3], got {images.dtype} {images.shape}")
    dtype = np.dtype(dtype)
    x = (images.astype(np.float32) / np.float32(255)).astype(dtype)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear_torch(x)
    return dtype.type(2) * x - dtype.type(1)


# ---- layers ------------------------------------------------------------------------------------------

def _zeros(shape: tuple[int, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32))


class BasicConv2d(nnx.Module):
    """torch `BasicConv2d`: Conv2d(bias=False) -> BatchNorm2d(eps=1e-3, running statistics) -> ReLU.

    Parameters: `conv.kernel` [kh, kw, in, out], `bn.scale`/`bn.bias`/`bn.mean`/`bn.var` [out]. Random
    initialisation (He normal, unit BatchNorm) only serves tests; real weights come from the converter.
    """

    def __init__(self, n_in: int, n_out: int, kernel: tuple[int, int], *, rngs: nnx.Rngs,
                 stride: int = 1, padding: tuple[int, int] = (0, 0)):
        kh, kw = kernel
        std = float(np.sqrt(2.0 / (n_in * kh * kw)))
        init = (jnp.zeros((kh, kw, n_in, n_out), jnp.float32) if shapes_only_active()
                else jax.random.normal(rngs.params(), (kh, kw, n_in, n_out), jnp.float32) * std)
        self.conv = nnx.Dict(kernel=nnx.Param(init))
        self.bn = nnx.Dict(scale=nnx.Param(jnp.ones((n_out,), jnp.float32)), bias=_zeros((n_out,)),
                           mean=_zeros((n_out,)), var=nnx.Param(jnp.ones((n_out,), jnp.float32)))
        self.stride = stride
        self.padding = ((padding[0], padding[0]), (padding[1], padding[1]))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.conv["kernel"][...].astype(x.dtype)
        y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        # torch's CPU inference BatchNorm: x * alpha + beta with alpha = weight / sqrt(var + eps).
        alpha = self.bn["scale"][...].astype(x.dtype) / jnp.sqrt(self.bn["var"][...].astype(x.dtype) + BN_EPS)
        beta = self.bn["bias"][...].astype(x.dtype) - self.bn["mean"][...].astype(x.dtype) * alpha
        return jax.nn.relu(y * alpha + beta)


def max_pool_3x3(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    """3x3 max pool; padding (if any) never wins (it is -inf), as in torch."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 padding)


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """avg_pool2d(3, stride 1, padding 1, count_include_pad=False): a border window is divided by the number
    of real pixels in it (4 in a corner, 6 on an edge), not by 9."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, jnp.array(0, x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    return total / count


def _cat(*branches: jax.Array) -> jax.Array:
    return jnp.concatenate(branches, axis=-1)


class FIDInceptionA(nnx.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool (no padding counted) -> 1x1."""

    def __init__(self, n_in: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(n_in, 64, (1, 1), rngs=rngs)
        self.branch5x5_1 = BasicConv2d(n_in, 48, (1, 1), rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, (5, 5), padding=(2, 2), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(n_in, 64, (1, 1), rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, (3, 3), padding=(1, 1), rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, (3, 3), padding=(1, 1), rngs=rngs)
        self.branch_pool = BasicConv2d(n_in, pool_features, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _cat(self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(avg_pool_3x3_same(x)))


class InceptionB(nnx.Module):
    """Mixed_6a (torchvision block): stride-2 3x3 | 1x1 -> 3x3 -> stride-2 3x3 | stride-2 max pool."""

    def __init__(self, n_in: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(n_in, 384, (3, 3), stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(n_in, 64, (1, 1), rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, (3, 3), padding=(1, 1), rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, (3, 3), stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _cat(self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    max_pool_3x3(x, 2))


class FIDInceptionC(nnx.Module):
    """Mixed_6b..6e: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1."""

    def __init__(self, n_in: int, c7: int, *, rngs: nnx.Rngs):
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(n_in, 192, (1, 1), rngs=rngs)
        self.branch7x7_1 = BasicConv2d(n_in, c7, (1, 1), rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row, rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(n_in, c7, (1, 1), rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row, rngs=rngs)
        self.branch_pool = BasicConv2d(n_in, 192, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return _cat(self.branch1x1(x), b7, d, self.branch_pool(avg_pool_3x3_same(x)))


class InceptionD(nnx.Module):
    """Mixed_7a (torchvision block): 1x1 -> stride-2 3x3 | 1x1 -> 1x7 -> 7x1 -> stride-2 3x3 | max pool."""

    def __init__(self, n_in: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(n_in, 192, (1, 1), rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, (3, 3), stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(n_in, 192, (1, 1), rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, (3, 3), stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return _cat(self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool_3x3(x, 2))


class FIDInceptionE(nnx.Module):
    """Mixed_7b (`max_pool=False`: FIDInceptionE_1) and Mixed_7c (`max_pool=True`: FIDInceptionE_2).

    1x1 | 1x1 -> [1x3, 3x1] | 1x1 -> 3x3 -> [1x3, 3x1] | pool -> 1x1, where [a, b] concatenates two
    convs of the same input. Mixed_7c pools with a 3x3 max (stride 1, padding 1), Mixed_7b averages.
    """

    def __init__(self, n_in: int, *, max_pool: bool, rngs: nnx.Rngs):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(n_in, 320, (1, 1), rngs=rngs)
        self.branch3x3_1 = BasicConv2d(n_in, 384, (1, 1), rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, **row, rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, **col, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(n_in, 448, (1, 1), rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, (3, 3), padding=(1, 1), rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row, rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col, rngs=rngs)
        self.branch_pool = BasicConv2d(n_in, 192, (1, 1), rngs=rngs)
        self.max_pool = max_pool

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = max_pool_3x3(x, 1, pad=1) if self.max_pool else avg_pool_3x3_same(x)
        return _cat(self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(d),
                    self.branch3x3dbl_3b(d), self.branch_pool(pooled))


class InceptionV3(nnx.Module):
    """The FID Inception network: `model(x)` -> (pool3 [N, 2048], {block name: channel means [N, C]}).

    `x` is the preprocessed input [N, 299, 299, 3] (`preprocess`); other sizes run too (FID never uses them).
    """

    def __init__(self, cfg: InceptionConfig, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, (3, 3), stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, (3, 3), rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, (3, 3), padding=(1, 1), rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, (1, 1), rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, (3, 3), rngs=rngs)
        self.Mixed_5b = FIDInceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = FIDInceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = FIDInceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = FIDInceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = FIDInceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = FIDInceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = FIDInceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False, rngs=rngs)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True, rngs=rngs)
        std = float(np.sqrt(1.0 / FEATURE_DIMS))
        init = (jnp.zeros((FEATURE_DIMS, cfg.num_classes), jnp.float32) if shapes_only_active()
                else jax.random.normal(rngs.params(), (FEATURE_DIMS, cfg.num_classes), jnp.float32) * std)
        self.fc = nnx.Dict(kernel=nnx.Param(init), bias=_zeros((cfg.num_classes,)))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        means = {}

        def tap(name: str, y: jax.Array) -> jax.Array:
            means[name] = jnp.mean(y, axis=(1, 2))
            return y

        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = tap("block0", max_pool_3x3(x, 2))
        x = tap("block1", max_pool_3x3(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2))
        for name in BLOCK_NAMES[2:]:
            x = tap(name, getattr(self, name)(x))
        return means["Mixed_7c"], means  # pool3 = AdaptiveAvgPool2d(1) of Mixed_7c

    def logits(self, pool3: jax.Array) -> jax.Array:
        """torchvision's fc on pool3 (not part of FID; 1008 ImageNet-2012 + extra classes of the TF graph)."""
        return pool3 @ self.fc["kernel"][...].astype(pool3.dtype) + self.fc["bias"][...].astype(pool3.dtype)


def abstract_params(cfg: InceptionConfig = DEFAULT_CONFIG) -> nnx.State:
    """Parameter shapes and dtypes (float32) of the network, without allocating them."""
    return graph_and_abstract_state(InceptionV3, cfg)[1]


def cast_params(params: nnx.State, dtype: Any) -> nnx.State:
    """The parameters in `dtype` (float64 needs `with jax.enable_x64(True):`)."""
    return jax.tree.map(lambda v: jnp.asarray(v, dtype), params)


def forward(params: nnx.State, x: jax.Array, cfg: InceptionConfig = DEFAULT_CONFIG
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pure forward pass: (pool3, block channel means) of preprocessed inputs, in the inputs' dtype."""
    return bind(InceptionV3, params, cfg)(x)


@functools.partial(jax.jit, static_argnames="cfg")
def forward_jit(params: nnx.State, x: jax.Array, cfg: InceptionConfig = DEFAULT_CONFIG
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`forward`, jitted: one compile per input shape and dtype (keep the batch size fixed)."""
    return forward(params, x, cfg)


def logits(params: nnx.State, pool3: jax.Array, cfg: InceptionConfig = DEFAULT_CONFIG) -> jax.Array:
    """The fc layer's class logits [N, num_classes] of pool3 features."""
    return bind(InceptionV3, params, cfg).logits(pool3)
