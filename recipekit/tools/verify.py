"""`recipekit verify OUT`: check that an output directory is what its manifest says it is.

The manifest (`recipekit.json`, written last by `run`) records each shard's size and sha256
(computed while streaming) and the recipe. Verification re-hashes every shard, checks its size
and its header as strictly as the safetensors library does (io/header.py: tiling, bounds, dtypes)
with metadata ``{"format": "pt"}``, that no unlisted safetensors file sits beside them, that the
index maps every tensor to the shard that holds it with the right ``total_size``, that the config
reads, and that the recorded recipe is valid against the schema. Every problem is collected and
reported, each naming its file. ``load_and_run`` (``--load``) then loads the output with
transformers (the class its ``architectures`` names, never remote code) or PEFT and runs a
forward pass. Oracle: tests/test_verify.py (tampered bytes, truncations, stale indexes).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipekit.errors import (
    CorruptCheckpointError,
    ExtraMissingError,
    RecipekitError,
    SourceNotFoundError,
    TensorDataError,
    UnsupportedCheckpointError,
    UsageError,
    VerifyError,
    display_path,
)
from recipekit.inputs.files import check_confined, check_readable_dir, read_small, sha256_file
from recipekit.inputs.models import read_config, read_index
from recipekit.io.header import (
    MAX_HEADER,
    kind_of,
    parse_json,
    quote_name,
    read_header,
    read_raw_header,
)
from recipekit.io.names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG,
    INDEX,
    MANIFEST,
    STATE,
    WEIGHTS,
)
from recipekit.io.output import finished_conversion
from recipekit.recipe import load_recipe, schema_problems

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: How to repair a file of a finished output: a rerun of the same plan rewrites missing files.
REPAIR = "delete it and rerun `recipekit run` with the same recipe, which rewrites missing files"


@dataclass
class VerifyReport:
    """What was checked (``passed``, one line each), what failed (``problems``) and remarks
    that are not failures (``notes``)."""

    path: Path
    adapter: bool = False
    passed: list[str] = field(default_factory=list)
    problems: list[RecipekitError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # by tensor, with --stats

    @property
    def exit_code(self) -> int:
        """1 when the output fails a check: whatever reading it finds (a damaged header, a
        shard name that is a FIFO, a folder or a link out of the output) is a damaged output,
        not a usage mistake (README, "Inspect, diff, verify")."""
        return 1 if self.problems else 0


def _check_confined(path: Path, root: Path) -> None:
    """`check_confined` for a file of the output: a link out of it, a FIFO, a device or a
    folder where recipekit wrote a regular file is a damaged output (`VerifyError`, exit 1).
    """
    try:
        check_confined(path, root)
    except UnsupportedCheckpointError as e:
        raise VerifyError(e.message, file=e.file,
                          hint=f"recipekit writes regular files; {REPAIR}") from None


def verify_output(out: Path, *, stats: bool = False) -> VerifyReport:
    """Check the files of a finished recipekit output against its manifest; with ``stats``,
    also read every floating value (`tools.verify_values`) and fail on NaN/Inf.

    Raises:
        SourceNotFoundError: ``out`` is not a directory.
        UsageError: the directory is not a recipekit output (no manifest, no state file).
        VerifyError: the manifest itself is unreadable (nothing else can be checked), or the
            run that writes the output did not finish.
    """
    if not out.is_dir():
        raise SourceNotFoundError(f"{display_path(out)} is not a directory",
                                  hint="name the output directory of `recipekit run`")
    check_readable_dir(out)  # every check below lists or looks into it
    manifest_path = out / MANIFEST
    if not os.path.lexists(manifest_path):  # one that is a FIFO or a link: `_check_confined`
        if finished_conversion(out):
            raise UsageError(f"{display_path(out)} is a finished `recipekit convert` output, "
                             f"which has no {MANIFEST} to verify against",
                             hint="check its values with `recipekit inspect`; `verify` checks "
                             "the outputs of `recipekit run`")
        if (out / STATE).is_file():
            raise VerifyError(
                f"no {MANIFEST}: the run that writes this output did not finish",
                file=display_path(out), hint="rerun `recipekit run` with the same recipe; it "
                "resumes from the finished shards")
        raise UsageError(f"{display_path(out)} is not a recipekit output (no {MANIFEST})",
                         hint="name a directory written by `recipekit run`")
    root = out.resolve()
    _check_confined(manifest_path, root)
    shown = display_path(manifest_path)
    try:
        manifest = parse_json(read_small(manifest_path, 1 << 28, MANIFEST), shown, MANIFEST,
                              hint=f"the manifest is damaged; {REPAIR}")
        shards = manifest_shards(manifest, shown)
    except CorruptCheckpointError as e:  # a damaged output fails verification: exit 1
        raise VerifyError(e.message, file=e.file, hint=e.hint, location=e.location) from None
    report = VerifyReport(out, adapter=(out / ADAPTER_CONFIG).is_file())
    read = None
    if stats:  # hash and summarise each sound shard in one read (tools.verify_values)
        from recipekit.tools.verify_values import read_shards

        read = read_shards(out, root, shards)
    tensors: dict[str, dict[str, str]] = {}
    for name, entry in shards.items():
        done = read.shards.get(name) if read is not None else None
        header = _check_shard(out, root, name, entry, report,
                              digest=done.sha256 if done is not None else None)
        if header is not None:
            tensors[name] = header
    listed = set(shards)
    for p in sorted(out.glob("*.safetensors")):
        if p.name not in listed:
            report.problems.append(VerifyError(
                f"{p.name} is not listed in {MANIFEST}", file=display_path(p),
                hint="recipekit did not write it; move it out of the output directory"))
    if len(tensors) == len(shards):
        _check_layout(out, root, shards, tensors, report)
    _check_config(out, root, report)
    _check_files(out, root, manifest, shown, report)
    check_recipe(manifest, shown, report)
    if stats and tensors:
        from recipekit.tools.verify_values import check_values

        problems, line, report.stats = check_values(out, sorted(tensors), read=read)
        report.problems += problems
        report.passed += [] if problems else [line]
        report.notes += [line] if problems else []
    return report


def manifest_shards(manifest: Any, shown: str) -> dict[str, dict[str, Any]]:
    """The manifest's ``shards`` map, checked: plain names, 64-hex sha256, integer sizes."""
    hint = f"the manifest is damaged or was edited; {REPAIR}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise CorruptCheckpointError(f"{MANIFEST} has no `shards` object", file=shown, hint=hint)
    shards = manifest["shards"]
    if not shards:
        raise CorruptCheckpointError(f"{MANIFEST} lists no shards", file=shown, hint=hint)
    for name, entry in shards.items():
        if "/" in name or "\0" in name or name in (".", "..") or not name.endswith(
                ".safetensors"):
            raise CorruptCheckpointError(f"{MANIFEST} lists the shard {quote_name(name)}, which "
                                         "is not a .safetensors file name", file=shown, hint=hint)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and _SHA256.match(entry["sha256"]) and isinstance(entry.get("size"), int)
                and not isinstance(entry.get("size"), bool) and entry["size"] >= 0):
            raise CorruptCheckpointError(f"{MANIFEST} entry of {quote_name(name)} is "
                                         f"{kind_of(entry)}, not {{sha256: <64 hex>, size: <int>}}",
                                         file=shown, hint=hint)
    return shards


