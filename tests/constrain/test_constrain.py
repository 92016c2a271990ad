"""Constrained decoding (`format`): the byte recognizer on accept/reject tables, schema
refusals, the validator against `jsonschema`, token masks checked token by token against
brute force during random walks (a toy vocabulary and the real SmolLM2 one), every
completed walk parsed and validated, and end to end through the runner on a tiny
random-weight model (and, marked e2e, on the default model)."""

from __future__ import annotations

import datetime
import json
import random
import re
import uuid

import jsonschema
import numpy as np
import pytest

from mlxlite.constrain import TokenConstraint, compile_spec, recognize, validate
from mlxlite.constrain import recognizer as cj
from mlxlite.errors import BadRequest, Unsupported

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age"],
}
PYDANTIC = {  # the shape pydantic's model_json_schema() produces
    "$defs": {
        "Address": {
            "properties": {
                "city": {"title": "City", "type": "string", "maxLength": 10},
                "zip": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}], "default": None},
            },
            "required": ["city"], "title": "Address", "type": "object",
        }
    },
    "properties": {
        "name": {"title": "Name", "type": "string", "maxLength": 10},
        "addresses": {"items": {"$ref": "#/$defs/Address"}, "type": "array", "maxItems": 2},
        "kind": {"enum": ["a", "b", "c"], "title": "Kind"},
        "score": {"type": "number", "minimum": -1.5, "maximum": 10},
    },
    "required": ["name", "addresses", "kind"], "title": "Model", "type": "object",
}
TREE = {
    "$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"]}},
    "$ref": "#/$defs/node",
}
SCHEMAS = {
    "json": "json",
    "person": PERSON,
    "pydantic": PYDANTIC,
    "tree": TREE,
    "array": {"type": "array", "items": {"type": ["integer", "string", "boolean", "null"]}, "minItems": 1, "maxItems": 4},
    "extra": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
              "additionalProperties": {"type": "boolean"}},
    "enum": {"type": "object", "properties": {"c": {"const": {"x": [1, 2]}},
                                              "e": {"enum": [1, 12, 1.5, "1", 'x"y', None, True]}},
             "required": ["c", "e"]},
    "tuple": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "number"}],
              "items": False, "minItems": 2},
    "lengths": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}},
                "required": ["s"]},
    "bounds": {"type": "object", "properties": {"x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                                "i": {"type": "integer", "minimum": -20, "maximum": -5}},
               "required": ["x", "i"]},
    "oneof": {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "string", "maxLength": 4}}, "required": ["b"]}]},
    "map": {"type": "object", "additionalProperties": {"type": "integer"}},
    "pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, "when": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "format": "uuid"}, "day": {"type": "string", "format": "date"},
        "note": {"type": "string", "pattern": "ok", "maxLength": 6},
        "pin": {"type": "string", "pattern": "^[0-9]+x?$", "minLength": 3, "maxLength": 5}},
        "required": ["code", "when", "id", "day", "note", "pin"]},
    "required_only": {"type": "object", "required": ["q"]},
}


