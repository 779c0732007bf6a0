"""One typed error hierarchy for everything a user can get wrong.

Every error carries where it happened (recipe file, line, column, key path, or a checkpoint file)
and an exit code: 2 for anything `recipekit validate` can find (the recipe, its names, its layer
ranges against the sources' headers, refused inputs), 1 for failures while reading or writing
tensor data. The CLI renders them like a compiler; library users catch `RecipekitError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

KeyPath = tuple[str | int, ...]

ECHO_LIMIT = 160
"""The one shortening rule: an echoed input (path, name, number, line) longer than this many
characters is shown as its first ECHO_LIMIT characters and ``...``; `terminal_text` applies it
to any longer run of non-blank characters (a 400-digit number) a message still holds."""

_LONG_RUN = re.compile(rf"\S{{{ECHO_LIMIT + 7},}}")  # longer than "..." + excerpt + "..."


def printable(text: str) -> str:
    """``text`` with control and format characters (ESC, NUL, newline, U+202E, ...) escaped as
    ``\\x1b``, ``\\n``, ``\\u202e``, so an untrusted string cannot forge output lines, retitle
    the terminal or reorder what is shown."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def echo_text(text: object, limit: int = ECHO_LIMIT) -> str:
    """Anything that came from an input, ready to print: shortened by the one rule
    (`ECHO_LIMIT`), then escaped (`printable`). Every message path, name and value goes
    through here or through `display_path`/`quote_name`, which use it."""
    raw = str(text)
    return printable(raw if len(raw) <= limit else raw[:limit] + "...")


def terminal_text(text: str) -> str:
    """A whole rendered message or report, made safe for a terminal: every control or format
    character escaped except the line breaks the renderer itself put there. The last guard
    behind `echo_text`, for values a message embeds without it."""
    text = _LONG_RUN.sub(lambda m: m.group()[:ECHO_LIMIT] + "...", text)
    return "\n".join(printable(line) for line in text.split("\n"))


#: Local folders that messages name by another name: a URL input's stub folder (the copies of
#: its config, index and tokenizer files, inputs/remote.py) is shown as the URL (`show_as`).
_SHOWN_AS: dict[Path, str] = {}


def show_as(folder: Path, name: str) -> None:
    """Name ``folder`` and every path under it by ``name`` in messages (`display_path`).

    Why: a URL input's small files are read from a private temporary copy, and a message that
    named ``/tmp/recipekit-remote-.../config.json`` would send the user to a file that is gone
    when the process ends, instead of the object to fix (``s3://bucket/model/config.json``).
    """
    _SHOWN_AS[Path(folder)] = name.rstrip("/")


def display_path(path: Path) -> str:
    """A path as a user wants to read it: relative to the working directory when inside it,
    shortened and escaped (`echo_text`).

    The last component is not resolved: a message about a symlink names the link, not its
    target (and a symlink loop cannot make the message itself fail). A remote input's file
    (io/remote.py `RemotePath`), or any file of its stub folder (`show_as`), is shown by its
    URL.
    """
    url = getattr(path, "url", None)
    if isinstance(url, str):
        return echo_text(url)
    for folder, name in _SHOWN_AS.items():
        if path.is_relative_to(folder):
            rel = path.relative_to(folder).as_posix()
            return echo_text(name if rel == "." else f"{name}/{rel}")
    try:
        full = path.parent.resolve() / path.name if path.name else path.resolve()
        return echo_text(full.relative_to(Path.cwd().resolve()))
    except (ValueError, OSError, RuntimeError):
        return echo_text(path)


def format_key_path(path: Sequence[str | int]) -> str:
    """Render ``("steps", 0, "alpha")`` as ``steps[0].alpha``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass(frozen=True)
class Location:
    """Where a recipe problem sits: file, 1-based line and column, and the line's own text."""

    file: str
    line: int | None = None
    column: int | None = None
    text: str | None = None

    def prefix(self) -> str:
        """``file:line:column``, the file name escaped (a U+202E in it cannot reorder the line)."""
        shown = echo_text(self.file)
        if self.line is None:
            return shown
        return f"{shown}:{self.line}:{self.column or 1}"


