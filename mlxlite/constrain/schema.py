"""JSON Schema subset -> grammar nodes for constrained decoding, and a matching validator.

Pure Python (no mlx, no numpy). `compile_spec(spec)` turns Ollama's `format` value (the
string "json", meaning any JSON object, or a JSON-Schema dict) into a graph of `Node`s
that `tokens.py` walks byte by byte. `validate(instance, schema)` checks a decoded
value against the same subset (a final check, and the test oracle's twin).

Supported keywords: type (string or list), properties, required, additionalProperties,
enum, const, items (schema, bool, or a draft-4 list), prefixItems, minItems, maxItems,
anyOf, oneOf, allOf with one member, $ref to local pointers (#/$defs/..., #/definitions/...,
recursion allowed), minLength, maxLength, pattern (the subset of `regex.py`),
format (date, time, date-time, uuid: as patterns), minimum, maximum, exclusiveMinimum,
exclusiveMaximum (number or draft-4 bool). Annotations (title, description, default,
examples, $schema, $id, $comment, deprecated, readOnly, writeOnly) are ignored because
they constrain nothing. Every other keyword (other formats, multipleOf, uniqueItems,
not, if/then/else, patternProperties, ...) is refused with `errors.Unsupported` naming
it: a constraint we cannot enforce is never silently dropped.

Deliberate choices, each one a narrowing of what the schema accepts, never a widening:
- an object schema that lists `properties` and has no `additionalProperties` gets
  additionalProperties: false (models otherwise invent keys); say `true` to allow them;
- oneOf is decoded as anyOf (overlapping alternatives are the schema author's problem);
- enum/const values must be written in their compact form (json.dumps with
  separators (",", ":"), ensure_ascii=False), e.g. 1.0 is not accepted for enum [1];
- numbers with bounds are written without an exponent;
- format date/time/date-time use upper-case T and Z, a time needs an offset, no leap
  second (`regex.FORMATS`).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from functools import lru_cache
from typing import Any

from mlxlite.constrain.regex import FORMATS, Regex
from mlxlite.errors import BadRequest, Unsupported

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
     "readOnly", "writeOnly", "$defs", "definitions"}
)
OBJECT_KW = frozenset({"properties", "required", "additionalProperties"})
ARRAY_KW = frozenset({"items", "prefixItems", "minItems", "maxItems"})
STRING_KW = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KW = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
COMBINE_KW = frozenset({"anyOf", "oneOf", "allOf", "$ref", "enum", "const"})
SUPPORTED = OBJECT_KW | ARRAY_KW | STRING_KW | NUMBER_KW | COMBINE_KW | {"type"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
INF = 1 << 62  # "no upper bound" for counts; an int keeps comparisons cheap
# Compiling and validating recurse up to 6 frames per level, so depth is refused before
# any recursion (a 400, not a RecursionError at ~170 levels): at most this many levels of
# JSON nesting in the schema, and of subschemas with each $ref followed. Output nests 64
# containers at most (recognizer.MAX_DEPTH); an object chain takes two levels per object.
MAX_SCHEMA_DEPTH = 128
MAX_ALTERNATIVES = 1000  # values one byte may start, through anyOf/oneOf and $ref (see _check_alternatives)


class Node:
    """One grammar node. `kind` picks which attributes matter (see `recognizer.py`)."""

    __slots__ = ("kind", "props", "names", "required", "additional", "track", "prefix", "items",
                 "min", "max", "integer", "lo", "hi", "lo_x", "hi_x", "cands", "alts", "target", "regex")

    def __init__(self, kind: str | None, **kw: Any) -> None:
        self.kind = kind
        for k in self.__slots__[1:]:
            setattr(self, k, kw.get(k))

    def __repr__(self) -> str:
        return f"Node({self.kind})"


def literal(value: Any) -> bytes:
    """The one byte form an enum/const value must take in the output."""
    return _utf8(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # json.loads returns lone surrogates ("\ud800"); no UTF-8 output holds one
        raise BadRequest("a string in the schema is not valid Unicode (a lone surrogate)") from None


ANY = Node("any")
ANY_OBJECT = Node("object", props={}, names=(), required=frozenset(), additional=ANY, track=False)
ANY_ARRAY = Node("array", prefix=(), items=ANY, min=0, max=INF)
ANY_STRING = Node("string", min=0, max=INF)
ANY_NUMBER = Node("number", integer=False)
TRUE = Node("lit", cands=(b"true",))
FALSE = Node("lit", cands=(b"false",))
NULL = Node("lit", cands=(b"null",))
BOOLEAN = Node("lit", cands=(b"true", b"false"))


def compile_spec(spec: Any) -> Node:
    """Ollama's `format`: "json" (any JSON object) or a JSON-Schema dict -> root Node."""
    if spec == "json":
        return ANY_OBJECT
    if isinstance(spec, bool) or isinstance(spec, dict):
        _check_depth(spec)
        try:
            root = _Compiler(spec).compile(spec, "#")
            _check_alternatives(root)
            return root
        except RecursionError:  # checking enum/const values through recursive $refs
            raise BadRequest("JSON schema is nested too deeply (or a $ref refers to itself without end)") from None
    # Named by type: json.dumps of a deeply nested value recurses past the stack.
    raise BadRequest(f"format must be \"json\" or a JSON schema object, not a {type(spec).__name__}")