def _check_shard(out: Path, root: Path, name: str, entry: dict[str, Any],
                 report: VerifyReport, *, digest: str | None = None) -> dict[str, str] | None:
    """Size, sha256 and header of one shard; its tensors' names -> shard, or None if broken.
    ``digest``: the shard's sha256 where it was already read (`verify --stats`)."""
    path = out / name
    shown = display_path(path)
    if not os.path.lexists(path):
        report.problems.append(VerifyError(f"{name} is listed in {MANIFEST} but missing",
                                           file=shown, hint="rerun `recipekit run`"))
        return None
    try:
        _check_confined(path, root)
    except RecipekitError as e:
        report.problems.append(e)
        return None
    size = path.stat().st_size
    if size != entry["size"]:
        report.problems.append(VerifyError(
            f"size is {size} bytes, the manifest records {entry['size']}", file=shown,
            hint=f"the file was truncated, extended or replaced; {REPAIR}"))
        return None
    digest = digest or _sha256(path)
    if digest != entry["sha256"]:
        report.problems.append(VerifyError(
            f"sha256 {digest} differs from the manifest's {entry['sha256']}", file=shown,
            hint=f"the file's bytes changed after it was written; {REPAIR}"))
        return None
    try:
        header = read_header(path)
        _check_metadata(path)
    except RecipekitError as e:
        report.problems.append(e)
        return None
    report.passed.append(f"{name}: {size} bytes, sha256 matches, header sound "
                         f"({len(header)} tensors)")
    return dict.fromkeys(header, name)


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise TensorDataError(f"cannot read: {e.strerror or e}",
                              file=display_path(path)) from e


