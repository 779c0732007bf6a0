"""Read a recipe file (YAML or JSON) into a `Document` that knows where every key and value is.

YAML is read with YAML 1.2 floats and strings (no timestamps), only plain tags, bounded
aliases, and duplicate keys reported on both lines; JSON is read by the JSON parser and located
by the YAML pass. Strings that are not text (lone surrogates) are refused here, so every later
message can print them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipekit.errors import (
    KeyPath,
    Location,
    RecipeError,
    RecipeErrors,
    SourceNotFoundError,
    UsageError,
)
from recipekit.inputs.files import read_bounded
from recipekit.units import format_size


class _Loader(yaml.SafeLoader):
    """SafeLoader whose float rule accepts ``1e-3`` (YAML 1.2); PyYAML 1.1 reads it as a string.

    As in YAML 1.2, ``2024-01-01`` is a string (YAML 1.1 reads a timestamp, which a recipe
    refuses): a revision, tag or step name written that way is just a name.
    """


_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_Loader.yaml_implicit_resolvers = {
    first: [r for r in rules if r[0] not in (_FLOAT_TAG, _TIMESTAMP_TAG)]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


_ALLOWED_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                          ("str", "int", "float", "bool", "null", "map", "seq"))


@dataclass
class Document:
    """A parsed recipe document with the position of every key and value."""

    file: str  # as the user named it, for messages
    data: Any
    lines: list[str]
    key_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    value_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    raw_scalars: dict[KeyPath, str] = field(default_factory=dict)
    #: Values that came from a variable (`recipekit.recipe.variables`): what messages add.
    notes: dict[KeyPath, str] = field(default_factory=dict)

    def locate(self, path: KeyPath, *, key: bool = False) -> Location:
        """Return where ``path`` sits: its key's position if ``key`` or it has no value mark.

        Falls back to the nearest enclosing path that has a position.
        """
        p = tuple(path)
        while True:
            marks = (self.key_marks, self.value_marks) if key else (
                self.value_marks, self.key_marks)
            for m in marks:
                if p in m:
                    line, col = m[p]
                    text = self.lines[line - 1] if 0 < line <= len(self.lines) else None
                    return Location(self.file, line, col, text)
            if not p:
                return Location(self.file)
            p = p[:-1]

    def error(self, path: KeyPath, message: str, *, hint: str | None = None,
              key: bool = False, cls: type[UsageError] = RecipeError) -> RecipeError:
        """A ``cls`` error (`RecipeError`, `ShapeMismatchError`, ...) located at ``path``;
        a value that came from a variable (at ``path`` or around it) says so after the
        message: ``... (from variable 'alpha' set by --set)``."""
        note = self.note(path)
        if note is not None:
            message = f"{message} ({note})"
        return cls(message, key_path=path, hint=hint,  # type: ignore[return-value]
                   location=self.locate(path, key=key))

    def note(self, path: KeyPath) -> str | None:
        """The variable note of ``path`` or of the nearest enclosing path that has one."""
        if not self.notes:
            return None
        p = tuple(path)
        while p:
            if p in self.notes:
                return self.notes[p]
            p = p[:-1]
        return None


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _compose(text: str, doc: Document, errors: list[RecipeError]) -> Any:
    """The document's data, recording every key's and value's position in ``doc``."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is None:
        return None
    loader = _Loader(text)  # a fresh constructor for scalars
    try:
        return _Composer(doc, errors, loader).convert(root, ())
    finally:
        loader.dispose()


