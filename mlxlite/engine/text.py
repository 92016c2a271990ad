"""Token ids -> bytes -> text for streaming, and stop strings on a text stream.

Engine-internal (`runner.py` re-exports it for per-sequence use through the engine).
Pure: no mlx. Contract:
  - `token_table(tokenizer, special_ids, size)`: the raw bytes of every token id of a
    `tokenizers.Tokenizer`: byte-level BPE tokens through GPT-2's byte alphabet, SPM
    tokens with `<0xNN>` byte fallback and `▁` -> space; special/control tokens and ids
    past the vocabulary are b"" (they never print and never match text).
  - `TextStream(table)`: `add(token) -> str` returns the text that became complete with
    this token (partial UTF-8 is held back), `flush()` at the end drops a character whose
    bytes never completed (num_predict cut it), so whole and streamed text agree, and
    neither ends in U+FFFD. Invalid bytes inside the text still decode to U+FFFD.
  - `StopMatcher(stops)`: `feed(text) -> (emit, stopped)`; the stop string and anything
    after it are never emitted; text that may begin a stop string is held back until it
    cannot; `flush()` returns what was held when generation ends another way; `matched`
    is the stop string that was found ("" until one is).
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

from mlxlite.formats.gguf import bytes_to_unicode

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")


def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tok: Any, vocab: dict[str, int]) -> bool:
    try:
        decoder = json.loads(tok.to_str()).get("decoder") or {}
    except Exception:
        decoder = {}

    def types(d: Any) -> set[str]:
        if not isinstance(d, dict):
            return set()
        found = {d.get("type", "")}
        for sub in d.get("decoders") or []:
            found |= types(sub)
        return found

    kinds = types(decoder)
    if "ByteLevel" in kinds:
        return True
    if kinds & {"Metaspace", "ByteFallback", "Replace"}:
        return False
    return "Ġ" in vocab or "Ċ" in vocab  # no decoder: guess from the alphabet


def token_table(tok: Any, special_ids: frozenset[int] | set[int] = frozenset(), size: int | None = None) -> list[bytes]:
    """Raw bytes of every token id (see module doc)."""
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    specials = set(special_ids)
    try:
        specials |= {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    except AttributeError:
        pass
    n = max(size or 0, (max(vocab.values()) + 1) if vocab else 0)
    table = [b""] * n
    if _is_byte_level(tok, vocab):
        dec = _byte_decoder()
        for text, i in vocab.items():
            if i in specials:
                continue
            if all(c in dec for c in text):
                table[i] = bytes(dec[c] for c in text)
            else:  # an added token written as plain text
                table[i] = text.encode("utf-8")
    else:
        for text, i in vocab.items():
            if i in specials:
                continue
            m = _BYTE_TOKEN.match(text)
            table[i] = bytes([int(m.group(1), 16)]) if m else text.replace("▁", " ").encode("utf-8")
    return table


class TextStream:
    """Incremental detokenizer over a token byte table (one per sequence)."""

    __slots__ = ("_table", "_decoder")

    def __init__(self, table: list[bytes]) -> None:
        self._table = table
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token: int) -> str:
        data = self._table[token] if 0 <= token < len(self._table) else b""
        return self._decoder.decode(data) if data else ""

    def flush(self) -> str:
        # The decoder holds only the bytes of a character that may still complete; at the
        # end it never will: drop them rather than emit a U+FFFD the stream never showed.
        self._decoder.reset()
        return ""


class StopMatcher:
    """Stop strings over a text stream (one per sequence)."""

    __slots__ = ("stops", "_held", "stopped", "matched")

    def __init__(self, stops: tuple[str, ...] | list[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched = ""              # the stop string that was found

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        if self.stopped:
            return "", True
        buf = self._held + text
        hit = -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (hit < 0 or i < hit):
                hit, self.matched = i, s
        if hit >= 0:
            self._held = ""
            self.stopped = True
            return buf[:hit], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out
