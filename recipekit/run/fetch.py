"""Download the hub shards a plan reads, before streaming: planning used remote headers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from recipekit.errors import TensorDataError, display_path
from recipekit.inputs.hub import download as hub_download
from recipekit.io.header import read_header
from recipekit.plan import Plan


def fetch_hub_shards(plan: Plan) -> Plan:
    """Download the hub shards this plan reads (only those) and read their local headers.

    Planning used remote headers (offsets unknown); the downloaded files must agree with them.

    Raises:
        SourceNotFoundError: a download failed.
        TensorDataError: a downloaded shard disagrees with the header planned from.
    """
    needed: dict[str, set[Path]] = {}
    for node in plan.loads():
        info = plan.sources[node.source].tensors[node.name]
        if info.offset < 0:
            needed.setdefault(node.source, set()).add(info.file)
    if not needed:
        return plan
    sources = dict(plan.sources)
    for name, files in sorted(needed.items()):
        ckpt = sources[name]
        assert ckpt.hub is not None
        tensors = dict(ckpt.tensors)
        for planned_file in sorted(files):
            local = hub_download(ckpt.hub, planned_file.name)
            header = read_header(local)
            for tname, info in ckpt.tensors.items():
                if info.file != planned_file:
                    continue
                got = header.get(tname)
                if got is None or (got.dtype, got.shape) != (info.dtype, info.shape):
                    raise TensorDataError(
                        f"`{tname}` differs from the header planned from",
                        file=display_path(local), hint="the download is damaged; delete it from "
                        "the hub cache and run again")
                tensors[tname] = got
        sources[name] = dataclasses.replace(ckpt, tensors=tensors)
    return dataclasses.replace(plan, sources=sources)
