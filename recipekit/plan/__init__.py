"""Planning: compile a recipe into a plan (`compile`), lay it into shards (`schedule`), estimate
what running it holds (`cost`, shared with run/) and show it (`render`). No torch.

The piece-size tunables (`CHUNK_ELEMS`, `CHUNKED_OVERHEAD`) are not re-exported: they are read
from `recipekit.plan.cost` at call time, so that is the one place to change (or monkeypatch)
them.
"""

from recipekit import callable_package
from recipekit.plan.compile import (
    NO_STACK,
    Plan,
    compile_plan,
    model_from_checkpoint,
    output_config,
)
from recipekit.plan.cost import (
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

callable_package(__name__, "plan")  # `recipekit.plan(...)` is `recipekit.api.plan`
