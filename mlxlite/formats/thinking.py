"""Reasoning ("thinking") split out of generated text, for models that think in tags.

Contract: `ThinkingParser(opening="<think>", closing="</think>", thinking=False)`;
`feed(text) -> [(kind, text), ...]` with kind "thinking" or "content", in output order,
holding back only what may still be part of a tag; `finish()` returns what was held (an
unclosed thinking section stays thinking). Nothing is dropped but the two tags and the
whitespace right after each. A thinking section is recognised only at the start of the
output (after whitespace), where DeepSeek-R1, Qwen3 and their kin write it; text that
does not start with the tag passes through unchanged. `thinking=True` starts inside a
section, for templates whose generation prompt already opened the tag. `split(text)` does
a whole text at once. `supported_by(template_source)`: whether a chat template knows
about thinking (reads `enable_thinking` or `.Think`, or writes the tags), which decides
whether a request may ask for it. Pure; no I/O, never imports anything above the ground floor.
"""

from __future__ import annotations

OPENING, CLOSING = "<think>", "</think>"


def supported_by(source: str | None) -> bool:
    """Whether a chat template supports thinking: Qwen3 and SmolLM3 read `enable_thinking`,
    DeepSeek-R1 and its distills write or strip the tags, Ollama's templates read `.Think`."""
    text = source or ""
    return "enable_thinking" in text or OPENING in text or CLOSING in text or ".Think" in text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkingParser:
    """Streams text through, splitting a leading thinking section from the content."""

    def __init__(self, opening: str = OPENING, closing: str = CLOSING, thinking: bool = False) -> None:
        self.opening, self.closing = opening, closing
        self.state = "thinking" if thinking else "start"    # start -> thinking -> content
        self.trim = thinking        # drop whitespace at the start of the section just entered
        self.buffer = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(self.opening):
                    self.buffer = head[len(self.opening):]
                    self.state, self.trim = "thinking", True
                    continue
                if not head or self.opening.startswith(head):
                    return out          # may still become the opening tag
                self.state = "content"  # not a thinking model's output: pass it through as is
            if self.trim:
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return out
                self.trim = False
            if self.state == "content":
                if self.buffer:
                    out.append(("content", self.buffer))
                    self.buffer = ""
                return out
            end = self.buffer.find(self.closing)
            if end >= 0:
                if end:
                    out.append(("thinking", self.buffer[:end]))
                self.buffer = self.buffer[end + len(self.closing):]
                self.state, self.trim = "content", True
                continue
            keep = _partial_suffix(self.buffer, self.closing)
            emit, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
            if emit:
                out.append(("thinking", emit))
            return out

    def finish(self) -> list[tuple[str, str]]:
        text, self.buffer = self.buffer, ""
        if self.trim:
            text = text.lstrip()
        if not text:
            return []
        return [("thinking" if self.state == "thinking" else "content", text)]


def split(text: str, *, opening: str = OPENING, closing: str = CLOSING, thinking: bool = False) -> tuple[str, str]:
    """(thinking, content) of a whole generated text."""
    parser = ThinkingParser(opening, closing, thinking)
    parts = parser.feed(text) + parser.finish()
    return ("".join(t for kind, t in parts if kind == "thinking"),
            "".join(t for kind, t in parts if kind == "content"))
