"""Go's text/template language, as Ollama's template layers use it: lex, parse, execute.

Contract:
  - `parse(text) -> Template` checks the whole text (Go's grammar: `{{ }}` actions with `-`
    trim markers, `{{/* comments */}}`, pipelines with `|`, `$x :=`/`$x =` variables, field
    chains, `if`/`else if`/`else`/`end`, `range` (with `$i, $x :=`, `else`, `break`,
    `continue`), `with` (and Go 1.23's `else with`), `define`/`template`/`block`). Functions
    are checked at parse time: Go's builtins (`and or not len index slice eq ne lt le gt ge
    print printf println html js urlquery call`) and Ollama's (`json currentDate
    yesterdayDate toTypeScriptType`). Ranges over an int run as Go 1.22 runs them.
  - `Template.execute(data, funcs=True) -> str` runs it the way Go's `text/template` does with
    `missingkey=zero`: Go's truthiness, comparisons and `fmt` printing (`<no value>` for a
    missing map key, `map[k:v]`, `[a b]`, floats as `%v` writes them), maps ranged in key
    order. Data is Python: dict = `map[string]any`, list = slice, str/bool, int = Go int,
    float = float64 (JSON numbers are floats, as Go decodes them), None = a nil interface,
    and `GoStruct` for Go structs (fields in order, an optional `String()`, JSON tags).
    `funcs=False` runs without Ollama's functions or defined templates (Ollama's last
    legacy pass does). `go_json(value)` is Go's `encoding/json` output for such data.
  - `Template.identifiers()` is Ollama's `Vars()`; `Template.with_response()` appends
    `{{ .Response }}`; `Template.cut_after_response()` is Ollama's legacy cut (everything
    after the first `.Response` field dropped).
  - Every mistake is a `TemplateError` (a `BadRequest`) naming the template's line:column.
Pure, standard library only; never does I/O.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from mlxlite.errors import BadRequest

MAX_DEPTH = 100                 # nested {{ template }} calls (Go allows 100000; a chat template needs a few)
MAX_STEPS = 5_000_000           # nodes walked in one execution: a hostile template cannot spin forever
MAX_OUTPUT = 64 << 20           # characters written by one execution


class TemplateError(BadRequest):
    """A template that does not parse or does not execute, at `line`:`column` (1-based)."""

    def __init__(self, reason: str, line: int = 0, column: int = 0) -> None:
        where = f"{line}:{column}: " if line else ""
        super().__init__(f"template: {where}{reason}")
        self.reason, self.line, self.column = reason, line, column


# ---- Go values ------------------------------------------------------------------------------
class _Missing:
    """Go's invalid reflect.Value: a missing map key after a pipeline; prints `<no value>`."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
_NOFINAL: Any = object()        # "no piped value" (Go's missingVal)


class GoStruct:
    """A Go struct value. Subclasses list `_go_fields` as (Name, json tag); a tag ending in
    ",omitempty" omits zero values, "-" never marshals, "" marshals under the field's name.
    `_go_type` names the type in errors; `_go_pointer` marks values held by pointer."""

    _go_type = "struct"
    _go_fields: tuple[tuple[str, str], ...] = ()
    _go_pointer = False

    def __init__(self, **values: Any) -> None:
        for name, _ in self._go_fields:
            setattr(self, name, values.pop(name, None))
        if values:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(values)}")

    def go_json(self) -> str:
        parts = []
        for name, tag in self._go_fields:
            key, _, opts = tag.partition(",")
            value = getattr(self, name)
            if key == "-" or (opts == "omitempty" and _empty(value)):
                continue
            parts.append(f"{_json_string(key or name)}:{go_json(value)}")
        return "{" + ",".join(parts) + "}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n, _ in self._go_fields)})"


class GoList(list):
    """A typed Go slice; `nil=True` is Go's nil slice (JSON null, otherwise empty)."""

    go_type = "[]interface {}"

    def __init__(self, items: Any = (), nil: bool = False) -> None:
        super().__init__(items)
        self.nil = nil and not self

    def go_json(self) -> str:
        return "null" if self.nil else "[" + ",".join(go_json(x) for x in self) + "]"


class GoMap(dict):
    """A typed Go map; `nil=True` is a nil map; `go_zero()` is its element type's zero value."""

    go_type = "map[string]interface {}"

    def __init__(self, items: Any = (), nil: bool = False) -> None:
        super().__init__(items)
        self.nil = nil and not self

    def go_zero(self) -> Any:
        return None

    def go_json(self) -> str:
        return "null" if self.nil else _json_object(self)


def _empty(value: Any) -> bool:
    """encoding/json's omitempty: false, 0, "", nil, and empty slices and maps."""
    if value is None or value is MISSING or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, (str, list, dict)) and len(value) == 0


def go_type(value: Any) -> str:
    if value is None or value is MISSING:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, GoStruct):
        return value._go_type
    if isinstance(value, (GoList, GoMap)):
        return value.go_type
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return type(value).__name__


# ---- Go's number and string formatting ---------------------------------------------------------
def _digits(f: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of abs(f) and the decimal point's position
    (Python's repr and Go's strconv both print the shortest digits that read back)."""
    _, digits, exp = Decimal(repr(abs(f))).normalize().as_tuple()
    if digits == (0,):
        return "0", 1
    return "".join(map(str, digits)), len(digits) + exp


def _fmt_e(neg: bool, digs: str, dp: int) -> str:
    mant = digs[0] + ("." + digs[1:] if len(digs) > 1 else "")
    exp = dp - 1 if digs != "0" else 0
    return ("-" if neg else "") + mant + "e" + ("-" if exp < 0 else "+") + f"{abs(exp):02d}"


def _fmt_f(neg: bool, digs: str, dp: int) -> str:
    if dp <= 0:
        text = "0." + "0" * -dp + digs
    elif dp >= len(digs):
        text = digs + "0" * (dp - len(digs))
    else:
        text = digs[:dp] + "." + digs[dp:]
    return ("-" if neg else "") + text


def go_float(f: float, verb: str = "v") -> str:
    """A float64 as Go writes it: "v" is fmt's %v (strconv's shortest 'g': an exponent
    below -4 or from 6 on), "json" is encoding/json's (an exponent below 1e-6 or from
    1e21 on, written e-7 rather than e-07)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    neg = math.copysign(1.0, f) < 0
    digs, dp = _digits(f)
    if verb == "json":
        a = abs(f)
        if a != 0 and (a < 1e-6 or a >= 1e21):
            return re.sub(r"e-0(\d)$", r"e-\1", _fmt_e(neg, digs, dp))
        return _fmt_f(neg, digs, dp)
    exp = dp - 1 if digs != "0" else 0
    if exp < -4 or exp >= 6:
        return _fmt_e(neg, digs, dp)
    return _fmt_f(neg, digs, dp)


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
                 "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_JSON_SPECIAL = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]')


def _json_string(s: str) -> str:
    def repl(m: re.Match) -> str:
        c = m.group()
        if c in _JSON_ESCAPES:
            return _JSON_ESCAPES[c]
        if "\ud800" <= c <= "\udfff":
            return "\ufffd"
        return f"\\u{ord(c):04x}"

    return '"' + _JSON_SPECIAL.sub(repl, s) + '"'


def _json_object(d: dict) -> str:
    return "{" + ",".join(f"{_json_string(str(k))}:{go_json(d[k])}" for k in sorted(d)) + "}"


def go_json(value: Any) -> str:
    """`encoding/json.Marshal` of a Go value: map keys sorted, HTML characters escaped."""
    if value is None or value is MISSING:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"json: unsupported value: {go_float(value)}")
        return go_float(value, "json")
    if isinstance(value, str):
        return _json_string(value)
    custom = getattr(value, "go_json", None)
    if custom is not None:
        return custom()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(go_json(x) for x in value) + "]"
    if isinstance(value, dict):
        return _json_object(value)
    raise ValueError(f"json: unsupported type {type(value).__name__}")


