"""Benchmark recipekit against mergekit 0.1.5 and the copy floor (DESIGN.md section 7).

    python bench/run.py [--runs N] [--cases solar,...]

Method, the same for every tool so the numbers compare:

* inputs are read once before every run, so the page cache is warm for all tools alike;
* before that, other fixtures are read until less than 1 GiB of memory is free, so that every
  tool writes into reclaimed page cache, not into free memory (see `fill_free_memory`);
* each tool runs as its own process and its wall time includes start-up (imports, parsing);
* peak memory is the maximum over time of the process tree's VmRSS (and RssAnon), sampled
  every 20 ms from /proc (see ``measure.py``);
* runs alternate (recipekit, ..., mergekit, copy floor, recipekit, ...) and each variant
  reports the median of ``--runs`` (>= 2) runs;
* before each run the previous output is deleted and ``sync`` flushes other dirty pages, so no
  tool pays for another's writeback; outputs go to the disk the inputs are on;
* the first round checks every tool's output tensor by tensor against the bytes it must hold.

recipekit fsyncs every shard by default and mergekit never does, so recipekit is also run
with ``--no-fsync``; the copy floor ends with a sync, as DESIGN asks.

Tables and raw JSON go to ``bench/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402 - bench/ is a folder of scripts, not a package
from measure import run_measured  # noqa: E402

BENCH = Path(__file__).resolve().parent
MERGEKIT_VENV = BENCH / ".venv-mergekit"
RESULTS = BENCH / "results"
MERGEKIT = "mergekit"
FLOOR = "copy floor"
#: the copy floor without its final sync: the reference of `recipekit --no-fsync`
CACHE_FLOOR = "copy floor --no-sync"
READ_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Variant:
    """One command to time: a tool with its flags."""

    tool: str  # "recipekit", MERGEKIT or FLOOR: what the ratios are taken against
    label: str  # the table's "tool" column
    argv: Callable[[Path], list[str]]  # the command, given a fresh output directory
    env: dict[str, str] | None = None
    verify: bool = True  # check its output's tensors (the floor writes filler)
    same_as: str | None = None  # label of a variant whose shards it must equal byte for byte
    exit_ok: tuple[int, ...] = (0,)  # exit codes of a successful run (`diff`: 1 = they differ)


@dataclass(frozen=True)
class Case:
    """One piece of work, done by every variant."""

    name: str
    description: str
    inputs: list[Path]  # files to warm into the page cache before each run
    variants: list[Variant]
    expected: dict[str, tuple[Path, str]]  # output tensor -> (input file, input tensor)
    expected_config: dict[str, object]  # config.json fields the output must have
    targets: dict[str, float]  # e.g. {"wall_vs_mk": 0.5}; checked for plain "recipekit"
    #: a check of each variant's first output whose text fills the "output check" column
    #: (e.g. an extracted LoRA's reconstruction error), where `verify_output` does not apply
    measure: Callable[[Path], str] | None = None


@dataclass
class Record:
    """All runs of one variant."""

    variant: str
    tool: str
    runs: list[dict[str, object]] = field(default_factory=list)
    verified: str = "not checked"
    shards: dict[str, str] | None = None  # shard -> sha256 from the first run's manifest
    same: str = ""  # the byte comparison with `Variant.same_as`, once made

    def ok_runs(self) -> list[dict[str, object]]:
        return [r for r in self.runs if r["ok"]]

    def median(self, key: str) -> float | None:
        values = [float(r[key]) for r in self.ok_runs()]  # type: ignore[arg-type]
        return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# Reading safetensors headers (for verification and the floor's output size).


def read_header(path: Path) -> tuple[int, dict[str, dict[str, object]]]:
    """(data start offset, tensor entries) of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


Location = tuple[Path, int, int, str, list[int]]  # file, start, end, dtype, shape


def tensor_locations(model_dir: Path) -> dict[str, Location]:
    """tensor name -> (file, start, end, dtype, shape) over every shard in ``model_dir``."""
    where: dict[str, Location] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        start, header = read_header(path)
        for name, info in header.items():
            a, b = info["data_offsets"]  # type: ignore[misc]
            where[name] = (path, start + a, start + b, info["dtype"], info["shape"])
    return where


def digest_tensor(loc: Location) -> str:
    """dtype, shape and sha1 of one stored tensor: equal strings mean equal tensors."""
    path, start, end, dtype, shape = loc
    return f"{dtype}{shape}:{digest_range(path, start, end)}"