class _Composer:
    """Converts composed YAML nodes to data: allowed tags only, duplicate keys reported, and
    aliases bounded (a node seen again came through an alias)."""

    def __init__(self, doc: Document, errors: list[RecipeError], loader: _Loader) -> None:
        self.doc, self.errors, self.loader = doc, errors, loader
        self.visited: set[int] = set()  # nodes converted so far
        self.inside: set[int] = set()  # the collections being converted, outermost first
        self.repeated = 0

    def convert(self, node: yaml.Node, path: KeyPath) -> Any:
        self.doc.value_marks[path] = _mark(node)
        self._check(node)
        self.visited.add(id(node))
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            self.inside.add(id(node))
            try:
                if isinstance(node, yaml.MappingNode):
                    return self.convert_mapping(node, path)
                return [self.convert(item, path + (i,)) for i, item in enumerate(node.value)]
            finally:
                self.inside.discard(id(node))
        return self.convert_scalar(node, path)

    def _check(self, node: yaml.Node) -> None:
        if node.tag not in _ALLOWED_TAGS:
            raise yaml.constructor.ConstructorError(
                None, None, f"tag {node.tag!r} is not allowed in a recipe", node.start_mark)
        if id(node) in self.inside:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias refers to a value that contains it", node.start_mark)
        if id(node) in self.visited:
            self.repeated += 1
            if self.repeated > _MAX_ALIASED_VALUES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"aliases repeat more than {_MAX_ALIASED_VALUES} values",
                    node.start_mark)

    def convert_mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        doc = self.doc
        out: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.errors.append(RecipeError(
                    "mapping keys must be plain strings",
                    key_path=path, location=_loc(doc, key_node)))
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.errors.append(RecipeError(
                    f"duplicate key `{key}` (first defined on line {seen[key]})",
                    key_path=path + (key,), location=_loc(doc, key_node),
                    hint=f"remove one of them; {_format_of(doc)} would silently keep only "
                    "the last"))
                continue
            seen[key] = line
            doc.key_marks[path + (key,)] = _mark(key_node)
            out[key] = self.convert(value_node, path + (key,))
        return out

    def convert_scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
            if isinstance(value, int):
                str(value)  # Python refuses to print an int of more than 4300 digits
        except (ValueError, IndexError, KeyError):  # 0b_, ._, 4301 digits; !!int '', !!bool x
            kind = "a boolean" if node.tag.endswith(":bool") else "a number"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {show(node.value)} as {kind} (quote it to make it "
                "a string)", node.start_mark) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.doc.raw_scalars[path] = str(node.value)
        return value


#: Values an alias may repeat in all (a legitimate recipe repeats a few dozen): beyond it, a
#: "billion laughs" document would take all memory.
_MAX_ALIASED_VALUES = 10_000


def _loc(doc: Document, node: yaml.Node) -> Location:
    line, col = _mark(node)
    return Location(doc.file, line, col, doc.lines[line - 1] if line <= len(doc.lines) else None)


def _format_of(doc: Document) -> str:
    """The recipe's format as a message names it: a .json recipe is JSON, even though its keys
    are located by the YAML pass."""
    return "JSON" if Path(doc.file).suffix.lower() == ".json" else "YAML"


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key `{k}`")
        out[k] = v
    return out


def load_document(path: str | Path) -> Document:
    """Parse a recipe file (YAML, or JSON by extension) into a located `Document`.

    Raises:
        RecipeErrors: syntax errors and duplicate keys, located.
        SourceNotFoundError: the file does not exist.
    """
    display = str(path)
    p = Path(path)
    return parse_document(_read_text(p, display), display, is_json=p.suffix.lower() == ".json")


def parse_document(text: str, display: str, *, is_json: bool = False) -> Document:
    """Parse a recipe's text (YAML, or JSON when ``is_json``) into a located `Document`;
    ``display`` names it in messages (a file name, or ``<string>`` for text handed to the
    Python API, which is then located by line like a file).

    Raises:
        RecipeErrors: syntax errors and duplicate keys, located.
    """
    doc = Document(display, None, text.splitlines())
    errors: list[RecipeError] = []
    yaml_text, json_data, json_ok = text, None, False
    if is_json:
        # The YAML pass below then only locates the JSON parser's document. Tabs are JSON
        # whitespace that YAML refuses in places; no JSON string holds a raw tab, so the YAML
        # pass reads them as spaces (one column each, as before).
        yaml_text = text.replace("\t", " ")
        json_data, json_ok = _parse_json(text, doc)
    try:
        doc.data = _compose(yaml_text, doc, errors)
    except (yaml.YAMLError, RecursionError) as e:
        if not json_ok:
            if isinstance(e, yaml.reader.ReaderError) and isinstance(e.character, int):
                raise _reader_error(doc, e, yaml_text) from None
            raise _syntax_error(doc, e) from None
        # Valid JSON that YAML cannot read (a key over 1024 characters, a raw U+0080): the JSON
        # parser's document, located as far as the YAML pass got.
        doc.data, errors = json_data, []
    if json_ok and doc.data != json_data:  # YAML folds a raw U+2028 or NEL in a string
        doc.data = json_data
    errors += _lone_surrogates(doc)
    if errors:
        raise RecipeErrors(errors)
    return doc


#: The largest recipe file read: real recipes are a few KiB (a 1,000-layer slice list with
#: gradients stays under 1 MiB), and the parser takes about a second per 3 MiB, so 16 MiB bounds
#: both memory and time (a recipe of /dev/zero or 150 MB of YAML is refused at once).
MAX_RECIPE_BYTES = 16 * 1024 * 1024


