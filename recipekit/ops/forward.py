"""A decoder-only transformer's forward pass, one layer at a time: pure tensor math, no I/O.

Why: mergekit-moe's `hidden` gate mode needs the base model's hidden states for a few prompts
and loads the whole model to get them (reference/moe.md §4.1). Layer l's states need only
layers < l, so the caller (steps/moe_gates.py) can read one layer's weights, advance every
prompt batch through it with `decoder_layer`, and drop the weights before the next layer.

The math is Llama's as transformers 5 writes it (`modeling_llama.py`), which Mistral, Qwen2 and
Qwen3 share: RMSNorm in fp32, rotary embeddings on the first ``head_dim`` features with
``cat(freqs, freqs)`` (``rotate_half``), grouped-query attention with a causal mask (and
Mistral's sliding window), a SwiGLU MLP; Qwen2 adds q/k/v biases, Qwen3 RMS-normalises each
head of q and k before the rotation. Oracle: tests/ops/test_forward.py compares every layer's
input with transformers' ``output_hidden_states`` on tiny Llama, Mistral, Qwen2 and Qwen3
models (GQA, non-default rope_theta, biases) within 1e-5 in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Rotary variants `inverse_frequencies` computes; others (yarn, longrope, dynamic) are refused.
ROPE_TYPES = ("default", "linear", "llama3")
#: config.json ``model_type`` values whose decoder layer `decoder_layer` computes.
FORWARD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ForwardSpec:
    """The numbers a layer's forward needs besides its weights (hashable: part of a plan node).

    ``rope`` holds ``(rope_type, theta, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings)``; ``sliding_window`` is None for full attention.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: tuple[str, float, float, float, float, int]
    sliding_window: int | None = None


def inverse_frequencies(spec: ForwardSpec) -> Any:
    """The rotary inverse frequencies (``head_dim / 2`` values, fp32), as transformers'
    `ROPE_INIT_FUNCTIONS` compute them for the default, linear and llama3 rope types."""
    import torch

    kind, theta, factor, low, high, original = spec.rope
    dim = spec.head_dim
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotary_tables(spec: ForwardSpec, length: int, device: Any = None) -> tuple[Any, Any]:
    """(cos, sin), each (length, head_dim) in fp32, for positions 0..length-1."""
    import torch

    inv = inverse_frequencies(spec).to(device)
    positions = torch.arange(length, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """``weight * x / sqrt(mean(x²) + eps)`` over the last dimension, in fp32."""
    import torch

    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * x


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _linear(x: Any, weight: Any, bias: Any = None) -> Any:
    import torch

    return torch.nn.functional.linear(x, weight.float(), None if bias is None else bias.float())


def attention_mask(length: int, sliding_window: int | None, device: Any = None) -> Any:
    """(length, length) bool, True where query i may attend to key j: j ≤ i, and
    i − j < ``sliding_window`` when there is one (Mistral)."""
    import torch

    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    return allowed


def padded_mask(real: Any, sliding_window: int | None) -> Any:
    """(batch, 1, seq, seq) bool for left-padded rows: `attention_mask` and the key is not a
    pad (``real``: (batch, seq) bool, False at pads). A pad query attends to nothing."""
    causal = attention_mask(real.shape[1], sliding_window, real.device)
    return (causal[None, :, :] & real[:, None, :])[:, None, :, :]


def decoder_layer(h: Any, w: Mapping[str, Any], spec: ForwardSpec, rope: tuple[Any, Any],
                  mask: Any) -> Any:
    """One pre-norm decoder layer on ``h`` (batch, seq, hidden) in fp32.

    ``w`` holds the layer's tensors by their name within the layer
    (``self_attn.q_proj.weight``, optional ``self_attn.q_proj.bias`` and
    ``self_attn.q_norm.weight``, ``mlp.gate_proj.weight``, ...); ``rope`` is `rotary_tables`
    for at least ``seq`` positions and ``mask`` a bool (seq, seq) or (batch, 1, seq, seq),
    True where a query may attend to a key (`attention_mask`, `padded_mask`).

    h' = h + o(attn(norm₁(h))), then h' + down(silu(gate(x)) · up(x)) with x = norm₂(h').
    """
    import torch

    b, s, _ = h.shape
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    x = rms_norm(h, w["input_layernorm.weight"], spec.rms_norm_eps)
    q = _linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
    k = _linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
    v = _linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
    q, k, v = q.view(b, s, nh, hd), k.view(b, s, nkv, hd), v.view(b, s, nkv, hd)
    if "self_attn.q_norm.weight" in w:  # Qwen3: each head normalised before the rotation
        q = rms_norm(q, w["self_attn.q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], spec.rms_norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = rope[0][:s], rope[1][:s]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    group = nh // nkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    # a query that may attend to nothing (a left pad) gets zeros, as torch's SDPA gives
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    attn = probs @ v
    attn = attn.transpose(1, 2).reshape(b, s, nh * hd)
    h = h + _linear(attn, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
    x = rms_norm(h, w["post_attention_layernorm.weight"], spec.rms_norm_eps)
    gate = _linear(x, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias"))
    up = _linear(x, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
    return h + _linear(torch.nn.functional.silu(gate) * up, w["mlp.down_proj.weight"],
                       w.get("mlp.down_proj.bias"))


def forward_spec(config: Mapping[str, Any]) -> ForwardSpec | str:
    """The forward's numbers from a base config, or the config value ops/forward.py cannot
    compute, as "<key> '<value>' (it computes ...)"."""
    kind = config.get("model_type")
    if kind not in FORWARD_FAMILIES:
        return f"model_type '{kind}' (it computes {', '.join(FORWARD_FAMILIES)})"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act '{config.get('hidden_act')}' (it computes SwiGLU with silu)"
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        return f"rope_type '{rope_type}' (it computes {', '.join(ROPE_TYPES)})"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        return "partial_rotary_factor (it rotates every head feature)"
    if kind != "mistral" and config.get("use_sliding_window"):
        return "use_sliding_window (it windows only Mistral's attention)"
    window = config.get("sliding_window") if kind == "mistral" else None
    rope = (rope_type, theta, float(params.get("factor", 1.0)),
            float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0)),
            int(params.get("original_max_position_embeddings", 8192)))
    return ForwardSpec(heads, kv, head_dim, float(config.get("rms_norm_eps", 1e-6)), rope,
                       int(window) if window else None)
