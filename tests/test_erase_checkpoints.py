"""Training checkpoints are stored and restored by name: a changed tree fails clearly instead of misloading."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varejax.erase import optim
from varejax.erase.checkpoints import CheckpointMismatchError, Checkpoints, named_leaves
from varejax.errors import UserError


def _state(names: list[tuple[str, ...]], seed: int = 0) -> dict:
    """A training state like the trainer's: trainable params {path: array} and their optimiser state."""
    rng = np.random.default_rng(seed)
    params = {name: jnp.asarray(rng.standard_normal((3, 4)), jnp.float32) for name in names}
    return {"params": params, "opt_state": optim.make_optimizer().init(params)}


KERNELS = [("blocks", "0", "ca", "mat_q", "kernel"), ("blocks", "0", "ffn", "fc1", "kernel")]


def test_names_are_parameter_paths():
    names = named_leaves(_state(KERNELS))
    assert "params/blocks/0/ca/mat_q/kernel" in names
    assert "opt_state/inner_state/1/mu/blocks/0/ffn/fc1/kernel" in names
    assert "opt_state/hyperparams/learning_rate" in names


def test_round_trip_by_name(tmp_path):
    state = _state(KERNELS)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    checkpoints.save(3, state)
    # Restore into a tree whose dict was built in the other order: arrays follow their names.
    like = _state(KERNELS[::-1], seed=1)
    restored = checkpoints.restore(checkpoints.latest_step(), like)
    checkpoints.close()
    for path in KERNELS:
        np.testing.assert_array_equal(restored["params"][path], state["params"][path])
    assert named_leaves(restored).keys() == named_leaves(state).keys()


def test_renamed_parameter_fails_with_the_names(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    checkpoints.save(2, _state(KERNELS))
    # Same number of leaves, same shapes: an index-keyed restore would load the old ffn.fc1 into fc2.
    renamed = _state([KERNELS[0], ("blocks", "0", "ffn", "fc2", "kernel")])
    with pytest.raises(CheckpointMismatchError) as info:
        checkpoints.restore(2, renamed)
    message = str(info.value)
    assert "params/blocks/0/ffn/fc2/kernel" in message and "params/blocks/0/ffn/fc1/kernel" in message
    assert "not in it" in message and "not in this run" in message
    assert isinstance(info.value, UserError)  # the command prints one line: a changed run, not a bug


def test_missing_parameter_and_changed_shape_fail(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    checkpoints.save(1, _state(KERNELS))
    with pytest.raises(CheckpointMismatchError, match=r"arrays in it are not in this run.*ffn/fc1"):
        checkpoints.restore(1, _state(KERNELS[:1]))
    wider = _state(KERNELS)
    wider["params"][KERNELS[1]] = jnp.zeros((3, 5), jnp.float32)
    with pytest.raises(CheckpointMismatchError, match=r"differ.*fc1/kernel: saved \(3, 4\) float32, this run has "
                                                      r"\(3, 5\) float32"):
        checkpoints.restore(1, wider)
    checkpoints.close()


def test_saves_are_asynchronous_but_safe_to_donate(tmp_path):
    """save() returns before the files are written, yet it has its own copy: the caller may free (donate)
    the arrays at once, and restore() / close() wait for the write."""
    state = _state(KERNELS, seed=3)
    expected = jax.tree.map(np.asarray, state)
    checkpoints = Checkpoints(tmp_path / "ckpt")
    checkpoints.save(7, state)
    for leaf in jax.tree.leaves(state):
        leaf.delete()  # what a donating training step does to the buffers right after a save
    restored = checkpoints.restore(7, like=_state(KERNELS, seed=4))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    checkpoints.close()
    assert Checkpoints(tmp_path / "ckpt").latest_step() == 7
