"""JSON Schema compilation for `format` (`mlxlite/constrain/schema.py` `compile_spec`) on
arbitrary JSON, schema-shaped JSON, and schemas nested or cross-referenced to extremes.

Properties: `compile_spec` returns a grammar or raises BadRequest/Unsupported (never
another exception, never a grammar the recognizer cannot walk: left-recursive or
exponentially ambiguous `$ref`s are refused); a compiled schema validates any value and
recognizes any bytes without crashing; and validation only ever narrows the schema, never
widens it: whatever `validate` accepts, `jsonschema` (draft 2020-12) accepts too."""

import json

import jsonschema
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlxlite.constrain import compile_spec, recognize, validate
from mlxlite.errors import BadRequest, MlxliteError
from tests.fuzz.common import DEEP, deep, examples, json_scalars, json_values, typed_or_value

KEYWORDS = ["type", "properties", "required", "additionalProperties", "enum", "const", "items", "prefixItems",
            "minItems", "maxItems", "anyOf", "oneOf", "allOf", "$ref", "$defs", "minLength", "maxLength",
            "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "title", "not"]
ATOMS = st.sampled_from([None, True, False, 0, -1, 2, 1.5, "", "a", "object", "array", "string", "number",
                         "integer", "boolean", "null", "#", "#/$defs/a", "#/$defs/b", "#/properties/a", "date",
                         "uuid", "^a+$", "(", ["string", "null"], ["object"], 10**30, "\ud800"]) | json_scalars


def _schema_like(inner):
    return st.one_of(st.lists(inner, max_size=3),
                     st.dictionaries(st.sampled_from(KEYWORDS + ["a", "b"]), inner, max_size=4))


schema_like = st.recursive(ATOMS, _schema_like, max_leaves=14)


@settings(max_examples=examples(300))
@given(schema_like | json_values(), json_values(max_leaves=6), st.binary(max_size=8))
@example({"enum": ["\ud800"]}, None, b"")
@example({"const": {"\udc00": 1}}, None, b"")
@example({"properties": {"\ud800": {}}}, None, b"")
@example({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"}, None, b"n")
@example({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "type": "array",
          "items": {"$ref": "#/$defs/a"}, "enum": [[1]]}, [1], b"[")
@example({"$ref": [1]}, None, b"")
@example({"type": None, "enum": [1]}, 1, b"1")
@example([1], None, b"")
def test_any_json_compiles_or_raises_a_typed_error(schema, value, data):
    ok, _ = typed_or_value(compile_spec, schema)
    if not ok:
        return
    typed_or_value(validate, value, schema)
    assert recognize(schema, data) in ("complete", "prefix", "reject")


# ---- nesting and references to extremes (explicit: hypothesis would print megabytes) ----------
def _ref_dag(levels: int) -> dict:
    """Two refs per level to the next (different spellings, one target): 2**levels paths."""
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}/"}]} for i in range(levels)}
    defs[f"d{levels}"] = {"type": "null"}
    props: dict = {}
    for i in range(levels, -1, -1):  # compiled innermost first, so no compile recursion limits it
        props[f"a{i}"], props[f"b{i}"] = {"$ref": f"#/$defs/d{i}"}, {"$ref": f"#/$defs/d{i}/"}
    return {"$defs": defs, "properties": props}


def _union_chain(levels: int) -> dict:
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"type": "null"}]} for i in range(levels)}
    defs[f"d{levels}"] = {"type": "string"}
    return {"$defs": defs, "properties": {f"p{i}": {"$ref": f"#/$defs/d{i}"} for i in range(levels, -1, -1)}}


EXTREMES = [
    deep(DEEP, {}, "dict", "items"), deep(DEEP, {}, "dict", "additionalProperties"),
    deep(DEEP, {"type": "null"}, "list"), {"anyOf": deep(DEEP, {}, "list")},
    {"properties": deep(DEEP, {}, "dict", "a")}, {"enum": [deep(DEEP)]}, {"const": deep(DEEP), "enum": [deep(DEEP)]},
    {"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}}, "type": "array",
     "items": {"$ref": "#/$defs/a"}, "enum": [deep(DEEP)]},
    {"$ref": deep(DEEP)}, deep(DEEP),
    {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}, {"type": "null"}]},
               "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "string"}]}}, "$ref": "#/$defs/a"},
]


def test_ref_graphs_the_recognizer_cannot_walk_are_refused():
    # Accepted, the first would take 2**40 steps at the first byte; the second recurses 1200 deep.
    for schema in (_ref_dag(40), _union_chain(1200)):
        try:
            compile_spec(schema)
        except BadRequest as exc:
            assert "alternatives" in str(exc) or "levels" in str(exc)
        else:
            raise AssertionError("an exponential or stack-deep $ref graph was accepted")


def test_extreme_nesting_and_references_are_refused_or_walkable():
    crashes = []
    for i, schema in enumerate(EXTREMES):
        try:
            compile_spec(schema)
            # What compiles, the recognizer walks (it recurses through refs and unions).
            assert recognize(schema, b"[[[[{") in ("complete", "prefix", "reject")
        except MlxliteError:
            continue
        except Exception as exc:  # collected, so one run names every case
            crashes.append((i, type(exc).__name__))
    assert crashes == [], crashes


# ---- validation narrows, never widens --------------------------------------------------------
# Without oneOf (documented: decoded as anyOf), pattern/format (ECMA vs Python regexes; formats
# are annotations to jsonschema) and draft-4 spellings (list items, boolean exclusive bounds).
SUB_KEYS = ["type", "properties", "required", "additionalProperties", "enum", "const", "items", "prefixItems",
            "minItems", "maxItems", "anyOf", "allOf", "minLength", "maxLength", "minimum", "maximum",
            "exclusiveMinimum", "exclusiveMaximum"]
SUB_ATOMS = st.sampled_from([True, 0, 1, 2, 3, -1, 1.5, "a", "b", "object", "array", "string", "number",
                             "integer", "boolean", "null", ["string", "null"], ["integer", "array"]])


def _sub(inner):
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(SUB_KEYS + ["a", "b"]), inner,
                                                                  max_size=4))


sub_schemas = st.recursive(SUB_ATOMS, _sub, max_leaves=10).filter(lambda s: isinstance(s, dict))
values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([1.5, 2.0, -0.5]) |
                      st.sampled_from(["", "a", "b", "ab"]),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c"]), c,
                                                                           max_size=3), max_leaves=8)


@settings(max_examples=examples(300))
@given(sub_schemas, st.lists(values, min_size=1, max_size=4))
def test_validate_never_accepts_what_jsonschema_refuses(schema, samples):
    try:
        compile_spec(schema)
        jsonschema.Draft202012Validator.check_schema(schema)
    except (MlxliteError, jsonschema.SchemaError):
        return
    checker = jsonschema.Draft202012Validator(schema)
    for value in samples:
        try:
            validate(value, schema)
        except MlxliteError:
            continue
        assert checker.is_valid(value), (json.dumps(schema), json.dumps(value))