def _too_deep(where: str) -> BadRequest:
    return BadRequest(f"the JSON schema nests too deeply: at most {MAX_SCHEMA_DEPTH} levels are supported{where}")


def _check_depth(spec: Any) -> None:
    """Refuse a schema nested deeper than MAX_SCHEMA_DEPTH, walking it without recursion."""
    stack = [(spec, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise _too_deep("")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


class _Compiler:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, Node] = {}
        self.depth = 0                  # subschemas being compiled, $ref hops included

    def compile(self, s: Any, where: str) -> Node:
        self.depth += 1
        try:
            if self.depth > MAX_SCHEMA_DEPTH:  # only a chain of $refs gets here past _check_depth
                raise _too_deep(f" following $refs (at {where[:200]})")
            return self._compile(s, where)
        finally:
            self.depth -= 1

    def _compile(self, s: Any, where: str) -> Node:
        if s is True:
            return ANY
        if s is False:
            raise BadRequest(f"schema at {where} is false: it accepts nothing")
        if not isinstance(s, dict):
            raise BadRequest(f"schema at {where} must be an object or a boolean")
        unknown = sorted(k for k in s if k not in SUPPORTED and k not in ANNOTATIONS)
        if unknown:
            raise Unsupported(f"JSON schema keyword(s) not supported for format: {', '.join(unknown)} (at {where})")
        keys = {k for k in s if k not in ANNOTATIONS}
        if "$ref" in keys:
            if keys != {"$ref"}:
                raise Unsupported(f"$ref with sibling keywords {sorted(keys - {'$ref'})} (at {where})")
            return self.ref(s["$ref"], where)
        if "allOf" in keys:
            members = s["allOf"]
            if keys != {"allOf"} or not isinstance(members, list) or len(members) != 1:
                raise Unsupported(f"allOf is supported only with exactly one member and no siblings (at {where})")
            return self.compile(members[0], f"{where}/allOf/0")
        unions = keys & {"anyOf", "oneOf"}
        if unions:
            if keys != unions or len(unions) != 1:
                raise Unsupported(f"anyOf/oneOf combined with sibling keywords {sorted(keys)} (at {where})")
            word = unions.pop()
            members = s[word]
            if not isinstance(members, list) or not members:
                raise BadRequest(f"{word} at {where} must be a non-empty list")
            return self.union([self.compile(m, f"{where}/{word}/{i}") for i, m in enumerate(members)])
        if "enum" in keys or "const" in keys:
            return self.enum(s, where)
        types = s.get("type")
        if types is None:
            inferred = [t for t, kw in (("object", OBJECT_KW), ("array", ARRAY_KW), ("string", STRING_KW),
                                        ("number", NUMBER_KW)) if keys & kw]
            if not inferred:
                return ANY
            types = inferred
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
            raise BadRequest(f"type at {where} must be one of {', '.join(TYPES)} or a list of them")
        return self.union([self.typed(t, s, where) for t in dict.fromkeys(types)])

    def ref(self, ref: Any, where: str) -> Node:
        if not isinstance(ref, str):  # named by type: the repr of a deeply nested value recurses
            raise BadRequest(f"$ref at {where} must be a string, not a {type(ref).__name__}")
        if not ref.startswith("#"):
            raise Unsupported(f"$ref {ref!r} at {where}: only local references (#/$defs/...) are supported")
        node = self.refs.get(ref)
        if node is not None:
            return node
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise BadRequest(f"$ref {ref!r} at {where} points at nothing")
        # A placeholder first, so recursive schemas compile to a cyclic graph.
        node = self.refs[ref] = Node("ref")
        node.target = self.compile(target, ref)
        seen = {id(node)}
        t = node.target
        while t is None or t.kind == "ref":
            if t is None or id(t) in seen:  # None: a placeholder still being compiled
                raise BadRequest(f"$ref {ref!r} refers to itself without a schema in between")
            seen.add(id(t))
            t = t.target
        return node

    def union(self, alts: list[Node]) -> Node:
        flat: list[Node] = []
        for a in alts:
            for b in a.alts if a.kind == "union" else (a,):
                if b not in flat:
                    flat.append(b)
        return flat[0] if len(flat) == 1 else Node("union", alts=tuple(flat))

    def enum(self, s: dict, where: str) -> Node:
        if "enum" in s and not isinstance(s["enum"], list):
            raise BadRequest(f"enum at {where} must be a list")
        values = [s["const"]] if "const" in s else s["enum"]
        if "const" in s and "enum" in s:
            values = [v for v in s["enum"] if _same(v, s["const"])]
        try:
            json.dumps(values, allow_nan=False)
        except (TypeError, ValueError):
            raise BadRequest(f"enum/const at {where} holds a value JSON cannot write (NaN, Infinity)") from None
        rest = {k: v for k, v in s.items() if k not in ("enum", "const")}
        self.compile(rest, where)  # refuses unsupported siblings the same way
        cands = tuple(dict.fromkeys(literal(v) for v in values if validate_subset(v, rest, self.root)))
        if not cands:
            raise BadRequest(f"enum/const at {where} leaves no value the schema accepts")
        return Node("lit", cands=cands)

    def typed(self, t: str, s: dict, where: str) -> Node:
        if t == "object":
            return self.object(s, where)
        if t == "array":
            return self.array(s, where)
        if t == "string":
            lo, hi = _count(s, "minLength", 0, where), _count(s, "maxLength", INF, where)
            if lo > hi:
                raise BadRequest(f"minLength > maxLength at {where}")
            regex = _regex(s, where)
            if regex is not None and (regex.min_left(regex.start) > hi or regex.max_left(regex.start) < lo):
                raise BadRequest(f"no string matching pattern {regex.pattern!r} has a length in [{lo}, {hi}] at {where}")
            return ANY_STRING if (lo, hi, regex) == (0, INF, None) else Node("string", min=lo, max=hi, regex=regex)
        if t in ("number", "integer"):
            return self.number(t == "integer", s, where)
        return BOOLEAN if t == "boolean" else NULL

    def object(self, s: dict, where: str) -> Node:
        props = s.get("properties", {})
        required = s.get("required", [])
        if not isinstance(props, dict):
            raise BadRequest(f"properties at {where} must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise BadRequest(f"required at {where} must be a list of strings")
        add = s.get("additionalProperties", False if props else True)
        additional = None if add is False else self.compile(add, f"{where}/additionalProperties")
        nodes = {_key(k): self.compile(v, f"{where}/properties/{k}") for k, v in props.items()}
        for r in required:
            if _key(r) not in nodes:
                if additional is None:
                    raise BadRequest(f"required property {r!r} at {where} is not allowed by the schema")
                nodes[_key(r)] = additional
        if not nodes and additional is ANY:
            return ANY_OBJECT
        return Node("object", props=nodes, names=tuple(nodes), required=frozenset(_key(r) for r in required),
                    additional=additional, track=bool(nodes))

    def array(self, s: dict, where: str) -> Node:
        items = s.get("items", True)
        prefix = s.get("prefixItems", [])
        if isinstance(items, list):  # draft-4 tuple form
            prefix, items = items, True
        if not isinstance(prefix, list):
            raise BadRequest(f"prefixItems at {where} must be a list")
        pnodes = tuple(self.compile(p, f"{where}/prefixItems/{i}") for i, p in enumerate(prefix))
        inode = None if items is False else self.compile(items, f"{where}/items")
        lo, hi = _count(s, "minItems", 0, where), _count(s, "maxItems", INF, where)
        if inode is None:
            hi = min(hi, len(pnodes))
        if lo > hi:
            raise BadRequest(f"no array length satisfies minItems/maxItems/items at {where}")
        return Node("array", prefix=pnodes, items=inode, min=lo, max=hi)

    def number(self, integer: bool, s: dict, where: str) -> Node:
        lo, hi, lo_x, hi_x = _bounds(s, where)
        if lo is None and hi is None:
            return Node("number", integer=True) if integer else ANY_NUMBER
        if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_x or hi_x))):
            raise BadRequest(f"no number satisfies the bounds at {where}")
        if integer:  # integer bounds become inclusive integer bounds
            if lo is not None:
                lo, lo_x = Fraction(math.floor(lo) + 1 if (lo_x or lo != math.floor(lo)) else lo), False
            if hi is not None:
                hi, hi_x = Fraction(math.ceil(hi) - 1 if (hi_x or hi != math.ceil(hi)) else hi), False
            if lo is not None and hi is not None and lo > hi:
                raise BadRequest(f"no integer satisfies the bounds at {where}")
        return Node("number", integer=integer, lo=lo, hi=hi, lo_x=lo_x, hi_x=hi_x)