# ---- the recognizer on byte strings -----------------------------------------------------------
TABLE = [
    ("json", b"{}", "complete"),
    ("json", b'{"a": [1, -2.5e+3, "x\\u00e9\\n", true, null, {"b": -0}], "c": {}}', "complete"),
    ("json", b'{"a":1,"a":2}', "complete"),  # duplicate keys of a free object: json.loads keeps the last
    ("json", '{"é": "日本"}'.encode(), "complete"),
    ("json", b' {"a":1}', "complete"),
    ("json", b'\n{"a":1}', "complete"),
    ("json", b'{\n  "a": 1\n}', "complete"),
    ("json", b'{"a":', "prefix"),
    ("json", b'{"a":"\xe6\x97', "prefix"),  # a character split across tokens
    ("json", b"[1]", "reject"),  # "json" means an object, as in Ollama
    ("json", b'"x"', "reject"),
    ("json", b'  {"a":1}', "reject"),  # one leading space or newline at most
    ("json", b'{"a":1} ', "reject"),  # nothing after the value
    ("json", b'{"a":01}', "reject"),
    ("json", b'{"a":1.}', "reject"),
    ("json", b'{"a":.5}', "reject"),
    ("json", b'{"a":+1}', "reject"),
    ("json", b'{"a":1,}', "reject"),
    ("json", b"{,}", "reject"),
    ("json", b'{"a" 1}', "reject"),
    ("json", b"{'a':1}", "reject"),
    ("json", b'{"a":tru}', "reject"),
    ("json", b'{"a":"\x01"}', "reject"),  # raw control byte
    ("json", b'{"a":"\\x"}', "reject"),
    ("json", b'{"a":"\\ud83d"}', "reject"),  # surrogate escapes are refused
    ("json", b'{"a":"\xff"}', "reject"),
    ("json", b'{"a":"\xc0\x80"}', "reject"),  # overlong UTF-8
    ("json", b'{"a":"\xed\xa0\x80"}', "reject"),  # UTF-8-encoded surrogate
    ("json", b'{"a":1e999}', "reject"),  # 2 exponent digits at most
    ("json", b'{"a":12345678901234567}', "reject"),  # 16 integer digits at most
    ("json", b'{"a":1234567890123456}', "complete"),
    ("json", b'{"a":0.1234567890123456}', "complete"),
    ("json", b'{"a":0.12345678901234567}', "reject"),
    ("json", b"{\n" + b" " * 20 + b"}", "complete"),
    ("json", b"{\n" + b" " * 21 + b"}", "reject"),  # indentation capped at 20
    ("json", b"{\n\n}", "reject"),
    ("json", b"{  }", "reject"),  # a gap is nothing, one space, or newline + indent
    ("json", b"{\t}", "reject"),
    ("json", b"{\r\n}", "reject"),
    ("person", b'{"name":"Al","age":30}', "complete"),
    ("person", b'{"age":30,"name":"Al","tags":["a","bb"]}', "complete"),
    ("person", b'{"name":"Al"}', "reject"),  # age is required
    ("person", b'{"name":"Al","age":30,"x":1}', "reject"),  # additionalProperties false by default
    ("person", b'{"name":"Al","name":"B"', "reject"),  # no duplicate keys
    ("person", b'{"name":"0123456789012"', "reject"),  # maxLength 12
    ("person", '{"name":"ééééééééééé"'.encode(), "prefix"),  # lengths count characters
    ("person", b'{"name":"A","age":121', "reject"),
    ("person", b'{"name":"A","age":-1', "reject"),
    ("person", b'{"name":"A","age":1.5', "reject"),
    ("person", b'{"name":"A","age":12', "prefix"),
    ("person", b'{"nam', "prefix"),
    ("person", b'{"nab', "reject"),
    ("person", b'{"name":"A","age":3,"tags":["a","b","c","d"]}', "reject"),
    ("pydantic", b'{"name":"n","addresses":[{"city":"c","zip":null}],"kind":"b"}', "complete"),
    ("pydantic", b'{"name":"n","addresses":[],"kind":"b","score":-1.5}', "complete"),
    ("pydantic", b'{"name":"n","addresses":[],"kind":"b","score":-1.6', "reject"),
    ("pydantic", b'{"name":"n","addresses":[],"kind":"b","score":10.01', "reject"),
    ("pydantic", b'{"name":"n","addresses":[],"kind":"d"', "reject"),
    ("pydantic", b'{"name":"n","addresses":[{"zip":"1"}]', "reject"),
    ("tree", b'{"v":1,"kids":[{"v":2,"kids":[{"v":3}]},{"v":4}]}', "complete"),
    ("tree", b'{"kids":[{"v":2}]}', "reject"),
    ("array", b'[1,"a",true,null]', "complete"),
    ("array", b"[]", "reject"),
    ("array", b"[1,2,3,4,5]", "reject"),
    ("array", b"[1.5]", "reject"),
    ("extra", b'{"id":1,"ok":true,"no":false}', "complete"),
    ("extra", b'{"id":true', "reject"),  # a listed key keeps its own schema
    ("extra", b'{"ok":1', "reject"),
    ("extra", b'{"ok":true,"ok":true', "reject"),
    ("enum", b'{"c":{"x":[1,2]},"e":12}', "complete"),
    ("enum", b'{"c":{"x":[1,2]},"e":1}', "complete"),
    ("enum", b'{"c":{"x":[1,2]},"e":"x\\"y"}', "complete"),
    ("enum", b'{"c":{"x":[1,2]},"e":13', "reject"),
    ("enum", b'{"c":{"x": [1,2]}', "reject"),  # enum values in their compact form only
    ("tuple", b'["abc",2.5]', "complete"),
    ("tuple", b'["abc",2.5,1', "reject"),
    ("tuple", b'["abc"]', "reject"),
    ("lengths", b'{"s":"a"}', "reject"),
    ("lengths", b'{"s":"ab"}', "complete"),
    ("lengths", b'{"s":"a\\nc"}', "complete"),
    ("lengths", b'{"s":"abcde', "reject"),
    ("bounds", b'{"x":0.5,"i":-20}', "complete"),
    ("bounds", b'{"x":0,', "reject"),
    ("bounds", b'{"x":1', "reject"),
    ("bounds", b'{"x":0.0,', "reject"),
    ("bounds", b'{"x":0.00', "prefix"),
    ("bounds", b'{"x":1e-1', "reject"),  # no exponent when bounded
    ("bounds", b'{"i":-21', "reject"),
    ("bounds", b'{"i":-4,', "reject"),
    ("bounds", b'{"i":-1', "prefix"),  # -1x may still come
    ("bounds", b'{"i":5', "reject"),
    ("oneof", b'{"a":1}', "complete"),
    ("oneof", b'{"b":"x"}', "complete"),
    ("oneof", b'{"a":1,"b":"x"}', "reject"),
    ("map", b'{"x":1,"y":2}', "complete"),
    ("map", b'{"x":"1"', "reject"),
    ("required_only", b'{"q":[1,{}]}', "complete"),
    ("required_only", b"{}", "reject"),
    ("pattern", b'{"code":"AB-123","when":"2024-02-29T23:59:59.5+01:00","id":"123e4567-e89b-12d3-a456-426614174000",'
                b'"day":"2000-02-29","note":"\\u006fk!","pin":"12x"}', "complete"),
    ("pattern", b'{"pin":"1x', "reject"),
    ("pattern", b'{"pin":"123456', "reject"),
    ("pattern", b'{"code":"Ab', "reject"),
    ("pattern", b'{"code":"AB-12"', "reject"),
    ("pattern", b'{"code":"AB-1234', "reject"),
    ("pattern", b'{"when":"2024-02-29T24', "reject"),
    ("pattern", b'{"when":"2024-02-29T23:59:59"', "reject"),  # an offset is required
    ("pattern", b'{"day":"2023-02-29', "reject"),  # not a leap year
    ("pattern", b'{"day":"2023-04-31', "reject"),
    ("pattern", b'{"day":"1900-02-2', "prefix"),
    ("pattern", b'{"day":"1900-02-29', "reject"),
    ("pattern", b'{"id":"123e4567-e89b-12d3-a456-42661417400g', "reject"),
    ("pattern", b'{"note":"xyzab', "reject"),  # "ok" no longer fits in maxLength 6
    ("pattern", b'{"note":"xyzok"', "prefix"),
    ("pattern", '{"note":"é'.encode(), "prefix"),  # unanchored: anything before "ok"
]


