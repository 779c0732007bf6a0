"""Coalescing schemes: partitions of a large model's heads, FFN blocks and layers.

A scheme is a list of groups; group ``i`` lists the **large**-model units merged into small unit
``i`` (MLTF's ``width_scheme`` / ``depth_scheme``, reference/coalescing.md §1.1). Both
`coalesce` (large -> small) and `decoalesce` (small -> large) read it in this orientation, so the
same scheme maps there and back. Every check here is a validate-time error that names the group:
a unit in two groups (overlap), a unit in none (gap), a group count that is not the small model's
count, a query-head scheme that would split a key/value group (GQA), and FFN widths that the
head count does not divide without an explicit ``ffn:`` partition.

From the query-head partition follow the other feature spaces (issue 5): key/value heads (the
partition of the large kv heads induced by the query groups and the heads-per-kv ratio), the
hidden stream in blocks of ``hidden_size / num_attention_heads``, and FFN neurons in blocks of
``intermediate_size / num_attention_heads`` (or an explicit ``ffn:`` partition of FFN blocks).
``head_dim`` is preserved. This module needs no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.errors import SchemeError
from recipekit.inputs.files import read_bounded

#: An MLTF config file is a few KB; anything far larger is not one.
MAX_SCHEME_FILE = 16 * 1024 * 1024
#: The key of an MLTF config file that holds each scheme of a coalescing step.
FILE_KEYS = {"width": "width_scheme", "depth": "depth_scheme"}

KeySuffix = tuple[str | int, ...]


@dataclass(frozen=True)
class Partition:
    """Groups of large-unit indices; group i is small unit i. Every large unit is in one group."""

    groups: tuple[tuple[int, ...], ...]

    @property
    def n_small(self) -> int:
        return len(self.groups)

    @property
    def n_large(self) -> int:
        return sum(len(g) for g in self.groups)

    def group_of(self) -> tuple[int, ...]:
        """For each large unit, the small unit (group) it belongs to."""
        out = [0] * self.n_large
        for i, g in enumerate(self.groups):
            for j in g:
                out[j] = i
        return tuple(out)

    @property
    def is_uniform(self) -> bool:
        return len({len(g) for g in self.groups}) <= 1

    def as_lists(self) -> list[list[int]]:
        return [list(g) for g in self.groups]


def check_partition(groups: Sequence[Sequence[int]], *, key: str, unit: str,
                    n_large: int | None = None, n_small: int | None = None,
                    model: str = "the model") -> Partition:
    """``groups`` as a `Partition` of ``range(n_large)`` into ``n_small`` groups.

    ``n_large`` None: the large count is the number of indices written (de-coalescing: the
    scheme defines the large model). ``n_small`` None: the group count is free (coalescing: the
    scheme defines the small model).

    Raises:
        SchemeError: at the first offending group (overlap, out of range), or at the scheme
            (gap, wrong group count).
    """
    seen: dict[int, int] = {}
    for i, group in enumerate(groups):
        if not group:
            raise SchemeError(f"group {i} is empty", (key, i),
                              hint=f"every group merges at least one {unit}")
        for j in group:
            if n_large is not None and j >= n_large:
                raise SchemeError(f"group {i} {list(group)} names {unit} {j}, but {model} has "
                                  f"{n_large} {unit}s (0-{n_large - 1})", (key, i))
            if j in seen:
                first = seen[j]
                what = (f"lists {unit} {j} twice" if first == i else
                        f"overlaps group {first} {list(groups[first])}: {unit} {j} is in both")
                raise SchemeError(f"group {i} {list(group)} {what}", (key, i),
                                  hint=f"each {unit} belongs to exactly one group")
            seen[j] = i
    total = n_large if n_large is not None else len(seen)
    missing = [j for j in range(total) if j not in seen]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        what = f"{unit} {shown} is" if len(missing) == 1 else f"{unit}s {shown} are"
        raise SchemeError(f"{what} in no group (a gap): every {unit} 0-{total - 1} of the large "
                          "model must be in exactly one group", (key,))
    if n_small is not None and len(groups) != n_small:
        raise SchemeError(f"the scheme has {len(groups)} groups, but {model} has {n_small} "
                          f"{unit}s: group i becomes {unit} i of the small model", (key,),
                          hint=f"write {n_small} groups")
    return Partition(tuple(tuple(g) for g in groups))


#: Each scheme key of a step, and the unit its groups name.
UNITS = {"width": "head", "depth": "layer", "ffn": "FFN block"}


def inline_scheme_problems(spec: Mapping[str, Any]) -> list[SchemeError]:
    """What a step's inline schemes (lists, not ``{file: ...}``) show without the model: an
    empty group, an index in two groups, and ``ffn:`` without ``width:``, with the messages the
    build gives. Gaps and ranges wait for the model: whether ``[[0, 2], [1, 4]]`` misses head 3
    or names a head 4 the model lacks depends on its head count, and the build says which.
    """
    problems = []
    if spec.get("ffn") is not None and spec.get("width") is None:
        problems.append(SchemeError("`ffn:` needs a `width:` scheme", ("ffn",),
                                    hint="add `width:` or remove `ffn:`"))
    for key, unit in UNITS.items():
        groups = spec.get(key)
        if not isinstance(groups, list):
            continue
        try:
            check_partition(groups, key=key, unit=unit)
        except SchemeError as e:
            if len(e.where) == 2:  # at a group (empty, overlapping), not a gap in the whole
                problems.append(e)
    return problems


@dataclass(frozen=True)
class Space:
    """One feature space of a width map: a partition of units of ``block`` features each."""

    partition: Partition
    block: int

    @property
    def large(self) -> int:
        return self.partition.n_large * self.block

    @property
    def small(self) -> int:
        return self.partition.n_small * self.block


@dataclass(frozen=True)
class WidthMap:
    """The four feature spaces of a width scheme (reference §1.1, extended to GQA)."""

    h: Space  # hidden stream
    q: Space  # query heads (attention output heads)
    kv: Space  # key/value heads
    ffn: Space  # FFN neurons

    def space(self, name: str) -> Space:
        return getattr(self, name)


def derive_width(heads: Sequence[Sequence[int]], ffn: Sequence[Sequence[int]] | None, *,
                 coalescing: bool, num_heads: int, num_kv_heads: int, hidden_size: int,
                 head_dim: int, intermediate_size: int, model: str) -> WidthMap:
    """Check a query-head scheme (and optional FFN partition) against a model's config.

    ``num_heads`` etc. are those of the step's input: the large model when coalescing, the small
    one when de-coalescing. The heads-per-kv ratio is kept, so ``num_key_value_heads`` scales by
    the same factor as the heads.

    Raises:
        SchemeError: the first problem found, located at the offending group.
    """
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise SchemeError(f"{model} has {num_heads} attention heads and {num_kv_heads} key/value "
                          "heads, which do not divide", ("width",))
    ratio = num_heads // num_kv_heads
    if hidden_size % num_heads:
        raise SchemeError(f"hidden_size {hidden_size} of {model} is not a multiple of its "
                          f"{num_heads} heads, so the hidden stream has no head blocks",
                          ("width",))
    if coalescing:
        q = check_partition(heads, key="width", unit="head", n_large=num_heads, model=model)
    else:
        q = check_partition(heads, key="width", unit="head", n_small=num_heads, model=model)
    if q.n_small % ratio:
        raise SchemeError(f"the scheme has {q.n_small} groups, but with {ratio} query heads per "
                          f"key/value head the small model's head count must be a multiple of "
                          f"{ratio}", ("width",))
    if q.n_large % ratio:
        raise SchemeError(f"the scheme names {q.n_large} heads, but with {ratio} query heads per "
                          f"key/value head the large model's head count must be a multiple of "
                          f"{ratio}", ("width",))
    kv = _kv_partition(q, ratio, heads)
    hidden_block = hidden_size // num_heads
    return WidthMap(h=Space(q, hidden_block), q=Space(q, head_dim), kv=Space(kv, head_dim),
                    ffn=_ffn_space(q, ffn, coalescing=coalescing, num_heads=num_heads,
                                   intermediate_size=intermediate_size, model=model))


def _ffn_space(q: Partition, ffn: Sequence[Sequence[int]] | None, *, coalescing: bool,
               num_heads: int, intermediate_size: int, model: str) -> Space:
    """FFN neurons: in blocks following the head groups ``q``, or an explicit ``ffn:``
    partition of FFN blocks."""
    if ffn is None:
        if intermediate_size % num_heads:
            raise SchemeError(
                f"intermediate_size {intermediate_size} of {model} is not a multiple of its "
                f"{num_heads} heads, so FFN neurons cannot follow the head groups", ("width",),
                hint="give an explicit `ffn:` partition of FFN blocks (its index count must "
                "divide intermediate_size)")
        return Space(q, intermediate_size // num_heads)
    f = check_partition(ffn, key="ffn", unit="FFN block", model=model)
    units = f.n_large if coalescing else f.n_small
    if intermediate_size % units:
        raise SchemeError(f"the `ffn:` partition has {units} "
                          f"{'blocks' if coalescing else 'groups'}, which does not divide "
                          f"intermediate_size {intermediate_size} of {model}", ("ffn",))
    return Space(f, intermediate_size // units)


def _kv_partition(q: Partition, ratio: int, written: Sequence[Sequence[int]]) -> Partition:
    """Large kv head k (query heads k·r .. k·r+r−1) goes to small kv head g(j) // r; all its
    query heads must agree, or the scheme splits kv group k."""
    group_of = q.group_of()
    kv_of: dict[int, int] = {}
    for j in range(q.n_large):
        k, small_kv = j // ratio, group_of[j] // ratio
        if k in kv_of and kv_of[k] != small_kv:
            first = next(x for x in range(k * ratio, j) if group_of[x] // ratio == kv_of[k])
            i = group_of[j]
            raise SchemeError(
                f"group {i} {list(written[i])} splits key/value group {k}: query heads {first} and "
                f"{j} share large kv head {k}, but land in small heads {group_of[first]} and {i}, "
                f"which use different kv heads ({kv_of[k]} and {small_kv}; {ratio} query heads per "
                f"kv head)", ("width", i),
                hint=f"keep the {ratio} query heads of each kv head in groups that share a small "
                "kv head (e.g. pair head h with h + H/2)")
        kv_of[k] = small_kv
    groups: list[list[int]] = [[] for _ in range(q.n_small // ratio)]
    for k in sorted(kv_of):
        groups[kv_of[k]].append(k)
    return Partition(tuple(tuple(g) for g in groups))


def read_scheme_file(path: Path, key: str) -> Any:
    """MLTF config file (e.g. ``map_tools/config/L6-H6.json``): its ``key`` value.

    Raises:
        SchemeError: unreadable, not JSON, no such key, or not a list of lists of indices.
    """
    where: KeySuffix = ()
    try:
        raw, size = read_bounded(path, MAX_SCHEME_FILE)
        if raw is None:
            raise SchemeError(f"the scheme file is {size} bytes, larger than any MLTF config "
                              f"({MAX_SCHEME_FILE} bytes)", where)
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise SchemeError("scheme file not found", where) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SchemeError(f"cannot read the scheme file ({e})", where) from None
    except json.JSONDecodeError as e:
        raise SchemeError(f"the scheme file is not JSON ({e.msg}, line {e.lineno})",
                          where) from None
    if not isinstance(data, dict) or key not in data:
        raise SchemeError(f"the scheme file has no `{key}`", where,
                          hint="MLTF config files hold `width_scheme` and `depth_scheme`")
    value = data[key]
    if not (isinstance(value, list) and value and all(
            isinstance(g, list) and g and all(isinstance(j, int) and not isinstance(j, bool)
                                              and j >= 0 for j in g) for g in value)):
        raise SchemeError(f"`{key}` in the scheme file is not a list of groups of indices "
                          "(e.g. [[0, 6], [1, 7]])", where)
    return value
