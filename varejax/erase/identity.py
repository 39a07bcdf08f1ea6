"""What a run's saved state was made from, checked before a re-run reuses it.

A re-run in the same workdir resumes: it skips the trajectories already sampled and restores the last
checkpoint. That is right after a preemption and silently wrong after a change of inputs: another base
model (a retrained toy world, `VAREJAX_TOY_ASSETS`, another `config.model.infinity`), other prompt pairs,
other sampling settings. So the first start writes `identity.json` into the trajectories folder and the
checkpoints folder, and every later start compares what it is about to run with it and refuses, naming
what differs, when they disagree.

The base model is identified by a fingerprint of its parameters, not of its files (preloaded models,
as in sweeps, have none): per array, the sum, the sum of absolute values and the sum of squares in
float32, compared with a relative tolerance (`FINGERPRINT_RTOL`) because the reduction order, and so
the rounding, depends on how the arrays are sharded. The values are rounded to bfloat16 first and LoRA
factors are left out, so that the training options that change how the base is held (bf16 storage, LoRA
adapters) keep its fingerprint: runs that differ only in those share one trajectory folder (sweeps do).
It tells models apart (any retraining or other checkpoint changes nearly every sum in the first
digits), not single flipped weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from varejax.errors import UserError
from varejax.paths import as_path, write_text_atomic

IDENTITY_FILE = "identity.json"
# float32 sums of up to ~1e8 terms reduced in different orders agree to ~1e-6 relative; models differ by far more
FINGERPRINT_RTOL = 1e-4


class RunIdentityError(UserError):
    """A workdir's trajectories or checkpoints were made from other inputs than the run re-using them."""


@jax.jit
def _leaf_statistics(leaves: list[Any]) -> list[Any]:
    def stats(x):
        x = x.astype(jnp.bfloat16).astype(jnp.float32)
        return jnp.stack([jnp.sum(x), jnp.sum(jnp.abs(x)), jnp.sum(x * x)])

    return [stats(x) for x in leaves]


def params_fingerprint(params: Any) -> dict[str, list[float]]:
    """{array name: [sum, sum |x|, sum x^2]} of every floating-point array of `params` but LoRA factors, in
    bfloat16-rounded values (multi-host safe: the reductions of global arrays are replicated, every process
    gets the same values)."""
    from varejax.erase.checkpoints import named_leaves
    from varejax.models.lora import host_array

    named = {name: leaf for name, leaf in named_leaves(params).items()
             if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
             and not {"lora_a", "lora_b"} & set(name.split("/"))}
    stats = _leaf_statistics(list(named.values()))
    return {name: [float(v) for v in host_array(s)] for name, s in zip(named, stats, strict=True)}


def digest(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_differences(saved: Mapping[str, Sequence[float]], current: Mapping[str, Sequence[float]],
                            rtol: float = FINGERPRINT_RTOL) -> list[str]:
    """Human-readable differences between two `params_fingerprint`s (empty when they agree)."""
    missing, added = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    out = []
    if missing:
        out.append(f"{len(missing)} saved parameter arrays are not in the model (e.g. {missing[0]})")
    if added:
        out.append(f"{len(added)} parameter arrays of the model were not saved (e.g. {added[0]})")
    changed = []
    for name in sorted(set(saved) & set(current)):
        (s0, a0, q0), (s1, a1, q1) = saved[name], current[name]
        scale = max(a0, a1, 1e-30)
        if abs(s0 - s1) > rtol * scale or abs(a0 - a1) > rtol * scale or abs(q0 - q1) > rtol * max(q0, q1, 1e-30):
            changed.append((name, a0, a1))
    if changed:
        name, a0, a1 = changed[0]
        out.append(f"{len(changed)} of {len(set(saved) & set(current))} parameter arrays hold other values "
                   f"(e.g. {name}: sum |x| {a0:.6g} saved, {a1:.6g} now)")
    return out


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a saved and a current identity: the model by fingerprint, the rest exactly."""
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if key == "model" and old is not None and new is not None:
            out += [f"base model: {d}" for d in fingerprint_differences(old, new)]
        elif old != new:
            out.append(f"{key}: {_short(old)} saved, {_short(new)} now")
    return out


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def check_or_record(directory: Any, identity: Mapping[str, Any], what: str, has_state: bool) -> None:
    """Compares `identity` with DIRECTORY/identity.json, or writes it there.

    Args:
      directory: the folder whose contents `identity` describes (created when missing).
      identity: JSON-able description of the inputs (a "model" entry is a `params_fingerprint`).
      what: what the folder holds, for the error ("trajectories", "checkpoints").
      has_state: whether the folder already holds state the run would reuse. Without a saved identity
        (a workdir from before identities were recorded) that state is trusted and the identity written.

    Raises:
      RunIdentityError: the saved identity differs; the message says what differs and how to go on.
    """
    from varejax.parallel.distributed import is_main_process

    directory = as_path(directory)
    path = directory / IDENTITY_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        differences = identity_differences(saved, identity)
        if differences and has_state:
            raise RunIdentityError(
                f"{directory} holds {what} of another run; re-running here would resume it with other inputs:\n  "
                + "\n  ".join(differences)
                + f"\nUse a new --workdir, or delete {directory} to start over (nothing was changed).")
        if not differences:
            return
    if is_main_process():  # other processes compute the same identity
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(identity, sort_keys=True, indent=1) + "\n")