def fmt_v(value: Any, depth: int = 0) -> str:
    """fmt's %v: Stringers through String(), `[a b]`, `map[k:v]` in key order, `{f1 f2}`."""
    if value is None or value is MISSING:
        return "<nil>"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return value
    stringer = getattr(value, "go_string", None)
    if stringer is not None:
        return stringer()
    if isinstance(value, GoStruct):
        body = "{" + " ".join(fmt_v(getattr(value, n), depth + 1) for n, _ in value._go_fields) + "}"
        return "&" + body if value._go_pointer and depth == 0 else body
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(fmt_v(x, depth + 1) for x in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{fmt_v(k, depth + 1)}:{fmt_v(value[k], depth + 1)}" for k in sorted(value)) + "]"
    return str(value)


def go_sprint(args: list[Any]) -> str:
    """fmt.Sprint: a space between operands when neither is a string."""
    out, prev = [], False
    for i, arg in enumerate(args):
        is_str = isinstance(arg, str)
        if i and not is_str and not prev:
            out.append(" ")
        out.append(fmt_v(arg))
        prev = is_str
    return "".join(out)


def go_quote(s: str) -> str:
    """strconv.Quote."""
    out = ['"']
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                        "\v": "\\v"}[c])
        elif c.isprintable() or c == " ":
            out.append(c)
        elif ord(c) < 0x20 or ord(c) == 0x7f:
            out.append(f"\\x{ord(c):02x}")
        elif "\ud800" <= c <= "\udfff":
            out.append("\\ufffd")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out) + '"'


_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d*|\*))?(.?)", re.S)