class RecipekitError(Exception):
    """Base of every error recipekit raises for a user's mistake or a bad input.

    Rendered as ``<where>: <key path>: <message>; <hint>`` followed, for recipe errors, by the
    user's own line and a caret.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        key_path: KeyPath | None = None,
        file: str | None = None,
        hint: str | None = None,
        location: Location | None = None,
    ) -> None:
        message = hide_credentials(message)
        super().__init__(message)
        self.message = message
        self.key_path = key_path
        self.file = file if file is None else hide_credentials(file)
        self.hint = hint if hint is None else hide_credentials(hint)
        self.location = location

    def render(self) -> str:
        head = []
        if self.location is not None:
            head.append(self.location.prefix())
        elif self.file:
            head.append(echo_text(self.file))
        if self.key_path:
            head.append(format_key_path(self.key_path))
        text = self.message
        if self.hint:
            text = f"{text}; {self.hint}" if not text.endswith(".") else f"{text} {self.hint}"
        line = hide_credentials(": ".join([*head, text]))  # also what was set after __init__
        loc = self.location
        if loc is not None and loc.text is not None and loc.line is not None:
            text, column = _excerpt(loc.text, loc.column or 1)
            line += f"\n    {text}\n    {' ' * (column - 1)}^"
        return terminal_text(line)

    def __str__(self) -> str:
        return self.render()


#: A URL's user and secret (``s3://KEY:SECRET@bucket``), never shown in a message: ``user@``,
#: or ``user:secret@`` where the secret may hold ``/`` (AWS secret keys do) and ``@`` (up to
#: the last ``@`` of the word, as URL parsers split a host at its last ``@``).
_CREDENTIALS = re.compile(
    r"([A-Za-z][\w+.-]*://)(?:[^/@:\s\"'`]*:[^\s\"'`]*|[^/@\s\"'`]+)@")


#: A URL, up to the first blank or quote: where `_query_secrets` looks.
_URL_TEXT = re.compile(r"[A-Za-z][\w+.-]*://[^\s\"'`]*")
#: The words that make a query or fragment parameter a secret when its name holds one of them
#: (``?token=``, ``access_token=``, presigned ``X-Amz-Signature=``/``X-Amz-Credential=``, an
#: Azure SAS ``sig=``, ``api_key=``, ``Authorization=``, ``pwd=``, ``params[token]=``, ``hdnts=``):
#: names are split into words at every character that is not a letter or digit, after
#: percent-decoding, so ``monkey=`` or ``keyword=`` are not secrets.
SECRET_WORDS = frozenset({
    "token", "accesstoken", "apikey", "key", "secret", "password", "passwd", "pwd", "pass",
    "auth", "authorization", "sig", "signature", "credential", "credentials", "hmac",
    "session", "sessiontoken", "bearer", "jwt", "hdnts", "hdnea"})  # (Akamai's tokens)
#: one parameter of a query or fragment: its name (up to ``=``, written or ``%3D``), its value
_PARAM = re.compile(r"(?P<name>[^=&;#?]*?)(?P<eq>=|%3[dD])(?P<value>[^&;#?]*)")


def _is_secret_name(name: str) -> bool:
    from urllib.parse import unquote

    words = re.split(r"[^a-z0-9]+", unquote(name).lower())
    return any(w in SECRET_WORDS for w in words)


def _query_secrets(url: str) -> tuple[str, bool]:
    """``url`` with the value of every secret parameter of its query and fragment written
    ``***``, and whether it had one. Only what follows the first ``?`` or ``#`` is read: a
    path segment such as ``exp;monkey=1`` is not a query."""
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return url, False
    found = False

    def hide(m: re.Match[str]) -> str:
        nonlocal found
        if not m.group("value") or not _is_secret_name(m.group("name")):
            return m.group()
        found = True
        return f"{m.group('name')}{m.group('eq')}***"

    return url[:cut] + _PARAM.sub(hide, url[cut:]), found


def holds_credentials(text: str) -> bool:
    """Whether ``text`` holds a URL with a user or secret, or a secret in its query or fragment
    (`hide_credentials` would hide one): refused wherever a path or URL is read, ``file://``
    URLs included."""
    return _CREDENTIALS.search(text) is not None or any(
        _query_secrets(m.group())[1] for m in _URL_TEXT.finditer(text))


def hide_credentials(text: str) -> str:
    """``text`` with every URL's user and secret, and every secret of its query, written
    ``***``: a recipe or command line that holds credentials is refused, and no message (nor
    the line it quotes, nor a JSON error) may repeat them."""
    text = _CREDENTIALS.sub(r"\1***@", text)
    if "://" not in text:
        return text
    return _URL_TEXT.sub(lambda m: _query_secrets(m.group())[0], text)


def _excerpt(text: str, column: int) -> tuple[str, int]:
    """The user's line for the caret display, escaped, and the caret's column in it: a long
    line is cut to `ECHO_LIMIT` characters around the column. A URL's credentials are written
    ``***`` (the message refusing them must not print them in the line it quotes)."""
    column = max(column, 1)
    start = max(0, min(column - 1 - ECHO_LIMIT // 2, len(text) - ECHO_LIMIT))
    cut = text[start:start + ECHO_LIMIT]

    def shown(part: str) -> str:
        return printable(hide_credentials(part))

    before = shown(cut[:column - 1 - start])
    lead, tail = ("..." if start else ""), ("..." if start + ECHO_LIMIT < len(text) else "")
    return lead + before + shown(cut[column - 1 - start:]) + tail, len(lead + before) + 1


class UsageError(RecipekitError):
    """A mistake `recipekit validate` can find: exit code 2."""

    exit_code = 2


class RecipeError(UsageError, ValueError):
    """A problem in the recipe document, located at a key.

    Example: ``recipe.yaml:9:5: steps[0].alhpa: unknown key in step 'up' (op: layers); did you
    mean 'alpha'?``
    """


class MergekitConfigError(RecipeError):
    """A mergekit config where a recipe belongs (`run`, `validate`, `plan`, the Python API).

    Example: ``merge.yml: this is a mergekit config, not a recipe; convert it with `recipekit
    import-mergekit merge.yml -o recipe.yaml`, then use the recipe``
    """


class RecipeErrors(UsageError):
    """Several recipe problems, collected and reported together, sorted by line."""

    def __init__(self, errors: Iterable[RecipekitError]) -> None:
        self.errors = sorted(errors, key=_sort_key)
        super().__init__(f"{len(self.errors)} problem(s)")

    def render(self) -> str:
        parts = [e.render() for e in self.errors]
        n = len(self.errors)
        if n > 1:
            parts.append(f"{n} errors found; nothing was written.")
        return "\n".join(parts)


def _sort_key(err: RecipekitError) -> tuple:
    loc = err.location
    return (loc.file if loc else err.file or "", loc.line if loc and loc.line else 0,
            loc.column if loc and loc.column else 0)


class SourceNotFoundError(UsageError, FileNotFoundError):
    """A model directory or file named by the recipe does not exist."""


class SourceUnreadableError(UsageError):
    """A model or adapter directory (or file) exists but cannot be read, e.g. for lack of
    permission: exit code 2, like a missing one.

    Example: ``models/m: cannot read: Permission denied; give the user running recipekit read
    and search permission on it (chmod u+rx)``
    """


class UnsupportedCheckpointError(UsageError):
    """A checkpoint outside version 1's scope (pickle, quantized, several layer stacks, ...)."""


