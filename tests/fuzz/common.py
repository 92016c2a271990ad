"""Strategies the fuzz files share: hostile text, any JSON value `json.loads` can return,
byte mutations, and the one property every parser must keep."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from mlxlite.errors import MlxliteError

SCALE = float(os.environ.get("MLXLITE_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    """max_examples for one property: `n` on a normal run, times MLXLITE_FUZZ_SCALE."""
    return max(1, int(n * SCALE))


def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` nine times in ten, else `hostile`: inputs get past their first bad field often
    enough to reach the deeper checks (st.one_of would weigh repeated branches as one)."""
    return st.integers(0, 9).flatmap(lambda i: hostile if i == 9 else valid)


def typed_or_value(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """(True, result) or (False, the MlxliteError): any other exception fails the test."""
    try:
        result = fn(*args, **kwargs)
    except MlxliteError as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        outcome(f"refused: {type(exc).__name__}")
        return False, exc
    outcome("accepted")
    return True, result


def outcome(label: str) -> None:
    """Count an outcome in hypothesis' statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(label)


# ---- text --------------------------------------------------------------------------
TRICKY = ["", " ", "\t", "\n", "\r", "\r\n", "\x00", "\x7f", ".", "..", "/", "\\", ":", "@", "#", '"', '"""',
          "{{", "}}", "{%", "%}", "\ud800", "\udfff", "\ufeff", "\u2028", "\x85", "\xa0", "é", "😀",
          "sha256:", "json", "../", "a" * 300]

surrogates = st.characters(categories=["Cs"])


def texts(max_size: int = 24) -> st.SearchStrategy[str]:
    """Unicode text, ASCII text, and joins of tricky pieces (lone surrogates included:
    `json.loads('"\\ud800"')` returns one)."""
    return st.one_of(
        st.text(max_size=max_size),
        st.text(st.characters(codec="ascii"), max_size=max_size),
        st.lists(st.sampled_from(TRICKY) | surrogates | st.characters(), max_size=6).map("".join),
    )


# ---- JSON values -------------------------------------------------------------------
BIG_INTS = [0, 1, -1, 2, 20, 21, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**20, 10**308, 10**400,
            -(10**400)]
# json.loads turns 1e400 into inf (NaN and Infinity literals are refused by the daemon).
FLOATS = st.floats(allow_nan=False)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.sampled_from(BIG_INTS), FLOATS, texts(),
)


def json_values(keys: st.SearchStrategy[str] | None = None, max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any value `json.loads` can produce, nested; `keys` biases object keys (field names)."""
    key = texts(12) if keys is None else st.one_of(keys, texts(12))
    return st.recursive(
        json_scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key, inner, max_size=5),
        max_leaves=max_leaves,
    )


def deep(depth: int, leaf: Any = None, kind: str = "list", key: str = "a") -> Any:
    """A value nested `depth` levels (json.loads in a server thread goes ~990 deep)."""
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {key: value}
    return value


DEEP = 990


# ---- bytes -------------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_ops: int = 4, fields: list[tuple[int, int]] | None = None) -> bytes:
    """`data` with a few edits: flip, overwrite, insert, delete, truncate, or (given
    `fields`: (offset, width) of length/count fields) a hostile integer in a field."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        ops = ["flip", "set", "insert", "delete", "truncate"] + (["field"] * 3 if fields else [])
        op = draw(st.sampled_from(ops))
        at = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[at] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[at:]
        elif op == "field" and fields:
            offset, width = draw(st.sampled_from(fields))
            top = (1 << (8 * width)) - 1
            value = draw(st.sampled_from([0, 1, 7, 255, 1 << 20, (1 << 28), (1 << 28) + 1, 1 << 31,
                                          top >> 1, top, top - 1]) | st.integers(0, top))
            if offset + width <= len(buf):
                buf[offset:offset + width] = value.to_bytes(width, "little")
    return bytes(buf)
