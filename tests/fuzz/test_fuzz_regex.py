"""The pattern engine (`mlxlite/constrain/regex.py`) on arbitrary patterns, and against
Python's `re` on generated patterns of the subset it documents.

Properties: `Regex(p)` compiles or raises BadRequest/Unsupported (never another exception,
never past MAX_STATES); a compiled pattern steps any text; for generated patterns of the
shared subset, a string matches exactly when `re.search` (with `$` as `\\Z`) finds it, and
every match's length lies within [min_left, max_left] of the start state."""

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlxlite.constrain.regex import MAX_STATES, Regex
from tests.fuzz.common import examples, texts, typed_or_value

META = list("()[]{}|*+?.^$\\-,:0123456789abdswDSWuxnvtfrB") + ["(?:", "(?=", "(?<", "\\u00", "{2}", "{1,3}",
                                                               "{,}", "[^", "\\p{L}", "\\1", "\\b"]
patterns = st.one_of(texts(30), st.lists(st.sampled_from(META) | st.characters(), max_size=25).map("".join))
TEXT = st.text(st.sampled_from("ab1 _\n.-{}") | st.characters(), max_size=12)


def run(rx: Regex, text: str) -> bool:
    states = rx.start
    for ch in text:
        states = rx.step(states, ord(ch))
        if not states:
            return False
    return rx.accepts(states)


@settings(max_examples=examples(300))
@given(patterns, TEXT)
@example("(" * 2000 + ")" * 2000, "")
@example("a" + "*" * 3000, "aa")
@example("a" + "{2}" * 3000, "")
@example("(?:" * 60 + "a" + ")" * 60, "a")
@example("(?:a{1000}){1000}", "")
@example("[\\d-z]", "")
@example("\\", "")
@example("[]", "")
@example("a{3,2}", "")
def test_any_pattern_compiles_or_raises_a_typed_error(pattern, text):
    ok, rx = typed_or_value(Regex, pattern)
    if not ok:
        return
    assert len(rx.edges) <= MAX_STATES
    run(rx, text)
    assert rx.min_left(rx.start) <= rx.max_left(rx.start)


# ---- agreement with re on the shared subset ------------------------------------------------
# ASCII text only: \d \w \s then mean the same in both, and `.` differs only on \r, \u2028, \u2029.
ATOMS = ["a", "b", "1", " ", "_", "\\.", "\\-", ".", "\\d", "\\w", "\\s", "\\D", "\\W", "\\S", "[ab]", "[^a]",
         "[a-c1]", "[\\d_]", "[^\\s]", "\\n", "\\t", "\\u0061", "\\x62"]
QUANTS = ["", "", "", "*", "+", "?", "*?", "+?", "??", "{2}", "{0,2}", "{1,}", "{2,3}?"]


def _pattern(inner):
    piece = st.one_of(st.sampled_from(ATOMS), inner.map(lambda p: f"(?:{p})"), inner.map(lambda p: f"({p})"))
    cat = st.lists(st.tuples(piece, st.sampled_from(QUANTS)).map("".join), min_size=1, max_size=3).map("".join)
    return st.lists(cat, min_size=1, max_size=3).map("|".join)


subset = st.recursive(st.sampled_from(ATOMS), _pattern, max_leaves=6)
anchored = st.tuples(st.sampled_from(["", "^"]), subset, st.sampled_from(["", "$"])).map("".join)
ASCII_TEXT = st.text(st.sampled_from("ab1 _.-c\n\t"), max_size=8)


@settings(max_examples=examples(250))
@given(anchored, st.lists(ASCII_TEXT, min_size=1, max_size=6))
@example("^(?:a|b)*?b$", ["ab", "a", "", "bb"])
@example("\\D|a$", ["_1"])          # `$` binds to the last alternative only
@example("^a|b", ["xb", "ab", "xa"])  # `^` to the first only
@example("a.b", ["a\nb", "axb"])
def test_generated_patterns_match_like_pythons_re(pattern, samples):
    rx = Regex(pattern)
    oracle = re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)
    for text in samples:
        ours = run(rx, text)
        assert ours == bool(oracle.search(text)), (pattern, text)
        if ours and pattern.startswith("^") and pattern.endswith("$"):
            assert rx.min_left(rx.start) <= len(text) <= rx.max_left(rx.start)