def go_sprintf(fmt: str, args: list[Any]) -> str:
    """fmt.Sprintf for the verbs templates use (v s q d t f F e E g G x X c U b o %)."""
    out: list[str] = []
    pos, argi = 0, 0
    while True:
        i = fmt.find("%", pos)
        if i < 0:
            out.append(fmt[pos:])
            break
        out.append(fmt[pos:i])
        m = _VERB.match(fmt, i)
        flags, width, prec, verb = m.group(1), m.group(2), m.group(3), m.group(4)
        pos = m.end()
        if verb == "%":
            out.append("%")
            continue
        if not verb:
            out.append("%!(NOVERB)")
            break
        if width == "*" or prec == "*":
            out.append(f"%!{verb}(BADWIDTH)")
            continue
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[argi]
        argi += 1
        out.append(_pad(_format_one(verb, arg, flags, prec), flags, int(width) if width else 0, verb, arg))
    if argi < len(args):
        extra = ", ".join(f"{go_type(a)}={fmt_v(a)}" if a is not None else "<nil>" for a in args[argi:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _bad(verb: str, arg: Any) -> str:
    return f"%!{verb}(<nil>)" if arg is None else f"%!{verb}({go_type(arg)}={fmt_v(arg)})"


def _format_one(verb: str, arg: Any, flags: str, prec: str | None) -> str:
    p = int(prec) if prec not in (None, "") else (0 if prec == "" else None)
    if verb == "v":
        if isinstance(arg, float) and p is not None:
            return f"{arg:.{p}g}"
        return fmt_v(arg)
    if verb == "T":
        return go_type(arg)
    if not hasattr(arg, "go_string") and verb in "sdqxXfFeEgGtco":
        # Containers apply the verb to each element; a nil inside one is just <nil>.
        def inner(x: Any) -> str:
            return "<nil>" if x is None else _format_one(verb, x, flags, prec)

        if isinstance(arg, (list, tuple)):
            return "[" + " ".join(inner(x) for x in arg) + "]"
        if isinstance(arg, dict):
            return "map[" + " ".join(f"{inner(k)}:{inner(arg[k])}" for k in sorted(arg)) + "]"
    if verb == "q" and isinstance(arg, int) and not isinstance(arg, bool):
        return "'" + chr(arg) + "'"
    if verb in "sq":
        if hasattr(arg, "go_string"):
            arg = arg.go_string()
        if not isinstance(arg, str):
            return _bad(verb, arg)
        if p is not None:
            arg = arg[:p]
        return go_quote(arg) if verb == "q" else arg
    if verb == "t":
        return ("true" if arg else "false") if isinstance(arg, bool) else _bad(verb, arg)
    if isinstance(arg, int) and not isinstance(arg, bool):
        if verb == "d":
            return ("+" if "+" in flags and arg >= 0 else "") + str(arg)
        if verb in "xXob":
            body = format(abs(arg), {"x": "x", "X": "X", "o": "o", "b": "b"}[verb])
            return ("-" if arg < 0 else "") + body
        if verb == "c":
            return chr(arg)
        if verb == "U":
            return f"U+{arg:04X}"
        return _bad(verb, arg)
    if isinstance(arg, float):
        if verb in "fF":
            return f"{arg:.{6 if p is None else p}f}"
        if verb in "eE":
            text = f"{arg:.{6 if p is None else p}e}"
            return text.upper() if verb == "E" else text
        if verb in "gG":
            return go_float(arg) if p is None else f"{arg:.{p}g}"
        return _bad(verb, arg)
    if isinstance(arg, str) and verb in "xX":
        return arg.encode().hex() if verb == "x" else arg.encode().hex().upper()
    return _bad(verb, arg)


def _pad(text: str, flags: str, width: int, verb: str, arg: Any) -> str:
    if len(text) >= width:
        return text
    if "-" in flags:
        return text + " " * (width - len(text))
    if "0" in flags and verb in "dfFeEgGxXob" and isinstance(arg, (int, float)):
        sign = text[0] if text[:1] in "+-" else ""
        return sign + "0" * (width - len(text)) + text[len(sign):]
    return " " * (width - len(text)) + text


# ---- lexer --------------------------------------------------------------------------------------
# Item types. Keywords are the last group (Go's itemKeyword and after).
(ERROR, BOOL, CHAR, CHAR_CONSTANT, COMPLEX, ASSIGN, DECLARE, EOF, FIELD, IDENTIFIER, LEFT_DELIM,
 LEFT_PAREN, NUMBER, PIPE, RAW_STRING, RIGHT_DELIM, RIGHT_PAREN, SPACE, STRING, TEXT, VARIABLE,
 KEYWORD, BLOCK, BREAK, CONTINUE, DOT, DEFINE, ELSE, END, IF, NIL, RANGE, TEMPLATE, WITH) = range(34)
_KEYWORDS = {"block": BLOCK, "break": BREAK, "continue": CONTINUE, "define": DEFINE, "else": ELSE,
             "end": END, "if": IF, "range": RANGE, "nil": NIL, "template": TEMPLATE, "with": WITH}
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class _Item:
    typ: int
    pos: int
    val: str

    def __str__(self) -> str:
        if self.typ == EOF:
            return "EOF"
        if self.typ == ERROR:
            return self.val
        if self.typ > KEYWORD:
            return f"<{self.val}>"
        if len(self.val) > 10:
            return go_quote(self.val[:10]) + "..."
        return go_quote(self.val)


def _alnum(c: str) -> bool:
    return c == "_" or c.isalpha() or c.isdecimal()


class _Lexer:
    """Go's lexer, run to the end at once: a list of items ending in EOF or ERROR."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.start, self.paren = text, 0, 0, 0
        self.items: list[_Item] = []

    def emit(self, typ: int) -> None:
        self.items.append(_Item(typ, self.start, self.text[self.start:self.pos]))
        self.start = self.pos

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def accept(self, valid: str) -> bool:
        if self.peek() and self.peek() in valid:
            self.pos += 1
            return True
        return False

    def accept_run(self, valid: str) -> None:
        while self.accept(valid):
            pass

    def left_trim(self, i: int) -> bool:
        return self.text[i:i + 1] == "-" and self.text[i + 1:i + 2] in tuple(_SPACE)

    def right_trim(self, i: int) -> bool:
        return self.text[i:i + 1] in tuple(_SPACE) and self.text[i + 1:i + 2] == "-"

    def at_right_delim(self) -> tuple[bool, bool]:
        if self.right_trim(self.pos) and self.text.startswith("}}", self.pos + 2):
            return True, True
        return self.text.startswith("}}", self.pos), False

    def at_terminator(self) -> bool:
        c = self.peek()
        return c == "" or c in _SPACE or c in ".,|:()" or self.text.startswith("}}", self.pos)

    def run(self) -> list[_Item]:
        try:
            self._text()
        except _LexFail as fail:
            self.items.append(_Item(ERROR, self.start, fail.message))
        return self.items

    def _text(self) -> None:
        text = self.text
        while True:
            x = text.find("{{", self.pos)
            if x < 0:
                self.pos = len(text)
                if self.pos > self.start:
                    self.emit(TEXT)
                self.emit(EOF)
                return
            trim = 0
            if self.left_trim(x + 2):
                chunk = text[self.start:x]
                trim = len(chunk) - len(chunk.rstrip(_SPACE))
            self.pos = x - trim
            if self.pos > self.start:
                self.emit(TEXT)
            self.pos = x
            self.start = self.pos
            self._left_delim()

    def _left_delim(self) -> None:
        self.pos += 2
        after = 2 if self.left_trim(self.pos) else 0
        if self.text.startswith("/*", self.pos + after):
            self.pos += after
            self.start = self.pos
            self._comment()
            return
        self.emit(LEFT_DELIM)
        self.pos += after
        self.start = self.pos
        self.paren = 0
        self._inside_action()

    def _comment(self) -> None:
        self.pos += 2
        i = self.text.find("*/", self.pos)
        if i < 0:
            raise _LexFail("unclosed comment")
        self.pos = i + 2
        delim, trim = self.at_right_delim()
        if not delim:
            raise _LexFail("comment ends before closing delimiter")
        self.pos += 4 if trim else 2
        if trim:
            self.pos += len(self.text[self.pos:]) - len(self.text[self.pos:].lstrip(_SPACE))
        self.start = self.pos

    def _right_delim(self) -> None:
        trim = self.right_trim(self.pos)
        if trim:
            self.pos += 2
            self.start = self.pos
        self.pos += 2
        self.emit(RIGHT_DELIM)
        if trim:
            rest = self.text[self.pos:]
            self.pos += len(rest) - len(rest.lstrip(_SPACE))
            self.start = self.pos

    def _inside_action(self) -> None:
        text = self.text
        while True:
            delim, _ = self.at_right_delim()
            if delim:
                if self.paren == 0:
                    self._right_delim()
                    return
                raise _LexFail("unclosed left paren")
            c = self.peek()
            if not c:
                raise _LexFail("unclosed action")
            if c in _SPACE:
                if self._space():
                    self._right_delim()
                    return
                continue
            self.pos += 1
            if c == "=":
                self.emit(ASSIGN)
            elif c == ":":
                if self.peek() != "=":
                    raise _LexFail("expected :=")
                self.pos += 1
                self.emit(DECLARE)
            elif c == "|":
                self.emit(PIPE)
            elif c == '"':
                self._quote()
            elif c == "`":
                j = text.find("`", self.pos)
                if j < 0:
                    raise _LexFail("unterminated raw quoted string")
                self.pos = j + 1
                self.emit(RAW_STRING)
            elif c == "$":
                self._field_or_variable(VARIABLE)
            elif c == "'":
                self._char()
            elif c == "." and self.peek() and not ("0" <= self.peek() <= "9"):
                self._field_or_variable(FIELD)
            elif c in "+-." or "0" <= c <= "9":
                self.pos -= 1
                self._number()
            elif _alnum(c):
                self.pos -= 1
                self._identifier()
            elif c == "(":
                self.emit(LEFT_PAREN)
                self.paren += 1
            elif c == ")":
                self.emit(RIGHT_PAREN)
                self.paren -= 1
                if self.paren < 0:
                    raise _LexFail("unexpected right paren U+0029 ')'")
            elif c.isascii() and c.isprintable():
                self.emit(CHAR)
            else:
                raise _LexFail(f"unrecognized character in action: U+{ord(c):04X} {c!r}")

    def _space(self) -> bool:
        """Emit a run of spaces; True when it ends at a ` -}}` (the action is over)."""
        n = 0
        while self.peek() and self.peek() in _SPACE:
            self.pos += 1
            n += 1
        if self.right_trim(self.pos - 1) and self.text.startswith("}}", self.pos + 1):
            self.pos -= 1
            if n == 1:
                return True
        self.emit(SPACE)
        return False

    def _identifier(self) -> None:
        while self.peek() and _alnum(self.peek()):
            self.pos += 1
        word = self.text[self.start:self.pos]
        if not self.at_terminator():
            raise _LexFail(f"bad character U+{ord(self.peek()):04X} {self.peek()!r}")
        if word in _KEYWORDS:
            self.emit(_KEYWORDS[word])
        elif word in ("true", "false"):
            self.emit(BOOL)
        else:
            self.emit(IDENTIFIER)

    def _field_or_variable(self, typ: int) -> None:
        if self.at_terminator():
            self.emit(VARIABLE if typ == VARIABLE else DOT)
            return
        while self.peek() and _alnum(self.peek()):
            self.pos += 1
        if not self.at_terminator():
            raise _LexFail(f"bad character U+{ord(self.peek()):04X} {self.peek()!r}")
        self.emit(typ)

    def _quote(self) -> None:
        while True:
            c = self.peek()
            self.pos += 1
            if c == "\\":
                c = self.peek()
                self.pos += 1
                if c and c != "\n":
                    continue
                raise _LexFail("unterminated quoted string")
            if c in ("", "\n"):
                raise _LexFail("unterminated quoted string")
            if c == '"':
                break
        self.emit(STRING)

    def _char(self) -> None:
        while True:
            c = self.peek()
            self.pos += 1
            if c == "\\":
                c = self.peek()
                self.pos += 1
                if c and c != "\n":
                    continue
                raise _LexFail("unterminated character constant")
            if c in ("", "\n"):
                raise _LexFail("unterminated character constant")
            if c == "'":
                break
        self.emit(CHAR_CONSTANT)

    def _number(self) -> None:
        if not self._scan_number():
            raise _LexFail(f"bad number syntax: {go_quote(self.text[self.start:self.pos])}")
        if self.peek() in ("+", "-") and self.peek():
            if not self._scan_number() or self.text[self.pos - 1] != "i":
                raise _LexFail(f"bad number syntax: {go_quote(self.text[self.start:self.pos])}")
            self.emit(COMPLEX)
        else:
            self.emit(NUMBER)

    def _scan_number(self) -> bool:
        self.accept("+-")
        digits = "0123456789_"
        if self.accept("0"):
            if self.accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif self.accept("oO"):
                digits = "01234567_"
            elif self.accept("bB"):
                digits = "01_"
        self.accept_run(digits)
        if self.accept("."):
            self.accept_run(digits)
        if len(digits) == 11 and self.accept("eE"):
            self.accept("+-")
            self.accept_run("0123456789_")
        if len(digits) == 23 and self.accept("pP"):
            self.accept("+-")
            self.accept_run("0123456789_")
        self.accept("i")
        if self.peek() and _alnum(self.peek()):
            self.pos += 1
            return False
        return True


class _LexFail(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


_HEX_ESCAPE = {"x": 2, "u": 4, "U": 8}


def _unquote(token: str) -> str:
    """strconv.Unquote of a "..." or `...` string, or a '...' character constant."""
    if token.startswith("`"):
        return token[1:-1].replace("\r", "")
    quote, body = token[0], token[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        e = body[i + 1:i + 2]
        i += 2
        if e in _ESCAPES:
            out += _ESCAPES[e].encode()
        elif e == quote:
            out += e.encode()
        elif e in _HEX_ESCAPE and re.fullmatch("[0-9a-fA-F]{%d}" % _HEX_ESCAPE[e], body[i:i + _HEX_ESCAPE[e]]):  # noqa: UP031
            code = int(body[i:i + _HEX_ESCAPE[e]], 16)
            i += _HEX_ESCAPE[e]
            if e == "x":
                out.append(code)            # a byte, as Go strings hold bytes
            elif code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ValueError("invalid syntax")
            else:
                out += chr(code).encode()
        elif e and e in "01234567" and re.fullmatch("[0-7]{2}", body[i:i + 2]) and int(e + body[i:i + 2], 8) < 256:
            out.append(int(e + body[i:i + 2], 8))
            i += 2
        else:
            raise ValueError("invalid syntax")
    return out.decode("utf-8", "replace")


# ---- parse tree -----------------------------------------------------------------------------------
@dataclass
class _Node:
    pos: int


@dataclass
class ListNode(_Node):
    nodes: list = field(default_factory=list)


@dataclass
class TextNode(_Node):
    text: str


@dataclass
class PipeNode(_Node):
    decl: list = field(default_factory=list)      # VariableNodes
    is_assign: bool = False
    cmds: list = field(default_factory=list)      # CommandNodes


@dataclass
class ActionNode(_Node):
    pipe: PipeNode


@dataclass
class CommandNode(_Node):
    args: list = field(default_factory=list)


@dataclass
class FieldNode(_Node):
    ident: list


@dataclass
class VariableNode(_Node):
    ident: list


@dataclass
class ChainNode(_Node):
    node: Any
    field: list


@dataclass
class IdentifierNode(_Node):
    ident: str


@dataclass
class DotNode(_Node):
    pass


@dataclass
class NilNode(_Node):
    pass


@dataclass
class BoolNode(_Node):
    value: bool


@dataclass
class NumberNode(_Node):
    text: str
    is_int: bool = False
    is_uint: bool = False
    is_float: bool = False
    int_value: int = 0
    float_value: float = 0.0
    is_rune: bool = False


@dataclass
class StringNode(_Node):
    quoted: str
    text: str


@dataclass
class BranchNode(_Node):
    pipe: PipeNode
    list: ListNode
    else_list: ListNode | None


class IfNode(BranchNode):
    pass


class RangeNode(BranchNode):
    pass


class WithNode(BranchNode):
    pass


@dataclass
class TemplateNode(_Node):
    name: str
    pipe: PipeNode | None


@dataclass
class BreakNode(_Node):
    pass


@dataclass
class ContinueNode(_Node):
    pass


@dataclass
class _EndNode(_Node):
    pass


@dataclass
class _ElseNode(_Node):
    pass


def _describe(node: Any) -> str:
    """A node as Go's String() would show it, for error messages."""
    if isinstance(node, FieldNode):
        return "." + ".".join(node.ident)
    if isinstance(node, VariableNode):
        return ".".join(node.ident)
    if isinstance(node, ChainNode):
        inner = _describe(node.node)
        if isinstance(node.node, PipeNode):
            inner = f"({inner})"
        return inner + "".join("." + f for f in node.field)
    if isinstance(node, IdentifierNode):
        return node.ident
    if isinstance(node, DotNode):
        return "."
    if isinstance(node, NilNode):
        return "nil"
    if isinstance(node, BoolNode):
        return "true" if node.value else "false"
    if isinstance(node, NumberNode):
        return node.text
    if isinstance(node, StringNode):
        return node.quoted
    if isinstance(node, CommandNode):
        return " ".join(f"({_describe(a)})" if isinstance(a, PipeNode) else _describe(a) for a in node.args)
    if isinstance(node, PipeNode):
        decl = ", ".join(_describe(v) for v in node.decl)
        head = f"{decl} {'=' if node.is_assign else ':='} " if decl else ""
        return head + " | ".join(_describe(c) for c in node.cmds)
    if isinstance(node, ActionNode):
        return "{{" + _describe(node.pipe) + "}}"
    if isinstance(node, _EndNode):
        return "{{end}}"
    if isinstance(node, _ElseNode):
        return "{{else}}"
    if isinstance(node, TemplateNode):
        return f"{{{{template {go_quote(node.name)}}}}}"
    return type(node).__name__


def _is_empty_tree(node: Any) -> bool:
    if node is None:
        return True
    if isinstance(node, ListNode):
        return all(_is_empty_tree(n) for n in node.nodes)
    if isinstance(node, TextNode):
        return not node.text.strip(" \t\r\n\v\f")
    return False


def _parse_number(tok: _Item) -> NumberNode:
    text = tok.val
    node = NumberNode(tok.pos, text)
    if tok.typ == COMPLEX:
        raise ValueError("complex numbers are not supported")
    if tok.typ == CHAR_CONSTANT:
        rune = _unquote(text)
        if len(rune) != 1:
            raise ValueError(f"malformed character constant: {text}")
        node.is_int = node.is_uint = node.is_float = node.is_rune = True
        node.int_value, node.float_value = ord(rune), float(ord(rune))
        return node
    value = _parse_int(text)
    if value is not None:
        node.is_int = -(1 << 63) <= value < (1 << 63)
        node.is_uint = 0 <= value < (1 << 64) and (not text.startswith(("+", "-")) or value == 0)
        if not (node.is_int or node.is_uint):
            raise ValueError(f"integer overflow: {go_quote(text)}")
        node.is_float, node.int_value, node.float_value = True, value, float(value)
        return node
    try:
        f = float.fromhex(text) if re.match(r"[+-]?0[xX]", text) else float(text)
    except (ValueError, OverflowError):  # fromhex overflows where float() gives inf (0x1p99999)
        f = None
    if f is None or math.isinf(f):
        raise ValueError(f"illegal number syntax: {go_quote(text)}")
    node.is_float, node.float_value = True, f
    if f == int(f):
        i = int(f)
        node.is_int = -(1 << 63) <= i < (1 << 63)
        node.is_uint = 0 <= i < (1 << 64)
        node.int_value = i
    return node


def _underscores_ok(text: str) -> bool:
    """strconv's rule: an underscore only between digits, or after a base prefix."""
    body = text.lstrip("+-")
    hexa = body[:2].lower() == "0x"
    saw, i = "^", 0
    if body[:2].lower() in ("0b", "0o", "0x"):
        saw, i = "0", 2
    for c in body[i:]:
        if c.isdigit() or hexa and c.lower() in "abcdef":
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def _parse_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, ...) without the range check; None when not an integer."""
    m = re.fullmatch(r"([+-]?)(0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|0[0-7_]*|[1-9][0-9_]*)", text)
    if not m or ("_" in text and not _underscores_ok(text)):
        return None
    sign, body = m.groups()
    digits = body.replace("_", "")
    if digits[:2].lower() in ("0x", "0o", "0b"):
        value = int(digits[2:], {"x": 16, "o": 8, "b": 2}[digits[1].lower()])
    elif len(digits) > 1 and digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    return -value if sign == "-" else value


# ---- parser ------------------------------------------------------------------------------------
class _Parser:
    """Go's recursive-descent parser over the lexer's items; trees go into `trees`."""

    def __init__(self, text: str, funcs: frozenset[str], trees: dict[str, ListNode]) -> None:
        self.text = text
        self.items = _Lexer(text).run()
        self.i = 0
        self.funcs = funcs
        self.trees = trees
        self.vars = ["$"]
        self.range_depth = 0
        self.last = self.items[0]

    # -- tokens
    def next(self) -> _Item:
        item = self.items[min(self.i, len(self.items) - 1)]
        self.i += 1
        self.last = item
        return item

    def backup(self) -> None:
        self.i -= 1

    def peek(self) -> _Item:
        return self.items[min(self.i, len(self.items) - 1)]

    def next_non_space(self) -> _Item:
        while True:
            item = self.next()
            if item.typ != SPACE:
                return item

    def peek_non_space(self) -> _Item:
        item = self.next_non_space()
        self.backup()
        return item

    def error(self, message: str, pos: int | None = None) -> TemplateError:
        line, col = _line_col(self.text, self.last.pos if pos is None else pos)
        return TemplateError(message, line, col)

    def expect(self, typ: int, context: str) -> _Item:
        item = self.next_non_space()
        if item.typ != typ:
            raise self.unexpected(item, context)
        return item

    def unexpected(self, item: _Item, context: str) -> TemplateError:
        if item.typ == ERROR:
            return self.error(item.val, item.pos)
        return self.error(f"unexpected {item} in {context}", item.pos)

    # -- structure
    def parse(self) -> ListNode:
        root = ListNode(self.peek().pos)
        while self.peek().typ != EOF:
            if self.peek().typ == ERROR:
                raise self.unexpected(self.peek(), "input")
            if self.peek().typ == LEFT_DELIM:
                save = self.i
                self.next()
                if self.next_non_space().typ == DEFINE:
                    self.definition()
                    continue
                self.i = save
            node = self.text_or_action()
            if isinstance(node, (_EndNode, _ElseNode)):
                raise self.error(f"unexpected {_describe(node)}", node.pos)
            root.nodes.append(node)
        return root

    def add(self, name: str, root: ListNode) -> None:
        old = self.trees.get(name)
        if old is None or _is_empty_tree(old):
            self.trees[name] = root
        elif not _is_empty_tree(root):
            raise self.error(f"template: multiple definition of template {go_quote(name)}")

    def _sub_tree(self, context: str) -> ListNode:
        """The body of a define or block: a new tree with its own variables."""
        saved, saved_depth = self.vars, self.range_depth
        self.vars, self.range_depth = ["$"], 0
        try:
            body, end = self.item_list()
            if not isinstance(end, _EndNode):
                raise self.error(f"unexpected {_describe(end)} in {context}", end.pos)
            return body
        finally:
            self.vars, self.range_depth = saved, saved_depth

    def definition(self) -> None:
        context = "define clause"
        tok = self.next_non_space()
        if tok.typ not in (STRING, RAW_STRING):
            raise self.unexpected(tok, context)
        name = self.unquote(tok)
        self.expect(RIGHT_DELIM, context)
        self.add(name, self._sub_tree(context))

    def item_list(self) -> tuple[ListNode, Any]:
        lst = ListNode(self.peek_non_space().pos)
        while self.peek_non_space().typ != EOF:
            node = self.text_or_action()
            if isinstance(node, (_EndNode, _ElseNode)):
                return lst, node
            lst.nodes.append(node)
        raise self.error("unexpected EOF")

    def text_or_action(self) -> Any:
        tok = self.next_non_space()
        if tok.typ == TEXT:
            return TextNode(tok.pos, tok.val)
        if tok.typ == LEFT_DELIM:
            return self.action()
        raise self.unexpected(tok, "input")

    def action(self) -> Any:
        tok = self.next_non_space()
        typ = tok.typ
        if typ == BLOCK:
            return self.block_control()
        if typ in (BREAK, CONTINUE):
            word = "break" if typ == BREAK else "continue"
            after = self.next_non_space()
            if after.typ != RIGHT_DELIM:
                raise self.unexpected(after, f"{{{{{word}}}}}")
            if self.range_depth == 0:
                raise self.error(f"{{{{{word}}}}} outside {{{{range}}}}", tok.pos)
            return BreakNode(tok.pos) if typ == BREAK else ContinueNode(tok.pos)
        if typ == ELSE:
            peek = self.peek_non_space()
            if peek.typ in (IF, WITH):      # `else if`, and Go 1.23's `else with`
                return _ElseNode(peek.pos)
            return _ElseNode(self.expect(RIGHT_DELIM, "else").pos)
        if typ == END:
            return _EndNode(self.expect(RIGHT_DELIM, "end").pos)
        if typ == IF:
            return IfNode(*self.control(True, "if"))
        if typ == RANGE:
            return RangeNode(*self.control(False, "range"))
        if typ == WITH:
            return WithNode(*self.control(False, "with"))
        if typ == TEMPLATE:
            return self.template_control()
        self.backup()
        return ActionNode(self.peek().pos, self.pipeline("command", RIGHT_DELIM))

    def control(self, allow_else_if: bool, context: str) -> tuple:
        mark = len(self.vars)
        try:
            pipe = self.pipeline(context, RIGHT_DELIM)
            if context == "range":
                self.range_depth += 1
            body, nxt = self.item_list()
            if context == "range":
                self.range_depth -= 1
            else_list = None
            if isinstance(nxt, _ElseNode):
                if allow_else_if and self.peek().typ == IF:
                    self.next()
                    else_list = ListNode(nxt.pos, [IfNode(*self.control(True, "if"))])
                elif context == "with" and self.peek().typ == WITH:
                    self.next()
                    else_list = ListNode(nxt.pos, [WithNode(*self.control(False, "with"))])
                else:
                    else_list, nxt = self.item_list()
                    if not isinstance(nxt, _EndNode):
                        raise self.error(f"expected end; found {_describe(nxt)}", nxt.pos)
            return pipe.pos, pipe, body, else_list
        finally:
            del self.vars[mark:]

    def template_name(self, tok: _Item, context: str) -> str:
        if tok.typ not in (STRING, RAW_STRING):
            raise self.unexpected(tok, context)
        return self.unquote(tok)

    def block_control(self) -> TemplateNode:
        context = "block clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = self.pipeline(context, RIGHT_DELIM)
        self.add(name, self._sub_tree(context))
        return TemplateNode(tok.pos, name, pipe)

    def template_control(self) -> TemplateNode:
        context = "template clause"
        tok = self.next_non_space()
        name = self.template_name(tok, context)
        pipe = None
        if self.next_non_space().typ != RIGHT_DELIM:
            self.backup()
            pipe = self.pipeline(context, RIGHT_DELIM)
        return TemplateNode(tok.pos, name, pipe)

    def pipeline(self, context: str, end: int) -> PipeNode:
        pipe = PipeNode(self.peek_non_space().pos)
        while True:     # declarations: `$x :=`, `$x =`, range's `$i, $x :=`
            v = self.peek_non_space()
            if v.typ != VARIABLE:
                break
            save = self.i
            self.next()
            nxt = self.peek_non_space()
            if nxt.typ in (ASSIGN, DECLARE):
                pipe.is_assign = nxt.typ == ASSIGN
                self.next_non_space()
                pipe.decl.append(VariableNode(v.pos, [v.val]))
                self.vars.append(v.val)
            elif nxt.typ == CHAR and nxt.val == ",":
                self.next_non_space()
                pipe.decl.append(VariableNode(v.pos, [v.val]))
                self.vars.append(v.val)
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().typ in (VARIABLE, RIGHT_DELIM, RIGHT_PAREN):
                        continue
                    raise self.error("range can only initialize variables")
                raise self.error(f"too many declarations in {context}")
            else:
                self.i = save
            break
        while True:
            tok = self.next_non_space()
            if tok.typ == end:
                if not pipe.cmds:
                    raise self.error(f"missing value for {context}", tok.pos)
                for k, cmd in enumerate(pipe.cmds[1:]):
                    if isinstance(cmd.args[0], (BoolNode, DotNode, NilNode, NumberNode, StringNode)):
                        raise self.error(f"non executable command in pipeline stage {k + 2}", cmd.pos)
                return pipe
            if tok.typ in (BOOL, CHAR_CONSTANT, COMPLEX, DOT, FIELD, IDENTIFIER, NUMBER, NIL, RAW_STRING, STRING,
                           VARIABLE, LEFT_PAREN):
                self.backup()
                pipe.cmds.append(self.command())
            else:
                raise self.unexpected(tok, context)

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().pos)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            tok = self.next()
            if tok.typ == SPACE:
                continue
            if tok.typ in (RIGHT_DELIM, RIGHT_PAREN):
                self.backup()
            elif tok.typ != PIPE:
                raise self.unexpected(tok, "operand")
            break
        if not cmd.args:
            raise self.error("empty command")
        return cmd

    def operand(self) -> Any:
        node = self.term()
        if node is None or self.peek().typ != FIELD:
            return node
        pos, fields = self.peek().pos, []
        while self.peek().typ == FIELD:
            fields.append(self.next().val[1:])
        if isinstance(node, FieldNode):
            return FieldNode(pos, node.ident + fields)
        if isinstance(node, VariableNode):
            return VariableNode(pos, node.ident + fields)
        if isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
            raise self.error(f"unexpected . after term {go_quote(_describe(node))}")
        return ChainNode(pos, node, fields)

    def term(self) -> Any:
        tok = self.next_non_space()
        typ = tok.typ
        if typ == IDENTIFIER:
            if tok.val not in self.funcs:
                raise self.error(f"function {go_quote(tok.val)} not defined", tok.pos)
            return IdentifierNode(tok.pos, tok.val)
        if typ == DOT:
            return DotNode(tok.pos)
        if typ == NIL:
            return NilNode(tok.pos)
        if typ == VARIABLE:
            if tok.val not in self.vars:
                raise self.error(f"undefined variable {go_quote(tok.val)}", tok.pos)
            return VariableNode(tok.pos, [tok.val])
        if typ == FIELD:
            return FieldNode(tok.pos, [tok.val[1:]])
        if typ == BOOL:
            return BoolNode(tok.pos, tok.val == "true")
        if typ in (CHAR_CONSTANT, COMPLEX, NUMBER):
            try:
                return _parse_number(tok)
            except ValueError as exc:
                raise self.error(str(exc), tok.pos) from None
        if typ == LEFT_PAREN:
            return self.pipeline("parenthesized pipeline", RIGHT_PAREN)
        if typ in (STRING, RAW_STRING):
            return StringNode(tok.pos, tok.val, self.unquote(tok))
        self.backup()
        return None

    def unquote(self, tok: _Item) -> str:
        try:
            return _unquote(tok.val)
        except (ValueError, IndexError):
            raise self.error("invalid syntax", tok.pos) from None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


# ---- functions ------------------------------------------------------------------------------------
class _CallError(Exception):
    """A function's error; the executor reports it as `error calling NAME: ...`."""


@dataclass(frozen=True)
class _Func:
    fn: Callable[..., Any]
    params: tuple[str, ...] = ()        # per fixed parameter: "value" (reflect.Value), "any", "string"
    variadic: str | None = None


def _indirect(v: Any) -> Any:
    """Go's indirectInterface: a nil interface becomes an invalid value."""
    return MISSING if v is None else v


def _is_true(v: Any) -> tuple[bool, bool]:
    if v is MISSING or v is None:
        return False, True
    if isinstance(v, bool):
        return v, True
    if isinstance(v, (int, float)):
        return v != 0, True
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0, True
    if isinstance(v, GoStruct):
        return True, True
    return False, False


def _truth(v: Any) -> bool:
    return _is_true(_indirect(v))[0]


def _kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    return None


def _go_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def _length(item: Any) -> int:
    if item is None:
        raise _CallError("len of nil pointer")
    if item is MISSING:
        raise _CallError("len of type <invalid Value>")
    if isinstance(item, str):
        return _go_len(item)
    if isinstance(item, (list, tuple, dict)):
        return len(item)
    raise _CallError(f"len of type {go_type(item)}")


def _index_arg(index: Any, cap: int) -> int:
    if index is MISSING:
        raise _CallError("cannot index slice/array with nil")
    if not isinstance(index, int) or isinstance(index, bool):
        raise _CallError(f"cannot index slice/array with type {go_type(index)}")
    if index < 0 or index > cap:
        raise _CallError(f"index out of range: {index}")
    return index


def _index(item: Any, *indexes: Any) -> Any:
    item = _indirect(item)
    if item is MISSING:
        raise _CallError("index of untyped nil")
    for index in indexes:
        index = _indirect(index)
        if item is None:
            raise _CallError("index of nil pointer")
        if isinstance(item, (list, tuple)):
            x = _index_arg(index, len(item))
            if x >= len(item):
                raise _CallError(f"reflect: slice index out of range: {x}")
            item = item[x]
        elif isinstance(item, str):
            raw = item.encode("utf-8", "surrogatepass")
            x = _index_arg(index, len(raw))
            if x >= len(raw):
                raise _CallError("reflect: string index out of range")
            item = raw[x]
        elif isinstance(item, dict):
            if index is MISSING:
                raise _CallError("value is nil; should be of type string")
            if not isinstance(index, str):
                raise _CallError(f"value has type {go_type(index)}; should be string")
            if index in item:
                item = item[index]
            else:
                item = item.go_zero() if isinstance(item, GoMap) else None
        else:
            raise _CallError(f"can't index item of type {go_type(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    item = _indirect(item)
    if item is MISSING:
        raise _CallError("slice of untyped nil")
    if len(indexes) > 3:
        raise _CallError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise _CallError("cannot 3-index slice a string")
        raw = item.encode("utf-8", "surrogatepass")
        cap = len(raw)
    elif isinstance(item, (list, tuple)):
        cap = len(item)
    else:
        raise _CallError(f"can't slice item of type {go_type(item)}")
    idx = [0, cap, cap]
    for i, index in enumerate(indexes):
        idx[i] = _index_arg(_indirect(index), cap)
    if idx[0] > idx[1]:
        raise _CallError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise _CallError(f"invalid slice index: {idx[1]} > {idx[2]}")
    if isinstance(item, str):
        return raw[idx[0]:idx[1]].decode("utf-8", "replace")
    out = item[idx[0]:idx[1]]
    if isinstance(item, GoList):
        typed = type(item)(out)
        typed.nil = item.nil
        return typed
    return list(out)


def _eq(arg1: Any, *args: Any) -> bool:
    a1 = _indirect(arg1)
    if not args:
        raise _CallError("missing argument for comparison")
    k1 = _kind(a1)
    for arg in args:
        a = _indirect(arg)
        k2 = _kind(a)
        if k1 != k2:
            if a1 is not MISSING and a is not MISSING:
                raise _CallError("incompatible types for comparison")
            truth = False
        elif k1 is not None:
            truth = a1 == a
        else:
            nil1 = a1 is MISSING or getattr(a1, "nil", False)
            nil2 = a is MISSING or getattr(a, "nil", False)
            if a1 is not MISSING and a is not MISSING and type(a1) is not type(a) and not (
                    isinstance(a1, list) and isinstance(a, list) or isinstance(a1, dict) and isinstance(a, dict)):
                raise _CallError(f"non-comparable types {fmt_v(a1)}: {go_type(a1)}, {go_type(a)}: {fmt_v(a)}")
            if nil1 or nil2:
                truth = nil1 == nil2
            elif isinstance(a1, GoStruct) and a1._go_pointer:
                truth = a1 is a
            else:
                raise _CallError(f"non-comparable type {fmt_v(a)}: {go_type(a)}")
        if truth:
            return True
    return False


def _lt(arg1: Any, arg2: Any) -> bool:
    a1, a2 = _indirect(arg1), _indirect(arg2)
    k1, k2 = _kind(a1), _kind(a2)
    if k1 is None or k2 is None:
        raise _CallError("invalid type for comparison")
    if k1 != k2:
        raise _CallError("incompatible types for comparison")
    if k1 == "bool":
        raise _CallError("invalid type for comparison")
    return a1 < a2


def _html(*args: Any) -> str:
    return re.sub("['\"&<>\x00]", lambda m: {"'": "&#39;", '"': "&#34;", "&": "&amp;", "<": "&lt;", ">": "&gt;",
                                             "\x00": "\ufffd"}[m.group()], _eval_args(args))


def _js(*args: Any) -> str:
    def repl(m: re.Match) -> str:
        c = m.group()
        special = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026",
                   "=": "\\u003D"}
        if c in special:
            return special[c]
        if ord(c) < 0x20:
            return f"\\u00{ord(c):02X}"
        return c if c.isprintable() else f"\\u{ord(c):04X}"

    return re.sub("[\\\\'\"<>&=\x00-\x1f\x80-\U0010ffff]", repl, _eval_args(args))


def _urlquery(*args: Any) -> str:
    # surrogatepass: a lone surrogate (Python-only) is escaped as its bytes, never a UnicodeEncodeError
    return urllib.parse.quote_plus(_eval_args(args), safe="", errors="surrogatepass")


def _eval_args(args: tuple) -> str:
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return go_sprint(["<no value>" if a is None or a is MISSING else a for a in args])


def _call(fn: Any, *args: Any) -> Any:
    fn = _indirect(fn)
    if fn is MISSING:
        raise _CallError("call of nil")
    raise _CallError(f"non-function of type {go_type(fn)}")


def _ts_type(prop: Any) -> str:
    """Ollama's ToolProperty.ToTypeScriptType."""
    any_of = getattr(prop, "AnyOf", None)
    if any_of:
        return " | ".join(_ts_type(p) for p in any_of)
    types = getattr(prop, "Type", None) or []
    names = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
             "array": "any[]", "object": "Record<string, any>", "null": "null"}
    return " | ".join(names.get(t, "any") for t in types) if types else "any"


