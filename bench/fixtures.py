"""Synthetic Llama checkpoints for the benchmarks, written straight to safetensors.

Why not ``LlamaForCausalLM(config).save_pretrained(...)``: that materialises the whole model in
RAM (and spends minutes on random init), while these files only need the right names, shapes,
dtype and layout. Here each tensor is generated in fixed-size chunks from a generator seeded by
(seed, tensor name) and written as it is made, so a 2 GiB or 14 GiB fixture costs ~32 MiB of
memory and the bytes are reproducible whatever the chunk size or shard split.

The layout is what ``save_pretrained`` writes: ``model-0000k-of-0000n.safetensors`` shards cut
in state-dict order at ``max_shard_size`` (huggingface_hub's rule: a tensor that would overflow
the current shard starts a new one), tensors inside a shard sorted by name as the safetensors
serializer does, header metadata ``{"format": "pt"}``, ``model.safetensors.index.json`` with
``total_parameters``/``total_size``, plus ``config.json``, ``generation_config.json`` and a
word-level tokenizer with the model's vocab size.

Fixtures are cached under ``bench/.fixtures/<name>-seed<seed>/``; a ``.complete`` stamp holding
the spec is written last, so an interrupted build is redone and a changed spec is rebuilt.

Usage::

    python bench/fixtures.py                 # build the fixtures the benchmarks need now
    python bench/fixtures.py tinyllama mistral-8l --seeds 0,1
    python bench/fixtures.py llama-70b       # sparse files: headers only, no disk used
    python bench/fixtures.py llama-405b      # the same at Llama-3.1-405B's shape (≈ 810 GB)
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FIXTURES_DIR = Path(__file__).resolve().parent / ".fixtures"
STAMP = ".complete"
INDEX = "model.safetensors.index.json"
# Elements generated per step: 8M bf16 values = 16 MiB out, 32 MiB of float32 scratch.
CHUNK_ELEMS = 8 * 1024 * 1024
# Keep this much disk free after building a fixture (outputs of the benchmarks need room too).
DISK_MARGIN = 2 * 1024**3


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a (synthetic) LlamaForCausalLM checkpoint."""

    name: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINYLLAMA = LlamaShape("tinyllama", num_layers=22, hidden=2048, heads=32, kv_heads=4,
                       intermediate=5632, vocab=32000, rms_norm_eps=1e-5)
MISTRAL_8L = LlamaShape("mistral-8l", num_layers=8, hidden=4096, heads=32, kv_heads=8,
                        intermediate=14336, vocab=32000, max_position_embeddings=32768,
                        rms_norm_eps=1e-5, rope_theta=1e6)
MISTRAL_32L = LlamaShape("mistral-32l", num_layers=32, hidden=4096, heads=32, kv_heads=8,
                         intermediate=14336, vocab=32000, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=1e6)
LLAMA_70B = LlamaShape("llama-70b", num_layers=80, hidden=8192, heads=64, kv_heads=8,
                       intermediate=28672, vocab=128256, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, rope_theta=5e5)
LLAMA_405B = LlamaShape("llama-405b", num_layers=126, hidden=16384, heads=128, kv_heads=8,
                        intermediate=53248, vocab=128256, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, rope_theta=5e5)
SHAPES = {s.name: s for s in (TINYLLAMA, MISTRAL_8L, MISTRAL_32L)}
SPARSE_SHAPES = {s.name: s for s in (LLAMA_70B, LLAMA_405B)}

BF16_BYTES = 2


class InsufficientDisk(RuntimeError):
    """Raised instead of filling the disk; callers report the fixture as skipped."""