class ShapeMismatchError(UsageError, ValueError):
    """Inputs that must agree in shape do not (a frankenmerge layer from a wider model, ...)."""


class TensorNotFoundError(UsageError, KeyError):
    """A tensor the index or the plan names is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.render()


class CorruptCheckpointError(UsageError):
    """A damaged safetensors header, config.json or index, found before any tensor data is read:
    exit code 2, like everything `recipekit validate` can find (DESIGN §4)."""


class TensorDataError(CorruptCheckpointError):
    """Reading tensor data failed (a file shorter than its header says, a read error, a shard
    that changed under the run): exit code 1, like every failure of tensor I/O."""

    exit_code = 1


class OutputError(RecipekitError, OSError):
    """The output cannot be written (disk full, permissions, ...): exit code 1."""


class OutputPathError(UsageError):
    """The output path is unusable as given (a file, a non-recipekit directory, ...)."""


class DeviceError(UsageError):
    """The requested compute device does not exist on this machine."""


class ExtraMissingError(UsageError):
    """An option needs a program or package that is not installed (Graphviz's ``dot`` for
    ``--format svg``, matplotlib for ``--chart``): exit code 2.

    Example: ``--chart needs matplotlib, which is not installed; pip install
    'recipekit[charts]'``
    """


class ClusterError(RecipekitError):
    """The Ray cluster of ``--executor ray`` failed the run: it cannot be reached, a task's
    worker died more often than Ray retries, or a node runs another recipekit version: exit
    code 1 (finished shards are kept and a rerun resumes).

    Example: ``out: a Ray worker died 4 times writing model-00002-of-00005.safetensors (Ray
    retries a task 3 times); finished shards are kept: run the same command again to resume``
    """


class RenderError(RecipekitError):
    """Drawing a picture failed (Graphviz exited with an error or took too long): exit code 1.
    """


class VerifyError(RecipekitError):
    """An output that fails a check of `recipekit verify` (a changed byte, a stale index, a
    model transformers cannot load): exit code 1.

    Example: ``out/model.safetensors: sha256 3f2a... differs from the manifest's 9b1c...; the
    file's bytes changed after it was written; rerun `recipekit run --force```
    """


# Problems found where the recipe position is not known (recipe params, arch lookup, scheme
# files, scalings logs): the caller turns them into located `RecipeError`s. Then the errors of
# `recipekit lock` and `recipekit import-mergekit`.


class UnlocatedError(ValueError):
    """A problem found by code that does not know where in the recipe it comes from (a scheme,
    a scalings log, a layer stack, a parameter): its ``message`` and ``hint``; the step or input
    that uses the value turns it into a located `RecipeError`."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class LayerStackError(UnlocatedError):
    """Why no single layer stack could be found; inputs/models.py turns it into a located
    error. ``stacks``: the prefixes found when there were several (which `import-mergekit`
    uses to name the language model's stack)."""

    stacks: tuple[str, ...] = ()


class ParamError(UnlocatedError):
    """A parameter that cannot give a value for some tensor; the caller locates it, at
    ``where`` (the key path of the parameter relative to the step, when known)."""

    def __init__(self, message: str, hint: str | None = None, where: KeyPath = ()) -> None:
        super().__init__(message, hint)
        self.where = where


class ScalingsLogError(UnlocatedError):
    """Why an X-LoRA scalings log cannot be used (the message names the file)."""


class SchemeError(UnlocatedError):
    """A coalescing-scheme problem, located by ``where``: the key path relative to the step,
    e.g. ``("width", 3)`` for group 3 of the width scheme."""

    def __init__(self, message: str, where: KeyPath, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.where = where


class ChatTemplateError(UnlocatedError):
    """A chat template that cannot be used (not UTF-8 text, not Jinja, too large), located by
    the recipe key that names it.

    Example: ``recipe.yaml:14:5: output.chat_template.file: templates/chat.jinja: line 2: the
    chat template is not valid Jinja: unexpected '}'``
    """


class LockError(UsageError):
    """The lock does not match the recipe or its inputs (exit 2)."""


class ConversionError(RecipeErrors):
    """Something in the mergekit config that has no exact recipekit translation (exit 2)."""
