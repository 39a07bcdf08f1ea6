"""Strict key mapping: every upstream tensor to exactly one parameter, checked before anything is read.

A converter is data: a list of `KeyRule`s (upstream key -> our parameter path, the upstream shape it
must have, and a transform) plus `BufferRule`s for non-parameters that are checked and dropped. `plan`
compares a checkpoint's key/shape table with the rules without reading tensor bytes, and collects
every problem at once; `ConversionError` renders them with a likely cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from varejax.convert.sources import CheckpointError, CheckpointSource, iter_loaded

ParamPath = tuple[str, ...]


def transpose_2d(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def conv_to_hwio(x: np.ndarray) -> np.ndarray:
    """torch conv weight [O, I, kh, kw] -> Flax [kh, kw, I, O]."""
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """Upstream tensor `key` of `shape` becomes parameter `path` after `transform`."""

    key: str
    path: ParamPath
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] = identity


@dataclasses.dataclass(frozen=True)
class BufferRule:
    """A non-parameter tensor: `check` (if any) must hold, then it is dropped.

    `required` buffers must be present (upstream always saves them); optional ones are derived caches
    some checkpoints carry.
    """

    key: str
    shape: tuple[int, ...] | None
    check: Callable[[np.ndarray], str | None] | None = None
    required: bool = True


def must_be_zero(x: np.ndarray) -> str | None:
    worst = float(np.max(np.abs(x.astype(np.float32)))) if x.size else 0.0
    return None if worst == 0.0 else f"expected all zeros (a fixed buffer), max |value| = {worst:g}"


@dataclasses.dataclass
class Plan:
    """Result of matching a checkpoint's keys and shapes against the rules."""

    rules: list[KeyRule]
    buffers: list[BufferRule]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, expected, found
    dropped: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def plan(shapes: Mapping[str, tuple[int, ...]], rules: Sequence[KeyRule], buffers: Sequence[BufferRule]) -> Plan:
    """Matches a key -> shape table against the rules (no tensor is read)."""
    keys = [r.key for r in rules] + [b.key for b in buffers]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:  # a bug in a rule table, not in the user's file
        raise AssertionError(f"key table maps these keys twice: {dup[:5]}")
    paths = [r.path for r in rules]
    if len(set(paths)) != len(paths):
        raise AssertionError("key table maps two keys to one parameter")
    missing, mismatched, dropped = [], [], []
    for rule in rules:
        if rule.key not in shapes:
            missing.append(rule.key)
        elif tuple(shapes[rule.key]) != tuple(rule.shape):
            mismatched.append((rule.key, tuple(rule.shape), tuple(shapes[rule.key])))
    for buf in buffers:
        if buf.key not in shapes:
            if buf.required:
                missing.append(buf.key)
            continue
        if buf.shape is not None and tuple(shapes[buf.key]) != tuple(buf.shape):
            mismatched.append((buf.key, tuple(buf.shape), tuple(shapes[buf.key])))
        dropped.append(buf.key)
    known = set(keys)
    unexpected = sorted(k for k in shapes if k not in known)
    return Plan(list(rules), list(buffers), missing, unexpected, mismatched, dropped)


class ConversionError(CheckpointError):
    """The checkpoint does not match the model: lists every problem and the likely cause."""


# The likely cause when keys are missing and nothing else is wrong, for every model.
TRUNCATED = ("Likely cause: the file is truncated or a partial shard (keys are missing, nothing else is wrong); "
             "check its size/sha256 or the shard index.")


