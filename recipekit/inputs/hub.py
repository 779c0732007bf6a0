"""Models from the Hugging Face Hub, through huggingface_hub and its cache.

Resolving a hub model fetches only its non-weight files (config, tokenizer, index) into the
usual cache and pins the revision to a commit sha. Shard headers come from the cache when the
shard is there, else from huggingface_hub's ranged reads of the header alone; the executor then
downloads only the shards the plan reads. ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` / ``HF_HOME`` and
tokens from the usual places (``HF_TOKEN``, ``hf auth login``) are honoured by huggingface_hub;
recipekit never sees or records a token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.errors import SourceNotFoundError, echo_text
from recipekit.inputs.files import sha256_file
from recipekit.io.header import TensorInfo, check_entry, check_layout
from recipekit.io.names import WEIGHT_DIRS, WEIGHT_SUFFIXES

#: What a snapshot fetch leaves out: weights (fetched per shard, on demand) and weight folders.
WEIGHT_PATTERNS = [*(f"*{s}" for s in WEIGHT_SUFFIXES),
                   *(f"{d}/*" for d in WEIGHT_DIRS if not d.startswith("."))]
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubSnapshot:
    """A hub repo pinned to a commit, with its cached snapshot directory."""

    repo: str
    revision: str
    commit: str
    path: Path


def is_offline() -> bool:
    # huggingface_hub is imported where a hub input is used: local recipes never load it.
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or (
        os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE)


def cache_dir() -> str | None:
    """The hub cache as the environment names it now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def fetch_snapshot(repo: str, revision: str) -> HubSnapshot:
    """Pin ``repo@revision`` to a commit and make its non-weight files available locally.

    Raises:
        SourceNotFoundError: repo or revision not found, gated/private without a token, not in
            the cache while offline, or the hub unreachable.
    """
    from huggingface_hub import errors, snapshot_download

    offline = is_offline()
    where = f"hub repo '{echo_text(repo)}' at revision '{echo_text(revision)}'"
    try:
        path = snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                 local_files_only=offline, ignore_patterns=WEIGHT_PATTERNS)
    except errors.GatedRepoError:
        raise SourceNotFoundError(f"{where} is gated", hint="accept its terms on the Hub and log "
                                  "in (`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise SourceNotFoundError(f"{where} does not exist or is private",
                                  hint="check the name; for a private repo log in (`hf auth "
                                  "login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise SourceNotFoundError(
            f"{where}: no such branch, tag or commit",
            hint="write a branch, a tag or a full 40-hex commit sha") from None
    except errors.LocalEntryNotFoundError:
        if offline:
            raise SourceNotFoundError(
                f"{where} is not in the local cache ({cache_dir() or 'the default hub cache'}) "
                "and HF_HUB_OFFLINE is set", hint="run once online, or point HF_HUB_CACHE / "
                "HF_HOME at a cache that has it") from None
        raise SourceNotFoundError(f"{where} could not be reached and is not cached",
                                  hint="check your network connection") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise SourceNotFoundError(f"{where}: {e}", hint="check the repo name and your network "
                                  "connection") from None
    path = Path(path)
    return HubSnapshot(repo, revision, path.name, path)


def fetch_model_dir(repo: str, revision: str) -> Path:
    """A whole model (weights too) at ``repo@revision`` in the hub cache, for loading it with
    transformers (`verify --load` of an adapter whose config names a hub base).

    Raises:
        SourceNotFoundError: not cached while offline, or the hub unreachable.
    """
    from huggingface_hub import errors, snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                      local_files_only=is_offline()))
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ValueError) as e:
        raise SourceNotFoundError(f"cannot get hub repo '{echo_text(repo)}' at revision "
                                  f"'{echo_text(revision)}': {e}", hint="check your network "
                                  "connection, or pass `--base MODEL_DIR`") from None


def remote_header(snap: HubSnapshot, filename: str) -> dict[str, TensorInfo]:
    """Tensor entries of a shard that is not cached yet, from its header alone (ranged reads).

    Offsets are unknown (-1) until the shard is downloaded; see `download`.
    """
    from huggingface_hub import HfApi, errors

    shown = f"{snap.repo}@{snap.commit[:12]}/{filename}"
    if is_offline():
        raise SourceNotFoundError(f"{shown} is not in the local cache and HF_HUB_OFFLINE is set",
                                  hint="run once online, or use a cache that has the weights")
    try:
        meta = HfApi().parse_safetensors_file_metadata(snap.repo, filename, revision=snap.commit)
    except (errors.HfHubHTTPError, errors.SafetensorsParsingError, OSError) as e:
        raise SourceNotFoundError(f"cannot read the header of {shown}: {e}",
                                  hint="check your network connection") from None
    out = {}
    spans = []
    for name, t in meta.tensors.items():
        # The same checks as a local header (the downloaded file is checked again in full).
        dtype, shape, (begin, end), nbytes = check_entry(
            name, {"dtype": t.dtype, "shape": list(t.shape),
                   "data_offsets": list(t.data_offsets)}, shown)
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, dtype, shape, snap.path / filename, -1, nbytes)
    check_layout(spans, max((e for _, e, _ in spans), default=0), -1, shown)
    return out


def download(snap: HubSnapshot, filename: str) -> Path:
    """Download one file of the pinned commit into the cache (no-op when cached)."""
    from huggingface_hub import errors, hf_hub_download

    try:
        return Path(hf_hub_download(snap.repo, filename, revision=snap.commit,
                                    cache_dir=cache_dir(), local_files_only=is_offline()))
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError) as e:
        raise SourceNotFoundError(f"cannot download {snap.repo}@{snap.commit[:12]}/{filename}: "
                                  f"{e}", hint="check your network connection") from None


def blob_id(path: Path) -> str:
    """What identifies a cached file's content: the blob its snapshot link points to (the
    hub's etag: git sha1 or sha256), or the sha256 of a plain file."""
    if path.is_symlink():
        return Path(os.readlink(path)).name
    return sha256_file(path)


def snapshot_identity(snap: HubSnapshot, files: list[str]) -> dict[str, Any]:
    """Manifest entry: repo, revision, commit and the blob of every listed file now cached."""
    blobs = {f: blob_id(snap.path / f) for f in files if (snap.path / f).exists()}
    return {"hub": snap.repo, "revision": snap.revision, "commit": snap.commit, "files": blobs}
