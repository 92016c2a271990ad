"""OCI manifests (`mlxlite/store/manifest.py`) as the store, registries and layouts hand
them over: arbitrary bytes, JSON of any shape, hostile layer titles.

Properties: `Manifest.parse` returns a manifest whose blobs all have canonical digests,
sizes and safe titles, or raises a typed error (also through `Store.resolve` of a damaged
manifest file); `check_title` never accepts a name that leaves the model's directory;
`build_manifest` -> `Manifest.parse` gives the same layers back, byte for byte stable."""

import json
import posixpath
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlxlite.errors import BadRequest, MlxliteError
from mlxlite.names import parse as parse_name
from mlxlite.store import TITLE, Layer, Manifest, Store, build_manifest, check_title
from tests.fuzz.common import DEEP, examples, json_values, mostly, mutated, texts, typed_or_value

HEX = st.text(st.sampled_from("0123456789abcdef"), min_size=64, max_size=64)
digests = st.one_of(HEX.map(lambda h: "sha256:" + h), texts(20), st.sampled_from(["sha256:" + "A" * 64,
                                                                                  "sha256-" + "b" * 64]))
MEDIA = ["application/vnd.ollama.image.model", "application/vnd.mlxlite.file.v1",
         "application/vnd.mlxlite.model.config.v1+json", "application/vnd.ollama.image.template"]
title_parts = st.sampled_from(["", ".", "..", "a", "b.json", "x y", "\x00", "\\", "C:", "~", "é"]) | texts(6)
titles = st.one_of(texts(30), st.lists(title_parts, max_size=5).map("/".join),
                   st.lists(title_parts, max_size=5).map(lambda p: "/" + "/".join(p)))
layer_json = st.fixed_dictionaries(
    {"mediaType": mostly(st.sampled_from(MEDIA), json_values(max_leaves=2)),
     "digest": mostly(HEX.map(lambda h: "sha256:" + h), digests | json_values(max_leaves=2)),
     "size": mostly(st.integers(0, 2**63), st.integers(-1, 2**64) | json_values(max_leaves=2))},
    optional={"annotations": mostly(st.dictionaries(st.just(TITLE), titles, max_size=1), st.dictionaries(
        st.just(TITLE) | texts(8), titles | json_values(max_leaves=2), max_size=2) | json_values(max_leaves=3))})
manifest_json = st.fixed_dictionaries(
    {"schemaVersion": mostly(st.just(2), st.sampled_from([1, "2", 2.0, True])),
     "config": mostly(layer_json, json_values(max_leaves=3)),
     "layers": mostly(st.lists(layer_json, max_size=4), json_values(max_leaves=4))},
    optional={"mediaType": st.sampled_from(MEDIA) | texts(10)})


def _valid_layer(n: int) -> Layer:
    return Layer(MEDIA[1], "sha256:" + f"{n:064x}", n, {TITLE: f"f{n}.bin"})


SEED = build_manifest(Layer(MEDIA[2], "sha256:" + "c" * 64, 10), [_valid_layer(i) for i in range(3)])


def check(raw: bytes) -> None:
    ok, manifest = typed_or_value(Manifest.parse, raw)
    if not ok:
        return
    for layer in manifest.blobs:
        assert layer.digest.startswith("sha256:") and len(layer.digest) == 71
        assert isinstance(layer.size, int) and layer.size >= 0 and isinstance(layer.media_type, str)
        if layer.title is not None:
            assert check_title(layer.title) == layer.title
    for title in manifest.files():
        assert not title.startswith("/") and ".." not in title.split("/")


@settings(max_examples=examples(300))
@given(st.binary(max_size=300))
@example(b"\xff\xfe{}")
@example(b'{"schemaVersion": 2, "size": 1' + b"0" * 5000 + b"}")
def test_any_bytes_parse_or_raise_a_typed_error(raw):
    check(raw)


@settings(max_examples=examples(300))
@given(manifest_json | json_values())
@example({"schemaVersion": 2, "config": {"mediaType": MEDIA[2], "digest": "sha256:" + "c" * 64, "size": 1},
          "layers": [{"mediaType": MEDIA[1], "digest": "sha256:" + "a" * 64, "size": 1,
                      "annotations": {TITLE: "../../etc/passwd"}}]})