def common_prefix(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    for prefix in ("module.", "_orig_mod.", "model.", "gpt.", "vae."):
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return None


def explain(p: Plan, source: str, arch: str, alternatives: Mapping[str, Plan] | None = None,
            limit: int = 12) -> str:
    """A readable report of a failed plan, with the most likely cause first."""
    lines = [f"{source} does not match --arch {arch}: {len(p.missing)} missing, {len(p.unexpected)} unexpected, "
             f"{len(p.mismatched)} mis-shaped tensors."]
    matching = [name for name, alt in (alternatives or {}).items() if alt.ok]
    prefix = common_prefix(p.unexpected) if p.unexpected else None
    if prefix and len(p.missing) < len(p.unexpected):
        # Fewer missing than unexpected keys (optional buffers): blame the prefix only if removing it
        # names tensors the model expects.
        known = {r.key for r in p.rules} | {b.key for b in p.buffers}
        if not any(k[len(prefix):] in known for k in p.unexpected):
            prefix = None
    if matching:
        lines.append(f"Likely cause: wrong --arch; the file matches --arch {' / '.join(matching)} exactly.")
    elif prefix:
        lines.append(f"Likely cause: every key starts with {prefix!r} (a wrapper such as DDP or torch.compile); "
                     f"save the inner module's state_dict instead.")
    elif p.missing and not p.unexpected and not p.mismatched:
        lines.append(TRUNCATED)
    elif p.mismatched and not p.missing and not p.unexpected:
        lines.append("Likely cause: same architecture family with other sizes: wrong --arch, or a config.json "
                     "whose sizes differ from the checkpoint's.")
    elif p.missing or p.unexpected:
        lines.append("Likely cause: a different model or --arch (depth/block_chunks change key names).")
    return "\n".join(lines + problem_lines(p, limit))


def problem_lines(p: Plan, limit: int = 12) -> list[str]:
    """One line per mis-shaped, missing and unexpected tensor (at most `limit` of each), then a count."""
    lines = [f"  shape  {key}: expected {list(expected)}, found {list(found)}" for key, expected, found
             in p.mismatched[:limit]]
    lines += [f"  missing  {key}" for key in p.missing[:limit]]
    lines += [f"  unexpected  {key}" for key in p.unexpected[:limit]]
    hidden = sum(max(0, len(problems) - limit) for problems in (p.mismatched, p.missing, p.unexpected))
    if hidden:
        lines.append(f"  ... and {hidden} more")
    return lines


def check(p: Plan, source: str, arch: str, alternatives: Mapping[str, Plan] | None = None) -> None:
    if not p.ok:
        raise ConversionError(explain(p, source, arch, alternatives))


def load_mapped(source: CheckpointSource, p: Plan, dtype: np.dtype | str = np.float32,
                progress: Callable[[Iterable], Iterable] | None = None) -> dict[ParamPath, np.ndarray]:
    """Reads the tensors of a successful plan: checks buffers, applies transforms, casts to `dtype`."""
    if not p.ok:
        raise ConversionError("cannot load a plan with errors")
    out: dict[ParamPath, np.ndarray] = {}
    by_key = {r.key: r for r in p.rules}
    buffers = {b.key: b for b in p.buffers}
    keys = [r.key for r in p.rules] + [k for k in p.dropped if buffers[k].check is not None]
    stream = iter_loaded(source, keys)
    if progress is not None:
        stream = progress(stream)
    for key, value in stream:
        if key in buffers:
            _check_buffer(source, buffers[key], value)
            continue
        rule = by_key[key]
        value = rule.transform(np.asarray(value, dtype=np.float32) if value.dtype != np.float32 else value)
        out[rule.path] = value.astype(dtype)
    return out


def _check_buffer(source: CheckpointSource, rule: BufferRule, value: np.ndarray) -> None:
    problem = rule.check(value)
    if problem:
        raise ConversionError(f"{source.tensors[rule.key].file}: buffer {rule.key!r}: {problem}")


def check_buffers(source: CheckpointSource, p: Plan) -> None:
    """Reads and checks only the dropped buffers of a plan (what a dry run can afford for small buffers)."""
    buffers = {b.key: b for b in p.buffers}
    for key, value in iter_loaded(source, [k for k in p.dropped if buffers[k].check is not None]):
        _check_buffer(source, buffers[key], value)