def _json_func(value: Any) -> str:
    try:
        return go_json(value)
    except (ValueError, RecursionError):
        return ""          # Ollama ignores json.Marshal's error: the text is empty


def _typescript(value: Any) -> str:
    return _ts_type(value) if hasattr(value, "AnyOf") and hasattr(value, "Type") else "any"


BUILTINS: dict[str, _Func] = {
    "and": _Func(lambda *a: a[-1], ("value",), "value"),        # short-circuited by the executor
    "or": _Func(lambda *a: a[-1], ("value",), "value"),
    "not": _Func(lambda v: not _truth(v), ("value",)),
    "len": _Func(_length, ("value",)),
    "index": _Func(_index, ("value",), "value"),
    "slice": _Func(_slice, ("value",), "value"),
    "call": _Func(_call, ("value",), "value"),
    "eq": _Func(_eq, ("value",), "value"),
    "ne": _Func(lambda a, b: not _eq(a, b), ("value", "value")),
    "lt": _Func(_lt, ("value", "value")),
    "le": _Func(lambda a, b: _lt(a, b) or _eq(a, b), ("value", "value")),
    "gt": _Func(lambda a, b: not (_lt(a, b) or _eq(a, b)), ("value", "value")),
    "ge": _Func(lambda a, b: not _lt(a, b), ("value", "value")),
    "print": _Func(lambda *a: go_sprint(list(a)), (), "any"),
    "printf": _Func(lambda f, *a: go_sprintf(f, list(a)), ("string",), "any"),
    "println": _Func(lambda *a: " ".join(fmt_v(x) for x in a) + "\n", (), "any"),
    "html": _Func(_html, (), "any"),
    "js": _Func(_js, (), "any"),
    "urlquery": _Func(_urlquery, (), "any"),
}
OLLAMA_FUNCS: dict[str, _Func] = {
    "json": _Func(_json_func, ("any",)),
    "currentDate": _Func(lambda *a: date.today().isoformat(), (), "string"),
    "yesterdayDate": _Func(lambda *a: (date.today() - timedelta(days=1)).isoformat(), (), "string"),
    "toTypeScriptType": _Func(_typescript, ("any",)),
}
_ALL_FUNCS = frozenset(BUILTINS) | frozenset(OLLAMA_FUNCS)


