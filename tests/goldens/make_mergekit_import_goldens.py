"""Write mergekit 0.1.5's outputs for the configs in tests/goldens/mergekit_import/configs/.

Run it with the side venv (bench/setup_mergekit.sh), not with recipekit's environment:

    bench/.venv-mergekit/bin/python tests/goldens/make_mergekit_import_goldens.py [--out DIR]

It writes four tiny fp32 Llamas (hidden 8, 4 layers, vocab 16; ``c`` is a base and ``a``, ``b``,
``d`` are base + 0.1·N(0, 1)) under ``mergekit_import/models/`` from fixed generator seeds, runs
``mergekit-yaml`` on each config with the golden folder as the working directory (the configs'
model paths are relative to it, as mergekit resolves them), and saves every output tensor as
``<out>/<config stem>.safetensors`` with the output's ``num_hidden_layers`` in its metadata.
The whole folder stays under 200 KB. tests/test_mergekit_import.py converts each config with
`recipekit import-mergekit`, runs the recipe and compares with these files.

This script imports only torch, safetensors and the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent / "mergekit_import"
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
    "intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 16, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
    "eos_token_id": 2,
}


def shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (16, 8)}
    for i in range(4):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (8, 8), p + "self_attn.k_proj.weight": (4, 8),
                p + "self_attn.v_proj.weight": (4, 8), p + "self_attn.o_proj.weight": (8, 8),
                p + "mlp.gate_proj.weight": (16, 8), p + "mlp.up_proj.weight": (16, 8),
                p + "mlp.down_proj.weight": (8, 16), p + "input_layernorm.weight": (8,),
                p + "post_attention_layernorm.weight": (8,)}
    out |= {"model.norm.weight": (8,), "lm_head.weight": (16, 8)}
    return out


def make_models(root: Path) -> None:
    g = torch.Generator().manual_seed(20261201)
    base = {n: torch.randn(s, generator=g) for n, s in shapes().items()}
    models = {"c": base}
    for name in ("a", "b", "d"):
        models[name] = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    for name, tensors in models.items():
        d = root / "models" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})


def run_case(config: Path, out: Path) -> None:
    mk = Path(sys.executable).parent / "mergekit-yaml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(mk), str(config), tmp, "--no-write-model-card"], check=True,
                       cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tensors = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                tensors |= {k: sf.get_tensor(k) for k in sf.keys()}  # noqa: SIM118 (not iterable)
        layers = json.loads((Path(tmp) / "config.json").read_text())["num_hidden_layers"]
    save_file(tensors, str(out / f"{config.stem}.safetensors"),
              metadata={"num_hidden_layers": str(layers)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--only", default="", help="comma-separated config stems")
    args = ap.parse_args()
    make_models(HERE)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    for config in sorted((HERE / "configs").glob("*.yml")):
        if not only or config.stem in only:
            run_case(config, args.out)
            print("wrote", args.out / f"{config.stem}.safetensors")


if __name__ == "__main__":
    main()