@pytest.mark.parametrize(("name", "data", "expected"), TABLE, ids=[f"{n}:{d[:30]!r}" for n, d, _ in TABLE])
def test_recognizer_table(name, data, expected):
    assert recognize(SCHEMAS[name], data) == expected
    if expected == "complete":  # the oracle agrees
        value = json.loads(data)
        if name != "json":
            jsonschema.validate(value, SCHEMAS[name])
        validate(value, SCHEMAS[name])


def test_pattern_with_length_bounds_never_dead_ends():
    spec = {"type": "string", "pattern": "^a{2,3}x?$", "minLength": 4}
    assert recognize(spec, b'"aaax"') == "complete"
    assert recognize(spec, b'"aax') == "reject"  # "aax" cannot grow to 4 characters
    assert recognize(spec, b'"aaa"') == "reject"
    spec = {"type": "string", "pattern": "^[\u00e0-\u00ff]b$", "maxLength": 2}
    assert recognize(spec, '"éb"'.encode()) == "complete"
    assert recognize(spec, b'"\xe0') == "reject"  # a 3-byte character can't be in \u00e0-\u00ff
    assert recognize(spec, b'"\\u00') == "prefix" and recognize(spec, b'"\\u01') == "reject"


def test_number_at_top_level_and_ambiguous_enum():
    assert recognize({"type": "integer"}, b"1") == "complete"
    assert recognize({"type": "integer"}, b"-") == "prefix"
    assert recognize({"enum": [1, 12]}, b"1") == "complete"  # and may continue to 12
    assert recognize({"enum": [1, 12]}, b"12") == "complete"
    assert recognize({"type": "boolean"}, b"fals") == "prefix"
    assert recognize({"type": "null"}, b"null") == "complete"
    assert recognize(True, b'[{"a":null}]') == "complete"  # schema true: any value