def _children(node: Node) -> list[Node]:
    kids = [*(node.props or {}).values(), *(node.prefix or ()), *(node.alts or ())]
    kids += [n for n in (node.additional, node.items, node.target) if isinstance(n, Node)]
    return kids


def _check_alternatives(root: Node) -> None:
    """Refs and unions consume no byte: the recognizer expands all of them at a value's
    first byte, recursively. A cycle of them never ends (`a: anyOf [$ref a, ...]`), a long
    chain recurses past the stack, and a DAG of them multiplies (2 refs per level, 40
    levels: 2**40 paths). Refused here, counting paths once per node, without recursion."""
    nodes, todo, seen = [], [root], {id(root)}
    while todo:
        node = todo.pop()
        nodes.append(node)
        for kid in _children(node):
            if id(kid) not in seen:
                seen.add(id(kid))
                todo.append(kid)
    done: dict[int, tuple[int, int]] = {}  # id -> (alternatives, depth of refs and unions)
    for start in nodes:
        stack, open_ = [(start, False)], set()
        while stack:
            node, finished = stack.pop()
            eps = [node.target] if node.kind == "ref" else list(node.alts) if node.kind == "union" else []
            if finished:
                open_.discard(id(node))
                alternatives = sum(done[id(k)][0] for k in eps) if eps else 1
                depth = 1 + max((done[id(k)][1] for k in eps), default=0)
                if alternatives > MAX_ALTERNATIVES or depth > MAX_SCHEMA_DEPTH:
                    raise BadRequest(f"JSON schema: anyOf/oneOf/$ref give more than {MAX_ALTERNATIVES} alternatives "
                                     f"or {MAX_SCHEMA_DEPTH} levels where one value starts")
                done[id(node)] = (alternatives, depth)
                continue
            if id(node) in done:
                continue
            open_.add(id(node))
            stack.append((node, True))
            for kid in eps:
                if id(kid) in open_:
                    raise BadRequest("JSON schema: a $ref reaches itself through anyOf/oneOf without "
                                     "a value in between (left recursion)")
                if id(kid) not in done:
                    stack.append((kid, False))


