"""Pure domain layer: node ids, levels, tree specs, chain math, update manifests.

No I/O beyond reading a spec file, no Ray, no database. Tensor math lives in
:mod:`hierarchy.chain` and is *not* imported here, so that the light client SDK
can use these value types without pulling in torch.
"""

from hierarchy.errors import ChainError, HierarchyError, InvalidNodePath, SpecError, SpecProblem
from hierarchy.ids import Level, NodeId, NodePath
from hierarchy.spec import (
    BaseSpec,
    GuardSettings,
    LoraSettings,
    NodeSpec,
    TrainSettings,
    TreeSpec,
    Visibility,
    load_spec,
    parse_spec,
)

__all__ = [
    "BaseSpec",
    "ChainError",
    "GuardSettings",
    "HierarchyError",
    "InvalidNodePath",
    "Level",
    "LoraSettings",
    "NodeId",
    "NodePath",
    "NodeSpec",
    "SpecError",
    "SpecProblem",
    "TrainSettings",
    "TreeSpec",
    "Visibility",
    "load_spec",
    "parse_spec",
]
