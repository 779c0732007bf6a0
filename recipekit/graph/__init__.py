"""Plan nodes and virtual models: what a recipe compiles to, with no tensor computed.

`graph.nodes` holds the node base (structural equality, hash-consing by `intern`) and the nodes
every step uses; `graph.values` the `VirtualModel`; `graph.lora` and `graph.adapterset` the
adapter sets. An op's own nodes live in its step module. Nothing here imports torch.
"""

from recipekit.graph.lora import (
    F32,
    Concat,
    DeltaCombine,
    Difference,
    LoraDelta,
    LoraFold,
    PackedFactor,
    RangeFinderFactors,
    ScaledSum,
    SvdFactor,
)
from recipekit.graph.nodes import (
    Cast,
    Load,
    Node,
    SameShape,
    cast,
    expression_nodes,
    fp32_copies,
    intern,
    iter_post_order,
    load,
    round_to,
    shared_shape,
)
from recipekit.graph.values import VirtualModel

__all__ = [
    "F32", "Cast", "Concat", "DeltaCombine", "Difference", "Load", "LoraDelta", "LoraFold",
    "Node", "PackedFactor", "RangeFinderFactors", "ScaledSum", "SvdFactor", "VirtualModel",
    "cast", "expression_nodes", "fp32_copies", "intern", "iter_post_order", "load", "round_to",
    "SameShape", "shared_shape",
]
