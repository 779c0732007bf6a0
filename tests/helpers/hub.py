"""A fake huggingface_hub cache: the layout huggingface_hub itself reads
(`models--org--name/{blobs,refs,snapshots}`), so hub sources run offline in tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo: str, files: dict[str, Path], *, sha: str = SHA,
                 branch: str = "main") -> Path:
    """Lay files out as huggingface_hub's cache does: content-addressed blobs, a snapshot of
    relative symlinks per commit, and a ref naming the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / sha
    for rel, src in files.items():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / branch).write_text(sha)
    return snap