def test_json_of_any_shape_parses_or_raises_a_typed_error(value):
    try:
        raw = json.dumps(value).encode("utf-8", "surrogatepass")
    except RecursionError:  # deeper than json.dumps writes; the raw bytes test covers depth
        return
    check(raw)


@settings(max_examples=examples(300))
@given(mutated(SEED, max_ops=3))
def test_mutated_manifests_parse_or_raise_a_typed_error(raw):
    check(raw)


@settings(max_examples=examples(100))
@given(st.one_of(st.binary(max_size=200), mutated(SEED, max_ops=3)))
def test_a_damaged_manifest_file_in_the_store_is_a_typed_error(raw):
    _stored_manifest(raw)


def _stored_manifest(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp))
        name = parse_name("fuzz:latest")
        path = store.manifest_path(name)
        path.parent.mkdir(parents=True)
        path.write_bytes(raw)
        ok, entry = typed_or_value(store.resolve, name)
        listed = store.list()  # skips what it cannot read
        assert [e.digest for e in listed] == ([entry.digest] if ok else [])


# Nesting deeper than json's decoder recurses (explicit: hypothesis would print megabytes).
DEEP_RAW = [b"[" * 100_000, b'{"schemaVersion": 2, "layers": [], "config": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            b'{"layers": ' * DEEP + b"null" + b"}" * DEEP,
            b'{"schemaVersion": 2, "layers": [], "config": {"mediaType": "x", "size": 1, "digest": '
            + b"[" * DEEP + b"]" * DEEP + b"}}"]


def test_deeply_nested_manifests_are_a_typed_error():
    crashes = []
    for i, raw in enumerate(DEEP_RAW):
        for fn in (check, _stored_manifest):
            try:
                fn(raw)
            except Exception as exc:  # collected, so one run names every case
                crashes.append((i, fn.__name__, type(exc).__name__))
    assert crashes == [], crashes


@settings(max_examples=examples(300))
@given(titles | json_values(max_leaves=2))
@example("a/../../b")
@example("./a")
@example("a//b")
@example("C:\\windows")
@example("a\x00b")
@example("x" * 513)
def test_check_title_never_accepts_an_escape(title):
    try:
        got = check_title(title)
    except BadRequest:
        return
    assert got == title and isinstance(title, str)
    root = "/store/model"
    joined = posixpath.normpath(posixpath.join(root, title))
    assert joined.startswith(root + "/") and joined != root
    assert "\\" not in title and "\x00" not in title and ".." not in title.split("/")
    assert posixpath.normpath(title) == title  # no ".", "", or ".." parts to normalize away


safe_titles = st.lists(st.text(st.sampled_from("abcXYZ019._-é"), min_size=1, max_size=8).filter(
    lambda p: p not in (".", "..")), min_size=1, max_size=3).map("/".join)
# Media types as JSON hands them over: json.loads joins an escaped surrogate pair into one
# character, so a Python-built pair would not (and need not) come back as two.
layers = st.builds(Layer, st.sampled_from(MEDIA) | st.text(max_size=10), HEX.map(lambda h: "sha256:" + h),
                   st.integers(0, 2**63), st.one_of(st.just({}), st.dictionaries(
                       st.just(TITLE) | st.text(max_size=8), safe_titles, max_size=2)))


@settings(max_examples=examples(200))
@given(layers, st.lists(layers, max_size=5))
def test_build_manifest_parses_back_to_the_same_layers(config, items):
    raw = build_manifest(config, items)
    manifest = Manifest.parse(raw)
    assert manifest.config == config and manifest.config.annotations == config.annotations
    assert list(manifest.layers) == items
    assert [x.annotations for x in manifest.layers] == [x.annotations for x in items]
    assert build_manifest(manifest.config, list(manifest.layers)) == raw  # canonical: same digest
    assert isinstance(manifest, Manifest) and not isinstance(manifest, MlxliteError)