def iter_tensor_specs(shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in LlamaForCausalLM's state-dict order."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    yield "model.embed_tokens.weight", (shape.vocab, h)
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        yield f"{p}.self_attn.q_proj.weight", (h, h)
        yield f"{p}.self_attn.k_proj.weight", (kv, h)
        yield f"{p}.self_attn.v_proj.weight", (kv, h)
        yield f"{p}.self_attn.o_proj.weight", (h, h)
        yield f"{p}.mlp.gate_proj.weight", (shape.intermediate, h)
        yield f"{p}.mlp.up_proj.weight", (shape.intermediate, h)
        yield f"{p}.mlp.down_proj.weight", (h, shape.intermediate)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    if not shape.tie_embeddings:
        yield "lm_head.weight", (shape.vocab, h)


def numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def checkpoint_bytes(shape: LlamaShape) -> int:
    """Tensor bytes of the checkpoint (headers and JSON files excluded)."""
    return sum(numel(d) for _, d in iter_tensor_specs(shape)) * BF16_BYTES


def split_shards(specs: list[tuple[str, tuple[int, ...]]],
                 max_shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Cut the state dict into shards the way huggingface_hub's splitter does."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in specs:
        nbytes = numel(dims) * BF16_BYTES
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length plus the JSON header (space-padded to 8 bytes), as safetensors writes.

    ``tensors`` must already be in file order (sorted by name for a single dtype).
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        nbytes = numel(dims) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": list(dims),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed, so a tensor's bytes do not depend on what else is built."""
    return (seed << 32) ^ zlib.crc32(name.encode())


def iter_bf16_chunks(name: str, dims: tuple[int, ...], seed: int) -> Iterator[bytes]:
    """Random bf16 values for one tensor, ``CHUNK_ELEMS`` at a time.

    Projections and embeddings are N(0, 0.02) like Llama's init; norms are 1 + N(0, 0.02) so
    they look trained (not all ones, which would make merges of two seeds trivially equal).
    bf16 is the top half of float32, rounded to nearest even, computed in numpy on a chunk.
    """
    rng = np.random.Generator(np.random.PCG64(tensor_seed(seed, name)))
    is_norm = name.endswith("norm.weight")
    left = numel(dims)
    while left:
        n = min(left, CHUNK_ELEMS)
        x = rng.standard_normal(n, dtype=np.float32)
        x *= 0.02
        if is_norm:
            x += 1.0
        bits = x.view(np.uint32)
        bits += 0x7FFF + ((bits >> 16) & 1)  # round to nearest even (no NaNs here)
        yield (bits >> 16).astype(np.uint16).tobytes()
        left -= n


def config_json(shape: LlamaShape, num_layers: int | None = None) -> dict[str, object]:
    """What transformers 5 writes for a LlamaConfig (non-default fields), for ``shape``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.num_layers if num_layers is None else num_layers,
        "num_key_value_heads": shape.kv_heads,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_parameters": {"rope_theta": shape.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": shape.tie_embeddings,
        "transformers_version": "5.23.0",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def tokenizer_files(vocab_size: int) -> dict[str, object]:
    """A word-level fast tokenizer with ``vocab_size`` entries (tokenizer.json + config).

    Why ship one: real checkpoints have a tokenizer, and both tools copy it (mergekit loads and
    re-saves it through transformers, logging an ERROR traceback when there is none), so
    leaving it out would skip work a real run does.
    """
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, tok in enumerate(specials)]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
                 "post_processor": None, "decoder": None,
                 "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def _dump(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fixture_path(shape: LlamaShape, seed: int = 0, root: Path = FIXTURES_DIR) -> Path:
    return root / f"{shape.name}-seed{seed}"


def make_llama_checkpoint(shape: LlamaShape, seed: int = 0, *, root: Path = FIXTURES_DIR,
                          max_shard_size: int = 1_000_000_000, log: bool = True) -> Path:
    """Build (or reuse) a synthetic sharded LlamaForCausalLM checkpoint; return its directory.

    Raises:
        InsufficientDisk: building it would leave less than ``DISK_MARGIN`` free.
    """
    out = fixture_path(shape, seed, root)
    spec = {"shape": asdict(shape), "seed": seed, "max_shard_size": max_shard_size,
            "format": 2}
    if is_cached(out, spec):
        return out
    specs = list(iter_tensor_specs(shape))
    total = checkpoint_bytes(shape)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if total + DISK_MARGIN > free:
        raise InsufficientDisk(f"{out.name} needs {total / 2**30:.1f} GiB (+{DISK_MARGIN >> 30} "
                               f"GiB margin), {free / 2**30:.1f} GiB free")
    out.mkdir()
    shards = split_shards(specs, max_shard_size)
    n = len(shards)
    weight_map: dict[str, str] = {}
    if log:
        print(f"building {out} ({total / 2**30:.2f} GiB, {n} shard(s))", file=sys.stderr)
    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        in_file = sorted(tensors)  # the safetensors serializer orders one dtype by name
        with open(out / fname, "wb") as f:
            f.write(safetensors_header(in_file))
            for name, dims in in_file:
                for chunk in iter_bf16_chunks(name, dims, seed):
                    f.write(chunk)
                weight_map[name] = fname
    if n > 1:
        params = sum(numel(d) for _, d in specs)
        _dump(out / INDEX, {"metadata": {"total_parameters": params, "total_size": total},
                            "weight_map": dict(sorted(weight_map.items()))})
    _dump(out / "config.json", config_json(shape))
    _dump(out / "generation_config.json",
          {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
           "transformers_version": "5.23.0"})
    for fname, data in tokenizer_files(shape.vocab).items():
        _dump(out / fname, data)
    _dump(out / STAMP, spec)
    return out


def is_cached(out: Path, spec: dict[str, object]) -> bool:
    """Whether ``out`` holds a finished build of ``spec``; if not, clear what is there."""
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return True
    if out.exists():
        shutil.rmtree(out)  # stale or partial: ours to replace
    return False


def make_sparse_checkpoint(shape: LlamaShape, *, root: Path = FIXTURES_DIR,
                           max_shard_size: int = 5_000_000_000) -> Path:
    """A checkpoint of full size whose tensor bytes are holes: real headers, index and
    config, for timing what needs only headers (``recipekit plan``). Costs no disk."""
    out = root / f"{shape.name}-sparse"
    spec = {"shape": asdict(shape), "sparse": True, "max_shard_size": max_shard_size}
    if is_cached(out, spec):
        return out
    out.mkdir(parents=True)
    specs = list(iter_tensor_specs(shape))
    shards = split_shards(specs, max_shard_size)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        in_file = sorted(tensors)
        header = safetensors_header(in_file)
        with open(out / fname, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(numel(d) for _, d in in_file) * BF16_BYTES)
        weight_map.update((name, fname) for name, _ in in_file)
    _dump(out / INDEX, {"metadata": {"total_size": checkpoint_bytes(shape)},
                        "weight_map": dict(sorted(weight_map.items()))})
    _dump(out / "config.json", config_json(shape))
    _dump(out / STAMP, spec)
    return out


def make_finetune(shape: LlamaShape, seed: int = 0, *, rank: int = 256, scale: float = 0.1,
                  changed: float = 1.0, root: Path = FIXTURES_DIR, log: bool = True) -> Path:
    """A "fine-tune" of the seed-``seed`` fixture: every 2-D weight plus a delta shaped like a
    real fine-tune's, whose spectrum decays (``B·diag(1/(i+1))·A`` of rank ``rank``, A and B
    Gaussian) with elements of std ``scale`` × the weights' 0.02, rounded to bf16; norms are
    copied. The difference of two independent seeds is a Gaussian matrix (a flat spectrum, the
    hardest case for a rank-64 extraction); this one is what `extract_lora` meets in use.
    With ``changed`` < 1 only that share of each weight's entries (drawn at random) gets its
    delta and the rest keep their bits: a light fine-tune, whose task vector is mostly exact
    zeros in bf16 (the case that once made DELLA 2.4× slower than on Gaussian deltas).
    Same layout, config and tokenizer as the base."""
    base = make_llama_checkpoint(shape, seed)
    part = f"-c{round(changed * 100)}" if changed < 1 else ""
    out = root / f"{shape.name}-ft{rank}{part}-seed{seed}"
    spec = {"shape": asdict(shape), "seed": seed, "rank": rank, "scale": scale, "format": 1,
            **({"changed": changed} if changed < 1 else {})}
    if is_cached(out, spec):
        return out
    out.mkdir(parents=True)
    if log:
        print(f"building {out}", file=sys.stderr)
    for src in sorted(base.iterdir()):
        if src.suffix != ".safetensors":
            if src.name != STAMP:
                shutil.copyfile(src, out / src.name)
            continue
        with open(src, "rb") as f, open(out / src.name, "wb") as w:
            (size,) = struct.unpack("<Q", f.read(8))
            raw = f.read(size)
            w.write(struct.pack("<Q", size) + raw)
            header = json.loads(raw)
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                f.seek(8 + size + start)
                data = f.read(end - start)
                if len(info["shape"]) == 2:
                    data = _plus_delta(data, tuple(info["shape"]), rank, scale,
                                       tensor_seed(seed + 1000, name), changed)
                w.write(data)
    _dump(out / STAMP, spec)
    return out


def _plus_delta(data: bytes, dims: tuple[int, ...], rank: int, scale: float, seed: int,
                changed: float = 1.0) -> bytes:
    """bf16 ``data`` plus the decaying-spectrum delta of `make_finetune` (on a random
    ``changed`` share of the entries), rounded to bf16."""
    rng = np.random.Generator(np.random.PCG64(seed))
    rows, cols = dims
    r = min(rank, rows, cols)
    weights = (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    b = rng.standard_normal((rows, r), dtype=np.float32) / (np.arange(r, dtype=np.float32) + 1)
    a = rng.standard_normal((r, cols), dtype=np.float32)
    delta = b @ a
    delta *= scale * 0.02 / float(delta.std())
    if changed < 1:
        delta[rng.random(dims, dtype=np.float32) >= changed] = 0.0  # x + 0 keeps x's bits
    x = weights.reshape(dims) + delta
    bits = x.view(np.uint32)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16).tobytes()


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora(shape: LlamaShape, rank: int = 64, seed: int = 2, *,
              root: Path = FIXTURES_DIR) -> Path:
    """A PEFT LoRA adapter directory for ``shape``: rank ``rank`` on every linear module of
    every layer, lora_alpha = 2·rank, bf16 factors drawn N(0, 0.02²) (B non-zero, so the fold
    changes every targeted weight), written as PEFT saves it."""
    out = root / f"{shape.name}-lora-r{rank}-seed{seed}"
    spec = {"shape": asdict(shape), "rank": rank, "seed": seed, "format": 1}
    if is_cached(out, spec):
        return out
    out.mkdir(parents=True)
    dims = {name.rsplit(".", 2)[-2]: d for name, d in iter_tensor_specs(shape)
            if name.startswith("model.layers.0.") and name.endswith("proj.weight")}
    tensors = []
    for i in range(shape.num_layers):
        for module in LORA_TARGETS:
            kind = "self_attn" if module[0] in "qkvo" else "mlp"
            n_out, n_in = dims[module]
            p = f"base_model.model.model.layers.{i}.{kind}.{module}"
            tensors += [(f"{p}.lora_A.weight", (rank, n_in)), (f"{p}.lora_B.weight", (n_out, rank))]
    in_file = sorted(tensors)
    with open(out / "adapter_model.safetensors", "wb") as f:
        f.write(safetensors_header(in_file))
        for name, d in in_file:
            for chunk in iter_bf16_chunks(name, d, seed):  # N(0, 0.02)
                f.write(chunk)
    _dump(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(LORA_TARGETS), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": None, "revision": None})
    _dump(out / STAMP, spec)
    return out


def make_tinyllama(seed: int = 0) -> Path:
    """TinyLlama-1.1B shape (22 layers, 2048 wide, 32/4 heads), ~2 GiB bf16, 3 shards."""
    return make_llama_checkpoint(TINYLLAMA, seed)


def make_mistral_8l(seed: int = 0) -> Path:
    """Mistral-7B width (4096, 32/8 heads, 14336 MLP) at 8 layers, ~3.74 GiB bf16."""
    return make_llama_checkpoint(MISTRAL_8L, seed)


def make_mistral_32l(seed: int = 0) -> Path:
    """Mistral-7B width at the full 32 layers, ~13.5 GiB bf16 (only when disk allows)."""
    return make_llama_checkpoint(MISTRAL_32L, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", default=["tinyllama"],
                        help=f"shapes to build, of {', '.join(SHAPES)} (default: tinyllama)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    args = parser.parse_args(argv)
    known = {**SHAPES, **SPARSE_SHAPES}
    unknown = [s for s in args.shapes if s not in known]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    status = 0
    for name in args.shapes:
        if name in SPARSE_SHAPES:
            print(make_sparse_checkpoint(SPARSE_SHAPES[name]))
            continue
        for seed in (int(s) for s in args.seeds.split(",")):
            try:
                path = make_llama_checkpoint(SHAPES[name], seed)
            except InsufficientDisk as e:
                print(f"skipped {name} seed {seed}: {e}", file=sys.stderr)
                status = 1
                continue
            print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
