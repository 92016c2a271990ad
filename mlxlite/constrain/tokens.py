"""Constrained decoding: which tokens keep the output a prefix of a document `format` accepts.

Pure Python + numpy (no mlx). The runner builds
`TokenConstraint(spec, token_bytes, eos_ids)` per request, where spec is Ollama's
`format` ("json" = any JSON object, or a JSON-Schema dict; the supported subset and the
deliberate narrowings, e.g. additionalProperties false by default when properties are
listed, are documented in `schema.py`). Before each token it asks
`allowed_mask()` (numpy bool [vocab]: True where the token's bytes keep the output a
valid prefix of some accepted document; EOS only once the document is complete); after
sampling it calls `advance(token_id)` (BadRequest if that token was not allowed).
`is_complete()` says the bytes so far are a whole document; `text()` returns them.

How: `recognizer.py` is a byte-level pushdown recognizer with hashable, persistent
states (output shape rules: whitespace and number caps, are documented there). A mask
is a walk of a byte trie of the vocabulary, stepping the state one byte per trie
edge and pruning dead branches. Inside a free string almost every token is allowed, so
there the ~all "plain" tokens (no quote, backslash or control byte) are taken from
precomputed per-UTF-8-state tables and only the few others are walked. Per-stack walk
results are cached (LRU) per (vocabulary, schema), and vocabularies and compiled
schemas are cached too, so a repeated request costs little.

Tokens with empty bytes (special tokens) are never allowed; EOS only when complete. A
number at the top level is complete after its first digit and may go on (the runner's
"only EOS once complete" rule ends it there: still valid). Should no token fit (a
vocabulary that cannot spell some byte), the mask is all False and the runner ends the
answer.
"""

from __future__ import annotations

import bisect
import copy
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mlxlite.constrain import recognizer as cj
from mlxlite.constrain import schema as cs
from mlxlite.constrain.recognizer import BYTE, F_KEY, F_STR, INF, U8_NEED, U8_NEXT
from mlxlite.constrain.schema import compile_spec, validate  # noqa: F401  (validate re-exported)
from mlxlite.errors import BadRequest


class _Trie:
    """A byte trie over sorted token strings, expanded lazily: a node's children are made
    the first time a walk reaches it, so the ~300k nodes of a 49k vocabulary are never all
    built (structural states prune after a byte or two; strings use the plain tables).
    A node is [children or None, ids ending here, lo, hi, depth] over `keys[lo:hi]`."""

    def __init__(self, items: list[tuple[bytes, int]]) -> None:
        items.sort()
        self.keys = [k for k, _ in items]
        self.ids = [i for _, i in items]
        self.root: list = [None, (), 0, len(items), 0]

    def expand(self, node: list) -> dict:
        keys, ids = self.keys, self.ids
        lo, hi, d = node[2], node[3], node[4]
        children: dict[int, list] = {}
        i = lo
        while i < hi:
            c = keys[i][d]
            j = hi if c == 255 else bisect.bisect_left(keys, keys[i][:d] + BYTE[c + 1], i, hi)
            k = i
            while k < j and len(keys[k]) == d + 1:
                k += 1
            children[c] = [None if k < j else {}, tuple(ids[i:k]), k, j, d + 1]
            i = j
        node[0] = children  # a race builds the same dict twice: harmless
        return children


_SPECIAL = re.compile(rb'["\\\x00-\x1f]')
_CONT = bytes(range(0x80, 0xC0))