def _read_text(p: Path, display: str) -> str:
    """The recipe's text, read only if it is a regular file under `MAX_RECIPE_BYTES`: a FIFO
    would block forever, a device never ends (inputs/files.py `read_bounded` refuses both)."""
    try:
        raw, size = read_bounded(p, MAX_RECIPE_BYTES)
    except FileNotFoundError:
        raise SourceNotFoundError(
            "recipe file not found", file=display,
            hint="check the path; recipes are YAML (.yaml/.yml) or JSON (.json)") from None
    except IsADirectoryError:
        raise SourceNotFoundError("is a directory, not a recipe file", file=display) from None
    except OSError as e:
        raise RecipeErrors([RecipeError(f"cannot read the recipe: {e.strerror or e}",
                                        file=display)]) from None
    if raw is None:
        raise RecipeErrors([RecipeError(
            f"the recipe is {format_size(size)}, larger than the {format_size(MAX_RECIPE_BYTES)} "
            "a recipe may be", file=display,
            hint="a recipe is a short YAML or JSON file; check that this is the right file")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(e, display) from None


def _not_utf8(e: UnicodeDecodeError, display: str) -> RecipeErrors:
    """Located at the first bad byte: its line and column (in characters), the line shown with
    the byte escaped, so a user finds it in a file their editor may show as fine."""
    data = bytes(e.object)
    start = data.rfind(b"\n", 0, e.start) + 1
    end = data.find(b"\n", e.start)
    text = data[start:end if end >= 0 else len(data)].decode("utf-8", "backslashreplace")
    before = data[start:e.start].decode("utf-8", "backslashreplace")
    return RecipeErrors([RecipeError(
        f"not UTF-8 text: byte 0x{data[e.start]:02x} ({e.reason})",
        location=Location(display, data.count(b"\n", 0, e.start) + 1, len(before) + 1, text),
        hint="save the recipe as UTF-8")])


def _reader_error(doc: Document, e: yaml.reader.ReaderError, text: str) -> RecipeErrors:
    """A character YAML refuses anywhere (NUL, other C0 controls): located at its line and
    column, which PyYAML only gives as an offset into the whole text."""
    line = text.count("\n", 0, e.position) + 1
    column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
    return RecipeErrors([RecipeError(
        f"invalid YAML: unacceptable character U+{e.character:04X}: control characters are not "
        "allowed", location=Location(doc.file, line, column, _line(doc, line)),
        hint="remove it, or write it as an escape in a double-quoted string")])


def _parse_json(text: str, doc: Document) -> tuple[Any, bool]:
    """(data, True) for valid JSON; (None, False) for duplicate keys, which the YAML pass
    reports with both lines."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_json_keys), True
    except json.JSONDecodeError as e:
        raise RecipeErrors([RecipeError(
            f"invalid JSON: {e.msg}",
            location=Location(doc.file, e.lineno, e.colno, _line(doc, e.lineno)))]) from None
    except ValueError:
        return None, False
    except RecursionError:
        raise RecipeErrors([RecipeError("invalid JSON: nested too deeply",
                                        file=doc.file)]) from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogates(doc: Document) -> list[RecipeError]:
    """Strings that are not text: "\\ud800" escapes a lone UTF-16 surrogate, valid in JSON and
    YAML syntax but not encodable, so every later print or file write of it would fail."""
    out = []
    todo: list[tuple[KeyPath, Any]] = [((), doc.data)]
    while todo:
        path, value = todo.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
            value, list) else ()
        for k, v in items:
            todo.append((path + (k,), v))
            if isinstance(k, str) and _SURROGATE.search(k):
                out.append(doc.error(path + (k,), f"key {show(k)} is not valid text: it holds a "
                                     "lone UTF-16 surrogate", key=True))
        if isinstance(value, str) and _SURROGATE.search(value):
            out.append(doc.error(path, f"{show(value)} is not valid text: it holds a lone UTF-16 "
                                 "surrogate", hint="write the character itself (or escape it as "
                                 "\\U0001f600 in YAML, as a \\ud83d\\ude00 pair in JSON)"))
    return out


def _syntax_error(doc: Document, e: yaml.YAMLError | RecursionError) -> RecipeErrors:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        loc = (Location(doc.file, mark.line + 1, mark.column + 1, _line(doc, mark.line + 1))
               if mark else Location(doc.file))
        problem = e.problem or e.context or "invalid YAML"
        return RecipeErrors([RecipeError(f"invalid YAML: {problem}", location=loc)])
    if isinstance(e, RecursionError):
        return RecipeErrors([RecipeError("invalid YAML: nested too deeply", file=doc.file)])
    return RecipeErrors([RecipeError(f"invalid YAML: {e}", file=doc.file)])


def _line(doc: Document, line: int) -> str | None:
    return doc.lines[line - 1] if 0 < line <= len(doc.lines) else None



def show(value: Any) -> str:
    """``value`` as a message quotes it: repr for strings, JSON otherwise, cut at 60 chars."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) < 60 else text[:57] + "..."
