"""The toy world's detector: a small CNN with one classification head per attribute.

    params = load_oracle("varejax/toy/assets/oracle")
    ids = classify(params, images_uint8)        # {"shape": [N], "colour": [N], "background": [N]} int32
    feats = features(params, images_uint8)      # [N, F] float32, the penultimate layer
    # Frechet distance of two feature sets: varejax.eval.metrics.frechet_distance(feats_a, feats_b)

Architecture (`OracleConfig`): 3x3 convolutions with stride 2, each followed by GroupNorm and ReLU
(64 px -> 2 px with five of them); the final map flattened; a ReLU dense layer (the features); one
linear head per attribute of `world.ATTRIBUTE_NAMES`. `classify` and `features` take the parameter
state only: the architecture is read from the parameter shapes inside the trace.

Images are uint8 RGB [N, 64, 64, 3] or float in [-1, 1] (the tokenizer's range).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from varejax.models import state
from varejax.toy import world
from varejax.toy.world import IMAGE_SIZE


@dataclasses.dataclass(frozen=True)
class OracleConfig:
    """channels: output channels of each conv (3x3, stride 2); feature_dim: penultimate width;
    num_classes: classes per head, in the order of `world.ATTRIBUTE_NAMES`."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 128)
    feature_dim: int = 128
    num_classes: tuple[int, ...] = tuple(world.NUM_CLASSES[name] for name in world.ATTRIBUTE_NAMES)
    groups: int = 8

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "num_classes", tuple(int(c) for c in self.num_classes))
        if len(self.num_classes) != len(world.ATTRIBUTE_NAMES):
            raise ValueError(f"num_classes needs one entry per attribute {world.ATTRIBUTE_NAMES}")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"every channel count must be a multiple of groups={self.groups}: {self.channels}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["channels"], out["num_classes"] = list(self.channels), list(self.num_classes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OracleConfig:
        return cls(**data)


class OracleCNN(nnx.Module):
    def __init__(self, cfg: OracleConfig, rngs: nnx.Rngs):
        convs, norms = [], []
        n_in = 3
        for n_out in cfg.channels:
            convs.append(nnx.Conv(n_in, n_out, (3, 3), strides=2, padding="SAME", rngs=rngs,
                                  kernel_init=nnx.initializers.he_normal()))
            norms.append(nnx.GroupNorm(n_out, num_groups=cfg.groups, rngs=rngs))
            n_in = n_out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        side = IMAGE_SIZE
        for _ in cfg.channels:
            side = -(-side // 2)
        self.fc = nnx.Linear(n_in * side * side, cfg.feature_dim, rngs=rngs,
                             kernel_init=nnx.initializers.he_normal())
        self.heads = nnx.List([nnx.Linear(cfg.feature_dim, k, rngs=rngs) for k in cfg.num_classes])

    def features(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = jax.nn.relu(norm(conv(x)))
        return jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        feats = self.features(images)
        return feats, [head(feats) for head in self.heads]


def init_params(cfg: OracleConfig, seed: int = 0) -> nnx.State:
    """Freshly initialised oracle parameters."""
    return state.init_state(OracleCNN, cfg, seed)


def config_from_params(params: nnx.State) -> OracleConfig:
    """The architecture of a parameter state, from its shapes (works on tracers)."""
    flat = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(params)}
    n_convs = len({k[1] for k in flat if k[0] == "convs"})
    n_heads = len({k[1] for k in flat if k[0] == "heads"})
    channels = tuple(int(flat[("convs", str(i), "kernel")].shape[-1]) for i in range(n_convs))
    classes = tuple(int(flat[("heads", str(i), "kernel")].shape[-1]) for i in range(n_heads))
    groups = int(OracleConfig.__dataclass_fields__["groups"].default)
    return OracleConfig(channels=channels, feature_dim=int(flat[("fc", "kernel")].shape[-1]), num_classes=classes,
                        groups=groups)


def bind(params: nnx.State) -> OracleCNN:
    """The module holding `params` (inside or outside a trace)."""
    return state.bind(OracleCNN, params, config_from_params(params))


def as_float(images: jax.Array) -> jax.Array:
    """uint8 -> float32 in [-1, 1] (`images.to_float`); float images are taken as already in [-1, 1]."""
    from varejax import images as image_io

    if images.dtype == jnp.uint8:
        return image_io.to_float(images)
    return images.astype(jnp.float32)


def logits(params: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
    """{attribute: logits [N, classes]}."""
    _, heads = bind(params)(as_float(images))
    return dict(zip(world.ATTRIBUTE_NAMES, heads, strict=True))


@jax.jit
def classify(params: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
    """{attribute: predicted class ids [N] int32} of uint8 or [-1, 1] float images [N, 64, 64, 3]."""
    return {name: jnp.argmax(lg, axis=-1).astype(jnp.int32) for name, lg in logits(params, images).items()}


@jax.jit
def features(params: nnx.State, images: jax.Array) -> jax.Array:
    """Penultimate-layer features [N, F] float32 (for a Frechet distance)."""
    return bind(params).features(as_float(images))


def classify_batched(params: nnx.State, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """`classify` over a large array in fixed-size batches (one compilation), as numpy arrays."""
    from varejax.batching import map_padded

    if len(images) == 0:
        return {name: np.zeros(0, np.int32) for name in world.ATTRIBUTE_NAMES}
    return map_padded(lambda idx: classify(params, images[idx]), len(images), batch)


def accuracy(params: nnx.State, images: np.ndarray, labels: dict[str, np.ndarray], batch: int = 256
             ) -> dict[str, float]:
    """Per-attribute accuracy of the oracle on labelled images."""
    ids = classify_batched(params, images, batch)
    return {name: float(np.mean(ids[name] == np.asarray(labels[name]))) for name in world.ATTRIBUTE_NAMES}


def state_from_flat(cfg: OracleConfig, flat: dict[tuple[str, ...], Any]) -> nnx.State:
    """The parameter state of `cfg` holding the arrays of `flat` (KeyError / ValueError on a mismatch)."""
    return state.fill_state(state.abstract_state(OracleCNN, cfg), flat)


def read_oracle_config(model_dir: str) -> dict[str, Any]:
    """config.json of an oracle folder (format checked): model, accuracy, training record."""
    from varejax.checkpoint import read_meta

    return read_meta(model_dir, "oracle")


def load_oracle(model_dir: str) -> nnx.State:
    """The oracle's parameters from a folder written by `varejax toy train`."""
    from varejax.checkpoint import ModelDirError, restore_flat

    meta = read_oracle_config(str(model_dir))
    cfg = OracleConfig.from_dict(meta["model"])
    try:
        return state_from_flat(cfg, restore_flat(model_dir))
    except (KeyError, ValueError) as err:
        raise ModelDirError(f"{model_dir}: parameters do not match its config.json: {err}") from None


def write_oracle(out: str, params: nnx.State, meta: dict[str, Any], overwrite: bool = False) -> None:
    """An oracle model folder: params/ and config.json (format, model config, and the fields of `meta`)."""
    from varejax.checkpoint import save_model

    save_model(out, "oracle", config_from_params(params), params, extra=meta, overwrite=overwrite)
