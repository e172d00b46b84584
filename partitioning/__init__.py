"""Device mesh, logical-axis rules and the partitioner (shardings of params and batches).

    from partitioning import MeshConfig, Partitioner, make_mesh
    partitioner = Partitioner(make_mesh(MeshConfig(data=2, fsdp=-1)), "fsdp")
"""

from partitioning.mesh import MESH_AXES, MeshConfig, make_mesh
from partitioning.partitioner import Partitioner
from partitioning.rules import (
    LOGICAL_AXES,
    PRESETS,
    LogicalRules,
    activate,
    get_rules,
    logical_to_mesh_spec,
    with_logical_constraint,
)

__all__ = [
    "LOGICAL_AXES",
    "MESH_AXES",
    "PRESETS",
    "LogicalRules",
    "MeshConfig",
    "Partitioner",
    "activate",
    "get_rules",
    "logical_to_mesh_spec",
    "make_mesh",
    "with_logical_constraint",
]