# ---- schema refusals -------------------------------------------------------------------------
@pytest.mark.parametrize(("schema", "word"), [
    ({"type": "string", "pattern": "^(?=a)"}, "lookaround"),
    ({"type": "string", "pattern": "(a)\\1"}, "escape"),
    ({"type": "string", "pattern": "\\p{L}"}, "escape"),
    ({"type": "string", "pattern": "a^b"}, "'\\^'"),
    ({"type": "string", "pattern": "\\bword"}, "escape"),
    ({"type": "string", "format": "email"}, "format"),
    ({"type": "string", "format": "date", "pattern": "^2"}, "pattern together with format"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {}, "then": {}}, "if"),
    ({"type": "object", "patternProperties": {"a": {}}}, "patternProperties"),
    ({"type": "object", "properties": {"a": {"type": "string", "contentEncoding": "base64"}}}, "contentEncoding"),
    ({"$ref": "https://example.invalid/s.json"}, "local"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf"),
    ({"type": "object", "anyOf": [{"required": ["a"]}]}, "anyOf"),
    ({"$ref": "#/$defs/a", "type": "object", "$defs": {"a": {}}}, "$ref"),
])
def test_unsupported_keywords_are_named(schema, word):
    with pytest.raises(Unsupported, match=word.replace("$", r"\$")):
        TokenConstraint(schema, [b"{", b"}", b""], [2])


@pytest.mark.parametrize("spec", [
    "yaml", 3, None, ["json"], False,
    {"type": "strin"},
    {"type": "string", "minLength": 5, "maxLength": 2},
    {"type": "array", "minItems": 3, "items": False},
    {"type": "integer", "minimum": 1.2, "maximum": 1.8},
    {"type": "number", "minimum": 1, "exclusiveMaximum": 1},
    {"enum": [1, 2], "type": "string"},
    {"enum": []},
    {"type": "object", "properties": {}, "additionalProperties": False, "required": ["a"]},
    {"$ref": "#/$defs/missing"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "string", "maxLength": -1},
    {"anyOf": []},
    {"type": "string", "pattern": "^a{1,2}$", "minLength": 3},
    {"type": "string", "format": "date", "maxLength": 9},
    {"type": "string", "pattern": "(ab"},
])
def test_bad_specs_are_bad_requests(spec):
    with pytest.raises(BadRequest):
        TokenConstraint(spec, [b"{", b"}", b""], [2])


WRAPS = {   # one more level of nesting around schema s, each the way real schemas nest
    "items": lambda s: {"type": "array", "items": s},
    "properties": lambda s: {"type": "object", "properties": {"a": s}, "required": ["a"]},
    "additionalProperties": lambda s: {"type": "object", "additionalProperties": s},
    "prefixItems": lambda s: {"type": "array", "prefixItems": [s]},
    "anyOf": lambda s: {"anyOf": [s, {"type": "null"}]},
    "allOf": lambda s: {"allOf": [s]},
    "enum value": lambda s: s if "enum" not in s else {"enum": [[s["enum"][0]]]},
}


