"""Lockfiles: `recipe.lock.json` pins every input of a recipe, and `run` checks it.

Why: a recipe names inputs by path or by hub branch, and both can change under it (a re-download,
a new commit on `main`). The lock records what the recipe was run against so that a later run
either reads the same bytes or says exactly which input changed:

* a hub input is pinned to the commit its revision resolved to, and each of its files that the
  cache holds to its size and the blob hash huggingface_hub's cache names it by (the sha256 for
  LFS files, the git sha1 for small files) — read from the cache's link, never recomputed;
* a local input's files (config.json, the index, every weight file; adapter_config.json for
  adapters; for a model, every file an output copies from it as the config donor: tokenizer,
  chat template, generation config...) to their size and sha256, plus the mtime the hash was
  taken at;
* a side file a step names (a coalescing scheme file, an X-LoRA scalings log and the arrays
  its mapping names), keyed ``steps.<step>.<key>``, like a local input's files.

`run` with a lock present checks sizes and, for a file whose mtime moved, its sha256; `--frozen`
hashes every local file and refuses to run without a lock. Oracle: tests/test_lock.py changes
one input byte and sees `run --frozen` refuse; hub pinning is tested offline on a fake cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipekit import __version__
from recipekit.errors import LockError, display_path
from recipekit.inputs.files import read_bounded, sha256_file
from recipekit.inputs.hub import blob_id
from recipekit.inputs.models import Checkpoint, iter_donor_files
from recipekit.inputs.resolve import Sources, with_side_files
from recipekit.inputs.side_files import SideFile
from recipekit.io.names import INDEX
from recipekit.io.writer import write_file_atomic
from recipekit.recipe import ModelRef, Recipe

LOCK_VERSION = 1
#: A lock lists a few files per input; one this large is not a lock.
MAX_LOCK = 64 * 1024 * 1024


def lock_path(recipe_file: Path) -> Path:
    """``foo.yaml`` → ``foo.lock.json`` beside it."""
    return recipe_file.with_name(recipe_file.stem + ".lock.json")


def _source_spec(ref: ModelRef | SideFile) -> dict[str, Any]:
    """How the recipe names an input; a lock entry applies only while this is unchanged."""
    if isinstance(ref, SideFile):
        return {"path": ref.written}
    if ref.hub is not None:
        return {"hub": ref.hub, "revision": ref.revision}
    if ref.url is not None:
        return {"url": ref.url}
    return {"path": ref.written}


def _files(source: Any) -> list[Path]:
    """The files `run` reads from an input: its config, a sharded index, its weights and, for a
    model, the files an output copies when it is the config donor (tokenizer, chat template,
    generation config: `iter_donor_files`); for a side file, every file read for it."""
    if isinstance(source, SideFile):
        return list(source.files)
    config = source.config_path
    index = source.path / INDEX
    extra = [index] if index.exists() and index not in source.weight_files else []
    donor = ([source.path / rel for rel in iter_donor_files(source.path, warn=False)]
             if isinstance(source, Checkpoint) else [])
    return [config, *extra, *source.weight_files, *donor]


def _key(source: Any, p: Path) -> str:
    """A file's name in the lock: its path inside the input (``1_Pooling/config.json``), which
    is its plain name for the files at the top."""
    base = None if isinstance(source, SideFile) else source.path
    if base is not None and p.parent != base:
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            pass
    return p.name


def _hub_file(path: Path) -> dict[str, Any] | None:
    """A cached hub file's size and blob hash (the name of the blob its snapshot link points
    to: a sha256 for LFS files, a git sha1 for small ones); None when not cached."""
    if not path.exists():
        return None
    blob = blob_id(path)
    key = "sha256" if len(blob) == 64 else "git_sha1"
    return {"size": path.stat().st_size, key: blob}


def _entry(ref: ModelRef | SideFile, source: Any) -> dict[str, Any]:
    entry = _source_spec(ref)
    files: dict[str, Any] = {}
    if getattr(source, "remote", None) is not None:  # a URL: each object's size, ETag, version
        files = {k: dict(v) for k, v in sorted(source.remote.objects.items())}
    elif source.hub is not None:
        entry["commit"] = source.hub.commit
        for p in _files(source):
            info = _hub_file(p)
            if info is not None:
                files[_key(source, p)] = info
    else:
        for p in _files(source):
            st = p.stat()
            files[_key(source, p)] = {"size": st.st_size, "sha256": sha256_file(p),
                             "mtime_ns": st.st_mtime_ns}
    entry["files"] = files
    return entry


def _inputs(recipe: Recipe, sources: dict[str, Any]
            ) -> dict[str, tuple[ModelRef | SideFile, Any]]:
    """Every input by its key in the recipe (``models.x``, ``adapters.y``, ``steps.s.key``):
    how the recipe names it, and what it resolved to."""
    out: dict[str, tuple[ModelRef | SideFile, Any]] = {
        f"models.{n}": (r, sources.get(n)) for n, r in recipe.models.items()}
    out.update({f"adapters.{n}": (r, sources.get(n)) for n, r in recipe.adapters.items()})
    # a plain mapping of checkpoints: the side files as `resolve_sources` finds them, the
    # tokenizers prompt-gated steps read included (`resolve_side_files` alone lacks them)
    side = (sources if isinstance(sources, Sources) else with_side_files(recipe, sources)
            ).side_files
    out.update({f.lock_key: (f, f) for f in side.values()})
    return out


def build_lock(recipe: Recipe, sources: dict[str, Any]) -> dict[str, Any]:
    """The lock document for a recipe whose inputs are resolved (`resolve_sources`)."""
    inputs = {key: _entry(ref, source) for key, (ref, source) in _inputs(recipe, sources).items()}
    return {"recipekit_lock": LOCK_VERSION, "recipekit": __version__,
            "recipe": recipe.file.name, "inputs": inputs}


def check_lock_path(path: Path, recipe: Recipe, sources: dict[str, Any], *,
                    named: bool) -> None:
    """Refuse a lock path that would write over, or into, what the lock pins, or (``named``:
    a path the caller chose rather than ``<stem>.lock.json``) over a file that is not a lock.

    Why: the lock replaces whatever is at its path, and a path passed to `api.lock` that named
    the recipe or a weight file destroyed it; one inside an input directory would become one
    of the model's donor files. The default path may hold a damaged lock: `run`'s hint is to
    refresh it there.

    Raises:
        LockError: naming the input or the file (exit 2).
    """
    from recipekit.plan.overlap import input_paths, overlapping_input

    found = overlapping_input(path, input_paths(recipe, sources))
    if found is not None and found[0] != "contains":
        raise LockError(f"the lock path {display_path(path)} {found[0]} {found[1]}",
                        hint="write the lock outside the recipe's inputs: it is written over "
                        "whatever is at its path, and inputs are never touched")
    if named and (path.is_symlink() or path.exists()) and not _is_lock(path):
        raise LockError(f"{display_path(path)} exists and is not a recipekit lock",
                        hint="a lock replaces only an earlier lock; choose another path or "
                        "remove the file")


def _is_lock(path: Path) -> bool:
    """Whether ``path`` is a regular file holding a JSON object with a ``recipekit_lock`` key."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        raw, _ = read_bounded(path, MAX_LOCK)
        doc = json.loads(raw.decode()) if raw is not None else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(doc, dict) and "recipekit_lock" in doc


