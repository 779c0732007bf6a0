"""Run in mergekit's side venv (not imported by the tests): mergekit-moe 0.1.5's router
weights for a base model and expert prompts, computed as `mergekit-moe` computes them.

Usage: python mergekit_moe_gates.py BASE EXPERTS.json MODE OUT.pt {float32|native}

``EXPERTS.json`` is a list of ``[positive_prompts, negative_prompts]``. It sets up the tokenizer
as ``mergekit/scripts/moe.py`` does (left padding, pad = BOS, else EOS) and calls
``mergekit.moe.router.get_gate_params``; with ``float32`` the base is loaded in fp32 instead of
mergekit's bf16 (``from_pretrained``'s ``torch_dtype``), so that recipekit's fp32 forward can be
compared within 1e-5; ``native`` keeps mergekit's bf16.
"""

import json
import sys

import torch
import transformers
from mergekit.common import ModelReference
from mergekit.moe import router
from mergekit.moe.config import Expert

base, experts_file, mode, out, dtype = sys.argv[1:6]
if dtype == "float32":
    original = transformers.AutoModelForCausalLM.from_pretrained

    def fp32(*args, **kwargs):
        kwargs["torch_dtype"] = torch.float32
        return original(*args, **kwargs)

    router.AutoModelForCausalLM.from_pretrained = fp32
tokenizer = transformers.AutoTokenizer.from_pretrained(base)
tokenizer.padding_side = "left"
tokenizer.pad_token_id = tokenizer.bos_token_id
if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
with open(experts_file) as f:
    listed = json.load(f)
experts = [Expert(source_model=base, positive_prompts=pos, negative_prompts=neg or None)
           for pos, neg in listed]
gates = router.get_gate_params(ModelReference.parse(base), tokenizer, experts, mode=mode,
                               device="cpu")
torch.save(gates.float().contiguous(), out)