def _json_depth(value) -> int:
    """Levels of JSON nesting (an object or array is one level), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _nested(kind: str, depth: int) -> dict:
    """The deepest schema of this kind whose JSON nests at most `depth` levels."""
    s: dict = {"enum": [[]]} if kind == "enum value" else {"type": "string"}
    step = _json_depth(WRAPS[kind](s)) - _json_depth(s)
    for _ in range((depth - _json_depth(s)) // step):
        s = WRAPS[kind](s)
    return s


@pytest.mark.parametrize("kind", list(WRAPS))
def test_schema_depth_is_refused_at_the_limit_before_any_recursion(kind):
    """Nested 200-450 levels, compiling raised RecursionError (a 500 on the wire)."""
    from mlxlite.constrain.schema import MAX_SCHEMA_DEPTH

    at_limit = _nested(kind, MAX_SCHEMA_DEPTH)
    assert MAX_SCHEMA_DEPTH - 1 <= _json_depth(at_limit) <= MAX_SCHEMA_DEPTH
    TokenConstraint(at_limit, [b"{", b"}", b""], [2])
    if kind == "enum value":
        validate(at_limit["enum"][0], at_limit)
    for deeper in (WRAPS[kind](at_limit), _nested(kind, 300), _nested(kind, 450), _nested(kind, 900)):
        with pytest.raises(BadRequest, match=f"nests too deeply: at most {MAX_SCHEMA_DEPTH} levels"):
            compile_spec(deeper)


def test_a_long_chain_of_refs_is_refused_at_the_depth_limit():
    from mlxlite.constrain.schema import MAX_SCHEMA_DEPTH

    def chain(n: int) -> dict:
        defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
        return {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}

    assert recognize(chain(MAX_SCHEMA_DEPTH - 2), b'"x"') == "complete"
    for n in (MAX_SCHEMA_DEPTH, 400, 2000):
        with pytest.raises(BadRequest, match=f"at most {MAX_SCHEMA_DEPTH} levels.*following \\$refs"):
            compile_spec(chain(n))


def test_random_junk_schemas_give_typed_errors():
    """Nonsense in any keyword is a BadRequest/Unsupported, never another exception."""
    from mlxlite.errors import MlxliteError

    words = ["type", "properties", "required", "additionalProperties", "enum", "const", "items", "prefixItems",
             "minItems", "maxItems", "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength", "minimum",
             "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "format", "$defs", "title"]
    atoms = [None, True, False, 0, -1, 2, 1.5, "", "a", "object", "string", "#/$defs/a", "#", "date", "^a+$", "(",
             float("nan"), 10**30, ["string", "null"]]
    rng = random.Random(7)

    def junk(depth: int):
        r = rng.random()
        if depth > 2 or r < 0.35:
            return rng.choice(atoms)
        if r < 0.55:
            return [junk(depth + 1) for _ in range(rng.randrange(3))]
        return {rng.choice(words + ["a", "b"]): junk(depth + 1) for _ in range(rng.randrange(4))}

    compiled = 0
    for _ in range(3000):
        schema = {rng.choice(words): junk(0) for _ in range(rng.randrange(1, 4))}
        try:
            TokenConstraint(schema, [b"{", b"}", b'"', b"a", b"1", b""], [5])
        except MlxliteError:
            continue
        compiled += 1
        for value in [None, 1, "a", [], {}, {"a": 1}, [1, "x"], 2.5, float("inf")]:
            try:
                validate(value, schema)
            except MlxliteError:
                pass
    assert compiled > 100


def test_annotations_are_accepted_and_ignored():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "T", "description": "d",
              "type": "object", "properties": {"a": {"type": "integer", "default": 1, "examples": [2],
                                                     "deprecated": True, "readOnly": True}}}
    assert recognize(schema, b'{"a":3}') == "complete"


# ---- the validator against jsonschema --------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in SCHEMAS if n != "json"])
def test_validate_agrees_with_jsonschema(name):
    schema = SCHEMAS[name]
    samples = [None, True, 0, -3, 1.5, 12, "", "ab", "abcdef", [], [1], ["abc", 2.5], [1, "a", True, None, 5],
               {}, {"name": "Al", "age": 30}, {"name": "Al", "age": 130}, {"id": 1, "ok": True}, {"id": 1, "ok": 2},
               {"v": 1, "kids": [{"v": 2}]}, {"v": 1, "kids": [{"w": 2}]}, {"a": 1}, {"b": "x"}, {"q": 1},
               {"x": 0.5, "i": -7}, {"x": 1, "i": -7}, {"s": "abc"}, {"s": "abcde"},
               {"c": {"x": [1, 2]}, "e": 1.5}, {"c": {"x": [1, 2]}, "e": 2},
               {"name": "n", "addresses": [{"city": "c"}], "kind": "a"}, {"name": "n", "addresses": [{}], "kind": "a"}]
    strict = _strict(schema)  # jsonschema with our additionalProperties default made explicit
    for x in samples:
        ours = True
        try:
            validate(x, schema)
        except BadRequest:
            ours = False
        assert ours == jsonschema.Draft202012Validator(strict).is_valid(x), (name, x)


def _strict(schema):
    """`schema` with additionalProperties: false written out wherever properties are listed."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


