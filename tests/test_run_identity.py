"""The identity a workdir keeps of what its trajectories and checkpoints were made from
(varejax.erase.identity): a fingerprint that tells models apart but not reduction orders, and a check that
refuses only when there is state to reuse."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varejax.erase import identity


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"blocks": {"0": {"kernel": jnp.asarray(rng.normal(size=(256, 64)), jnp.float32),
                             "bias": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}},
            "norm": {"scale": jnp.ones((64,), jnp.bfloat16)}, "step": jnp.asarray(3, jnp.int32)}


def test_fingerprint_ignores_summation_order_and_names_a_changed_array():
    params = _params()
    fingerprint = identity.params_fingerprint(params)
    assert sorted(fingerprint) == ["blocks/0/bias", "blocks/0/kernel", "norm/scale"]  # floats only
    # The same values summed in another order (another sharding): float32 rounding differs, no difference.
    shuffled = jax.tree.map(lambda x: x, params)
    shuffled["blocks"]["0"]["kernel"] = params["blocks"]["0"]["kernel"][::-1].T[::-1].T
    other_order = identity.params_fingerprint(shuffled)
    assert identity.fingerprint_differences(fingerprint, other_order) == []
    # The base held in bfloat16 (bf16_params) or with LoRA factors added: the same fingerprint.
    held = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, params)
    held["blocks"]["0"]["lora_a"] = jnp.ones((256, 2), jnp.float32)
    assert identity.params_fingerprint(held) == fingerprint
    # One array scaled by 1.001: reported by name.
    scaled = jax.tree.map(lambda x: x, params)
    scaled["blocks"]["0"]["bias"] = params["blocks"]["0"]["bias"] * 1.001
    (difference,) = identity.fingerprint_differences(fingerprint, identity.params_fingerprint(scaled))
    assert difference.startswith("1 of 3 parameter arrays hold other values (e.g. blocks/0/bias")
    # Another model: every array that differs (the norm's ones do not); an array added or removed is named.
    assert "2 of 3" in identity.fingerprint_differences(fingerprint, identity.params_fingerprint(_params(1)))[0]
    fewer = dict(fingerprint)
    fewer.pop("norm/scale")
    assert identity.fingerprint_differences(fingerprint, fewer) == [
        "1 saved parameter arrays are not in the model (e.g. norm/scale)"]


def test_check_or_record_refuses_only_when_state_would_be_reused(tmp_path):
    folder = tmp_path / "trajectories"
    first = {"model": identity.params_fingerprint(_params()), "pair_count": 4, "schedule": [[1, 1, 1]]}
    identity.check_or_record(folder, first, "trajectories", has_state=False)
    assert json.loads((folder / "identity.json").read_text())["pair_count"] == 4
    identity.check_or_record(folder, first, "trajectories", has_state=True)  # the same run: resumes
    changed = {**first, "model": identity.params_fingerprint(_params(1)), "pair_count": 5}
    with pytest.raises(identity.RunIdentityError) as error:
        identity.check_or_record(folder, changed, "trajectories", has_state=True)
    message = str(error.value)
    assert "holds trajectories of another run" in message
    assert "base model: 2 of 3 parameter arrays hold other values" in message
    assert "pair_count: 4 saved, 5 now" in message
    assert f"delete {folder}" in message
    assert json.loads((folder / "identity.json").read_text())["pair_count"] == 4  # nothing changed
    # Nothing to reuse (the state was deleted, the identity left): the new identity is recorded.
    identity.check_or_record(folder, changed, "trajectories", has_state=False)
    assert json.loads((folder / "identity.json").read_text())["pair_count"] == 5
