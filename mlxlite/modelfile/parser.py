"""Ollama's Modelfile syntax: parse and check, pure (no I/O but what the caller passes).

Contract (docs/modelfile in ollama/ollama, and its parser's behaviour):
  - Instructions, case-insensitive: FROM (required, once), PARAMETER name value (typed by
    `options.coerce`; unknown names rejected; `stop` repeatable), TEMPLATE (an Ollama Go
    template, kept as written and checked by Go's grammar, or a jinja template),
    SYSTEM, MESSAGE role text (system/user/assistant), LICENSE (repeatable), REQUIRES
    (semver), ADAPTER / DRAFT / RENDERER / PARSER (recognized, refused as unsupported).
  - `#` starts a comment only where an instruction could start. A value runs to the end
    of its line; a value that starts with `"` or `\"\"\"` runs to the first line end where
    the (trimmed) text ends with the same quote, so quoted values may span lines. There
    are no escapes. CRLF line ends count as one.
  - Every error is a `ModelfileError` (a `BadRequest`) carrying line and column (1-based).
  - `quote(value)` writes a value so that parsing gives it back exactly (for `show`).
Never imports mlx; jinja2 and `formats.gotemplate` only to check templates.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from mlxlite import options
from mlxlite.errors import BadRequest, MlxliteError
from mlxlite.formats import gotemplate, templates

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "REQUIRES",
                "ADAPTER", "DRAFT", "RENDERER", "PARSER")
ROLES = ("system", "user", "assistant")
ONCE = ("FROM", "TEMPLATE", "SYSTEM", "REQUIRES")
_SEMVER = re.compile(r"v?(0|[1-9]\d*)(\.(0|[1-9]\d*)(\.(0|[1-9]\d*))?)?"
                     r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class ModelfileError(BadRequest):
    """A Modelfile mistake at `line`:`column` (1-based)."""

    def __init__(self, message: str, line: int, column: int, source: str = "Modelfile",
                 unsupported: bool = False) -> None:
        super().__init__(f"{source}:{line}:{column}: {message}")
        self.reason = message
        self.line = line
        self.column = column
        self.unsupported = unsupported


class TemplateProblem(BadRequest):
    """A template that cannot be used; `lineno` is the template's own line (1-based)."""

    def __init__(self, message: str, lineno: int = 1) -> None:
        super().__init__(message)
        self.lineno = lineno


# ---- one frozen dataclass per instruction --------------------------------------------
@dataclass(frozen=True)
class From:
    source: str  # a model name, or a path to a .gguf file or a model directory
    line: int
    column: int


@dataclass(frozen=True)
class Parameter:
    name: str
    value: Any  # typed by options.coerce; a str for `stop` (one per line)
    text: str
    line: int
    column: int


@dataclass(frozen=True)
class Template:
    text: str  # as written
    go: bool  # an Ollama Go template (else jinja)
    line: int
    column: int


@dataclass(frozen=True)
class System:
    text: str
    line: int
    column: int


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    line: int
    column: int


@dataclass(frozen=True)
class License:
    text: str
    line: int
    column: int


@dataclass(frozen=True)
class Requires:
    version: str
    line: int
    column: int


Instruction = From | Parameter | Template | System | Message | License | Requires


@dataclass(frozen=True)
class Modelfile:
    instructions: tuple[Instruction, ...]

    def _all(self, kind: type) -> list:
        return [i for i in self.instructions if isinstance(i, kind)]

    @property
    def from_(self) -> From:
        return self._all(From)[0]

    @property
    def parameters(self) -> dict[str, Any]:
        """{name: value}, with `stop` gathered into a list in file order."""
        out: dict[str, Any] = {}
        for p in self._all(Parameter):
            if p.name == "stop":
                out.setdefault("stop", []).append(p.value)
            else:
                out[p.name] = p.value
        return out

    @property
    def template(self) -> str | None:
        found = self._all(Template)
        return found[-1].text if found else None

    @property
    def system(self) -> str | None:
        found = self._all(System)
        return found[-1].text if found else None

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self._all(Message)]

    @property
    def licenses(self) -> list[str]:
        return [lic.text for lic in self._all(License)]

    @property
    def requires(self) -> str | None:
        found = self._all(Requires)
        return found[-1].version if found else None


# ---- templates ---------------------------------------------------------------------------
def is_semver(text: str) -> bool:
    return bool(_SEMVER.match(text))


def is_go_template(text: str) -> bool:
    return templates.is_go_template(text)


