"""Finish an output directory once its shards are written: the index, config.json (or
adapter_config.json), the donor's other files (dimension fields rewritten), the model card and
the manifest. The list of what a run writes (`output_files`) lives here too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from recipekit.inputs.models import Checkpoint, iter_donor_files, read_donor_json
from recipekit.io.names import ADAPTER_CONFIG, CONFIG, INDEX, MANIFEST, MODEL_CARD
from recipekit.io.output import OutputDir, dumps
from recipekit.io.remote_output import RemoteOutput
from recipekit.plan import Plan
from recipekit.run.card import build_model_card
from recipekit.run.manifest import build_manifest

log = logging.getLogger(__name__)


def output_files(plan: Plan, donor_files: list[Path]) -> list[str]:
    """Every file a run of this plan writes, relative to the output directory."""
    files = [s.filename for s in plan.shards]
    if plan.adapter:
        return [*files, ADAPTER_CONFIG, MODEL_CARD, MANIFEST]
    if len(plan.shards) > 1:
        files.append(INDEX)
    files += [CONFIG, MODEL_CARD, *_other_files(plan, donor_files), MANIFEST]
    return files


def _other_files(plan: Plan, donor_files: list[Path]) -> list[str]:
    """The donor's files the output gets (`Plan.files` maps those it leaves out to None), then
    the files the plan adds (e.g. chat_template.jinja), relative, as posix paths."""
    donor = [p.as_posix() for p in donor_files]
    kept = [rel for rel in donor if plan.files.get(rel, b"") is not None]
    added = sorted(rel for rel, data in plan.files.items()
                   if data is not None and rel not in set(donor))
    return kept + added


def finish_output(plan: Plan, out: OutputDir | RemoteOutput, donor_files: list[Path]) -> None:
    """Write every file besides the shards, then the manifest, which records each one's size and
    sha256 (hashed as written, read back: `recipekit verify` checks them), then mark the
    output complete."""
    written: list[str] = []
    if len(plan.shards) > 1:
        weight_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
        total = sum(t.nbytes for s in plan.shards for t in s.tensors)
        out.write_file(INDEX, dumps({"metadata": {"total_size": total},
                                     "weight_map": weight_map}))
        written.append(INDEX)
    written.append(ADAPTER_CONFIG if plan.adapter else CONFIG)
    out.write_file(written[-1], dumps(plan.config))
    for rel in _other_files(plan, donor_files):
        data = plan.files.get(rel)
        if data is not None:  # planned bytes: a dimension field rewritten, a chat template
            out.write_file(rel, data)
        else:
            out.copy_file(plan.donor.path / rel, rel)  # type: ignore[union-attr]
        written.append(rel)
    out.write_file(MODEL_CARD, build_model_card(plan).encode())
    written.append(MODEL_CARD)
    check_inputs_unchanged(plan, out.plan_hash, during=True)  # what was copied is the planned
    files = {rel: out.file_record(rel) for rel in written}
    out.write_file(MANIFEST, dumps(build_manifest(plan, out.state.finished, files)))
    out.complete()


def check_inputs_unchanged(plan: Plan, planned: str, *, during: bool = False) -> None:
    """Refuse when an input's small files (config.json, adapter_config.json, the donor's
    tokenizer and other files) are not those the plan read: its hash, recomputed from them,
    differs from ``planned``. Weight files are checked as they are read (`io.reader`).

    Why: a plan keeps what it read of them (the config it rewrites), while the donor's other
    files are copied when the run finishes; an output made after such a change mixed two
    versions, and its manifest claimed the new ones, so `verify` and reruns accepted it.

    Raises:
        TensorDataError: (exit 1) before anything is written, or, ``during`` the run, before
            the manifest (finished shards are kept).
    """
    from recipekit.errors import TensorDataError

    if plan.plan_hash() == planned:
        return
    raise TensorDataError(
        "an input's files changed " + ("during the run" if during else "since the plan was made")
        + " (config.json, adapter_config.json or another file of an input): the output would "
        "mix what the plan read with the new files",
        hint="finished shards are kept; run again to plan from the inputs as they are now (an "
        "output begun from the old ones then needs --force)")


#: config.json keys that hold the hidden size, tried in order (families spell it differently).
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


def rewrite_dimension_files(donor: Checkpoint, config: dict[str, Any]) -> dict[str, bytes]:
    """Donor files whose known dimension fields must follow a new hidden size, rewritten.

    sentence-transformers keeps the embedding width in ``1_Pooling/config.json``
    (``word_embedding_dimension``); a checkpoint whose ``config.json`` changed its hidden size
    (coalesce/decoalesce) gets it rewritten. A ``Dense`` module (``in_features``) has weights of
    its own that no op maps: it is copied unchanged with a warning naming it.
    """
    old = next((donor.config[k] for k in HIDDEN_KEYS if isinstance(donor.config.get(k), int)),
               None)
    new = next((config[k] for k in HIDDEN_KEYS if isinstance(config.get(k), int)), None)
    if old is None or new is None or old == new:
        return {}
    out: dict[str, bytes] = {}
    for rel in iter_donor_files(donor.path):
        if rel.name != CONFIG or rel.parent == Path("."):
            continue
        data = read_donor_json(donor.path, rel)
        if not isinstance(data, dict):
            continue
        if data.get("word_embedding_dimension") == old:
            data["word_embedding_dimension"] = new
            out[rel.as_posix()] = json.dumps(data, indent=2).encode()
        elif data.get("in_features") == old:
            log.warning("%s: `in_features` is %d but the output's hidden size is %d; this module's "
                        "own weights are not mapped", rel.as_posix(), old, new)
    return out