# ---- random walks over vocabularies, masks checked against brute force ------------------------
TOY_CHUNKS = [
    '{"', '"}', '":', '": ', '", "', ', "', '",', "true", "false", "null", "12", "3.5", "-1", "e+5", "0.",
    "name", "age", "tags", "ag", "city", "addresses", "kind", "score", ' "', "\n  ", "\n    ", "    ", "[]", "{}",
    '"a"', "\\u00e9", "\\n", '\\"', "é", "日本", "},", "],", "]}", "}}", '{"v":', '"kids":[', '"x":0.', '"i":-',
    '"s":"', '"c":{"x":[1,2]}', '"e":', '"id":', '"ok":', "1,", "[{", "\\ud83d",
]


def toy_vocab() -> tuple[list[bytes], int]:
    """Single bytes (printable ASCII, whitespace, a control byte, UTF-8 pieces), chunks, and
    two special tokens with empty bytes (id 0 is EOS)."""
    tokens = [b"", b""]
    tokens += [bytes([c]) for c in range(0x20, 0x7F)]
    tokens += [b"\n", b"\t", b"\r", b"\x01", b"\xe6", b"\x97", b"\xa5", b"\xff", b"\xc3"]
    tokens += [c.encode() for c in TOY_CHUNKS]
    return tokens, 0


def random_walk(c: TokenConstraint, tokens: list[bytes], eos: int, rng: random.Random, max_steps: int,
                check_every: int = 1, check_until: int = 1 << 30) -> bool:
    """Pick random allowed tokens, drifting towards completion as the walk gets longer,
    until EOS; check each mask against brute force every `check_every` steps. True if the
    walk ended with EOS."""
    specials = [i for i, t in enumerate(tokens) if not t and i != eos]
    for step in range(max_steps):
        mask = c.allowed_mask()
        assert mask.any(), f"dead end after {c.text()!r}"
        assert not mask[specials].any()  # tokens without bytes never
        if check_every and step % check_every == 0 and step < check_until:
            expected = np.array([bool(t) and i != eos and c.accepts(t) for i, t in enumerate(tokens)])
            expected[eos] = c.is_complete()
            wrong = np.flatnonzero(mask != expected)
            assert not len(wrong), [(tokens[i], bool(mask[i])) for i in wrong[:10]] + [c.text()]
        if mask[eos] and (rng.random() < 0.8 or mask.sum() == 1):
            c.advance(eos)
            return True
        mask[eos] = False
        ids = np.flatnonzero(mask)
        picks = [int(ids[rng.randrange(len(ids))]) for _ in range(16)]
        if rng.random() < min(0.95, 0.3 + step / 40):
            tok = min(picks, key=lambda i: _distance(c, tokens[i]))
        else:
            tok = picks[0]
        c.advance(tok)
    return False


def _distance(c: TokenConstraint, data: bytes) -> int:
    """A rough "how far from done" of the state after `data`: open containers, missing
    required keys, and being inside a string or key."""
    state = c._state
    for b in data:
        state = cj.advance(state, b)
    if cj.complete(state):
        return 0
    best = 1 << 30
    for stack in state:
        cost = 0
        while stack is not None:
            frame, stack = stack
            cost += 10
            if frame[0] == cj.F_OBJ:
                cost += 30 * len(frame[1].required - frame[4])
            elif frame[0] == cj.F_STR:
                cost += 3
            elif frame[0] == cj.F_KEY:  # on the way to a missing required key is cheaper
                missing = frame[1].required - stack[0][4]
                cost += -27 if frame[2] is not None and any(k.startswith(frame[2]) for k in missing) else 8
        best = min(best, cost)
    return best


def check_output(c: TokenConstraint, spec) -> None:
    value = json.loads(c.text())
    if spec == "json":
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, spec)
    validate(value, spec)
    if spec is SCHEMAS["pattern"]:  # the formats hold by Python's own parsers too
        datetime.date.fromisoformat(value["day"])
        datetime.datetime.fromisoformat(value["when"])
        uuid.UUID(value["id"])


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_toy_vocab_walks(name):
    tokens, eos = toy_vocab()
    rng = random.Random(f"toy-{name}")
    spec = SCHEMAS[name]
    done = 0
    for _ in range(12):
        c = TokenConstraint(spec, tokens, [eos])
        if random_walk(c, tokens, eos, rng, max_steps=300):
            check_output(c, spec)
            done += 1
    assert done >= 6, f"only {done}/12 walks finished"


