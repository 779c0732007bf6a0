"""Run many mergekit configs in one process of mergekit's side venv (importing mergekit once
costs seconds; the `mergekit`-marked suite tests/tools/test_mergekit_import_suite.py runs ~60).

    bench/.venv-mergekit/bin/python tests/goldens/run_mergekit_cases.py CASES.json

CASES.json is a list of ``{"config": path, "out": dir}``; each config is run with mergekit's
own `run_merge` (MergeOptions: no tokenizer copy, no model card, random seed 0, CPU) and the
outcome written back as ``{"<config>": "ok" | "error: <type>: <message>"}`` to
CASES.json + ".status.json". Imports only mergekit, yaml and the standard library.
"""

from __future__ import annotations

import json
import sys

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0,
                           quiet=True)
    status = {}
    for case in cases:
        try:
            with open(case["config"]) as f:
                config = MergeConfiguration.model_validate(yaml.safe_load(f))
            run_merge(config, out_path=case["out"], options=options)
            status[case["config"]] = "ok"
        except Exception as e:  # noqa: BLE001 (a refusal is a result)
            status[case["config"]] = f"error: {type(e).__name__}: {str(e)[:300]}"
    with open(sys.argv[1] + ".status.json", "w") as f:
        json.dump(status, f, indent=1)


if __name__ == "__main__":
    main()
