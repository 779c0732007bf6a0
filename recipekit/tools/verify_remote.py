"""`recipekit verify s3://bucket/prefix`: an output on object storage against its manifest.

The same checks as a local output's (tools/verify.py) where they come from the manifest:
every shard's size, sha256 (the objects are read once, in 8 MiB ranges: S3 keeps no sha256 of a
multipart object) and header, no unlisted shard beside them, every other file's size and sha256,
and the recorded recipe. The index and config are covered by their hashes; `--load` needs a
local directory. Oracle: tests/inputs/test_remote.py (a tampered object is found).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from recipekit.errors import CorruptCheckpointError, RecipekitError, UsageError, VerifyError
from recipekit.io.names import ADAPTER_CONFIG, MANIFEST, STATE
from recipekit.io.remote import (
    RemotePath,
    describe_failure,
    open_fs,
    read_remote_header,
    remote_errors,
)
from recipekit.tools.verify import REPAIR, VerifyReport, check_recipe, manifest_shards

#: Bytes per ranged read while hashing.
CHUNK = 8 * 1024 * 1024


def verify_remote(url: str) -> VerifyReport:
    """Check a finished output prefix against its manifest.

    Raises:
        UsageError: no manifest and no state object there (not a recipekit output); no
            credentials, or a broken configuration (nothing can be checked until it is fixed).
        VerifyError: the prefix cannot be listed or the manifest read (network, endpoint), the
            manifest is unreadable, or the run that writes the output did not finish (a state
            object, no manifest).
    """
    url = url.rstrip("/")
    fs, root = open_fs(url)
    try:
        fs.invalidate_cache(root)
        listing = {k[len(root) + 1:]: int(v.get("size") or 0)
                   for k, v in fs.find(root, detail=True, withdirs=False).items()
                   if k.startswith(root + "/")}
    except remote_errors() as e:
        raise _cannot("list", url, e) from None
    shown = f"{url}/{MANIFEST}"
    if MANIFEST not in listing:
        if STATE in listing:
            raise VerifyError(f"no {MANIFEST}: the run that writes this output did not finish",
                              file=url, hint="rerun `recipekit run` with the same recipe; it "
                              "resumes from the finished shards")
        raise UsageError(f"{url} is not a recipekit output (no {MANIFEST})",
                         hint="name an output prefix written by `recipekit run`")
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST}")
    except remote_errors() as e:
        raise _cannot("read", shown, e) from None
    try:
        manifest = json.loads(raw)
        shards = manifest_shards(manifest, shown)
    except (ValueError, CorruptCheckpointError) as e:
        raise VerifyError(f"the manifest is damaged: {e}", file=shown, hint=REPAIR) from None
    report = VerifyReport(Path(url.split("://", 1)[-1]), adapter=ADAPTER_CONFIG in listing)
    for name, entry in shards.items():
        _check_object(fs, root, url, name, entry, listing, report, shard=True)
    for name in sorted(listing):
        if name.endswith(".safetensors") and "/" not in name and name not in shards:
            report.problems.append(VerifyError(
                f"{name} is not listed in {MANIFEST}", file=f"{url}/{name}",
                hint="recipekit did not write it; move it out of the output prefix"))
    files = manifest.get("files")
    if isinstance(files, dict):
        ok = sum(_check_object(fs, root, url, rel, entry, listing, report, shard=False)
                 for rel, entry in sorted(files.items()) if isinstance(entry, dict))
        if ok == len(files):
            report.passed.append(f"{len(files)} other files: sizes and sha256 match")
    # the recipe file sits beside the recipe, not under the prefix: check the record only
    check_recipe({k: v for k, v in manifest.items() if k != "recipe_file"}, shown, report)
    return report


def _cannot(verb: str, shown: str, e: BaseException) -> RecipekitError:
    """The error for a request that failed (`describe_failure`): missing credentials or a
    broken configuration is the caller's to fix (exit 2), anything else means the output could
    not be checked (exit 1)."""
    failure = describe_failure(e)
    cls = UsageError if failure.config else VerifyError
    return cls(f"cannot {verb}: {failure.what}", file=shown, hint=failure.hint)


def _check_object(fs: Any, root: str, url: str, name: str, entry: dict[str, Any],
                  listing: dict[str, int], report: VerifyReport, *, shard: bool) -> bool:
    shown = f"{url}/{name}"
    size = listing.get(name)
    if size is None:
        report.problems.append(VerifyError(f"is listed in {MANIFEST} but missing", file=shown,
                                           hint="rerun `recipekit run`"))
        return False
    if size != entry.get("size"):
        report.problems.append(VerifyError(
            f"size is {size} bytes, the manifest records {entry.get('size')}", file=shown,
            hint=f"the object was replaced; {REPAIR}"))
        return False
    h = hashlib.sha256()
    try:
        for start in range(0, size, CHUNK):
            h.update(fs.cat_file(f"{root}/{name}", start=start, end=min(size, start + CHUNK)))
    except remote_errors() as e:
        failure = describe_failure(e)
        report.problems.append(VerifyError(f"cannot read: {failure.what}", file=shown,
                                           hint=failure.hint))
        return False
    if h.hexdigest() != entry.get("sha256"):
        report.problems.append(VerifyError(
            f"sha256 {h.hexdigest()} differs from the manifest's {entry.get('sha256')}",
            file=shown, hint=f"the object's bytes changed after it was written; {REPAIR}"))
        return False
    if shard:
        try:
            header = read_remote_header(RemotePath.make(Path(name), shown, None), size)
        except RecipekitError as e:
            report.problems.append(e)
            return False
        report.passed.append(f"{name}: {size} bytes, sha256 matches, header sound "
                             f"({len(header)} tensors)")
    return True
