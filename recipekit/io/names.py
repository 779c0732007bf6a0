"""File names of the checkpoint layouts recipekit reads and writes, defined once.

A model checkpoint is ``config.json`` plus ``model.safetensors`` or a sharded
``model.safetensors.index.json``; a PEFT adapter directory is ``adapter_config.json`` plus
``adapter_model.safetensors``; an output also holds recipekit's manifest and, while a run is
under way, its state file. Every module that names one of these files imports it from here.
"""

from __future__ import annotations

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Pickle weights recipekit refuses to load (`recipekit convert --allow-pickle` converts them).
ADAPTER_PICKLE = "adapter_model.bin"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin",
                ADAPTER_PICKLE)
#: Files that hold weights (never copied from a donor, fetched from the hub only per shard) and
#: folders of weights in other formats or of bookkeeping.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                   ".onnx_data", ".gguf", ".ot", ".tflite", ".mlmodel", ".npz")
WEIGHT_DIRS = ("onnx", "openvino", "coreml", ".git", ".cache")
MODEL_CARD = "README.md"
#: Tokenizer files an output's chat template touches: transformers 5 saves a template as
#: chat_template.jinja (which it prefers to tokenizer_config.json's `chat_template` key), named
#: extra templates under additional_chat_templates/ (`transformers.utils.hub.CHAT_TEMPLATE_DIR`),
#: and processors' older chat_template.json.
TOKENIZER_JSON = "tokenizer.json"  # the fast tokenizer (the `tokenizers` library's file)
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
CHAT_TEMPLATE_JSON = "chat_template.json"
MANIFEST = "recipekit.json"
STATE = ".recipekit-state.json"


def is_absolute_local(value: object) -> bool:
    """Whether ``value`` is an absolute local path (POSIX, ``~``, or Windows drive/UNC): what
    a published output must not name (e.g. a config's ``_name_or_path`` or an adapter's
    ``base_model_name_or_path`` recorded on the writer's machine)."""
    return isinstance(value, str) and (value.startswith(("/", "~", "\\")) or (
        len(value) > 2 and value[1] == ":" and value[2] in "\\/"))