def _regex(s: dict, where: str) -> Regex | None:
    if "pattern" in s and "format" in s:
        raise Unsupported(f"pattern together with format (at {where})")
    if "format" in s:
        if not isinstance(s["format"], str):
            raise BadRequest(f"format at {where} must be a string")
        if s["format"] not in FORMATS:
            raise Unsupported(f"format {s['format']!r} (at {where}); supported: {', '.join(FORMATS)}")
        return _compiled_regex(FORMATS[s["format"]])
    if "pattern" not in s:
        return None
    if not isinstance(s["pattern"], str):
        raise BadRequest(f"pattern at {where} must be a string")
    return _compiled_regex(s["pattern"])


@lru_cache(maxsize=256)
def _compiled_regex(pattern: str) -> Regex:
    return Regex(pattern)


def _key(name: str) -> bytes:
    """A property name as it appears between the quotes in the output."""
    return _utf8(json.dumps(name, ensure_ascii=False))[1:-1]


def _count(s: dict, kw: str, default: int, where: str) -> int:
    v = s.get(kw, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadRequest(f"{kw} at {where} must be a non-negative integer")
    return v


def _num(v: Any, kw: str, where: str) -> Fraction:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"{kw} at {where} must be a finite number")
    return Fraction(str(v)) if isinstance(v, float) else Fraction(v)  # str: 0.1 means 1/10