def _check_metadata(path: Path) -> None:
    """``__metadata__`` must say ``format: pt``: transformers refuses other formats."""
    header = json.loads(read_raw_header(path, display_path(path))[2])
    meta = header.get("__metadata__") or {}
    if meta.get("format") != "pt":
        raise VerifyError(f"header metadata is {json.dumps(meta)[:80]}, without "
                          '{"format": "pt"}', file=display_path(path),
                          hint=f"transformers refuses to load it; {REPAIR}")


def _check_layout(out: Path, root: Path, shards: dict[str, Any],
                  tensors: dict[str, dict[str, str]], report: VerifyReport) -> None:
    """A single shard under the name transformers looks for, or an index that maps every
    tensor to the shard holding it."""
    where: dict[str, str] = {}
    for header in tensors.values():
        for tname, shard in header.items():
            if tname in where:
                report.problems.append(VerifyError(
                    f"tensor {quote_name(tname)} is in both {where[tname]} and {shard}",
                    file=display_path(out / shard), hint=REPAIR))
            where[tname] = shard
    index = out / INDEX
    if report.adapter or len(shards) == 1:
        want = ADAPTER_WEIGHTS if report.adapter else WEIGHTS
        if list(shards) != [want]:
            report.problems.append(VerifyError(
                f"the output holds {', '.join(sorted(shards))}; "
                + (f"an adapter output is one file, {want}" if report.adapter else
                   f"one shard must be named {want}"), file=display_path(out)))
            return
        if not index.is_file():
            return
    if not index.is_file():
        report.problems.append(VerifyError(f"{len(shards)} shards but no {INDEX}",
                                           file=display_path(out),
                                           hint="transformers cannot find the shards without it"))
        return
    _check_index(out, root, shards, where, report)


def _check_index(out: Path, root: Path, shards: dict[str, Any], where: dict[str, str],
                 report: VerifyReport) -> None:
    """The index maps each tensor to the shard that holds it (``where``) and no other, and its
    ``total_size`` is the shards' tensor bytes."""
    index = out / INDEX
    try:
        weight_map = read_index(index, root)
    except RecipekitError as e:
        report.problems.append(e)
        return
    wrong = [t for t in where if weight_map.get(t) != where[t]]
    extra = [t for t in weight_map if t not in where]
    shown = display_path(index)
    if wrong:
        t = wrong[0]
        report.problems.append(VerifyError(
            f"maps tensor {quote_name(t)} to {weight_map.get(t, 'nothing')}, but it is in "
            f"{where[t]}" + (f" ({len(wrong)} tensors disagree)" if len(wrong) > 1 else ""),
            file=shown, hint=f"the index is stale; {REPAIR}"))
    if extra:
        report.problems.append(VerifyError(
            f"lists tensor {quote_name(extra[0])}, which no shard holds"
            + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""), file=shown,
            hint=f"the index is stale; {REPAIR}"))
    doc = json.loads(read_small(index, MAX_HEADER, INDEX))
    total = (doc.get("metadata") or {}).get("total_size") if isinstance(doc, dict) else None
    expected = sum(_data_bytes(out / s) for s in shards)
    if total != expected:
        report.problems.append(VerifyError(
            f"metadata.total_size is {kind_of(total)}, the shards hold {expected} bytes of "
            "tensor data", file=shown, hint=REPAIR))
    if not wrong and not extra and total == expected:
        report.passed.append(f"{INDEX}: maps all {len(where)} tensors to their shards")


def _data_bytes(path: Path) -> int:
    size, n, _ = read_raw_header(path, display_path(path))
    return size - 8 - n


def _check_config(out: Path, root: Path, report: VerifyReport) -> None:
    name = ADAPTER_CONFIG if report.adapter else CONFIG
    path = out / name
    if not path.is_file():
        report.problems.append(VerifyError(f"no {name}", file=display_path(out),
                                           hint="rerun `recipekit run` with the same recipe"))
        return
    try:
        if report.adapter:
            config = parse_json(read_small(path, 1 << 22, name), display_path(path), name,
                                strict=False)
            if not isinstance(config, dict) or config.get("peft_type") != "LORA":
                raise VerifyError("is not a LoRA adapter config", file=display_path(path))
        else:
            read_config(path, root)
    except RecipekitError as e:
        report.problems.append(e)
        return
    report.passed.append(f"{name}: reads")


