"""gpt-oss's harmony format in generated text: its channels split into thinking, content and
tool calls, as Ollama's harmony parser splits them.

A harmony reply is a run of messages `<|start|>ROLE[ to=RECIPIENT]<|channel|>CHANNEL
[<|constrain|>json]<|message|>BODY<|end|>`; the prompt ends in `<|start|>assistant`, so the
output begins inside a header. Routing, by header: `analysis` -> thinking; `commentary` or
`final` -> content; a recipient (`to=functions.NAME`, before or after the channel) on any
channel -> a tool call whose body is its JSON arguments (`<|call|>` ends it: an end-of-turn
token, so the engine stops there). `<|return|>` ends the turn.

Contract: `is_harmony(template_source)`; `TAGS`, the structural tokens an engine must print
(special tokens it would otherwise drop) for the parser to see them; `open_message(prompt)`,
the prompt's unfinished last message, which the output continues (`<|start|>assistant`, or a
prefilled `...<|channel|>final<|message|>partial answer`); `HarmonyParser(opened)` with
`feed(text) -> [(kind, text)]` (kind "thinking" or "content", in output order, holding back
only what may still be a tag) and `finish() -> ([(kind, text)], calls)`, calls Ollama-shaped
`{"function": {"index", "name", "arguments": {...}}}` (the `functions.` namespace dropped).
Unlike Ollama's, text outside any message is content, a reply that never wrote a header is
content, and a call whose arguments are not a JSON object comes back as content: nothing
generated is dropped but the markup (a header cut off by the end of generation is markup). Pure; no I/O, never imports
anything above the ground floor.
"""

from __future__ import annotations

import json
import re

START, END, MESSAGE, CHANNEL, CONSTRAIN = "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>"
RETURN, CALL = "<|return|>", "<|call|>"
TAGS = (START, END, MESSAGE, CHANNEL, CONSTRAIN)
_ENDS = (END, RETURN, CALL)


def is_harmony(source: str | None) -> bool:
    """Whether a chat template writes harmony's messages (gpt-oss's, Ollama's or jinja)."""
    text = source or ""
    return CHANNEL in text and MESSAGE in text and START in text


def open_message(prompt: str) -> str:
    """The prompt's last message if it is unfinished (what the output continues), else ""."""
    at = prompt.rfind(START)
    if at < 0:
        return ""
    tail = prompt[at:]
    return "" if any(tag in tail for tag in _ENDS) else tail


def _held(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


def parse_header(raw: str) -> tuple[str, str, str]:
    """(role, channel, recipient) of a message header such as `assistant to=functions.f
    <|channel|>commentary <|constrain|>json` or `assistant<|channel|>final`."""
    raw = raw.replace(CONSTRAIN, " " + CONSTRAIN)
    channel = ""
    if CHANNEL in raw:
        before, _, after = raw.partition(CHANNEL)
        match = re.match(r"\S*", after)
        channel = match.group(0) if match else ""
        raw = before + " " + after[len(channel):]
    words = raw.split()
    role = words[0] if words else ""
    recipient = ""
    if role.startswith("to="):
        role, recipient = "tool", role[3:]
    for word in words[1:]:
        if not recipient and word.startswith("to="):
            recipient = word[3:]
    return role, channel, recipient


class HarmonyParser:
    """Streams a harmony reply into thinking and content, collecting its tool calls."""

    def __init__(self, opened: str = START + "assistant") -> None:
        self.state = "outside"      # outside -> header -> body -> outside ...
        self.buffer = ""
        self.route = "content"      # the open message's body: "thinking", "content" or "tool"
        self.recipient = ""
        self.arguments = ""
        self.calls: list[dict] = []
        self.content_seen = False   # any content out yet (the thinking before it is counted)
        self.thought = False        # any thinking out yet
        self.feed(opened)           # the prompt's own part of the message: its text is not output
        # Of the prompt's part, what is still buffered (its unfinished header); -1 once the
        # output opened a message of its own (a header cut off there is markup).
        self.opened = len(self.buffer) if self.state == "header" else -1

    @property
    def thinking(self) -> bool:
        """Inside an analysis message before any content (thinking tokens are counted)."""
        return not self.content_seen

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "outside":
                at = self.buffer.find(START)
                stray = self.buffer if at < 0 else self.buffer[:at]
                keep = _held(stray, (START,)) if at < 0 else 0
                self._body(out, stray[:len(stray) - keep], route="content")
                if at < 0:
                    self.buffer = self.buffer[len(self.buffer) - keep:] if keep else ""
                    return out
                self.buffer, self.state, self.opened = self.buffer[at + len(START):], "header", -1
            elif self.state == "header":
                at = self.buffer.find(MESSAGE)
                if at < 0:
                    return out
                _, channel, self.recipient = parse_header(self.buffer[:at])
                self.buffer, self.state, self.arguments = self.buffer[at + len(MESSAGE):], "body", ""
                self.route = "tool" if self.recipient else "thinking" if channel == "analysis" else "content"
            else:
                ends = [(self.buffer.find(tag), tag) for tag in _ENDS if tag in self.buffer]
                if not ends:
                    keep = _held(self.buffer, _ENDS)
                    self._body(out, self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                at, tag = min(ends)
                self._body(out, self.buffer[:at])
                self.buffer, self.state = self.buffer[at + len(tag):], "outside"
                self._end_message(out)

    def _body(self, out: list[tuple[str, str]], text: str, route: str | None = None) -> None:
        if not text:
            return
        route = route or self.route
        if route == "tool":
            self.arguments += text
            return
        if route == "content":
            if self.state == "outside" and not text.strip():
                return      # whitespace between messages is not part of any answer
            self.content_seen = True
        else:
            self.thought = True
        if out and out[-1][0] == route:
            out[-1] = (route, out[-1][1] + text)
        else:
            out.append((route, text))

    def _end_message(self, out: list[tuple[str, str]]) -> None:
        if self.route == "tool":
            name = self.recipient.removeprefix("functions.")
            try:
                args = json.loads(self.arguments) if self.arguments.strip() else {}
            except ValueError:
                args = None
            if isinstance(args, dict):
                self.calls.append({"function": {"index": len(self.calls), "name": name, "arguments": args}})
            else:   # not a call after all: its text is the answer's, never dropped
                self._body(out, self.arguments, route="content")
        self.route, self.recipient, self.arguments = "content", "", ""

    def finish(self) -> tuple[list[tuple[str, str]], list[dict]]:
        out: list[tuple[str, str]] = []
        text, self.buffer = self.buffer, ""
        if self.state == "body":
            self._body(out, text)
            self._end_message(out)
        elif self.state == "outside":
            self._body(out, text, route="content")
        elif self.opened >= 0 and "<|" not in text[self.opened:] and not text[self.opened:].lstrip().startswith("to="):
            # never a header: a reply that ignored the format (or a constrained JSON one)
            self.state = "body"
            self._body(out, text[self.opened:].lstrip(), route="content")
        self.state = "outside"
        return out, self.calls