class _Vocab:
    """Byte tries of a vocabulary plus the tables of the plain-token shortcut."""

    def __init__(self, token_bytes: Sequence[bytes], eos: frozenset[int]) -> None:
        self.tokens = list(token_bytes)
        n = self.n = len(self.tokens)
        self.eos = np.array(sorted(i for i in eos if 0 <= i < n), dtype=np.int64)
        self.plain_ok = np.zeros((8, n), dtype=bool)  # plain token valid from UTF-8 state u
        self.chars = np.zeros(n, dtype=np.int64)  # characters a plain token adds to a string
        full, special = [], []
        for i, t in enumerate(self.tokens):
            if not t or i in eos:
                continue
            full.append((t, i))
            if _SPECIAL.search(t):  # a quote, backslash or control byte: walked, never shortcut
                special.append((t, i))
                continue
            self.chars[i] = len(t.translate(None, _CONT))
            lead = len(t) - len(t.lstrip(_CONT))
            rest_ok = _utf8_prefix_ok(t[lead:])
            self.plain_ok[0, i] = lead == 0 and rest_ok
            if lead:
                for u, (lo, hi, _) in U8_NEXT.items():
                    need = U8_NEED[u]
                    self.plain_ok[u, i] = lo <= t[0] <= hi and (
                        (lead == len(t) and lead <= need) or (lead == need and rest_ok))
        self.full = _Trie(full)
        self.special = _Trie(special)
        self.lock = threading.Lock()
        self.grammars: OrderedDict[str, _Grammar] = OrderedDict()


