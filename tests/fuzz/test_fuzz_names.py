"""Model names and digests (`mlxlite/names.py`) under arbitrary text.

tests/test_names.py holds the table and a seeded random round trip; these are the
hypothesis properties: any value parses or raises InvalidName, an accepted name never has
a part that could leave `manifests/`, and `display`/`full` parse back to the same key."""

import string

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mlxlite import names
from mlxlite.errors import InvalidName
from tests.fuzz.common import DEEP, deep, examples, json_scalars, texts

NAME_CHARS = string.ascii_letters + string.digits + "._-:/@"
name_like = st.text(st.sampled_from(NAME_CHARS), max_size=40)


def _part(first: str = string.ascii_letters + string.digits, rest: str = string.ascii_letters + string.digits + "._-"):
    return st.builds(lambda a, b: a + b, st.sampled_from(first), st.text(st.sampled_from(rest), max_size=20))


@settings(max_examples=examples(400))
@given(st.one_of(texts(40), name_like, json_scalars))
@example("../../etc/passwd")
@example("a/./b")
@example("host:99999999/ns/m")
@example("m@sha256:" + "A" * 64)
@example("m:" + "t" * 128)
def test_any_value_parses_or_is_invalid_name(text):
    try:
        parsed = names.parse(text)
    except InvalidName as exc:
        assert str(exc)
        assert not names.is_name(text)
        return
    assert names.is_name(text)
    host, namespace, model, tag = parsed.key
    for part in (namespace, model, tag):
        assert part not in ("", ".", "..") and "/" not in part and "\\" not in part and "\x00" not in part
    assert host and ".." not in host and "/" not in host
    # Whatever was accepted comes back from its short and its long form.
    assert names.parse(parsed.display).key == parsed.key
    assert names.parse(parsed.full).key == parsed.key


def test_deeply_nested_values_are_invalid_names():
    # json.loads in a server thread returns values ~990 deep; their repr recurses past the stack.
    value = deep(DEEP)
    for fn in (names.parse, names.parse_digest, names.is_name):
        try:
            assert fn(value) is False
        except InvalidName as exc:
            assert "list" in str(exc)


@settings(max_examples=examples(300))
@given(host=st.none() | st.sampled_from(["hf.co", "example.com", "localhost", "localhost:5000", "10.0.0.1:443"]),
       namespace=st.none() | _part(), model=_part(), tag=st.none() | _part(),
       digest=st.none() | st.text(st.sampled_from("0123456789abcdefABCDEF"), min_size=64, max_size=64))
def test_built_names_round_trip_through_display(host, namespace, model, tag, digest):
    # Without a host, a first part with '.' or ':' (or localhost) is a host (docker's rule).
    assume(host or not namespace or not ("." in namespace or namespace.lower() == "localhost"))
    text = "/".join(p for p in (host, namespace, model) if p)
    if tag:
        text += ":" + tag
    if digest:
        text += "@sha256:" + digest
    parsed = names.parse(text)
    assert parsed.model.lower() == model.lower()
    assert parsed.tag.lower() == (tag or "latest").lower()
    if digest:
        assert parsed.digest == "sha256:" + digest.lower()
    assert names.parse(parsed.display).key == parsed.key
    assert names.parse(parsed.full).key == parsed.key
    assert names.parse(parsed.display).display == parsed.display


@settings(max_examples=examples(300))
@given(st.one_of(texts(80), json_scalars,
                 st.builds(lambda p, s, h: p + s + h, st.sampled_from(["sha256:", "sha256-", "SHA256:", "sha512:", ""]),
                           st.text(st.sampled_from("0123456789abcdefABCDEFg"), min_size=62, max_size=66),
                           st.sampled_from(["", "\n", " ", "/.."]))))
def test_parse_digest_is_canonical_or_invalid_name(text):
    try:
        digest = names.parse_digest(text)
    except InvalidName:
        return
    assert digest.startswith("sha256:") and len(digest) == 71
    assert set(digest[7:]) <= set("0123456789abcdef")
    assert names.parse_digest(digest) == digest
