"""Memory per device of one S-VARE training iteration, from an AOT compile on CPU without weights.

    python benchmarks/erase_memory.py --config configs/erase_memory.py:2b \
        --config.memory.out=benchmarks/results/erase_memory_2b.json

Builds abstract parameters, optimiser state and batch (`jax.ShapeDtypeStruct`: nothing is allocated) and
compiles the program `varejax erase` runs: the same update (`config.train.mode`), jitted by the same
`jit_step(..., donate=True)`, with the model config built from the same fields (`config.numerics`, the
`config.train` overrides, remat, drop path, condition dropout) on the same mesh. Prints, per device:

  parameters (trainable / frozen), optimiser state and gradients (trainable only), from the shapes;
  XLA's memory analysis: arguments, outputs, aliased (donated) bytes, temporaries, and the peak
  arguments + outputs - aliased + temporaries;
  an analytic estimate of the saved activations (what remat keeps: each block's input, the head's inputs)
  and of the chunked attention's per-chunk buffers, so the temporaries split into gradients + saved
  activations + the rest (the block being recomputed, attention chunks, optimiser update, workspace).

The CPU compiler's numbers are an estimate of a GPU/TPU run, not a measurement: see the README section.
Fake a mesh of N CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N (the script sets it
from config.mesh.shape).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

GIB = 1024 ** 3


def _configure_devices(mesh_shape: tuple[int, ...], cpu_scheduler: str = "") -> None:
    """A fake CPU device per mesh slot, and the CPU scheduler. Runs before any device is touched: XLA
    reads its flags when the backend starts, not when JAX is imported."""
    import jax

    count = math.prod(s for s in mesh_shape if s > 0)
    flags = [f"--xla_force_host_platform_device_count={count}"]
    if cpu_scheduler:
        # The CPU default schedules for concurrency and keeps far more buffers live than a memory-aware
        # GPU/TPU scheduler would; the memory-optimised one is the closer stand-in.
        flags.append(f"--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_{cpu_scheduler.upper()}")
    current = os.environ.get("XLA_FLAGS", "")
    for flag in flags:
        if flag.split("=")[0] not in current:
            current = (current + " " + flag).strip()
    os.environ["XLA_FLAGS"] = current
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays / ShapeDtypeStructs (its shard of each sharded leaf)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if not hasattr(leaf, "shape"):
            continue
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            itemsize = 8  # a threefry key: two uint32 words
        else:
            itemsize = np.dtype(dtype).itemsize
        total += math.prod(shape) * itemsize
    return total


def training_model_config(config):
    """The InfinityConfig `varejax erase` trains with: the preset's architecture (no checkpoint here),
    `trainer.model_overrides(config)` (numerics + bf16_params/LoRA), then the training switches that
    `trainer.train` sets (condition dropout, drop path, remat)."""
    from varejax.erase.trainer import model_overrides
    from varejax.models.config import get_preset

    cfg = get_preset(config.memory.model_preset).replace(**model_overrides(config))
    return cfg.replace(cond_drop_rate=float(config.train.cond_drop_rate),
                       drop_path_rate=float(config.train.drop_path_rate), remat=bool(config.train.remat))


def abstract_batch(cfg, config, mesh, rules, L: int) -> dict:
    """The training batch (every field `TrajectoryBatches` yields) as sharded ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    from varejax.parallel import batch_sharding

    B, T = int(config.train.batch_size), min(int(config.memory.text_len), cfg.text_maxlen)
    d, V, C = cfg.bits_per_token, cfg.num_logits, cfg.text_channels
    shapes = {"target_text": ((B, T, C), jnp.float32), "target_mask": ((B, T), jnp.int32),
              "anchor_text": ((B, T, C), jnp.float32), "anchor_mask": ((B, T), jnp.int32),
              "x_BLC_wo_prefix": ((B, L - 1, d), jnp.float32), "gt_bits": ((B, L, d), jnp.int8),
              "teacher_logits": ((B, L, V), jnp.float32), "frozen_concept_logits": ((B, L, V), jnp.float32)}
    return {k: jax.ShapeDtypeStruct(s, t, sharding=batch_sharding(mesh, rules, shape=s))
            for k, (s, t) in shapes.items()}


def batch_fields_read(config, scfg) -> set[str]:
    """The batch fields the update reads; jit drops the others (e.g. `frozen_concept_logits` unless the
    erase loss is `esd`), so they are no argument of the compiled program."""
    from varejax.erase import step

    fields = set(step._erase_keys(scfg))
    if str(config.train.mode) != "erase_only":
        fields |= set(step._PRESERVE_KEYS)
    return fields