@pytest.fixture(scope="module")
def smol_vocab(default_gguf) -> tuple[list[bytes], int]:
    """The default model's token bytes, built the way the runner builds them."""
    from mlxlite.engine import text as runner_text
    from mlxlite.formats import gguf

    spec = gguf.build_tokenizer(gguf.read_metadata(default_gguf))
    (eos,) = spec.eos_token_ids
    return runner_text.token_table(spec.tokenizer, spec.special_ids), eos


@pytest.mark.parametrize("name", ["json", "person", "pydantic", "tree", "enum", "bounds", "oneof", "map", "pattern"])
def test_real_vocab_walks(smol_vocab, name):
    tokens, eos = smol_vocab
    spec = SCHEMAS[name]
    rng = random.Random(f"smol-{name}")
    done = 0
    for walk in range(6):
        c = TokenConstraint(spec, tokens, [eos])
        # Brute force over 49k tokens costs ~0.2 s a step: check a few steps of the first walk.
        if random_walk(c, tokens, eos, rng, max_steps=300, check_every=4 if walk == 0 else 0, check_until=30):
            check_output(c, spec)
            done += 1
    assert done >= 3, f"only {done}/6 walks finished"


# ---- the pattern engine against Python's re ----------------------------------------------------
PATTERNS = ["^a+$", "ab", "^(ab|c)*d?$", "^[a-c]{2,3}$", "[^a]b", "^a.c$", "^\\d{2}-\\w+$", "^(?:x|yz){1,}$",
            "^a{2}b{0,1}$", "\\s", "^[\\-a]+$", "^[\\d_]*$", "b$", "^$", "^a*?b+?$", "^[^b-y]+$", "{", "a{2,x}"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_matches_like_python(pattern):
    from mlxlite.constrain.regex import Regex

    rx = Regex(pattern)
    oracle = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern  # ECMA's $ is Python's \Z
    rng = random.Random(pattern)
    alphabet = "abcdxyz01-_ .\n{},"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(7)))
        states = rx.start
        for ch in text:
            states = rx.step(states, ord(ch))
            if not states:
                break
        ours = bool(states) and rx.accepts(states)
        assert ours == bool(re.search(oracle, text)), (pattern, text)


# ---- the TokenConstraint interface -----------------------------------------------------------
def test_interface_errors_and_eos():
    tokens, eos = toy_vocab()
    ids = {t: i for i, t in enumerate(tokens) if t}
    c = TokenConstraint(PERSON, tokens, [eos])
    m = c.allowed_mask()
    assert m.dtype == bool and m.shape == (len(tokens),)
    assert not m[eos] and not m[1]  # special tokens never; EOS not before completion
    assert m[ids[b"{"]] and m[ids[b'{"']] and m[ids[b" "]] and not m[ids[b"["]]
    with pytest.raises(BadRequest):
        c.advance(ids[b"["])
    with pytest.raises(BadRequest):
        c.advance(eos)
    with pytest.raises(BadRequest):
        c.advance(1)
    with pytest.raises(BadRequest):
        c.advance(len(tokens) + 5)
    for piece in [b'{"', b"name", b'":', b'"', b"A", b'",', b'"', b"age", b'":', b"12", b"}"]:
        assert not c.is_complete()
        c.advance(ids[piece])
    assert c.is_complete() and c.text() == '{"name":"A","age":12}'
    m = c.allowed_mask()
    assert np.flatnonzero(m).tolist() == [eos]  # a closed object: only EOS
    c.advance(eos)
    with pytest.raises(BadRequest):
        c.advance(ids[b" "])


def test_split_utf8_and_text():
    tokens, eos = toy_vocab()
    ids = {t: i for i, t in enumerate(tokens) if t}
    c = TokenConstraint("json", tokens, [eos])
    for piece in [b'{"', b"a", b'":', b'"', b"\xe6"]:
        c.advance(ids[piece])
    m = c.allowed_mask()
    assert m[ids[b"\x97"]] and m[ids[b"\xa5"]] and not m[ids[b"\xc3"]] and not m[ids[b'"']] and not m[ids[b"a"]]
    c.advance(ids[b"\x97"])
    assert c.text().endswith("\ufffd")  # partial character shown as U+FFFD
    c.advance(ids[b"\xa5"])
    c.advance(ids[b'"}'])
    assert c.text() == '{"a":"日"}' and c.is_complete()