def _check_files(out: Path, root: Path, manifest: dict[str, Any], shown: str,
                 report: VerifyReport) -> None:
    """Every other file the output holds (config, index, donor copies, model card) has the size
    and sha256 the manifest's ``files`` records: a changed `rope_theta` or a swapped tokenizer
    is found, not only damaged shards. Older manifests record no ``files`` (a note says so)."""
    files = manifest.get("files")
    if files is None:
        report.notes.append(f"{MANIFEST} records no hashes of the output's other files "
                            "(written by an older recipekit): only the shards were checked")
        return
    hint = f"the manifest is damaged or was edited; {REPAIR}"
    if not isinstance(files, dict):
        report.problems.append(VerifyError(f"{MANIFEST} `files` is {kind_of(files)}, not an "
                                           "object", file=shown, hint=hint))
        return
    ok = 0
    for rel, entry in sorted(files.items()):
        parts = Path(rel).parts
        if (not parts or Path(rel).is_absolute() or ".." in parts or "\0" in rel
                or not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                        and isinstance(entry.get("size"), int))):
            report.problems.append(VerifyError(f"{MANIFEST} lists the file {quote_name(rel)} "
                                               f"as {kind_of(entry)}", file=shown, hint=hint))
            continue
        ok += _check_file(out / rel, root, entry, report)
    if ok == len(files):
        report.passed.append(f"{len(files)} other files: sizes and sha256 match")


def _check_file(path: Path, root: Path, entry: dict[str, Any], report: VerifyReport) -> bool:
    shown = display_path(path)
    if not os.path.lexists(path):
        report.problems.append(VerifyError(f"is listed in {MANIFEST} but missing", file=shown,
                                           hint=REPAIR))
        return False
    try:
        _check_confined(path, root)
        size, digest = path.stat().st_size, _sha256(path)
    except RecipekitError as e:
        report.problems.append(e)
        return False
    if size != entry["size"] or digest != entry["sha256"]:
        report.problems.append(VerifyError(
            f"size {size}, sha256 {digest[:12]}: the manifest records {entry['size']} bytes, "
            f"sha256 {entry['sha256'][:12]}", file=shown,
            hint=f"the file changed after it was written; {REPAIR}"))
        return False
    return True


def check_recipe(manifest: dict[str, Any], shown: str, report: VerifyReport) -> None:
    """The recorded recipe is valid against the schema; say whether its file still matches."""
    recipe = manifest.get("recipe")
    if not isinstance(recipe, dict):
        report.problems.append(VerifyError(f"{MANIFEST} records no recipe", file=shown))
        return
    # JSON Schema's own `integer`: a manifest of an older recipekit records `seed: 3.0` as the
    # recipe it ran (recipes refuse it since); the recipe file's check below is a recipe's
    problems = schema_problems(recipe, standard=True)
    if problems:
        report.problems.append(VerifyError(f"the recorded recipe is not valid: {problems[0]}",
                                           file=shown, hint="the manifest was edited"))
        return
    report.passed.append(f"{MANIFEST}: recipe valid (recipekit "
                         f"{manifest.get('recipekit_version', '?')})")
    file = manifest.get("recipe_file")
    if isinstance(file, str):  # relative to the output directory (older manifests: absolute)
        file = str(Path(os.path.normpath(report.path / file)))
    if isinstance(file, str) and Path(file).is_file():
        try:
            values = manifest.get("variables")  # a run with --set, or one of a sweep
            same = load_recipe(file, variables=values if isinstance(values, dict) else None
                               ).canonical() == recipe
        except RecipekitError:
            report.notes.append(f"the recipe file {file} no longer validates")
            return
        report.notes.append(f"the recipe file {file} " + (
            "still matches the recorded recipe" if same else "has changed since this run"))


