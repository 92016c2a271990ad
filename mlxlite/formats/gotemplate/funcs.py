"""Go's template builtins (and, or, eq, index, slice, printf, ...) and the functions Ollama adds
(json, currentDate, yesterdayDate, toTypeScriptType)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from mlxlite.formats.gotemplate.values import (
    MISSING,
    GoList,
    GoMap,
    GoStruct,
    fmt_v,
    go_json,
    go_sprint,
    go_sprintf,
    go_type,
)


# ---- functions ------------------------------------------------------------------------------------
class CallError(Exception):
    """A function's error; the executor reports it as `error calling NAME: ...`."""


@dataclass(frozen=True)
class Func:
    fn: Callable[..., Any]
    params: tuple[str, ...] = ()        # per fixed parameter: "value" (reflect.Value), "any", "string"
    variadic: str | None = None


def indirect(v: Any) -> Any:
    """Go's indirectInterface: a nil interface becomes an invalid value."""
    return MISSING if v is None else v


def is_true(v: Any) -> tuple[bool, bool]:
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


def truth(v: Any) -> bool:
    return is_true(indirect(v))[0]


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
        raise CallError("len of nil pointer")
    if item is MISSING:
        raise CallError("len of type <invalid Value>")
    if isinstance(item, str):
        return _go_len(item)
    if isinstance(item, (list, tuple, dict)):
        return len(item)
    raise CallError(f"len of type {go_type(item)}")


def _index_arg(index: Any, cap: int) -> int:
    if index is MISSING:
        raise CallError("cannot index slice/array with nil")
    if not isinstance(index, int) or isinstance(index, bool):
        raise CallError(f"cannot index slice/array with type {go_type(index)}")
    if index < 0 or index > cap:
        raise CallError(f"index out of range: {index}")
    return index


def _index(item: Any, *indexes: Any) -> Any:
    item = indirect(item)
    if item is MISSING:
        raise CallError("index of untyped nil")
    for index in indexes:
        index = indirect(index)
        if item is None:
            raise CallError("index of nil pointer")
        if isinstance(item, (list, tuple)):
            x = _index_arg(index, len(item))
            if x >= len(item):
                raise CallError(f"reflect: slice index out of range: {x}")
            item = item[x]
        elif isinstance(item, str):
            raw = item.encode("utf-8", "surrogatepass")
            x = _index_arg(index, len(raw))
            if x >= len(raw):
                raise CallError("reflect: string index out of range")
            item = raw[x]
        elif isinstance(item, dict):
            if index is MISSING:
                raise CallError("value is nil; should be of type string")
            if not isinstance(index, str):
                raise CallError(f"value has type {go_type(index)}; should be string")
            if index in item:
                item = item[index]
            else:
                item = item.go_zero() if isinstance(item, GoMap) else None
        else:
            raise CallError(f"can't index item of type {go_type(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    item = indirect(item)
    if item is MISSING:
        raise CallError("slice of untyped nil")
    if len(indexes) > 3:
        raise CallError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise CallError("cannot 3-index slice a string")
        raw = item.encode("utf-8", "surrogatepass")
        cap = len(raw)
    elif isinstance(item, (list, tuple)):
        cap = len(item)
    else:
        raise CallError(f"can't slice item of type {go_type(item)}")
    idx = [0, cap, cap]
    for i, index in enumerate(indexes):
        idx[i] = _index_arg(indirect(index), cap)
    if idx[0] > idx[1]:
        raise CallError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise CallError(f"invalid slice index: {idx[1]} > {idx[2]}")
    if isinstance(item, str):
        return raw[idx[0]:idx[1]].decode("utf-8", "replace")
    out = item[idx[0]:idx[1]]
    if isinstance(item, GoList):
        typed = type(item)(out)
        typed.nil = item.nil
        return typed
    return list(out)


def _eq(arg1: Any, *args: Any) -> bool:
    a1 = indirect(arg1)
    if not args:
        raise CallError("missing argument for comparison")
    k1 = _kind(a1)
    for arg in args:
        a = indirect(arg)
        k2 = _kind(a)
        if k1 != k2:
            if a1 is not MISSING and a is not MISSING:
                raise CallError("incompatible types for comparison")
            truth = False
        elif k1 is not None:
            truth = a1 == a
        else:
            nil1 = a1 is MISSING or getattr(a1, "nil", False)
            nil2 = a is MISSING or getattr(a, "nil", False)
            if a1 is not MISSING and a is not MISSING and type(a1) is not type(a) and not (
                    isinstance(a1, list) and isinstance(a, list) or isinstance(a1, dict) and isinstance(a, dict)):
                raise CallError(f"non-comparable types {fmt_v(a1)}: {go_type(a1)}, {go_type(a)}: {fmt_v(a)}")
            if nil1 or nil2:
                truth = nil1 == nil2
            elif isinstance(a1, GoStruct) and a1._go_pointer:
                truth = a1 is a
            else:
                raise CallError(f"non-comparable type {fmt_v(a)}: {go_type(a)}")
        if truth:
            return True
    return False


def _lt(arg1: Any, arg2: Any) -> bool:
    a1, a2 = indirect(arg1), indirect(arg2)
    k1, k2 = _kind(a1), _kind(a2)
    if k1 is None or k2 is None:
        raise CallError("invalid type for comparison")
    if k1 != k2:
        raise CallError("incompatible types for comparison")
    if k1 == "bool":
        raise CallError("invalid type for comparison")
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
    fn = indirect(fn)
    if fn is MISSING:
        raise CallError("call of nil")
    raise CallError(f"non-function of type {go_type(fn)}")


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


BUILTINS: dict[str, Func] = {
    "and": Func(lambda *a: a[-1], ("value",), "value"),        # short-circuited by the executor
    "or": Func(lambda *a: a[-1], ("value",), "value"),
    "not": Func(lambda v: not truth(v), ("value",)),
    "len": Func(_length, ("value",)),
    "index": Func(_index, ("value",), "value"),
    "slice": Func(_slice, ("value",), "value"),
    "call": Func(_call, ("value",), "value"),
    "eq": Func(_eq, ("value",), "value"),
    "ne": Func(lambda a, b: not _eq(a, b), ("value", "value")),
    "lt": Func(_lt, ("value", "value")),
    "le": Func(lambda a, b: _lt(a, b) or _eq(a, b), ("value", "value")),
    "gt": Func(lambda a, b: not (_lt(a, b) or _eq(a, b)), ("value", "value")),
    "ge": Func(lambda a, b: not _lt(a, b), ("value", "value")),
    "print": Func(lambda *a: go_sprint(list(a)), (), "any"),
    "printf": Func(lambda f, *a: go_sprintf(f, list(a)), ("string",), "any"),
    "println": Func(lambda *a: " ".join(fmt_v(x) for x in a) + "\n", (), "any"),
    "html": Func(_html, (), "any"),
    "js": Func(_js, (), "any"),
    "urlquery": Func(_urlquery, (), "any"),
}
OLLAMA_FUNCS: dict[str, Func] = {
    "json": Func(_json_func, ("any",)),
    "currentDate": Func(lambda *a: date.today().isoformat(), (), "string"),
    "yesterdayDate": Func(lambda *a: (date.today() - timedelta(days=1)).isoformat(), (), "string"),
    "toTypeScriptType": Func(_typescript, ("any",)),
}
ALL_FUNCS = frozenset(BUILTINS) | frozenset(OLLAMA_FUNCS)