def _utf8_prefix_ok(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"
    return True


def _walk(trie: _Trie, state: tuple) -> list[int]:
    """Token ids of `trie` whose bytes the recognizer accepts from `state`."""
    found: list[int] = []
    todo = [(trie.root, state)]
    while todo:
        node, st = todo.pop()
        children = node[0]
        if children is None:
            children = trie.expand(node)
        for b, child in children.items():
            nxt = cj.advance(st, b)
            if nxt:
                if child[1]:
                    found.extend(child[1])
                if child[2] < child[3]:
                    todo.append((child, nxt))
    return found


class _Grammar:
    """A compiled spec bound to one vocabulary, with its per-stack mask cache."""

    MAX_CACHED = 2048  # entries are at most vocab/8 bytes each (~6 KB for 49k tokens)

    def __init__(self, root: cs.Node, vocab: _Vocab) -> None:
        self.root = root
        self.vocab = vocab
        self.cache: OrderedDict[tuple, tuple[tuple[int, int] | None, np.ndarray]] = OrderedDict()

    def stack_part(self, stack: tuple) -> tuple[tuple[int, int] | None, np.ndarray]:
        """(plain-token shortcut (u8 state, chars left) or None, walked tokens: int32 ids, or
        a packed uint8 bitmap when there are many) of one stack."""
        lock = self.vocab.lock
        with lock:
            hit = self.cache.get(stack)
            if hit is not None:
                self.cache.move_to_end(stack)
                return hit
        frame = stack[0]
        fast = None
        if frame[0] == F_STR and not frame[4] and frame[5] is None:
            node = frame[1]
            fast = (frame[3], node.max - frame[2] if node.max < INF else INF)
        elif frame[0] == F_KEY and not frame[4] and frame[1].additional is not None:
            fast = (frame[3], INF)
        trie = self.vocab.special if fast else self.vocab.full
        ids = np.array(_walk(trie, (stack,)), dtype=np.int32)
        if len(ids) * 32 > self.vocab.n:  # many tokens (a permissive pattern): keep a bitmap instead
            bits = np.zeros(self.vocab.n, dtype=bool)
            bits[ids] = True
            ids = np.packbits(bits)
        part = (fast, ids)
        with lock:
            self.cache[stack] = part
            if len(self.cache) > self.MAX_CACHED:
                self.cache.popitem(last=False)
        return part


_VOCABS: OrderedDict[tuple, _Vocab] = OrderedDict()
_VOCABS_LOCK = threading.Lock()


def _vocab_for(token_bytes: Sequence[bytes], eos: frozenset[int]) -> _Vocab:
    key = (tuple(token_bytes), eos)
    with _VOCABS_LOCK:
        v = _VOCABS.get(key)
        if v is not None:
            _VOCABS.move_to_end(key)
            return v
    v = _Vocab(key[0], eos)
    with _VOCABS_LOCK:
        _VOCABS[key] = v
        while len(_VOCABS) > 4:
            _VOCABS.popitem(last=False)
    return v


def _spec_key(spec: Any) -> str:
    try:
        return spec if spec == "json" else json.dumps(spec, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"format is not valid JSON: {e}") from None


class TokenConstraint:
    """Token-level JSON / JSON-Schema constraint for one generation (see module doc)."""

    def __init__(self, spec: Any, token_bytes: Sequence[bytes], eos_ids: Iterable[int]) -> None:
        eos = frozenset(int(i) for i in eos_ids)
        self.spec = spec    # what it was built from (a distributed group rebuilds it on every rank)
        self._vocab = _vocab_for(token_bytes, eos)
        key = _spec_key(spec)
        with self._vocab.lock:
            g = self._vocab.grammars.get(key)
        if g is None:
            g = _Grammar(compile_spec(spec), self._vocab)
            with self._vocab.lock:
                self._vocab.grammars[key] = g
                while len(self._vocab.grammars) > 16:
                    self._vocab.grammars.popitem(last=False)
        self._g = g
        self._eos = eos
        self._state: tuple = cj.start(g.root)
        self._out = bytearray()
        self._ended = False

    def allowed_mask(self) -> np.ndarray:
        """Bool array over the vocabulary: True for tokens that may come next."""
        v = self._vocab
        mask = np.zeros(v.n, dtype=bool)
        if not self._ended:
            for stack in self._state:
                fast, ids = self._g.stack_part(stack)
                if fast is not None:
                    u8, room = fast
                    mask |= v.plain_ok[u8] if room >= INF else v.plain_ok[u8] & (v.chars <= room)
                if ids.dtype == np.uint8:
                    mask |= np.unpackbits(ids, count=v.n).view(bool)
                else:
                    mask[ids] = True
        if self._ended or self.is_complete():
            mask[v.eos] = True
        return mask

    def advance(self, token_id: int) -> None:
        """Accept one sampled token; BadRequest if it was not allowed."""
        token_id = int(token_id)
        if self._ended:
            raise BadRequest("format constraint: token after the end of the document")
        if token_id in self._eos:
            if not self.is_complete():
                raise BadRequest("format constraint: end of sequence before the JSON document is complete")
            self._ended = True
            return
        if not 0 <= token_id < self._vocab.n or not self._vocab.tokens[token_id]:
            raise BadRequest(f"format constraint: token {token_id} is not allowed here")
        state = self._state
        for b in self._vocab.tokens[token_id]:
            state = cj.advance(state, b)
            if not state:
                raise BadRequest(f"format constraint: token {token_id} "
                                 f"{self._vocab.tokens[token_id]!r} is not allowed after {bytes(self._out[-40:])!r}")
        self._state = state
        self._out += self._vocab.tokens[token_id]

    def fork(self) -> TokenConstraint:
        """An independent copy at this point (speculative decoding walks a draft on it)."""
        twin = copy.copy(self)
        twin._out = bytearray(self._out)
        return twin

    def is_complete(self) -> bool:
        """True when the output so far is a whole document the format accepts."""
        return self._ended or cj.complete(self._state)

    def text(self) -> str:
        """The output accepted so far (a partial UTF-8 tail shows as U+FFFD)."""
        return self._out.decode("utf-8", errors="replace")

    def accepts(self, data: bytes) -> bool:
        """Whether `data` is a valid prefix from the current state (tests, diagnostics)."""
        state = self._state
        for b in data:
            state = cj.advance(state, b)
            if not state:
                return False
        return True


def recognize(spec: Any, data: bytes) -> str:
    """Classify bytes under a spec: "complete", "prefix" (valid, unfinished) or "reject"."""
    state = cj.start(compile_spec(spec))
    for b in data:
        state = cj.advance(state, b)
        if not state:
            return "reject"
    return "complete" if cj.complete(state) else "prefix"