def load_and_run(out: Path, *, adapter: bool, base: str | None) -> str:
    """Load the output with transformers (or PEFT on ``base``) and run one forward pass.

    Returns a one-line description of what was loaded and run.

    Raises:
        VerifyError: the class is not in transformers, weights are missing or the wrong shape,
            adapter tensors match no module of the base, the forward pass fails or gives
            non-finite values.
        UsageError: an adapter output without ``base``, or ``base`` for a model output.
    """
    root = None  # what config.json may link into: a hub cache's blobs for a hub base
    if adapter and base is None:
        found = adapter_base(out)
        base, root = (str(found[0]), found[1]) if found else (None, None)
    if adapter and base is None:
        raise UsageError("this output is a PEFT adapter: `--load` needs the model it adapts",
                         hint="pass `--base MODEL_DIR`")
    if not adapter and base is not None:
        raise UsageError("--base is for adapter outputs; this output is a full checkpoint")
    import importlib.util

    missing = [m for m in ("transformers", "peft")[:2 if adapter else 1]
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ExtraMissingError(f"--load loads the output with {' and '.join(missing)}, which "
                                "is not installed (recipekit itself does not need it)",
                                hint=f"pip install {' '.join(missing)}")
    import torch  # torch, transformers and PEFT only for `verify --load`

    model_dir = Path(base) if adapter else out
    model, what = _load_transformers(model_dir, root)
    if adapter:
        import peft

        try:
            model = peft.PeftModel.from_pretrained(model, str(out))
        except Exception as e:  # PEFT raises ValueError/KeyError/RuntimeError for bad adapters
            raise VerifyError(f"PEFT cannot load the adapter: {type(e).__name__}: {e}",
                              file=display_path(out)) from e
        _check_adapter_loaded(model, out, model_dir)
        what = f"PEFT adapter on {what}"
    model.eval()
    inputs = _example_inputs(model)
    try:
        with torch.no_grad():
            result = model(**inputs)
    except Exception as e:  # a forward failure is the finding we report
        raise VerifyError(f"the forward pass of {what} failed: {type(e).__name__}: {e}",
                          file=display_path(out)) from e
    outputs = [v for v in (result.values() if hasattr(result, "values") else [result])
               if isinstance(v, torch.Tensor) and v.is_floating_point()]
    bad = [t for t in outputs if not torch.isfinite(t).all()]
    if bad or not outputs:
        raise VerifyError(f"the forward pass of {what} gave "
                          + ("non-finite values" if bad else "no floating output"),
                          file=display_path(out))
    shape = "x".join(map(str, next(iter(inputs.values())).shape))
    merged = _check_merged(model, inputs, outputs[0], out) if adapter else ""
    return (f"loaded {what} and ran a forward pass on a {shape} `{next(iter(inputs))}`: "
            f"finite{merged}")


#: The largest relative difference between an adapter's unmerged and merged outputs that
#: `verify --load` accepts (fp32 models: rounding gives ~1e-7; a tied embedding's LoRA that
#: PEFT applies only to the lookup unmerged gave 0.99).
MERGED_TOLERANCE = 1e-3


def _check_merged(model: Any, inputs: dict[str, Any], unmerged: Any, out: Path) -> str:
    """Merge the PEFT model (`merge_and_unload`) and fail when its output differs from the
    unmerged one: an adapter that PEFT applies one way unmerged and another merged is wrong
    in one of them (found by a black-box check: an embedding LoRA extracted from a model with
    tied embeddings changed the input lookup only unmerged, and the head too merged). Checked
    on fp32 and fp64 models only, where rounding stays far below `MERGED_TOLERANCE`; returns
    what was compared ("" when nothing was).

    Raises:
        VerifyError: the relative difference of the first floating output exceeds the
            tolerance.
    """
    import torch

    if any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters()):
        return ""
    try:
        merged = model.merge_and_unload()
        with torch.no_grad():
            result = merged(**inputs)
    except Exception:  # noqa: BLE001 (PEFT cannot merge every adapter: nothing to compare)
        return ""
    values = [v for v in (result.values() if hasattr(result, "values") else [result])
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not values or values[0].shape != unmerged.shape:
        return ""
    diff = float((values[0].double() - unmerged.double()).norm()
                 / unmerged.double().norm().clamp_min(1e-30))
    if diff > MERGED_TOLERANCE:
        raise VerifyError(f"the adapter's forward pass differs unmerged and merged (relative "
                          f"difference {diff:.3g} > {MERGED_TOLERANCE:g}): PEFT applies it one "
                          "way unmerged and another after `merge_and_unload`",
                          file=display_path(out), hint="an embedding LoRA on a model with tied "
                          "embeddings does this; save the embedding and head whole "
                          "(modules_to_save) instead")
    return f"; merged, the same to {diff:.1g}"


def _check_adapter_loaded(model: Any, out: Path, base: Path) -> None:
    """Fail when some of the adapter's tensors reached no module of the PEFT-wrapped base.

    Why: PEFT wraps the modules of ``target_modules`` that the base has and skips the adapter
    tensors of modules it lacks without a word (an adapter of a 4-layer model loaded on a
    2-layer base loaded 8 of its 16 tensors, and `verify --load` said "verified": found by a
    black-box check), the adapter analogue of weights transformers would initialise randomly.
    PEFT's own load result tells: the weights are set again (the same values) and its
    ``unexpected_keys`` are the file's tensors that matched no parameter.

    Raises:
        VerifyError: naming how many tensors matched nothing, with examples, and the fix.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    name = model.active_adapter if isinstance(model.active_adapter, str) else "default"
    weights = load_peft_weights(str(out), device="cpu")
    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    stray = sorted(str(k).replace(f".{name}.", ".")
                   for k in getattr(result, "unexpected_keys", None) or [])
    if stray:
        raise VerifyError(
            f"{len(stray)} of the adapter's {len(weights)} tensors match no module of the base "
            f"{display_path(base)} ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}); "
            "PEFT loads the adapter without them", file=display_path(out),
            hint="load it on the model it was made for: `--base MODEL_DIR`")


#: A hub repo id (``org/name``), as adapter_config.json's ``base_model_name_or_path`` holds it.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def adapter_base(out: Path) -> tuple[Path, Path] | None:
    """The base model directory an adapter output's config names, with the directory its
    files may link into: a local directory as it is, a hub id through the hub cache
    (downloaded unless offline; its snapshot links into the repo's blobs); None when it names
    none that exists, so that the caller asks for `--base`.

    Raises:
        SourceNotFoundError: a hub base that is neither cached nor reachable.
    """
    from recipekit.inputs.adapters import MAX_ADAPTER_CONFIG
    from recipekit.inputs.files import read_bounded
    from recipekit.io.names import ADAPTER_CONFIG

    try:
        raw, _ = read_bounded(out / ADAPTER_CONFIG, MAX_ADAPTER_CONFIG)
        config = json.loads(raw) if raw is not None else None
    except (OSError, ValueError):
        return None
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name:
        return None
    if Path(name).is_dir():
        return Path(name), Path(name)
    if not _HUB_ID.match(name):
        return None
    from recipekit.inputs.hub import fetch_model_dir

    revision = config.get("revision")
    snapshot = fetch_model_dir(name, revision if isinstance(revision, str) else "main")
    return snapshot, snapshot.parents[1]  # models--org--name: snapshots/<sha> and blobs/


def _load_transformers(path: Path, root: Path | None = None) -> tuple[Any, str]:
    """The class ``architectures`` names (a transformers class, never remote code); config.json
    may be a link inside ``root`` (default: ``path``)."""
    import transformers

    config = read_config(path / CONFIG, (root or path).resolve()) if (
        path / CONFIG).is_file() else None
    if config is None:
        raise UsageError(f"{display_path(path)} has no config.json", hint="name a model directory")
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            or cls is transformers.AutoModel):
        raise VerifyError(f"architecture {archs[0]!r} is not a transformers class; --load never "
                          "runs remote code (trust_remote_code)", file=display_path(path))
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True)
    except Exception as e:  # transformers raises many types for unloadable checkpoints
        raise VerifyError(f"transformers cannot load it: {type(e).__name__}: {e}",
                          file=display_path(path)) from e
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        names = [str(m) for m in missing[:3]] + [str(m[0] if isinstance(m, tuple) else m)
                                                 for m in mismatched[:3]]
        raise VerifyError(f"transformers loads {type(model).__name__} with "
                          f"{len(missing)} missing and {len(mismatched)} wrongly shaped weights "
                          f"({', '.join(names)}), which it would initialise randomly",
                          file=display_path(path))
    return model, f"{type(model).__name__} ({model.num_parameters():,} parameters)"


def _example_inputs(model: Any) -> dict[str, Any]:
    """A fixed small input for the model's main input: token ids, or an image batch."""
    import torch

    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        return {name: torch.randn(1, channels, size, size, generator=g)}
    vocab = getattr(config, "vocab_size", None) or getattr(
        config.get_text_config(), "vocab_size", 100)
    return {"input_ids": torch.randint(0, min(int(vocab), 1000), (1, 8), generator=g)}