def write_lock(path: Path, lock: dict[str, Any]) -> None:
    """Written like every file recipekit writes (io/writer.py): temp name, no link followed."""
    write_file_atomic(path, (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode(),
                      resumable=False)


def read_lock(path: Path, recipe_file: Path) -> dict[str, Any]:
    shown = display_path(path)
    try:
        raw, size = read_bounded(path, MAX_LOCK)
        if raw is None:
            raise LockError(f"cannot read the lock: it is {size} bytes, not a lock", file=shown,
                            hint=_refresh_hint(recipe_file))
        doc = json.loads(raw.decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LockError(f"cannot read the lock: {e}", file=shown,
                        hint=_refresh_hint(recipe_file)) from None
    except RecursionError:  # 100,000 nested brackets: no lock nests deeper than three levels
        raise LockError("cannot read the lock: it is nested too deeply to be a lock", file=shown,
                        hint=_refresh_hint(recipe_file)) from None
    if not (isinstance(doc, dict) and doc.get("recipekit_lock") == LOCK_VERSION
            and isinstance(doc.get("inputs"), dict)):
        raise LockError("not a recipekit lock (version 1)", file=shown,
                        hint=_refresh_hint(recipe_file))
    return doc


def _refresh_hint(recipe_file: Path) -> str:
    return ("if the change is intended, refresh the lock with "
            f"`recipekit lock {display_path(recipe_file)}`")


def check_lock(recipe: Recipe, sources: dict[str, Any], path: Path, *,
               full_hash: bool) -> None:
    """Check the resolved inputs against the lock at ``path``.

    ``full_hash`` re-hashes every local file; otherwise a file whose size and mtime are the
    locked ones is trusted and only files whose mtime moved are hashed.

    Raises:
        LockError: an input added, removed or renamed differently than locked; a hub revision
            that now resolves to another commit; a file whose size or hash changed.
    """
    lock = read_lock(path, recipe.file)
    shown = display_path(path)
    hint = _refresh_hint(recipe.file) + " (or restore the locked inputs)"
    problems: list[str] = []
    current = _inputs(recipe, sources)
    locked = lock["inputs"]
    for key in sorted(set(locked) - set(current)):
        problems.append(f"{key} is locked but no longer in the recipe")
    for key, (ref, source) in sorted(current.items()):
        entry = locked.get(key)
        if not isinstance(entry, dict):
            problems.append(f"{key} ({ref.written}) is not in the lock")
            continue
        spec = _source_spec(ref)
        if {k: entry.get(k) for k in spec} != spec or ("hub" in entry) != ("hub" in spec):
            problems.append(f"{key} is now {_show(spec)} but the lock has {_show(entry)}")
            continue
        problems += _check_files(key, entry, source, full_hash)
    if problems:
        head = problems[0] if len(problems) == 1 else (
            f"{len(problems)} inputs differ from the lock: " + "; ".join(problems))
        raise LockError(head, file=shown, hint=hint)


def _show(spec: dict[str, Any]) -> str:
    if "hub" in spec:
        return f"hub {spec.get('hub')}@{spec.get('revision')}"
    if "url" in spec:
        return f"url {spec.get('url')}"
    return f"path {spec.get('path')!r}"


def _check_files(key: str, entry: dict[str, Any], source: Any, full_hash: bool) -> list[str]:
    problems = []
    files = entry.get("files") if isinstance(entry.get("files"), dict) else {}
    if getattr(source, "remote", None) is not None:
        now = source.remote.objects
        for name in sorted(set(files) | set(now)):
            if name not in now:
                problems.append(f"{key}: {name} is locked but {source.remote.url} no longer "
                                "has it")
            elif not isinstance(files.get(name), dict):  # added since: as a local file's
                obj = now[name]
                problems.append(f"{key}: {source.remote.url}/{name} is not in the lock (ETag "
                                f"{obj.get('etag') or obj.get('version_id')}, "
                                f"{obj.get('size')} bytes)")
            elif files.get(name) != now[name]:
                problems.append(f"{key}: {source.remote.url}/{name} is {_object(now[name])}, "
                                f"the lock has {_object(files.get(name))}")
        return problems
    if source.hub is not None:
        if entry.get("commit") != source.hub.commit:
            return [f"{key}: {source.hub.repo}@{source.hub.revision} now resolves to commit "
                    f"{source.hub.commit[:12]}, the lock pins {str(entry.get('commit'))[:12]} "
                    f"(pin it with `revision: {entry.get('commit')}` to keep the locked one)"]
        for p in _files(source):
            now, want = _hub_file(p), files.get(_key(source, p))
            if now is not None and want is not None and now != want:
                problems.append(f"{key}: {_key(source, p)} in the hub cache is blob "
                                f"{_digest(now)[:12]}, the lock has {_digest(want)[:12]}")
        return problems
    current = {_key(source, p): p for p in _files(source)}
    for name in sorted(set(files) - set(current)):
        problems.append(f"{key}: {name} is locked but the input no longer has it")
    for name, p in current.items():
        want = files.get(name)
        if not isinstance(want, dict):
            problems.append(f"{key}: {display_path(p)} is not in the lock")
            continue
        st = p.stat()
        if st.st_size != want.get("size"):
            problems.append(f"{key}: {display_path(p)} is {st.st_size} bytes, the lock has "
                            f"{want.get('size')}")
        elif full_hash or st.st_mtime_ns != want.get("mtime_ns"):
            digest = sha256_file(p)
            if digest != want.get("sha256"):
                problems.append(f"{key}: {display_path(p)} has sha256 {digest[:12]}, the lock "
                                f"has {str(want.get('sha256'))[:12]}")
    return problems


def _object(info: dict[str, Any]) -> str:
    """An object's identity for a message: its ETag (or version id) and size, e.g.
    ``ETag 49f6... (2 bytes)``. An object missing from one side has its own sentence
    (`_check_files`)."""
    return f"ETag {info.get('etag') or info.get('version_id')} ({info.get('size')} bytes)"


def _digest(info: dict[str, Any]) -> str:
    return str(info.get("sha256") or info.get("git_sha1"))