# ---- executor -------------------------------------------------------------------------------------
class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _State:
    def __init__(self, template: Template, funcs: dict[str, _Func], trees: dict[str, ListNode]) -> None:
        self.text = template.text
        self.funcs = funcs
        self.trees = trees
        self.vars: list[list] = []
        self.out: list[str] = []
        self.size = 0
        self.steps = 0
        self.depth = 0
        self.node: Any = None
        self.missing_zero = True        # Option("missingkey=zero"), as Ollama parses templates

    def error(self, message: str) -> TemplateError:
        if self.node is None:
            return TemplateError(message)
        line, col = _line_col(self.text, self.node.pos)
        return TemplateError(f"executing at <{_describe(self.node)}>: {message}", line, col)

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > MAX_OUTPUT:
            raise self.error(f"output longer than {MAX_OUTPUT} characters")
        self.out.append(text)

    # -- variables
    def var_value(self, name: str) -> Any:
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry[1]
        raise self.error(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for entry in reversed(self.vars):
            if entry[0] == name:
                entry[1] = value
                return
        raise self.error(f"undefined variable: {name}")

    # -- walking
    def walk(self, dot: Any, node: Any) -> None:
        self.node = node
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise self.error(f"template ran for more than {MAX_STEPS} steps")
        if isinstance(node, TextNode):
            self.write(node.text)
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.node = node
                self.write("<no value>" if value is MISSING else fmt_v(value, depth=-1))
        elif isinstance(node, (IfNode, WithNode)):
            mark = len(self.vars)
            try:
                value = self.eval_pipeline(dot, node.pipe)
                truth, ok = _is_true(_indirect(value))
                if not ok:
                    raise self.error(f"if/with can't use {fmt_v(value)}")
                if truth:
                    self.walk(value if isinstance(node, WithNode) else dot, node.list)
                elif node.else_list is not None:
                    self.walk(dot, node.else_list)
            finally:
                del self.vars[mark:]
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, TemplateNode):
            self.walk_template(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break
        elif isinstance(node, ContinueNode):
            raise _Continue
        else:
            raise self.error(f"unknown node: {_describe(node)}")

    def walk_range(self, dot: Any, node: RangeNode) -> None:
        outer = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            mark = len(self.vars)
            ndecl = len(node.pipe.decl)

            def one(index: Any, elem: Any) -> None:
                if ndecl > 0:
                    self.vars[-1][1] = elem
                if ndecl > 1:
                    self.vars[-2][1] = index
                try:
                    self.walk(elem, node.list)
                except _Continue:
                    pass
                finally:
                    del self.vars[mark:]

            if isinstance(value, (list, tuple)):
                if value:
                    for i, elem in enumerate(value):
                        one(i, elem)
                    return
            elif isinstance(value, dict):
                if value:
                    for key in sorted(value):
                        one(key, value[key])
                    return
            elif isinstance(value, int) and not isinstance(value, bool):     # Go 1.22: range over an int
                if ndecl > 1:
                    raise self.error(f"can't use {value} to iterate over more than one variable")
                if value > 0:
                    for i in range(value):
                        one(i, i)
                    return
            elif value is not MISSING:
                self.node = node
                raise self.error(f"range can't iterate over {fmt_v(value)}")
            if node.else_list is not None:
                self.walk(dot, node.else_list)
        except _Break:
            pass
        finally:
            del self.vars[outer:]

    def walk_template(self, dot: Any, node: TemplateNode) -> None:
        tree = self.trees.get(node.name)
        if tree is None:
            raise self.error(f"template {go_quote(node.name)} not defined")
        if self.depth >= MAX_DEPTH:
            raise self.error(f"exceeded maximum template depth ({MAX_DEPTH})")
        dot = self.eval_pipeline(dot, node.pipe)
        saved = self.vars
        self.vars = [["$", dot]]
        self.depth += 1
        try:
            self.walk(dot, tree)
        finally:
            self.vars = saved
            self.depth -= 1

    # -- evaluation
    def eval_pipeline(self, dot: Any, pipe: PipeNode | None) -> Any:
        if pipe is None:
            return MISSING
        self.node = pipe
        value = _NOFINAL
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
            if value is None:           # an interface holding nil: no value at all
                value = MISSING
        for var in pipe.decl:
            if pipe.is_assign:
                self.set_var(var.ident[0], value)
            else:
                self.vars.append([var.ident[0], value])
        return value

    def not_a_function(self, args: list, final: Any) -> None:
        if len(args) > 1 or final is not _NOFINAL:
            raise self.error(f"can't give argument to non-function {_describe(args[0])}")

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        first = cmd.args[0]
        if isinstance(first, FieldNode):
            self.node = first
            return self.eval_field_chain(dot, dot, first, first.ident, cmd.args, final)
        if isinstance(first, ChainNode):
            return self.eval_chain(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, cmd.args, final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable(dot, first, cmd.args, final)
        self.node = first
        self.not_a_function(cmd.args, final)
        if isinstance(first, BoolNode):
            return first.value
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            raise self.error("nil is not a command")
        if isinstance(first, NumberNode):
            return self.ideal_constant(first)
        if isinstance(first, StringNode):
            return first.text
        raise self.error(f"can't evaluate command {go_quote(_describe(first))}")

    def ideal_constant(self, node: NumberNode) -> Any:
        self.node = node
        hex_int = len(node.text) > 2 and node.text[0] == "0" and node.text[1] in "xX" and not re.search(
            "[pP]", node.text)
        if node.is_float and not hex_int and not node.is_rune and re.search("[.eEpP]", node.text):
            return node.float_value
        if node.is_int:
            return node.int_value
        if node.is_uint:
            raise self.error(f"{node.text} overflows int")
        return MISSING

    def eval_chain(self, dot: Any, chain: ChainNode, args: list | None, final: Any) -> Any:
        self.node = chain
        if isinstance(chain.node, NilNode):
            raise self.error(f"indirection through explicit nil in {_describe(chain)}")
        receiver = self.eval_arg(dot, None, chain.node)
        return self.eval_field_chain(dot, receiver, chain, chain.field, args, final)

    def eval_variable(self, dot: Any, var: VariableNode, args: list | None, final: Any) -> Any:
        self.node = var
        value = self.var_value(var.ident[0])
        if len(var.ident) == 1:
            self.not_a_function(args or [var], final)
            return value
        return self.eval_field_chain(dot, value, var, var.ident[1:], args, final)

    def eval_field_chain(self, dot: Any, receiver: Any, node: Any, ident: list, args: list | None,
                         final: Any) -> Any:
        for name in ident[:-1]:
            receiver = self.eval_field(dot, name, node, None, _NOFINAL, receiver)
        return self.eval_field(dot, ident[-1], node, args, final, receiver)

    def eval_field(self, dot: Any, name: str, node: Any, args: list | None, final: Any, receiver: Any) -> Any:
        if receiver is MISSING:
            return MISSING
        if receiver is None:
            raise self.error(f"nil pointer evaluating interface {{}}.{name}")
        if name == "String" and hasattr(receiver, "go_string"):
            return self.eval_call(dot, _Func(receiver.go_string), node, name, args, final)
        has_args = (args is not None and len(args) > 1) or final is not _NOFINAL
        if isinstance(receiver, GoStruct):
            if name in receiver.__dict__ and not name.startswith("_"):
                if has_args:
                    raise self.error(f"{name} has arguments but cannot be invoked as function")
                return getattr(receiver, name)
        elif isinstance(receiver, dict):
            if has_args:
                raise self.error(f"{name} is not a method but has arguments")
            if name in receiver:
                return receiver[name]
            if not self.missing_zero:
                return MISSING
            return receiver.go_zero() if isinstance(receiver, GoMap) else None
        raise self.error(f"can't evaluate field {name} in type {go_type(receiver)}")

    def eval_function(self, dot: Any, node: IdentifierNode, args: list, final: Any) -> Any:
        self.node = node
        func = self.funcs.get(node.ident)
        if func is None:
            raise self.error(f"{go_quote(node.ident)} is not a defined function")
        return self.eval_call(dot, func, node, node.ident, args, final)

    def eval_call(self, dot: Any, func: _Func, node: Any, name: str, args: list | None, final: Any) -> Any:
        args = list(args[1:]) if args else []
        num_in = len(args) + (final is not _NOFINAL)
        fixed = len(func.params)
        if func.variadic is not None:
            if num_in < fixed:
                raise self.error(f"wrong number of args for {name}: want at least {fixed} got {len(args)}")
        elif num_in != fixed:
            raise self.error(f"wrong number of args for {name}: want {fixed} got {num_in}")
        if name in ("and", "or") and func is BUILTINS[name]:
            value = MISSING
            for arg in args:
                value = self.eval_arg(dot, "value", arg)
                if _truth(value) == (name == "or"):
                    return value
            return final if final is not _NOFINAL else value
        argv = [self.eval_arg(dot, func.params[i] if i < fixed else func.variadic, arg)
                for i, arg in enumerate(args)]
        if final is not _NOFINAL:
            argv.append(self.validate(final, func.params[num_in - 1] if num_in - 1 < fixed else func.variadic))
        try:
            return func.fn(*argv)
        except _CallError as exc:
            self.node = node
            raise self.error(f"error calling {name}: {exc}") from None

    def validate(self, value: Any, kind: str | None) -> Any:
        if kind == "any":
            return None if value is MISSING else value
        if kind == "string":
            if value is MISSING:
                raise self.error("invalid value; expected string")
            if not isinstance(value, str):
                raise self.error(f"wrong type for value; expected string; got {go_type(value)}")
        return value

    def eval_arg(self, dot: Any, kind: str | None, node: Any) -> Any:
        self.node = node
        if isinstance(node, DotNode):
            return self.validate(dot, kind)
        if isinstance(node, NilNode):
            if kind == "string":
                raise self.error("cannot assign nil to string")
            return None if kind == "any" else MISSING
        if isinstance(node, FieldNode):
            return self.validate(self.eval_field_chain(dot, dot, node, node.ident, [node], _NOFINAL), kind)
        if isinstance(node, VariableNode):
            return self.validate(self.eval_variable(dot, node, None, _NOFINAL), kind)
        if isinstance(node, PipeNode):
            return self.validate(self.eval_pipeline(dot, node), kind)
        if isinstance(node, IdentifierNode):
            return self.validate(self.eval_function(dot, node, [node], _NOFINAL), kind)
        if isinstance(node, ChainNode):
            return self.validate(self.eval_chain(dot, node, None, _NOFINAL), kind)
        if kind == "string":
            if isinstance(node, StringNode):
                return node.text
            raise self.error(f"expected string; found {_describe(node)}")
        if isinstance(node, BoolNode):
            return node.value
        if isinstance(node, NumberNode):
            return self.ideal_constant(node)
        if isinstance(node, StringNode):
            return node.text
        raise self.error(f"can't handle {_describe(node)} for arg")


# ---- the public face -------------------------------------------------------------------------------
class Template:
    """A parsed Go template: the main tree (name "") and the templates it defines."""

    def __init__(self, text: str, trees: dict[str, ListNode]) -> None:
        self.text = text
        self.trees = trees

    @property
    def root(self) -> ListNode:
        return self.trees[""]

    def execute(self, data: Any, funcs: bool = True) -> str:
        """Run the template over `data` (see the module doc). `funcs=False` runs the main tree
        alone as a template built from a bare parse tree does: Go's builtins only, no
        defined templates, and Go's default for a missing key (no value, not a nil one)."""
        table = {**BUILTINS, **OLLAMA_FUNCS} if funcs else dict(BUILTINS)
        trees = self.trees if funcs else {"": self.root}
        state = _State(self, table, trees)
        state.missing_zero = funcs
        state.vars = [["$", data]]
        try:
            state.walk(data, self.root)
        except (_Break, _Continue):
            pass
        except RecursionError:
            raise state.error("template nests too deeply") from None
        return "".join(state.out)

    def identifiers(self) -> set[str]:
        """Ollama's Vars(): the lower-cased names of every field and variable the template
        uses (`.Messages` -> "messages", `$.Tools` -> "$", "tools"). A `{{ template }}` call
        without a pipeline is an error there, so it is here."""
        names: set[str] = set()

        def visit(node: Any) -> None:
            if isinstance(node, ListNode):
                for child in node.nodes:
                    visit(child)
            elif isinstance(node, TemplateNode):
                if node.pipe is None:
                    line, col = _line_col(self.text, node.pos)
                    raise TemplateError("undefined template specified", line, col)
                visit(node.pipe)
            elif isinstance(node, ActionNode):
                visit(node.pipe)
            elif isinstance(node, BranchNode):
                visit(node.pipe)
                visit(node.list)
                if node.else_list is not None:
                    visit(node.else_list)
            elif isinstance(node, PipeNode):
                for cmd in node.cmds:
                    for arg in cmd.args:
                        visit(arg)
            elif isinstance(node, (FieldNode, VariableNode)):
                names.update(part.lower() for part in node.ident)

        for tree in self.trees.values():
            visit(tree)
        return names

    def with_response(self) -> Template:
        """This template with `{{ .Response }}` appended to its main tree."""
        action = ActionNode(len(self.text), PipeNode(len(self.text), cmds=[
            CommandNode(len(self.text), [FieldNode(len(self.text), ["Response"])])]))
        return Template(self.text, {**self.trees, "": ListNode(self.root.pos, [*self.root.nodes, action])})

    def cut_after_response(self) -> Template:
        """Ollama's legacy cut: walking the main tree in order, the first `.Response` field
        stays and every node after it goes (the pipelines of if/range/with are not looked
        into); actions and pipelines left empty go too."""
        cut = False

        def gone(node: Any) -> bool:
            nonlocal cut
            if isinstance(node, FieldNode) and "Response" in node.ident:
                cut = True
                return False
            return cut

        def walk(node: Any) -> Any:
            if gone(node):
                return None
            if isinstance(node, ListNode):
                return ListNode(node.pos, [n for n in (walk(c) for c in node.nodes) if n is not None])
            if isinstance(node, BranchNode):
                body = walk(node.list) or ListNode(node.list.pos)
                rest = walk(node.else_list) if node.else_list is not None else None
                return type(node)(node.pos, node.pipe, body, rest)
            if isinstance(node, ActionNode):
                pipe = walk(node.pipe)
                return None if pipe is None else ActionNode(node.pos, pipe)
            if isinstance(node, PipeNode):
                cmds = []
                for cmd in node.cmds:
                    args = [a for a in (walk(x) for x in cmd.args) if a is not None]
                    if not args:
                        return None
                    cmds.append(CommandNode(cmd.pos, args))
                return PipeNode(node.pos, node.decl, node.is_assign, cmds) if cmds else None
            return node

        return Template(self.text, {**self.trees, "": walk(self.root) or ListNode(self.root.pos)})


def parse(text: str) -> Template:
    """Parse a whole template (see the module doc); a mistake is a `TemplateError`."""
    if not isinstance(text, str):
        raise TemplateError("a template must be text")
    trees: dict[str, ListNode] = {}
    parser = _Parser(text, _ALL_FUNCS, trees)
    try:
        root = parser.parse()
    except RecursionError:
        raise TemplateError("template nests too deeply") from None
    parser.add("", root)
    trees.setdefault("", root)
    return Template(text, trees)