def check_template(text: str) -> bool:
    """Whether `text` is an Ollama Go template (else jinja), after checking it parses.

    Raises `TemplateProblem` (with the template's line) for a syntax error in either
    language; Go templates are checked as Ollama parses them (its functions, and a
    `{{ template }}` call needs a pipeline)."""
    if not text.strip():
        raise TemplateProblem("TEMPLATE is empty")
    if is_go_template(text):
        try:
            gotemplate.parse(text).identifiers()
        except gotemplate.TemplateError as exc:
            raise TemplateProblem(f"TEMPLATE is not a valid Go template: {exc.reason}"
                                  + (f" (column {exc.column})" if exc.column else ""), exc.line or 1) from None
        return True
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(text)
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"TEMPLATE is not a valid jinja template: {exc.message}",
                              exc.lineno or 1) from None
    except RecursionError:  # jinja's parser recurses once per nesting level
        raise TemplateProblem("TEMPLATE is not a valid jinja template: nested too deeply") from None
    try:  # compiled as the runner will, so what create accepts also loads
        templates.ChatTemplate(text, name="TEMPLATE")
    except BadRequest as exc:
        raise TemplateProblem(f"TEMPLATE cannot be used: {exc}") from None
    return False


# ---- values ------------------------------------------------------------------------------
def unquote(text: str) -> tuple[bool, str]:
    """Ollama's rule: complete when unquoted, or when it ends with the quote it starts with."""
    if text.startswith('"""'):
        return (True, text[3:-3]) if len(text) >= 6 and text.endswith('"""') else (False, "")
    if text.startswith('"'):
        return (True, text[1:-1]) if len(text) >= 2 and text.endswith('"') else (False, "")
    return True, text


def _parses_back(quoted: str, value: str) -> bool:
    lines = quoted.split("\n")
    for k in range(1, len(lines) + 1):
        ok, got = unquote("\n".join(lines[:k]).strip())
        if ok:
            return k == len(lines) and got == value
    return False


def _check_writable(value: str) -> None:
    # A parse turns CR into LF and refuses control characters: such a value has no spelling.
    if "\r" in value or _CONTROL.search(value):
        raise BadRequest(f"value {value[:40]!r} cannot be written in a Modelfile "
                         "(it holds a carriage return or a control character)")


def quote(value: str) -> str:
    """`value` written so that a parse gives it back exactly (bare when that is safe)."""
    _check_writable(value)
    if value and value == value.strip() and "\n" not in value and not value.startswith('"'):
        return value
    for candidate in (f'"{value}"', f'"""{value}"""'):
        if _parses_back(candidate, value):
            return candidate
    raise BadRequest(f"value {value[:40]!r}... cannot be written in a Modelfile "
                     '(a line inside it ends with """)')


