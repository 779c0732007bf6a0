"""Planning: compile a recipe into a plan (`compile`), lay it into shards (`schedule`), estimate
what running it holds (`cost`, shared with run/) and show it (`render`). No torch.
"""

from recipekit.plan.compile import (
    NO_STACK,
    Plan,
    compile_plan,
    model_from_checkpoint,
    output_config,
)
from recipekit.plan.cost import (
    CHUNK_ELEMS,
    CHUNKED_OVERHEAD,
    COPY_BUFFERS,
    COPY_CHUNK,
    chunkable,
    expression_bytes,
    piece_workers,
    reads_whole_tensor,
    row_sliced,
    rows_per_piece,
    working_set,
)
from recipekit.plan.schedule import PlannedTensor, Shard, natural_key, schedule_shards

__all__ = [
    "CHUNKED_OVERHEAD",
    "CHUNK_ELEMS",
    "COPY_BUFFERS",
    "COPY_CHUNK",
    "NO_STACK",
    "Plan",
    "PlannedTensor",
    "Shard",
    "chunkable",
    "compile_plan",
    "expression_bytes",
    "model_from_checkpoint",
    "natural_key",
    "output_config",
    "piece_workers",
    "reads_whole_tensor",
    "row_sliced",
    "rows_per_piece",
    "schedule_shards",
    "working_set",
]