def digest_range(path: Path, start: int, end: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = end - start
        while left:
            data = f.read(min(left, READ_CHUNK))
            if not data:
                raise OSError(f"{path} ended early")
            h.update(data)
            left -= len(data)
    return h.hexdigest()


def verify_output(out: Path, case: Case, source_digests: dict[tuple[Path, str], str]) -> str:
    """"ok" if ``out`` holds exactly the expected tensors and config fields, else the problem."""
    have = tensor_locations(out)
    if set(have) != set(case.expected):
        missing = sorted(set(case.expected) - set(have))[:3]
        extra = sorted(set(have) - set(case.expected))[:3]
        return f"tensor names differ (missing {missing}, unexpected {extra})"
    for name, (src_file, src_name) in sorted(case.expected.items()):
        got, want = digest_tensor(have[name]), source_digests[(src_file, src_name)]
        if got != want:
            return f"{name} differs from {src_file.name}:{src_name} ({got} vs {want})"
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json unreadable: {e}"
    for key, value in case.expected_config.items():
        if config.get(key) != value:
            return f"config.json {key} = {config.get(key)!r}, expected {value!r}"
    return "ok"


def source_locations(expected: dict[str, tuple[Path, str]]) -> dict[str, Location]:
    """input tensor name -> location, for every input checkpoint the case reads."""
    locations: dict[str, Location] = {}
    for model_dir in sorted({src_file.parent for src_file, _ in expected.values()}):
        locations.update({f"{model_dir}::{k}": v
                          for k, v in tensor_locations(model_dir).items()})
    return locations


def digest_sources(case: Case) -> dict[tuple[Path, str], str]:
    """Digest of every input tensor an output tensor must equal (read once per benchmark)."""
    locs = source_locations(case.expected)
    digests = {}
    for src_file, src_name in set(case.expected.values()):
        digests[(src_file, src_name)] = digest_tensor(locs[f"{src_file.parent}::{src_name}"])
    return digests


# ---------------------------------------------------------------------------------------------
# Cases.


def recipekit_command() -> list[str]:
    """The console script beside this Python, else on PATH, else ``python -m recipekit``
    (a checkout on PYTHONPATH, as on a GPU machine with no install)."""
    exe = Path(sys.executable).with_name("recipekit")
    found = str(exe) if exe.exists() else shutil.which("recipekit")
    return [found] if found else [sys.executable, "-m", "recipekit"]


def compile_bytecode() -> None:
    """Byte-compile the recipekit package under test, as ``pip install`` does for a wheel.

    Why: an editable install under ``PYTHONDONTWRITEBYTECODE=1`` (set on these machines)
    never writes ``__pycache__``, so every timed run compiled its ~150 modules from source
    again (0.1–0.3 s a run, a third of `inspect`'s distance to its target), while mergekit's
    venv holds the compiled files pip wrote. Existing bytecode is reused by the imports with
    or without that variable."""
    spec = importlib.util.find_spec("recipekit")
    if spec is None or not spec.submodule_search_locations:
        return
    compileall.compile_dir(spec.submodule_search_locations[0], quiet=1)


def recipekit_argv(recipe: Path, *flags: str) -> Callable[[Path], list[str]]:
    cmd = recipekit_command()
    return lambda out: [*cmd, "run", str(recipe), "--output", str(out), "-q", *flags]


def mergekit_argv(config: Path) -> Callable[[Path], list[str]]:
    return lambda out: [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(config), str(out)]


def mergekit_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def floor_argv(inputs: list[Path], nbytes: int, *, sync: bool = True
               ) -> Callable[[Path], list[str]]:
    script = BENCH / "floor.py"

    def argv(out: Path) -> list[str]:
        out.mkdir(parents=True, exist_ok=True)
        return [sys.executable, str(script), "--out", str(out / "model.safetensors"),
                "--bytes", str(nbytes), *([] if sync else ["--no-sync"]), *map(str, inputs)]
    return argv


def single_shard_size(expected: dict[str, tuple[Path, str]]) -> int:
    """Bytes of the output written as one safetensors file (header included)."""
    locs = source_locations(expected)
    tensors = [(name, tuple(locs[f"{src_file.parent}::{src_name}"][4]))
               for name, (src_file, src_name) in sorted(expected.items())]
    return len(fixtures.safetensors_header(tensors)) + sum(
        fixtures.numel(dims) * fixtures.BF16_BYTES for _, dims in tensors)


def solar_case(shape: str = "tinyllama") -> Callable[[Path], Case]:
    """SOLAR-style depth up-scale: the first ~3/4 of the layers then the last ~3/4 (TinyLlama:
    layers 0-15 then 6-21, 32 layers)."""
    return lambda work: _solar_case(work, fixtures.SHAPES[shape])


def _solar_case(work: Path, shape: fixtures.LlamaShape) -> Case:
    src = fixtures.make_llama_checkpoint(shape, 0)
    n = shape.num_layers
    cut = (n * 8 + 10) // 11  # 16 of 22
    ranges = [(0, cut), (n - cut, n)]
    out_layers = [i for a, b in ranges for i in range(a, b)]
    weight_map = json.loads((src / fixtures.INDEX).read_text())["weight_map"]
    expected: dict[str, tuple[Path, str]] = {}
    for name, fname in weight_map.items():
        if not name.startswith("model.layers."):
            expected[name] = (src / fname, name)
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        for j, i in enumerate(out_layers):
            if i == int(layer):
                expected[f"model.layers.{j}.{rest}"] = (src / fname, name)

    layers = ", ".join(f'"range({a},{b})"' for a, b in ranges)

    def recipe(shard_size: str | None) -> Path:
        path = work / f"solar-{shape.name}-{shard_size or 'default'}.yaml"
        output = f"\noutput:\n  shard_size: {shard_size}\n" if shard_size else "\n"
        path.write_text(
            "recipekit: 1\nname: solar-tinyllama\n"
            f"models:\n  tiny: {src}\n"
            f"steps:\n  - name: upscaled\n    op: layers\n    from: tiny\n"
            f"    layers: [{layers}]\n" + output)
        return path

    mk_config = work / f"solar-{shape.name}-mergekit.yml"
    mk_config.write_text(
        "slices:\n" + "".join(
            f"  - sources:\n      - model: {src}\n        layer_range: [{a}, {b}]\n"
            for a, b in ranges) + "merge_method: passthrough\ndtype: bfloat16\n")
    shards = sorted(src.glob("*.safetensors"))
    default = recipe(None)
    variants = [
        Variant("recipekit", "recipekit", recipekit_argv(default)),
        Variant("recipekit", "recipekit --no-fsync", recipekit_argv(default, "--no-fsync"),
                same_as="recipekit"),
        Variant(MERGEKIT, "mergekit 0.1.5", mergekit_argv(mk_config), env=mergekit_env()),
        Variant(FLOOR, FLOOR, floor_argv(shards, single_shard_size(expected)), verify=False),
    ]
    if shape is fixtures.TINYLLAMA:
        variants += [
            Variant("recipekit", "recipekit shard_size 1GB", recipekit_argv(recipe("1GB"))),
            Variant("recipekit", "recipekit shard_size 10GB", recipekit_argv(recipe("10GB"))),
        ]
    return Case(
        name="solar" if shape is fixtures.TINYLLAMA else f"solar-{shape.name}",
        description=f"SOLAR-style upscale of {src.name}: layers {ranges} -> 32 layers",
        inputs=sorted(p for p in src.iterdir() if p.is_file()),
        variants=variants,
        expected=expected,
        expected_config={"num_hidden_layers": len(out_layers), "hidden_size": shape.hidden},
        targets={"wall_vs_mk": 0.2, "rss_vs_mk": 0.25, "wall_vs_floor": 1.5},
    )


def merge_case(method: str, shape: str = "tinyllama", changed: float | None = None
               ) -> Callable[[Path], Case]:
    """A merge of two fixtures of one shape (seeds 0 and 1) by ``method``, 0.5/0.5. With
    ``changed``, the second is a light fine-tune of the first instead (`fixtures.
    make_finetune`: that share of each weight changed, the task vector otherwise exact zeros,
    as a real fine-tune's is in bf16; two seeds give Gaussian task vectors without a zero).

    Outputs are not checked byte for byte (a merge equals no input tensor); the test suite checks
    the numbers against the kernels and mergekit. Timing and memory are what this case is for.
    """
    steps = {
        "linear": ("    method: linear\n    from: [{model: a, weight: 0.5}, "
                   "{model: b, weight: 0.5}]\n",
                   "models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                   "  - model: {b}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n"),
        "slerp": ("    method: slerp\n    from: [a, b]\n    parameters: {t: 0.5}\n",
                  "base_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                  "merge_method: slerp\nparameters: {{t: 0.5}}\n"),
        "ties": ("    method: ties\n    base: a\n    from: [{model: b, weight: 0.5, "
                 "density: 0.5}]\n",
                 "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5, "
                 "density: 0.5}}\nmerge_method: ties\n"),
        "dare_ties": ("    method: dare_ties\n    base: a\n    from: [{model: b, weight: 0.5, "
                      "density: 0.5}]\n",
                      "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: "
                      "0.5, density: 0.5}}\nmerge_method: dare_ties\n"),
        "breadcrumbs": ("    method: breadcrumbs\n    base: a\n    from: [{model: b, weight: 0.5, "
                        "density: 0.5}]\n",
                        "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: "
                        "0.5, density: 0.5}}\nmerge_method: breadcrumbs\n"),
        "della": ("    method: della\n    base: a\n    from: [{model: b, weight: 0.5, "
                  "density: 0.5}]\n",
                  "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: "
                  "0.5, density: 0.5}}\nmerge_method: della\n"),
        "sce": ("    method: sce\n    base: a\n    from: [b, c]\n"
                "    parameters: {select_topk: 0.5}\n",
                "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\nmerge_method: sce\n"
                "parameters: {{select_topk: 0.5}}\n"),
        "model_stock": ("    method: model_stock\n    base: a\n    from: [b, c]\n",
                        "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n"
                        "merge_method: model_stock\n"),
    }

    def case(work: Path) -> Case:
        # model_stock and SCE: a base and two models (SCE's variance across one task vector is
        # zero, so with one it would select nothing and return the base)
        seeds = (0, 1, 2) if method in ("model_stock", "sce") else (0, 1)
        dirs = [fixtures.make_llama_checkpoint(fixtures.SHAPES[shape], seed) for seed in seeds]
        if changed is not None:
            dirs[1] = fixtures.make_finetune(fixtures.SHAPES[shape], 0, changed=changed)
        a, b = dirs[:2]
        c = dirs[2] if len(dirs) > 2 else b
        step, mk = steps[method]
        recipe = work / f"{method}-{shape}.yaml"
        models = "".join(f"  {n}: {d}\n" for n, d in zip("abc", dirs, strict=False))
        recipe.write_text(f"recipekit: 1\nname: {method}-tinyllama\nmodels:\n{models}"
                          f"steps:\n  - name: merged\n    op: merge\n{step}")
        mk_config = work / f"{method}-{shape}-mergekit.yml"
        mk_config.write_text(mk.format(a=a, b=b, c=c) + "dtype: bfloat16\n")
        shards = [p for d in dirs for p in sorted(d.glob("*.safetensors"))]
        out_bytes = sum(p.stat().st_size for p in a.glob("*.safetensors"))
        variants = [
            Variant("recipekit", "recipekit", recipekit_argv(recipe), verify=False),
            Variant("recipekit", "recipekit --no-fsync", recipekit_argv(recipe, "--no-fsync"),
                    verify=False, same_as="recipekit"),
            Variant(MERGEKIT, "mergekit 0.1.5", mergekit_argv(mk_config), env=mergekit_env(),
                    verify=False),
            Variant(FLOOR, FLOOR, floor_argv(shards, out_bytes), verify=False),
            Variant(CACHE_FLOOR, CACHE_FLOOR, floor_argv(shards, out_bytes, sync=False),
                    verify=False),
        ]
        targets = ({"wall_vs_mk": 0.2, "rss_vs_mk": 0.25, "wall_vs_floor": 2.0}
                   if method == "linear" else
                   {"wall_vs_mk": 0.2, "rss_vs_mk": 0.2, "wall_vs_floor": 4.0}
                   if method in ("ties", "dare_ties") else {"wall_vs_floor": 4.0}
                   if method in ("breadcrumbs", "della", "sce", "model_stock") else {})
        name = method if shape == "tinyllama" else f"{method}-{shape}"
        tuned = ("" if changed is None else
                 f", the second a fine-tune of the first ({changed:.0%} changed)")
        return Case(
            name=name if changed is None else f"{name}-ft{round(changed * 100)}",
            description=f"{method} merge of {len(dirs)} {shape}-shaped fixtures, 0.5/0.5{tuned}",
            inputs=sorted(p for d in dirs for p in d.iterdir() if p.is_file()),
            variants=variants, expected={}, expected_config={}, targets=targets,
        )
    return case


def lora_case(work: Path) -> Case:
    """Fold a rank-64 LoRA on all linear modules into the TinyLlama fixture (weight 1).

    mergekit merges `model+lora` by loading the whole model through transformers and PEFT into a
    full copy under `--lora-merge-cache` (required), then passes it through; the cache is made
    fresh for every run so that no run reuses another's merged copy.
    """
    base = fixtures.make_tinyllama(0)
    lora = fixtures.make_lora(fixtures.TINYLLAMA, rank=64)
    recipe = work / "lora.yaml"
    recipe.write_text(f"recipekit: 1\nmodels:\n  base: {base}\nadapters:\n  lora: {lora}\n"
                      "steps:\n  - name: folded\n    op: adapters\n    from: base\n"
                      "    adapters: [lora]\n")
    mk_config = work / "lora-mergekit.yml"
    mk_config.write_text(f"models:\n  - model: {base}+{lora}\nmerge_method: passthrough\n"
                         "dtype: bfloat16\n")

    def mergekit(out: Path) -> list[str]:
        cache = out.with_name("lora-merge-cache")
        shutil.rmtree(cache, ignore_errors=True)
        return [*mergekit_argv(mk_config)(out), "--lora-merge-cache", str(cache)]

    shards = sorted(base.glob("*.safetensors"))
    out_bytes = sum(p.stat().st_size for p in shards)
    variants = [
        Variant("recipekit", "recipekit", recipekit_argv(recipe), verify=False),
        Variant("recipekit", "recipekit --no-fsync", recipekit_argv(recipe, "--no-fsync"),
                verify=False, same_as="recipekit"),
        Variant(MERGEKIT, "mergekit 0.1.5", mergekit, env=mergekit_env(), verify=False),
        Variant(FLOOR, FLOOR, floor_argv([*shards, lora / "adapter_model.safetensors"],
                                         out_bytes), verify=False),
    ]
    return Case(name="lora", description=f"fold {lora.name} (all linear modules) into "
                f"{base.name}", inputs=[*shards, lora / "adapter_model.safetensors"],
                variants=variants, expected={}, expected_config={},
                targets={"wall_vs_mk": 0.2, "rss_vs_mk": 0.25})


def coalesce_case(work: Path) -> Case:
    """Coalesce the TinyLlama fixture to half width and half depth (32/4 heads -> 16/2, 22
    layers -> 11): no peer streams this, so the comparison is the copy floor."""
    src = fixtures.make_tinyllama(0)
    heads, layers = fixtures.TINYLLAMA.heads, fixtures.TINYLLAMA.num_layers
    width = [[i, i + heads // 2] for i in range(heads // 2)]
    depth = [[i, i + layers // 2] for i in range(layers // 2)]
    recipe = work / "coalesce.yaml"
    recipe.write_text(f"recipekit: 1\nmodels:\n  large: {src}\nsteps:\n  - name: small\n"
                      f"    op: coalesce\n    from: large\n    width: {width}\n"
                      f"    depth: {depth}\n")
    shards = sorted(src.glob("*.safetensors"))
    # output bytes: each width axis halves (not the vocabulary), layers halve in number
    def kept(name: str, dims: tuple[int, ...]) -> int:
        width_axes = 1 if "embed" in name or "lm_head" in name else len(dims)
        depth = 2 if name.startswith("model.layers.") else 1
        return fixtures.numel(dims) // 2 ** width_axes // depth
    out_bytes = 2 * sum(kept(n, d) for n, d in fixtures.iter_tensor_specs(fixtures.TINYLLAMA))
    variants = [
        Variant("recipekit", "recipekit", recipekit_argv(recipe), verify=False),
        Variant("recipekit", "recipekit --no-fsync", recipekit_argv(recipe, "--no-fsync"),
                verify=False, same_as="recipekit"),
        Variant(FLOOR, FLOOR, floor_argv(shards, out_bytes), verify=False),
    ]
    return Case(name="coalesce", description=f"coalesce {src.name} to half width and depth",
                inputs=shards, variants=variants, expected={}, expected_config={},
                targets={})


def extract_case(tuned: str) -> Callable[[Path], Case]:
    """``tuned``: "seed1" (another random model: the difference is a Gaussian matrix, whose flat
    spectrum is the hardest case for a randomized range finder) or "ft" (`fixtures.make_finetune`:
    the base plus a delta whose spectrum decays, as a fine-tune's does)."""
    return lambda work: _extract_case(work, tuned)


def _extract_case(work: Path, tuned: str) -> Case:
    """Extract a rank-64 LoRA from the difference of two TinyLlama fixtures: 154 linear
    modules, the embedding and lm_head (recipekit's randomized range finder by default).

    mergekit-extract-lora does the same work with ``--max-rank 64 --embed-lora
    --skip-undecomposable``: without them it would use rank 128 and copy the embeddings,
    lm_head and norms whole instead of factoring them. Every output's error
    ‖Δ − BA‖_F / ‖Δ‖_F over all changed weights (bench/lora_error.py) is the output check, so
    the wall times compare at a stated error.
    """
    a = fixtures.make_tinyllama(0)
    b = (fixtures.make_tinyllama(1) if tuned == "seed1" else
         fixtures.make_finetune(fixtures.SHAPES["tinyllama"]))
    recipe = work / f"extract-{tuned}.yaml"
    recipe.write_text(f"recipekit: 1\nmodels:\n  base: {a}\n  tuned: {b}\nsteps:\n"
                      "  - name: lora\n    op: extract_lora\n    base: base\n    tuned: tuned\n"
                      "    rank: 64\n")
    shards = sorted(a.glob("*.safetensors")) + sorted(b.glob("*.safetensors"))

    def mergekit(out: Path) -> list[str]:
        return [str(MERGEKIT_VENV / "bin" / "mergekit-extract-lora"), "--model", str(b),
                "--base-model", str(a), "--out-path", str(out), "--max-rank", "64",
                "--embed-lora", "--skip-undecomposable"]

    def measure(out: Path) -> str:
        from lora_error import reconstruction_error

        e = reconstruction_error(a, b, out)
        return (f"‖Δ−BA‖/‖Δ‖ = {e['relative_error']:.5f} ({e['modules']} of "
                f"{e['changed_weights']} changed weights factored)")

    variants = [Variant("recipekit", "recipekit", recipekit_argv(recipe), verify=False),
                Variant(MERGEKIT, "mergekit-extract-lora 0.1.5", mergekit, env=mergekit_env(),
                        verify=False)]
    return Case(name="extract" if tuned == "seed1" else f"extract-{tuned}",
                description=f"extract a rank-64 LoRA from {b.name} − {a.name}",
                inputs=shards, variants=variants, expected={}, expected_config={},
                targets={"wall_vs_mk": 0.3}, measure=measure)


def plan_case(work: Path) -> Case:
    """`recipekit plan` of a SOLAR upscale and a TIES merge of a 70B-shaped checkpoint made of
    sparse files (headers only): planning must stay under 2 s, start-up included."""
    src = fixtures.make_sparse_checkpoint(fixtures.LLAMA_70B)
    solar = work / "plan-70b-solar.yaml"
    solar.write_text(f"recipekit: 1\nmodels:\n  big: {src}\nsteps:\n  - name: up\n"
                     "    op: layers\n    from: big\n"
                     '    layers: ["range(0,60)", "range(20,80)"]\n')
    ties = work / "plan-70b-ties.yaml"
    ties.write_text(f"recipekit: 1\nmodels:\n  a: {src}\n  b: {src}\nsteps:\n  - name: m\n"
                    "    op: merge\n    method: ties\n    base: a\n"
                    "    from: [{model: b, weight: 0.5, density: 0.5}]\n")
    cmd = recipekit_command()
    variants = [Variant("recipekit", f"recipekit plan ({r.stem.rsplit('-', 1)[-1]})",
                        lambda out, r=r: [*cmd, "plan", str(r)], verify=False)
                for r in (solar, ties)]
    return Case(name="plan-70b", description=f"recipekit plan on {src.name} (sparse files)",
                inputs=[src / "config.json"], variants=variants, expected={},
                expected_config={}, targets={"wall_s": 2.0})


def read_floor_argv(inputs: list[Path]) -> Callable[[Path], list[str]]:
    """The read floor (bench/floor.py without --out): every input read once, nothing written."""
    return lambda out: [sys.executable, str(BENCH / "floor.py"), *map(str, inputs)]


#: What every statistics command imports before it reads a byte (its start-up, shown apart).
STARTUP = [sys.executable, "-c", "import recipekit.cli, recipekit.tools.diff, numpy"]


def stats_case(command: str, shape: str = "tinyllama") -> Callable[[Path], Case]:
    """`recipekit inspect`, `diff` or `verify --stats` of the fixtures of ``shape`` (seeds 0 and
    1) against the read floor of the same files (issue 18 item 6: within 2x of reading the
    bytes).

    They read every value and write nothing, so the copy floor does not apply; the *read floor*
    (bench/floor.py without --out) reads the same files once in 16 MiB chunks in a process that
    imports nothing. A "start-up" variant imports what the commands import (the CLI and numpy)
    and reads nothing, so that the table also shows what the statistics cost beyond start-up.
    `verify --stats` runs on an output written once (untimed) by a copy recipe of seed 0;
    plain `verify` (sha256 of every shard, no statistics) is timed beside it.
    """
    def case(work: Path) -> Case:
        spec = fixtures.SHAPES[shape]
        a, b = (fixtures.make_llama_checkpoint(spec, seed) for seed in (0, 1))
        cmd = recipekit_command()
        if command == "verify-stats":
            src = work / f"verify-copy-{shape}"
            if not (src / "recipekit.json").is_file():
                recipe = work / f"verify-copy-{shape}.yaml"
                recipe.write_text(f"recipekit: 1\nmodels:\n  a: {a}\nsteps:\n  - name: copy\n"
                                  "    op: layers\n    from: a\n    layers: "
                                  f"[\"range(0,{spec.num_layers})\"]\n")
                subprocess.run([*cmd, "run", str(recipe), "--output", str(src), "-q",
                                "--no-fsync"], check=True)
            files = sorted(src.glob("*.safetensors"))
            variants = [
                Variant("recipekit", "recipekit verify --stats",
                        lambda out: [*cmd, "verify", str(src), "--stats", "--json"],
                        verify=False),
                Variant("recipekit", "recipekit verify (no --stats)",
                        lambda out: [*cmd, "verify", str(src), "--json"], verify=False)]
            what = f"verify --stats of a copy of {a.name}"
        else:
            files = sorted(a.glob("*.safetensors")) + (
                sorted(b.glob("*.safetensors")) if command == "diff" else [])
            args = [str(a), str(b)] if command == "diff" else [str(a)]
            variants = [Variant("recipekit", f"recipekit {command}",
                                lambda out: [*cmd, command, "--json", "-q", *args],
                                verify=False, exit_ok=(0, 1) if command == "diff" else (0,))]
            what = f"{command} {' '.join(p.name for p in (a, b)[:len(args)])}"
        variants += [Variant(FLOOR, "read floor", read_floor_argv(files), verify=False),
                     Variant("start-up", "start-up (import recipekit.cli, numpy)",
                             lambda out: STARTUP, verify=False)]
        return Case(name=command if shape == "tinyllama" else f"{command}-{shape}",
                    description=f"{what} against reading the same bytes",
                    inputs=files, variants=variants, expected={}, expected_config={},
                    targets={"wall_vs_floor": 2.0})
    return case


CASES: dict[str, Callable[[Path], Case]] = {
    "solar": solar_case(),
    "linear": merge_case("linear"),
    "slerp": merge_case("slerp"),
    "ties": merge_case("ties"),
    "dare_ties": merge_case("dare_ties"),
    "breadcrumbs": merge_case("breadcrumbs"),
    "della": merge_case("della"),
    "sce": merge_case("sce"),
    "model_stock": merge_case("model_stock"),
    # a light fine-tune: the task vector 70% exact zeros
    "ties-ft30": merge_case("ties", changed=0.3),
    "breadcrumbs-ft30": merge_case("breadcrumbs", changed=0.3),
    "della-ft30": merge_case("della", changed=0.3),
    "solar-mistral-8l": solar_case("mistral-8l"),
    "linear-mistral-8l": merge_case("linear", "mistral-8l"),
    "solar-mistral-32l": solar_case("mistral-32l"),
    "lora": lora_case,
    "coalesce": coalesce_case,
    "extract": extract_case("seed1"),
    "extract-ft": extract_case("ft"),
    "plan-70b": plan_case,
    "inspect": stats_case("inspect"),
    "diff": stats_case("diff"),
    "verify-stats": stats_case("verify-stats"),
    "inspect-mistral-8l": stats_case("inspect", "mistral-8l"),
    "diff-mistral-8l": stats_case("diff", "mistral-8l"),
    "verify-stats-mistral-8l": stats_case("verify-stats", "mistral-8l"),
}
#: What `python bench/run.py` runs with no --cases: everything but the 13.5 GiB 32-layer case
#: and the compute-bound `dare_ties` and `extract` (minutes each on 2 cores; for `--device` runs).
DEFAULT_CASES = ("solar", "linear", "slerp", "ties", "lora", "coalesce", "solar-mistral-8l",
                 "linear-mistral-8l", "plan-70b", "inspect", "diff", "verify-stats")


# ---------------------------------------------------------------------------------------------
# Running.


def with_device(variants: list[Variant], device: str) -> list[Variant]:
    """``variants`` plus, after plain "recipekit", the same run with ``--device``; its shards
    are compared with the CPU run's (equal where DESIGN.md §3 promises it)."""
    out = []
    for v in variants:
        out.append(v)
        if v.label == "recipekit":
            out.append(dataclasses.replace(
                v, label=f"recipekit --device {device}",
                argv=lambda o, f=v.argv: [*f(o), "--device", device], same_as=v.label))
    return out


def warm(paths: list[Path]) -> None:
    """Read every input once so the page cache holds it (same start for every tool)."""
    buf = bytearray(READ_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


#: `fill_free_memory` stops below this much free memory
FREE_TARGET = 1 << 30


def mem_free() -> int:
    """MemFree from /proc/meminfo, in bytes (0 where there is none: not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fill_free_memory(keep: list[Path]) -> None:
    """Read fixture files other than ``keep`` into the page cache until less than
    `FREE_TARGET` bytes are free (dense fixtures only; nothing where none is free).

    Why: on a VM that hands free memory back to its host (free page reporting, as on this
    project's Firecracker machines), a process writing into free pages waits for the host to
    back each one again: 2 GB were written in 25 s instead of 0.4 s, and the last run's deleted
    output is free memory a few seconds later. A write into reclaimed page cache does not wait.
    So the harness pays for backing free memory (by reading), not the timed tools; on other
    machines this only fills the cache."""
    kept = {p.resolve() for p in keep}
    buf = bytearray(READ_CHUNK)
    dirs = sorted(d for d in fixtures.FIXTURES_DIR.glob("*") if d.is_dir()
                  and not d.name.startswith(("llama-70b", "llama-405b")))
    for path in (p for d in dirs for p in sorted(d.glob("*.safetensors"))):
        if mem_free() < FREE_TARGET:
            return
        if path.resolve() in kept:
            continue
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf) and mem_free() >= FREE_TARGET:
                pass


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_case(case: Case, runs: int, scratch: Path, interval: float, verify: bool) -> list[Record]:
    records = {v.label: Record(v.label, v.tool) for v in case.variants}
    digests = digest_sources(case) if verify else {}
    for r in range(runs):
        for v in case.variants:
            out = scratch / "out"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            fill_free_memory(case.inputs)
            warm(case.inputs)
            log = scratch / f"{case.name}-{len(records[v.label].runs)}-{slug(v.label)}.log"
            m = run_measured(v.argv(out), env=v.env, log=log, interval=interval)
            row = {**asdict(m), "round": r, "output_bytes": dir_bytes(out), "log": str(log),
                   "ok": m.returncode in v.exit_ok}
            records[v.label].runs.append(row)
            status = f"{m.wall_s:7.2f} s  rss {mib(m.peak_rss):>6}  anon {mib(m.peak_rss_anon):>6}"
            if not row["ok"]:
                tail = log.read_text(errors="replace")[-2000:]
                status += f"  FAILED (exit {m.returncode}); log tail:\n{tail}"
            elif r == 0 and verify and v.verify:
                records[v.label].verified = verify_output(out, case, digests)
                status += f"  output check: {records[v.label].verified}"
            elif r == 0 and case.measure is not None:
                records[v.label].verified = case.measure(out)
                status += f"  {records[v.label].verified}"
            if r == 0 and row["ok"] and v.tool == "recipekit":
                records[v.label].shards = manifest_shards(out)
            print(f"[{case.name} {r + 1}/{runs}] {v.label:<28} {status}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    for v in case.variants:
        if v.same_as in records:
            records[v.label].same = compare_shards(records[v.label], records[v.same_as])
            print(f"[{case.name}] {v.label}: {records[v.label].same}", file=sys.stderr)
    return list(records.values())


def manifest_shards(out: Path) -> dict[str, str] | None:
    """Shard name -> sha256 as recipekit's manifest records it (None: no manifest)."""
    try:
        shards = json.loads((out / "recipekit.json").read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return None
    return {name: entry["sha256"] for name, entry in shards.items()}


def compare_shards(rec: Record, ref: Record) -> str:
    """Whether two recipekit variants wrote the same shards (DESIGN.md §3: flags, worker
    threads and devices change no byte of data movement or elementwise ops)."""
    if rec.shards is None or ref.shards is None:
        return "bytes not compared"
    if rec.shards == ref.shards:
        return f"same bytes as {ref.variant}"
    differ = sum(rec.shards.get(k) != h for k, h in ref.shards.items())
    return f"{differ} of {len(ref.shards)} shards differ from {ref.variant}"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}×"


def render_table(results: list[tuple[Case, list[Record]]]) -> str:
    lines = ["| case | tool | wall s (min–max) | CPU s | peak RSS | peak RssAnon | wall ÷ mk "
             "| RSS ÷ mk | wall ÷ floor | output check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for case, records in results:
        mk = next((r for r in records if r.tool == MERGEKIT), None)
        floor = next((r for r in records if r.tool == FLOOR), None)
        mk_wall = mk.median("wall_s") if mk else None
        mk_rss = mk.median("peak_rss") if mk else None
        floor_wall = floor.median("wall_s") if floor else None
        for rec in records:
            walls = [float(r["wall_s"]) for r in rec.ok_runs()]  # type: ignore[arg-type]
            wall = rec.median("wall_s")
            span = f"{wall:.2f} ({min(walls):.2f}–{max(walls):.2f})" if walls else "failed"
            check = "; ".join(filter(None, (rec.verified, rec.same)))
            failed = len(rec.runs) - len(walls)
            if failed:
                span += f", {failed} failed"
            lines.append(
                f"| {case.name} | {rec.variant} | {span} | {rec.median('cpu_s') or 0:.1f} "
                f"| {mib(rec.median('peak_rss'))} "
                f"| {mib(rec.median('peak_rss_anon'))} "
                f"| {ratio(wall, mk_wall) if rec is not mk else '1.00×'} "
                f"| {ratio(rec.median('peak_rss'), mk_rss) if rec is not mk else '1.00×'} "
                f"| {ratio(wall, floor_wall)} | {check} |")
        main = next((r for r in records if r.variant.startswith("recipekit")), None)
        if main is None or main.median("wall_s") is None:
            continue
        wall, rss = main.median("wall_s") or 0.0, main.median("peak_rss") or 0.0
        checks = {"wall_vs_mk": wall / mk_wall if mk_wall else None,
                  "rss_vs_mk": rss / mk_rss if mk_rss else None,
                  "wall_vs_floor": wall / floor_wall if floor_wall else None,
                  "wall_s": wall}
        parts = []
        for key, target in case.targets.items():
            got = checks.get(key)
            what = {"wall_vs_mk": "× mergekit wall", "rss_vs_mk": "× mergekit peak RSS",
                    "wall_vs_floor": f"× the {floor.variant if floor else 'floor'}",
                    "wall_s": " s wall"}[key]
            if got is None:
                parts.append(f"{what.strip(' ×')}: not measured")
            else:
                parts.append(f"{got:.2f}{what} (target ≤ {target}: "
                             f"{'met' if got <= target else 'MISSED'})")
        cache_floor = next((r for r in records if r.tool == CACHE_FLOOR), None)
        unsynced = next((r for r in records if r.variant == "recipekit --no-fsync"), main)
        cache_wall = cache_floor.median("wall_s") if cache_floor is not None else None
        if cache_wall:
            # the synced floor is mostly the disk's write speed, which moves several-fold
            ratio_ = (unsynced.median("wall_s") or 0.0) / cache_wall
            parts.append(f"{unsynced.variant}: {ratio_:.2f}× the {CACHE_FLOOR} "
                         f"({cache_wall:.2f} s)")
        mk_cpu, cpu = (mk.median("cpu_s") if mk else None), main.median("cpu_s")
        if mk_cpu and cpu:
            # wall time on a shared VM moves more than CPU seconds do (bench/README.md)
            parts.append(f"CPU {cpu:.1f} s, {cpu / mk_cpu:.2f}× mergekit's")
        startup = next((r for r in records if r.tool == "start-up"), None)
        if startup is not None and floor is not None and floor_wall:
            # A loaded machine stretches wall times; CPU seconds say what the work costs.
            up, cpu = startup.median("wall_s") or 0.0, main.median("cpu_s") or 0.0
            up_cpu, floor_cpu = startup.median("cpu_s") or 0.0, floor.median("cpu_s") or 0.0
            parts.append(f"{(wall - up) / floor_wall:.2f}× the {floor.variant} less start-up "
                         f"({up:.2f} s); CPU {cpu:.2f} s, less start-up {cpu - up_cpu:.2f} s, "
                         f"{floor.variant} {floor_cpu:.2f} s")
        if parts:
            notes.append(f"* {case.name}, {main.variant} (default flags): " + "; ".join(parts))
    return "\n".join(lines + [""] + notes) + "\n"


def environment() -> dict[str, object]:
    """Versions and machine facts, so a result file says what produced it."""
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                  check=False).stdout.strip()
        except OSError:
            return "unavailable"
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal:")), "0")
    mk_py = MERGEKIT_VENV / "bin" / "python"
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "mem_total_gib": round(int(mem) / 2**20, 1),
        "python": platform.python_version(),
        "recipekit": out([*recipekit_command(), "version"]),
        # The checkout under test: others may commit while a benchmark runs.
        "git": out(["git", "-C", str(BENCH.parent), "describe", "--always", "--dirty"]),
        "mergekit": out([str(mk_py), "-c", "from importlib.metadata import version as v; "
                         "import torch; print(v('mergekit'), 'torch', torch.__version__, "
                         "'transformers', v('transformers'))"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="alternated runs per variant "
                        "(median reported; DESIGN asks >= 2; default 3)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated cases, of: {', '.join(CASES)} (default: all "
                        "but solar-mistral-32l)")
    parser.add_argument("--interval", type=float, default=0.02,
                        help="memory sampling interval in seconds (<= 0.05; default 0.02)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking each tool's output tensors in the first round")
    parser.add_argument("--device", help="also run recipekit with --device DEVICE (e.g. cuda) "
                        "and compare its shards with the default run's")
    parser.add_argument("--skip-variants", default="",
                        help="comma-separated variant labels to leave out, e.g. "
                        "'recipekit --no-fsync,copy floor'")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.runs < 1 or not 0 < args.interval <= 0.05:
        parser.error("--runs must be >= 1 and --interval in (0, 0.05]")
    if args.runs < 2:
        print("warning: DESIGN.md asks for the median of >= 2 runs", file=sys.stderr)
    skip = {s.strip() for s in args.skip_variants.split(",") if s.strip()}
    have_mergekit = (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists()
    if not have_mergekit:
        print(f"no mergekit at {MERGEKIT_VENV} (`bash bench/setup_mergekit.sh` makes it): "
              "running recipekit and the copy floor only", file=sys.stderr)

    fixtures.FIXTURES_DIR.mkdir(parents=True, exist_ok=True)
    compile_bytecode()
    env = environment()
    print(f"recipekit {env['recipekit']}; mergekit {env['mergekit']}; {env['cpus']} CPUs, "
          f"{env['mem_total_gib']} GiB", file=sys.stderr)
    results: list[tuple[Case, list[Record]]] = []
    skipped: dict[str, str] = {}
    # Outputs go next to the fixtures: same disk for every tool, and never /tmp on tmpfs.
    with tempfile.TemporaryDirectory(prefix="run-", dir=fixtures.FIXTURES_DIR) as tmp:
        scratch = Path(tmp)
        for name in names:
            try:
                case = CASES[name](scratch)
            except fixtures.InsufficientDisk as e:
                skipped[name] = str(e)
                print(f"skipped case {name}: {e}", file=sys.stderr)
                continue
            if args.device:
                case.variants[:] = with_device(case.variants, args.device)
            case.variants[:] = [v for v in case.variants if v.label not in skip
                                and (have_mergekit or v.tool != MERGEKIT)]
            results.append((case, run_case(case, args.runs, scratch, args.interval,
                                           not args.no_verify)))
            # Keep the logs of failed runs; the scratch folder itself is removed.
            for rec in results[-1][1]:
                for run in rec.runs:
                    if not run["ok"]:
                        RESULTS.mkdir(exist_ok=True)
                        kept = RESULTS / Path(str(run["log"])).name
                        shutil.copyfile(str(run["log"]), kept)
                        run["log"] = str(kept)

    table = render_table(results)
    header = (f"Benchmark {env['date_utc']}: recipekit {env['recipekit']} ({env['git']}), "
              f"mergekit "
              f"{env['mergekit']}; {env['cpus']} CPUs, {env['mem_total_gib']} GiB RAM, "
              f"kernel {env['kernel']}; median of {args.runs} alternated runs.\n\n")
    if skipped:
        header += "".join(f"Skipped {k}: {v}\n" for k, v in skipped.items()) + "\n"
    print(header + table)
    RESULTS.mkdir(exist_ok=True)
    stamp = env["date_utc"].replace(":", "").replace("-", "")  # type: ignore[union-attr]
    (RESULTS / f"{stamp}.md").write_text(header + table)
    raw = {"environment": env, "runs_per_variant": args.runs, "interval_s": args.interval,
           "skipped": skipped,
           "cases": [{"name": c.name, "description": c.description, "targets": c.targets,
                      "variants": [asdict(r) for r in recs]} for c, recs in results]}
    (RESULTS / f"{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
    shutil.copyfile(RESULTS / f"{stamp}.md", RESULTS / "latest.md")
    print(f"saved {RESULTS / stamp}.md and .json", file=sys.stderr)
    failed = any(not r["ok"] for _, recs in results for rec in recs for r in rec.runs)
    bad = any(rec.verified not in ("ok", "not checked") for _, recs in results for rec in recs)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