def format_parameter(value: Any) -> str:
    """A PARAMETER value as text: strings in double quotes (as Ollama's docs write stop)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        _check_writable(value)
        return f'"{value}"' if _parses_back(f'"{value}"', value) else quote(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # reads back as the same float
    return repr(value)


# ---- the parser --------------------------------------------------------------------------
class _Scanner:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def where(self, pos: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.starts, pos)
        return line, pos - self.starts[line - 1] + 1

    def error(self, pos: int, message: str, unsupported: bool = False) -> ModelfileError:
        line, col = self.where(pos)
        return ModelfileError(message, line, col, self.source, unsupported)


def _decode(data: bytes | str, source: str) -> str:
    if isinstance(data, str):
        return data
    # A UTF-16 byte order mark says UTF-16 (Windows editors write it); damaged text of
    # either kind is reported where it breaks, like any other Modelfile mistake.
    utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff"))
    codec = "utf-16" if utf16 else "utf-8-sig"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        head = data[: exc.start].decode(codec, "replace")
        line = head.count("\n") + 1
        col = len(head) - (head.rfind("\n") + 1) + 1
        raise ModelfileError(f"not valid {'UTF-16' if utf16 else 'UTF-8'} text", line, col, source) from None


def parse(data: bytes | str, source: str = "Modelfile") -> Modelfile:
    """Parse and check a Modelfile (syntax, parameter types, templates); no I/O."""
    text = _decode(data, source).lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    sc = _Scanner(text, source)
    bad = _CONTROL.search(text)
    if bad:
        raise sc.error(bad.start(), f"control character U+{ord(bad.group()):04X} is not allowed")
    out: list[Instruction] = []
    seen: dict[str, int] = {}
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\n":
            i += 1
            continue
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        start = i
        while i < n and "a" <= text[i].lower() <= "z":
            i += 1
        word = text[start:i].upper()
        if not word:
            raise sc.error(start, f"expected an instruction, found {c!r}")
        if word not in INSTRUCTIONS:
            raise sc.error(start, f"unknown instruction {text[start:i]!r}; expected one of "
                           + ", ".join(INSTRUCTIONS))
        arg = ""
        i = _after_word(sc, i, f"{word} needs a value")
        if word in ("PARAMETER", "MESSAGE"):
            arg_start = i
            allowed = re.compile(r"[A-Za-z0-9_]" if word == "PARAMETER" else r"[A-Za-z]")
            while i < n and allowed.match(text[i]):
                i += 1
            arg = text[arg_start:i]
            what = "a parameter name" if word == "PARAMETER" else "a role (system, user or assistant)"
            if not arg:
                raise sc.error(arg_start, f"{word} needs {what}")
            i = _after_word(sc, i, f"{word} {arg} needs a value")
            if word == "MESSAGE" and arg not in ROLES:
                raise sc.error(arg_start, f"unknown message role {arg!r}; expected system, user or assistant")
        value, vpos, i = _read_value(sc, i)
        line, col = sc.where(start)
        key = word if word != "PARAMETER" else f"PARAMETER {arg}"
        if (word in ONCE or (word == "PARAMETER" and arg != "stop")) and key in seen:
            raise sc.error(start, f"{key} given twice (first on line {seen[key]})")
        seen[key] = line
        out.append(_instruction(sc, word, arg, value, vpos, line, col, start))
    if not any(isinstance(x, From) for x in out):
        raise ModelfileError("no FROM instruction (FROM names the base model or file)", 1, 1, source)
    return Modelfile(tuple(out))


def _after_word(sc: _Scanner, i: int, missing: str) -> int:
    text = sc.text
    if i >= len(text) or text[i] == "\n":
        raise sc.error(i, missing)
    if text[i] not in " \t":
        raise sc.error(i, f"unexpected {text[i]!r}; expected a space")
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _read_value(sc: _Scanner, i: int) -> tuple[str, int, int]:
    """(value, position of its first character, position after it) from Ollama's rule."""
    text, n = sc.text, len(sc.text)
    j = i
    while True:
        e = text.find("\n", j)
        end = n if e < 0 else e
        raw = text[i:end]
        ok, value = unquote(raw.strip())
        if ok:
            return value, i + len(raw) - len(raw.lstrip()), (n if e < 0 else e + 1)
        if e < 0:
            q = '"""' if text.startswith('"""', i) else '"'
            raise sc.error(i, f"unterminated {q}: no later line ends with the closing {q}")
        j = e + 1


def _instruction(sc: _Scanner, word: str, arg: str, value: str, vpos: int, line: int, col: int,
                 start: int) -> Instruction:
    if word in ("ADAPTER", "DRAFT", "RENDERER", "PARSER"):
        what = {"ADAPTER": "LoRA adapters", "DRAFT": "draft models for speculative decoding",
                "RENDERER": "Ollama's built-in renderers", "PARSER": "Ollama's built-in output parsers"}
        raise sc.error(start, f"{word} is not supported by mlxlite ({what[word]})", unsupported=True)
    if word == "FROM":
        if not value.strip():
            raise sc.error(vpos, "FROM needs a model name or a path")
        return From(value, line, col)
    if word == "PARAMETER":
        try:
            typed = options.coerce(arg, value, from_text=True)
        except MlxliteError as exc:
            at = vpos if arg in options.SPECS else sc.text.rfind(arg, start, vpos)
            raise sc.error(at, str(exc).replace("invalid option", "invalid parameter")) from None
        if arg == "stop":
            typed = typed[0]
        return Parameter(arg, typed, value, line, col)
    if word == "TEMPLATE":
        try:
            go = check_template(value)
        except TemplateProblem as exc:
            if exc.lineno <= 1:
                pos = vpos
            else:  # the template's line inside the Modelfile; its first column
                pos = sc.starts[min(sc.where(vpos)[0] + exc.lineno - 2, len(sc.starts) - 1)]
            raise sc.error(pos, str(exc)) from None
        return Template(value, go, line, col)
    if word == "SYSTEM":
        return System(value, line, col)
    if word == "MESSAGE":
        return Message(arg, value, line, col)
    if word == "LICENSE":
        return License(value, line, col)
    if not _SEMVER.match(value):
        raise sc.error(vpos, f"REQUIRES must be a semantic version like 0.14.0, not {value!r}")
    return Requires(value.removeprefix("v"), line, col)
