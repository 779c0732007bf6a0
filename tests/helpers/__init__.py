"""Test helpers, imported as ``tests.helpers.<module>`` (not test files; pytest collects none).

* `builders`: tiny random checkpoints of every family, and reading a checkpoint's tensors back;
* `adapter_builders`: tiny PEFT LoRA adapters made by PEFT itself;
* `recipes`: the repository root, the SOLAR-style recipe most tests start from, writing recipes;
* `hub`: a fake huggingface_hub cache laid out as huggingface_hub writes it;
* `crashpoints`: the I/O-instrumenting wrapper the crash tests (and bench/kill_soak.py) run;
* `rerun_model`: what a killed run leaves and its rerun's events, predicted from a trace
  (the crash tests' and bench/kill_soak.py's model);
* `fuzz_documents`, `fuzz_mutations`, `fuzz_oracle`: the recipe fuzzer's strategies and its
  oracle (shared with bench/fuzz_soak.py);
* `ties`: the tie band of magnitude selection, where mergekit's unstable sort and recipekit's
  lowest-index rule may keep different entries;
* `memory`: a run's measured peak against the plan's estimate, in a fresh process.

Fixtures stay in tests/conftest.py; they build on these.
"""
