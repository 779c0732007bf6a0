"""Prompt-based MoE router initialisation (`cheap_embed`, `hidden`): placeholder.

The `gates` branch builds these modes here (mergekit-moe's §3.3-3.5 in reference/moe.md); until
it is merged, this module holds only the interface `recipekit.steps.moe` calls, and a located
refusal for the two modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from recipekit.errors import RecipeErrors
from recipekit.graph import Node, VirtualModel
from recipekit.recipe import Recipe, Step


@dataclass(frozen=True)
class ExpertPrompts:
    """One gate's prompts: its router row points toward these and away from the negatives."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


def prompt_gate_nodes(step: Step, recipe: Recipe, base: VirtualModel,
                      prompts: Sequence[ExpertPrompts], mode: str) -> list[Node]:
    """One fp32 router-weight node per layer of `base`, shape (len(prompts), hidden).

    Raises:
        RecipeErrors: always, for now: the prompt-based modes are not built yet.
    """
    raise RecipeErrors([recipe.error(
        step.key_path + ("gate_mode",), f"gate_mode {mode!r} is not available in this build",
        hint="use `gate_mode: random` or `uniform_random`")])