def _bounds(s: dict, where: str) -> tuple[Fraction | None, Fraction | None, bool, bool]:
    lo = _num(s["minimum"], "minimum", where) if "minimum" in s else None
    hi = _num(s["maximum"], "maximum", where) if "maximum" in s else None
    lo_x = hi_x = False
    for kw, is_lo in (("exclusiveMinimum", True), ("exclusiveMaximum", False)):
        if kw not in s:
            continue
        v = s[kw]
        if isinstance(v, bool):  # draft 4: a flag on minimum/maximum
            if is_lo:
                lo_x = v and lo is not None
            else:
                hi_x = v and hi is not None
            continue
        x = _num(v, kw, where)
        if is_lo and (lo is None or x >= lo):
            lo, lo_x = x, True
        elif not is_lo and (hi is None or x <= hi):
            hi, hi_x = x, True
    return lo, hi, lo_x, hi_x


def validate(instance: Any, schema: Any) -> None:
    """Raise BadRequest unless `instance` (a decoded JSON value) satisfies `schema` under
    the subset above ("json" means any object). Unsupported keywords raise Unsupported."""
    if schema == "json":
        ok = isinstance(instance, dict)
    else:
        compile_spec(schema)  # the same refusals as decoding
        ok = validate_subset(instance, schema, schema)
    if not ok:
        raise BadRequest(f"output does not match the format: {json.dumps(instance)[:200]}")


def validate_subset(x: Any, s: Any, root: Any) -> bool:
    """True if x satisfies schema s (refs resolve against root); additionalProperties
    defaults to false when properties are listed, as in decoding."""
    if s is True or s == {}:
        return True
    if s is False or not isinstance(s, dict):
        return False
    if "$ref" in s:
        target = root
        for part in [p for p in s["$ref"][1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target[int(part)] if isinstance(target, list) else target[part]
        if not validate_subset(x, target, root):
            return False
    if "allOf" in s and not all(validate_subset(x, m, root) for m in s["allOf"]):
        return False
    for word in ("anyOf", "oneOf"):
        if word in s and not any(validate_subset(x, m, root) for m in s[word]):
            return False
    if "const" in s and not _same(x, s["const"]):
        return False
    if "enum" in s and not any(_same(x, v) for v in s["enum"]):
        return False
    if s.get("type") is not None:  # null: no type constraint, as `compile` reads it
        types = [s["type"]] if isinstance(s["type"], str) else s["type"]
        if not any(_is_type(x, t) for t in types):
            return False
    if isinstance(x, dict):
        props = s.get("properties", {})
        add = s.get("additionalProperties", False if props else True)
        if any(r not in x for r in s.get("required", [])):
            return False
        for k, v in x.items():
            if not validate_subset(v, props[k] if k in props else add, root):
                return False
    elif isinstance(x, list):
        items = s.get("items", True)
        prefix = s.get("prefixItems", [])
        if isinstance(items, list):
            prefix, items = items, True
        if not s.get("minItems", 0) <= len(x) <= s.get("maxItems", INF):
            return False
        if not all(validate_subset(v, prefix[i] if i < len(prefix) else items, root) for i, v in enumerate(x)):
            return False
    elif isinstance(x, str):
        if not s.get("minLength", 0) <= len(x) <= s.get("maxLength", INF):
            return False
        regex = _regex(s, "#")
        if regex is not None:
            states = regex.start
            for ch in x:
                states = regex.step(states, ord(ch))
                if not states:
                    return False
            if not regex.accepts(states):
                return False
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        if not math.isfinite(x):
            return False
        lo, hi, lo_x, hi_x = _bounds(s, "#")
        v = Fraction(x)
        if lo is not None and (v < lo or (lo_x and v == lo)):
            return False
        if hi is not None and (v > hi or (hi_x and v == hi)):
            return False
    return True


def _is_type(x: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(x, int) and not isinstance(x, bool) or isinstance(x, float) and x.is_integer()
    return {
        "object": lambda: isinstance(x, dict), "array": lambda: isinstance(x, list),
        "string": lambda: isinstance(x, str), "boolean": lambda: isinstance(x, bool),
        "null": lambda: x is None,
        "number": lambda: isinstance(x, (int, float)) and not isinstance(x, bool),
    }.get(t, lambda: False)()


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
    return (numbers or type(a) is type(b)) and a == b
