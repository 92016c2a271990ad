"""Go's values as templates see them (structs, slices, maps, missing keys, truthiness) and
Go's `fmt` and `encoding/json` printing of them (%v, %q, Sprintf, floats as Go writes them)."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any


# ---- Go values ------------------------------------------------------------------------------
class _Missing:
    """Go's invalid reflect.Value: a missing map key after a pipeline; prints `<no value>`."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
NOFINAL: Any = object()        # "no piped value" (Go's missingVal)


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
