"""Measuring a run's peak memory in a fresh process, for the plan-estimate tests."""

from __future__ import annotations

import textwrap

#: ``python -c MEASURE RECIPE [THRESHOLD]``: plans RECIPE, then prints the run's measured peak
#: above an idle process (VmHWM, reset just before the run by Linux clear_refs) and the plan's
#: estimate, as JSON. THRESHOLD, when given, lowers `plan.cost.HOLD_BYTES` and `EXACT_BYTES`.
MEASURE = textwrap.dedent("""
    import gc, json, re, sys
    if len(sys.argv) > 2:
        import recipekit.plan.cost as cost
        cost.HOLD_BYTES = cost.EXACT_BYTES = int(sys.argv[2])
    def kb(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
    from recipekit.run.local import run_plan
    from recipekit.plan import compile_plan
    from recipekit.recipe import load_recipe
    from recipekit.inputs.resolve import resolve_sources
    recipe = load_recipe(sys.argv[1])
    plan = compile_plan(recipe, resolve_sources(recipe))
    import torch
    torch.ones(4).to(torch.bfloat16)  # an idle process that has already used torch once
    gc.collect()
    idle = kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    run_plan(plan, fsync=False)
    print(json.dumps({"measured": (kb("VmHWM") - idle) * 1024,
                      "estimate": plan.peak_memory_estimate()}))
""")
