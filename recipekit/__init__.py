"""recipekit: compile declarative checkpoint recipes into a tensor plan and stream it to disk.

The Python API (`recipekit.api`: `validate`, `plan`, `run`, `lock` and their results) is
re-exported here lazily, so ``import recipekit`` stays free of torch and answers at once.
``recipekit.run`` and ``recipekit.plan`` are also the names of subpackages (the executor and
the planner); Python binds a subpackage to its parent's attribute when it is imported, so those
two subpackages are made callable (`callable_package`): ``recipekit.run(...)`` is
``recipekit.api.run`` whichever of the two the attribute holds.

Example:
    >>> import recipekit
    >>> result = recipekit.run("recipes/quickstart.yaml")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

#: Names `recipekit.api` provides, imported on first access (PEP 562).
_API = ("validate", "lock", "sweep", "ValidationResult", "PlanResult", "PlannedShard",
        "RunResult", "ShardResult", "LockResult", "ProgressUpdate", "SweepResult")
#: API functions whose name is also a subpackage's.
_PACKAGES = ("run", "plan")

__all__ = ["__version__", *_API, *_PACKAGES]


def __getattr__(name: str) -> Any:
    if name in _PACKAGES:  # importing binds the (callable) subpackage to the attribute
        return importlib.import_module(f"{__name__}.{name}")
    if name in _API:
        return getattr(importlib.import_module("recipekit.api"), name)
    raise AttributeError(f"module 'recipekit' has no attribute {name!r}")


def callable_package(package: str, function: str) -> None:
    """Make the subpackage ``package`` callable as ``recipekit.api.<function>``, keeping every
    attribute (``recipekit.run.local`` still is the module)."""

    def api() -> Any:
        return getattr(importlib.import_module("recipekit.api"), function)

    module_doc = sys.modules[package].__doc__

    class _Entry(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return api()(*args, **kwargs)

        # what `help(recipekit.run)`, `inspect.signature` and a notebook's `?` show is the
        # function's (they showed the subpackage's docstring and ``(*args, **kwargs)``)
        @property
        def __signature__(self) -> Any:
            import inspect

            return inspect.signature(api())

        @property  # type: ignore[override]
        def __doc__(self) -> str | None:
            return (f"``recipekit.{function}(...)`` is `recipekit.api.{function}`:\n\n"
                    f"{api().__doc__}\n\nThe subpackage {package}: {module_doc}")

    _Entry.__call__.__doc__ = (f"``recipekit.{function}(...)`` calls `recipekit.api."
                               f"{function}` (see its documentation).")
    sys.modules[package].__class__ = _Entry
