"""Tool calls parsed out of generated text, for templates that support tools.

Contract: `ToolCallParser(tool_names).feed(text) -> str` returns the text that is safe to
show now; text that may be the start of a tool call is held back until it is clearly
not one. `finish() -> (text, calls)` parses what was held: calls are Ollama-shaped
`{"function": {"index", "name", "arguments": {...}}}`; text that is not a valid call is
returned as plain text, never dropped. Formats recognised (the common open models):
`<tool_call>{json}</tool_call>` (Qwen, Hermes, SmolLM), `[TOOL_CALLS][...]` (Mistral),
`<|python_tag|>{json}` (Llama 3.1), and a bare JSON object/array of
`{"name", "arguments"|"parameters"}` (Llama 3.2 and others), optionally in a ```json fence.
Pure; no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any

OPENERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```json", "```", "{", "[")
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)


def _as_calls(value: Any, names: frozenset[str] | None) -> list[dict] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        if isinstance(item.get("function"), dict):      # OpenAI-shaped
            item = item["function"]
        name = item.get("name")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                return None
        if not isinstance(name, str) or not isinstance(args, dict):
            return None
        if names and name not in names:
            return None
        calls.append({"function": {"index": len(calls), "name": name, "arguments": args}})
    return calls or None


def _loads(text: str) -> Any:
    text = text.strip()
    if text.startswith("```"):
        text = re.sub(r"\A```(?:json)?\s*|\s*```\Z", "", text)
    try:
        return json.loads(text)
    except ValueError:
        pass
    # Several JSON values one after another (one call per line, say).
    decoder, pos, out = json.JSONDecoder(), 0, []
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n;,":
            pos += 1
        if pos >= len(text):
            break
        value, pos = decoder.raw_decode(text, pos)
        out.extend(value if isinstance(value, list) else [value])
    return out


def parse(text: str, names: frozenset[str] | None = None) -> tuple[str, list[dict]]:
    """(plain text, calls) from a whole generated text."""
    stripped = text.strip()
    try:
        if "<tool_call>" in stripped:
            before = stripped[:stripped.index("<tool_call>")]
            values = []
            for block in _BLOCK.findall(stripped):
                value = _loads(block)
                values.extend(value if isinstance(value, list) else [value])
            calls = _as_calls(values, names)
            if calls:
                return before.strip(), calls
        for tag in ("[TOOL_CALLS]", "<|python_tag|>"):
            if stripped.startswith(tag):
                calls = _as_calls(_loads(stripped[len(tag):]), names)
                if calls:
                    return "", calls
        if stripped[:1] in "{[`":
            calls = _as_calls(_loads(stripped), names)
            if calls:
                return "", calls
    except (ValueError, RecursionError):
        pass
    return text, []


class ToolCallParser:
    """Streams text through, holding back what may be a tool call."""

    def __init__(self, tool_names: list[str] | tuple[str, ...] | None = None) -> None:
        self.names = frozenset(tool_names) if tool_names else None
        self.buffer = ""
        self.holding = True      # undecided until the first non-space text shows the shape
        self.capturing = False   # a call has started: hold everything to the end

    def feed(self, text: str) -> str:
        if self.capturing:
            self.buffer += text
            return ""
        self.buffer += text
        if self.holding:
            head = self.buffer.lstrip()
            if not head:
                return ""
            if any(head.startswith(o) for o in OPENERS):
                self.capturing = True
                return ""
            if any(o.startswith(head) for o in OPENERS):
                return ""        # could still become an opener
            self.holding = False
        # Plain text so far; a <tool_call> block may still start later in it.
        idx = self.buffer.find("<tool_call>")
        if idx >= 0:
            out, self.buffer = self.buffer[:idx], self.buffer[idx:]
            self.capturing = True
            return out
        # Hold a suffix that could be the start of "<tool_call>".
        for k in range(min(len("<tool_call>") - 1, len(self.buffer)), 0, -1):
            if "<tool_call>".startswith(self.buffer[-k:]):
                out, self.buffer = self.buffer[:-k], self.buffer[-k:]
                return out
        out, self.buffer = self.buffer, ""
        return out

    def finish(self) -> tuple[str, list[dict]]:
        text, self.buffer = self.buffer, ""
        if not self.capturing:
            return text, []
        return parse(text, self.names)
