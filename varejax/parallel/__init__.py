"""Meshes, logical sharding rules and multi-host setup."""

from varejax.parallel.mesh import (
                                   abstract_sharded_state,
                                   batch_sharding,
                                   batch_split,
                                   check_global_batch,
                                   check_mesh_spans_processes,
                                   make_mesh,
                                   param_shardings,
                                   param_specs,
                                   process_rows,
                                   shard_state,
)
from varejax.parallel.rules import DEFAULT_RULES, MESH_AXES, constrain, logical_to_spec, sharding_context

__all__ = [
    "abstract_sharded_state", "DEFAULT_RULES", "MESH_AXES", "batch_sharding", "batch_split",
    "check_global_batch", "check_mesh_spans_processes", "constrain", "logical_to_spec",
    "make_mesh", "param_shardings", "param_specs", "process_rows", "shard_state", "sharding_context",
]