def saved_activation_bytes(cfg, batch_per_device: int, L: int, Lp: int, tensor: int) -> dict[str, int | None]:
    """Analytic bytes of what one forward pass keeps for its backward pass, per device.

    With remat (training's default) each block keeps only its input, the float32 residual stream
    [B, Lp, C] (not sharded over `tensor`: act_embed is replicated). Outside the blocks: the block-causal
    mask [Lp, Lp] (bool; none for `scales`), the head's centred and normalised input [B, L, C] (float32)
    and the loss's per-bit terms [B, L, d] (two float32 arrays and a bool mask). Without remat every
    intermediate of every block is kept; that is not estimated here (None). The alternating iteration
    runs its two passes one after the other, so one pass is live at a time. `jax_saved_residual_bytes`
    measures the same quantity from the traced program.
    """
    B, C, d = batch_per_device, cfg.embed_dim, cfg.bits_per_token
    mask = Lp * Lp if cfg.attention_impl in ("xla", "chunked") else 0
    outside = 2 * B * L * C * 4 + B * L * d * (2 * 4 + 1) + mask
    blocks = cfg.depth * B * Lp * C * 4 if cfg.remat else None
    total = None if blocks is None else blocks + outside
    # Chunked attention: one chunk's float32 logits, softmax and logits' gradient [B, H/tensor, chunk, Lp].
    chunk = 256
    heads = max(cfg.num_heads // tensor, 1)
    attention_chunk = 3 * B * heads * min(chunk, Lp) * Lp * 4
    full = 3 * B * heads * Lp * Lp * 4  # the same buffers of full-matrix (`xla`) attention, for comparison
    return {"blocks": blocks, "outside_blocks": outside, "total": total,
            "attention_temporaries": full if cfg.attention_impl == "xla" else attention_chunk}


def jax_saved_residual_bytes(inputs: dict) -> int:
    """Bytes of the residuals JAX saves between the forward and backward pass of the erase objective.

    Traced (not compiled) from abstract inputs: the outputs of the VJP's forward that are neither an
    input (parameters, batch) nor a constant, i.e. what the program asks the compiler to keep alive.
    Global shapes (not per device). This is the program's own answer to "what does remat keep"; the
    compiler may keep more (see the README).
    """
    import jax
    import numpy as np

    from varejax.erase import optim, step

    cfg, scfg, schedule = inputs["cfg"], inputs["scfg"].static(), inputs["schedule"]

    def objective(train, params, batch, rng):
        return step._erase_objective(train, params, batch, rng, cfg, schedule, scfg)[0]

    def forward_and_residuals(train, params, batch, rng):
        return jax.vjp(lambda t: objective(t, params, batch, rng), train)[1]

    train = optim.trainable_params(inputs["params"], scfg.optim.trainable)
    closed = jax.make_jaxpr(forward_and_residuals)(train, inputs["params"], inputs["batch"], inputs["rng"])
    jaxpr = closed.jaxpr
    seen = set(jaxpr.invars) | set(jaxpr.constvars)
    total = 0
    for var in jaxpr.outvars:
        aval = getattr(var, "aval", None)
        if type(var).__name__ == "Literal" or var in seen or aval is None or not hasattr(aval, "shape"):
            continue  # an input, a constant, a literal or counted already: no new memory
        seen.add(var)
        dtype = aval.dtype
        itemsize = 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).itemsize
        total += math.prod(aval.shape) * itemsize
    return total