def test_whitespace_cannot_loop():
    tokens, eos = toy_vocab()
    ids = {t: i for i, t in enumerate(tokens) if t}
    c = TokenConstraint("json", tokens, [eos])
    c.advance(ids[b"{"])
    c.advance(ids[b"\n"])
    for _ in range(20):
        assert c.allowed_mask()[ids[b" "]]
        c.advance(ids[b" "])
    m = c.allowed_mask()
    assert not m[ids[b" "]] and not m[ids[b"\t"]] and not m[ids[b"\n"]] and m[ids[b"}"]]


def test_masks_and_compiled_specs_are_cached():
    tokens, eos = toy_vocab()
    a = TokenConstraint(PERSON, tokens, [eos])
    b = TokenConstraint(json.loads(json.dumps(PERSON)), list(tokens), [eos])
    assert a._g is b._g
    assert np.array_equal(a.allowed_mask(), b.allowed_mask())


# ---- end to end through the runner ------------------------------------------------------------
E2E_SCHEMA = {  # bounded: every document it accepts is short, so a random model must finish
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "n", "ok", "tags"],
}


@pytest.fixture(scope="module")
def tiny_loaded(tiny_gguf_loaded):
    return tiny_gguf_loaded


def _generate(loaded, spec, **opts):
    from mlxlite import options
    from mlxlite.engine import runner

    c = TokenConstraint(spec, runner.token_bytes(loaded), loaded.eos_token_ids)
    prompt = runner.tokenize(loaded, "Answer in JSON:")
    items = list(runner.generate(loaded, prompt, options.parse(opts), constraint=c))
    text = "".join(p.text for p in items[:-1]) + items[-1].text_tail
    return text, items[-1], c


@pytest.mark.parametrize("opts", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"temperature": 1.5, "seed": 11}],
                         ids=["greedy", "sampled", "hot"])
def test_runner_output_parses_and_validates(tiny_loaded, opts):
    text, finish, c = _generate(tiny_loaded, E2E_SCHEMA, num_predict=400, **opts)
    assert finish.reason == "stop", text
    assert text == c.text()
    value = json.loads(text)
    jsonschema.validate(value, E2E_SCHEMA)
    validate(value, E2E_SCHEMA)


def test_runner_json_mode_stays_a_valid_prefix(tiny_loaded):
    text, finish, c = _generate(tiny_loaded, "json", num_predict=40, temperature=1.0, seed=5)
    assert text.startswith(("{", " {", "\n{"))
    if finish.reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert recognize("json", text.encode()) == "prefix"


@pytest.mark.e2e
@pytest.mark.slow
def test_default_model_fills_a_schema(store, default_model):
    from mlxlite import options
    from mlxlite.engine import runner

    loaded = runner.load(store, store.resolve(default_model))
    try:
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "country": {"type": "string", "maxLength": 30}},
                  "required": ["city", "country"]}
        prompt = loaded.template.render([{"role": "user", "content": "Name the capital of France as JSON "
                                          "with keys city and country."}], add_generation_prompt=True)
        c = TokenConstraint(schema, runner.token_bytes(loaded), loaded.eos_token_ids)
        ids = runner.tokenize(loaded, prompt, add_special=False)
        items = list(runner.generate(loaded, ids, options.parse({"temperature": 0, "num_predict": 80}), constraint=c))
        text = "".join(p.text for p in items[:-1]) + items[-1].text_tail
        assert items[-1].reason == "stop", text
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert "paris" in value["city"].lower()
    finally:
        runner.unload(loaded)


def test_overlapping_unions_stop_at_a_bound_instead_of_doubling_forever():
    """Two array branches of one union that recurse into it: each `[` doubles the live parses
    (65,536 after 16 bytes, seconds per byte, and on: the MLX thread stalled for everyone)."""
    schema = {"$defs": {"v": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/v"}},
                                        {"type": "array", "items": {"$ref": "#/$defs/v"}, "maxItems": 3},
                                        {"type": "integer"}]}},
              "$ref": "#/$defs/v"}
    state = cj.start(compile_spec(schema))
    for _ in range(12):                         # 2^12 = 4096 parses: still followed
        state = cj.advance(state, ord("["))
    assert len(state) == cj.MAX_ALTERNATIVES
    assert recognize(schema, b"[[[1]],[2]]") == "complete"     # shallow documents are unaffected
    with pytest.raises(Unsupported, match="too ambiguous"):
        cj.advance(state, ord("["))
