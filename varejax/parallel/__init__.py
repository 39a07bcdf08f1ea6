"""Meshes, logical sharding rules and multi-host setup."""

from varejax.parallel.mesh import (
                                   abstract_sharded_state,
                                   batch_sharding,
                                   make_mesh,
                                   param_shardings,
                                   param_specs,
                                   shard_state,
)
from varejax.parallel.rules import DEFAULT_RULES, MESH_AXES, constrain, logical_to_spec, sharding_context

__all__ = [
    "abstract_sharded_state", "DEFAULT_RULES", "MESH_AXES", "batch_sharding", "constrain", "logical_to_spec",
    "make_mesh", "param_shardings", "param_specs", "shard_state", "sharding_context",
]