def abstract_opt_state(params, scfg, mesh, rules, placement: str = "steady"):
    """The optimiser state as sharded ShapeDtypeStructs.

    "steady": every moment sharded like its parameter (`optim.opt_state_shardings`), as each training step
    returns it and as the trainer's `optim.init_opt_state_sharded` creates it.
    "trainer_init": what a plain `jax.jit(init_opt_state)` returns (the trainer's init before that fix):
    its zeros depend on no sharded input, so the moments come back replicated and the first step holds
    the whole state on every device (results/erase_memory_8b_first_step.json).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from varejax.erase import optim
    from varejax.parallel import sharding_context

    shapes = jax.eval_shape(lambda p: optim.init_opt_state(p, scfg.optim), params)
    if placement == "trainer_init":
        replicated = NamedSharding(mesh, PartitionSpec())
        with sharding_context(mesh, rules):
            init = jax.jit(lambda p: optim.init_opt_state(p, scfg.optim)).lower(params).compile()

        def placed(shape, sharding):  # scalars come back on one device: replicate them
            sharding = sharding if isinstance(sharding, NamedSharding) else replicated
            return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)

        return jax.tree.map(placed, shapes, init.output_shardings)
    if placement != "steady":
        raise ValueError(f"config.memory.opt_state_sharding must be steady or trainer_init, not {placement!r}")
    return jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
                        shapes, optim.opt_state_shardings(params, scfg.optim))


def lower_training_step(config, remat: bool | None = None, depth: int | None = None) -> tuple[Any, dict]:
    """Lowers the training iteration of `config` (remat / depth overridden when given) on abstract inputs.

    Returns (the `jax.stages.Lowered` program, its inputs and settings: cfg, scfg, mesh, rules, params,
    opt_state, batch, L, Lp, lower_s). Nothing is allocated.
    """
    import jax

    from varejax.configlib import rules_tuple
    from varejax.erase.step import jit_step
    from varejax.erase.trainer import UPDATES, svare_config
    from varejax.models import apply, schedules
    from varejax.parallel import abstract_sharded_state, check_global_batch, make_mesh, sharding_context

    cfg = training_model_config(config)
    if remat is not None:
        cfg = cfg.replace(remat=remat)
    if depth is not None:  # the one-block probe: same blocks, fewer of them
        cfg = cfg.replace(depth=depth, block_chunks=1)
    schedule = schedules.get_schedule(float(config.h_div_w), str(config.pn))
    L, Lp = schedules.sequence_length(schedule), schedules.padded_length(schedule, cfg.pad_to_multiplier)
    mesh = make_mesh(tuple(config.mesh.shape))
    rules = rules_tuple(config.mesh.rules)
    check_global_batch(int(config.train.batch_size), mesh, rules)  # what training refuses is not estimated
    scfg = svare_config(config)

    params = abstract_sharded_state(apply.abstract_params(cfg), mesh, rules)
    opt_state = abstract_opt_state(params, scfg, mesh, rules, str(config.memory.opt_state_sharding))
    batch = abstract_batch(cfg, config, mesh, rules, L)
    rng = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(0), 0))

    step = jit_step(UPDATES[str(config.train.mode)], donate=True).compiled
    start = time.perf_counter()
    with sharding_context(mesh, rules):
        lowered = step.lower(params, opt_state, batch, rng, cfg=cfg, schedule=schedule, scfg=scfg.static(),
                             diagnostics=False)
    inputs = {"cfg": cfg, "scfg": scfg, "mesh": mesh, "rules": rules, "params": params, "opt_state": opt_state,
              "batch": batch, "rng": rng, "schedule": schedule, "L": L, "Lp": Lp,
              "lower_s": time.perf_counter() - start}
    return lowered, inputs


def estimate(config, remat: bool | None = None, depth: int | None = None, keep_hlo: bool = False,
             residuals: bool = True) -> dict:
    """Compiles the training iteration of `config` (remat / depth overridden when given) and breaks its
    memory down.

    With `residuals` the saved activations are also measured from the traced program
    (`jax_saved_residual_bytes`). With `keep_hlo` the compiled HLO and the lowered StableHLO texts come
    back under "hlo" and "stablehlo".
    """
    import jax

    from varejax.erase import optim
    from varejax.models import apply
    from varejax.parallel import batch_split

    lowered, inputs = lower_training_step(config, remat, depth)
    cfg, scfg, mesh, rules = inputs["cfg"], inputs["scfg"], inputs["mesh"], inputs["rules"]
    params, opt_state, batch, L, Lp = (inputs[k] for k in ("params", "opt_state", "batch", "L", "Lp"))
    lower_s = inputs["lower_s"]
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    xla = {name: int(getattr(mem, f"{name}_size_in_bytes")) for name in
           ("argument", "output", "alias", "temp", "generated_code")}
    peak = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]

    flat = apply.flat_params(params)
    trainable_mask = optim.trainable_mask(flat, scfg.optim.trainable)
    trainable = {k: v for k, v in flat.items() if trainable_mask[k]}
    frozen = {k: v for k, v in flat.items() if not trainable_mask[k]}
    parts = {"params_trainable": per_device_bytes(trainable), "params_frozen": per_device_bytes(frozen),
             "opt_state": per_device_bytes(opt_state), "grads": per_device_bytes(trainable),
             "batch": per_device_bytes({k: v for k, v in batch.items() if k in batch_fields_read(config, scfg)})}
    split = batch_split(mesh, rules)
    batch_per_device = int(config.train.batch_size) // split if int(config.train.batch_size) % split == 0 \
        else int(config.train.batch_size)
    acts = saved_activation_bytes(cfg, batch_per_device, L, Lp, int(mesh.shape["tensor"]))
    rest = None if acts["total"] is None else xla["temp"] - parts["grads"] - acts["total"]
    # Residual stream and loss terms are split over the batch axes; the mask is not (small next to them).
    jax_saved = jax_saved_residual_bytes(inputs) // (split if batch_per_device != int(config.train.batch_size) else 1) \
        if residuals else None

    def gib(x):
        return None if x is None else round(x / GIB, 3)

    budget = float(config.memory.device_gib) * float(config.memory.usable_fraction)
    result = {
        "size": config.memory.size, "model_preset": config.memory.model_preset,
        "mesh": dict(mesh.shape), "devices": int(mesh.devices.size),
        "batch": int(config.train.batch_size), "batch_per_device": batch_per_device,
        "pn": str(config.pn), "L": L, "L_padded": Lp,
        "settings": {"mode": str(config.train.mode), "trainable": str(config.train.trainable),
                     "remat": cfg.remat, "attention_impl": cfg.attention_impl, "attention_chunk": 256,
                     "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
                     "matmul_precision": cfg.matmul_precision, "bf16_params": bool(config.train.bf16_params),
                     "drop_path_rate": cfg.drop_path_rate, "cond_drop_rate": cfg.cond_drop_rate,
                     "opt_state_sharding": str(config.memory.opt_state_sharding)},
        "params": {"total": sum(math.prod(v.shape) for v in flat.values()),
                   "trainable": sum(math.prod(v.shape) for v in trainable.values()),
                   "frozen": sum(math.prod(v.shape) for v in frozen.values())},
        "per_device_GiB": {
            **{k: gib(v) for k, v in parts.items()},
            "saved_activations_est": gib(acts["total"]),
            "saved_activations_blocks_est": gib(acts["blocks"]),
            "saved_activations_jax": gib(jax_saved),
            "attention_temporaries_est": gib(acts["attention_temporaries"]),
            "temp_rest": gib(rest),
            "xla": {k: gib(v) for k, v in xla.items()},
            "peak": gib(peak),
        },
        "per_device_bytes": {**parts, "saved_activations_est": acts["total"], "saved_activations_jax": jax_saved,
                             "xla": xla, "peak": peak},
        "budget_GiB": round(budget, 3),
        "fits_80gb_by_cpu_compile": bool(peak / GIB <= budget),
        "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
        "platform": jax.devices()[0].platform, "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if keep_hlo:
        result["hlo"], result["stablehlo"] = compiled.as_text(), lowered.as_text()
    return result


def add_remat_model(result: dict, probe: dict, config) -> None:
    """Adds the peak a memory-aware compiler reaches when it honours remat, and the verdict `fits_80gb`.

    The compiled one-block program (`probe`) gives the working set of one block's backward pass (its
    recomputed forward, attention chunks, the head and loss, workspace): its temporaries less its
    gradients and saved activations. Remat makes the blocks' backward passes independent, so the full
    iteration needs: its arguments and outputs (from the full compile) + every gradient + every block's
    saved input + one block's working set. The CPU compile of the full program keeps much more alive
    (`fits_80gb_by_cpu_compile`): see the README for why that part is not what a GPU/TPU would allocate.
    """
    full, one = result["per_device_bytes"], probe["per_device_bytes"]
    saved = full["saved_activations_jax"]
    saved = full["saved_activations_est"] if saved is None else saved
    working_set = one["xla"]["temp"] - one["grads"] - one["saved_activations_est"]
    xla = full["xla"]
    peak = xla["argument"] + xla["output"] - xla["alias"] + full["grads"] + saved + working_set
    budget = float(config.memory.device_gib) * float(config.memory.usable_fraction)
    result["remat_model"] = {
        "block_working_set_GiB": round(working_set / GIB, 3),
        "saved_activations_GiB": round(saved / GIB, 3),
        "peak_GiB": round(peak / GIB, 3),
        "probe_temp_GiB": probe["per_device_GiB"]["xla"]["temp"],
        "probe_compile_s": probe["compile_s"],
    }
    result["fits_80gb"] = bool(peak / GIB <= budget)


def main() -> None:
    from varejax.configlib import parse_config_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/erase_memory.py:2b")
    _, config = parse_config_args(parser)
    _configure_devices(tuple(config.mesh.shape), str(config.memory.cpu_scheduler))
    result = estimate(config)
    if config.memory.block_probe:
        add_remat_model(result, estimate(config, depth=1, residuals=False), config)
    if config.memory.baseline_remat_toggled:
        base = estimate(config, remat=not bool(config.train.remat))
        result["baseline_remat_toggled"] = base
        result["peak_ratio_vs_baseline"] = round(result["per_device_GiB"]["peak"] / base["per_device_GiB"]["peak"], 3)
    result["command"] = " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:])
    text = json.dumps(result, indent=1)
    print(text)
    if config.memory.out:
        os.makedirs(os.path.dirname(os.path.abspath(config.memory.out)), exist_ok=True)
        with open(config.memory.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
