"""The sparse-MoE checkpoints `op: moe` writes: per output architecture, the dense families it
is built from, its tensor names and the config keys transformers reads (reference/moe.md §2).

Why here: family knowledge lives in `recipekit.arch`, not in the step (the step asks this
table); the values are mergekit-moe 0.1.5's (`moe/mixtral.py`, `moe/qwen.py`, `moe/qwen3.py`)
and transformers 5's class defaults, checked by tests/steps/test_moe.py against both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MoeOutput:
    """One output architecture.

    ``block``: the layer's sparse-MLP module; ``expert_names``: an expert's projection names
    (gate, up, down) in the output; ``experts_key``: the config key of the expert count;
    ``shared_expert``: whether it has (and needs) exactly one shared expert;
    ``intermediate_keys``: config keys set to the experts' intermediate size; ``config``: the
    other keys mergekit sets; ``biases``: the per-layer biases it has a parameter for (a base's
    other biases would be lost); ``zero_qkv_biases``: q/k/v biases the base lacks are written as
    zeros (Qwen2-MoE's attention always has them).
    """

    built_from: tuple[str, ...]
    block: str
    expert_names: Mapping[str, str]
    experts_key: str
    shared_expert: bool
    intermediate_keys: tuple[str, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    biases: tuple[str, ...] = ()
    zero_qkv_biases: bool = False


_SAME = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_COMMON = {"output_router_logits": False, "router_aux_loss_coef": 0.001}
#: Qwen2-MoE's attention: q/k/v biases (``qkv_bias``), none on o_proj or the MLPs
_QKV_BIASES = tuple(f"self_attn.{p}_proj.bias" for p in "qkv")
#: Qwen3(-MoE)'s attention with ``attention_bias: true`` (a key the output's config takes over
#: from the base's): q/k/v/o biases
_ATTENTION_BIASES = tuple(f"self_attn.{p}_proj.bias" for p in "qkvo")

OUTPUTS: dict[str, MoeOutput] = {
    "mixtral": MoeOutput(
        ("llama", "mistral"), "block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3",
                                                   "down_proj": "w2"},
        "num_local_experts", False, (),
        {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "sliding_window": None,
         "router_jitter_noise": 0.0, **_COMMON}),
    "qwen2_moe": MoeOutput(
        ("llama", "mistral", "qwen2"), "mlp", _SAME, "num_experts", True,
        ("shared_expert_intermediate_size", "moe_intermediate_size"),
        {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
         "decoder_sparse_step": 1, "norm_topk_prob": True, "sliding_window": None,
         "use_sliding_window": False, "mlp_only_layers": [], "qkv_bias": True, **_COMMON},
        biases=_QKV_BIASES, zero_qkv_biases=True),
    "qwen3_moe": MoeOutput(
        ("qwen3",), "mlp", _SAME, "num_local_experts", False, ("moe_intermediate_size",),
        {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
         "decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [], **_COMMON},
        biases=_ATTENTION_BIASES),
}
#: `architecture: auto`, as mergekit-moe chooses: by the base's model_type, then Qwen2-MoE for
#: a shared expert, else Mixtral
AUTO_BY_MODEL_TYPE = {"qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}
AUTO_WITH_SHARED = "qwen2_moe"
AUTO_DEFAULT = "mixtral"


def choose_output(model_type: Any, shared: bool) -> str:
    """The output architecture `architecture: auto` picks for a base of ``model_type``."""
    if model_type in AUTO_BY_MODEL_TYPE:
        return AUTO_BY_MODEL_TYPE[model_type]
    return AUTO_WITH_SHARED if shared else AUTO_DEFAULT


def config_keys(arch: str, experts: int, top_k: int, intermediate: int) -> dict[str, Any]:
    """The keys the output's config.json takes over the base's."""
    out = OUTPUTS[arch]
    return {**out.config, out.experts_key: experts, "num_experts_per_tok": top_k,
            **dict.fromkeys(out.intermediate_keys, intermediate)}
