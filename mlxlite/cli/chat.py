"""`mlxlite run`: one-shot prompts, piped stdin, and the interactive chat.

Contract: a `Backend` streams a chat turn as text pieces and returns Ollama-style
stats; `LocalBackend` runs the model in this process through `engine/runner.py` (imported
lazily), `DaemonBackend` goes through a running daemon's `/api/chat` (showing the thinking
the daemon splits off inside its `<think>` tags, as the model wrote it). The REPL keeps
the history, understands `/bye`, `/clear`, `/set parameter K V`, `/set system ...`,
`/show`, `/?`; Ctrl-C stops the current answer, Ctrl-D quits.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlxlite import options as opts
from mlxlite.errors import BadRequest, ModelNotFound
from mlxlite.formats.templates import assemble
from mlxlite.remote import catalog
from mlxlite.store import Store


@dataclass
class TurnStats:
    total: float = 0.0
    load: float = 0.0
    prompt_tokens: int = 0
    prompt_eval_tokens: int = 0
    prompt_seconds: float = 0.0
    eval_tokens: int = 0
    eval_seconds: float = 0.0
    done_reason: str = "stop"

    def render(self) -> str:
        def rate(n: int, s: float) -> str:
            return f"{n / s:.2f} tokens/s" if s > 0 else "n/a"

        return "\n".join([
            f"total duration:       {self.total:.3f}s",
            f"load duration:        {self.load:.3f}s",
            f"prompt eval count:    {self.prompt_eval_tokens} token(s)"
            + (f" ({self.prompt_tokens - self.prompt_eval_tokens} cached)"
               if self.prompt_tokens > self.prompt_eval_tokens else ""),
            f"prompt eval duration: {self.prompt_seconds:.3f}s",
            f"prompt eval rate:     {rate(self.prompt_eval_tokens, self.prompt_seconds)}",
            f"eval count:           {self.eval_tokens} token(s)",
            f"eval duration:        {self.eval_seconds:.3f}s",
            f"eval rate:            {rate(self.eval_tokens, self.eval_seconds)}",
        ])


class Backend(Protocol):
    def chat(self, messages: list[dict], overrides: dict, fmt: Any, cancel: threading.Event,
             stats: TurnStats) -> Iterator[str]: ...


def resolve_or_fetch(store, name: str, say: Callable[[str], None]):
    """The store entry for `name`; catalog names are fetched on first use."""
    try:
        return store.resolve(name)
    except ModelNotFound:
        if catalog.lookup(name) is None:
            raise ModelNotFound(
                f"model '{name}' not found; pull it with `mlxlite pull {name}` or import a file with "
                "`mlxlite import PATH --name NAME`") from None
    say(f"pulling {name} from the built-in catalog")
    return catalog.install(store, name, say)


@dataclass
class LocalBackend:
    """Runs the model in this process; loads it once per session."""

    name: str
    say: Callable[[str], None]
    loaded: Any = None
    load_seconds: float = 0.0
    _loaded_once: bool = field(default=False, repr=False)

    def load(self) -> None:
        from mlxlite.engine import runner  # lazy: mlx loads only after blas.preload()

        start = time.perf_counter()
        store = Store()
        entry = resolve_or_fetch(store, self.name, self.say)
        self.loaded = runner.load(store, entry)
        self.load_seconds = time.perf_counter() - start

    def chat(self, messages: list[dict], overrides: dict, fmt: Any, cancel: threading.Event,
             stats: TurnStats) -> Iterator[str]:
        from mlxlite.engine import runner  # lazy: mlx loads only after blas.preload()

        start = time.perf_counter()
        if self.loaded is None:
            self.load()
            stats.load = self.load_seconds
        loaded = self.loaded
        options = loaded.defaults.merged(overrides)
        full = assemble(messages, loaded.system, loaded.messages)
        prompt = loaded.template.render(full, add_generation_prompt=True)
        tokens = runner.tokenize(loaded, prompt, add_special=loaded.template.add_special)
        constraint = None
        if fmt is not None:
            from mlxlite.constrain import TokenConstraint  # lazy: numpy, for --format only

            constraint = TokenConstraint(fmt, runner.token_bytes(loaded), loaded.eos_token_ids)
        for item in runner.generate(loaded, tokens, options, cancel, constraint=constraint, logprobs=False):
            if isinstance(item, runner.Piece):
                if item.text:
                    yield item.text
            else:
                if item.text_tail:
                    yield item.text_tail
                stats.prompt_tokens = item.prompt_tokens
                stats.prompt_eval_tokens = item.prompt_eval_tokens
                stats.prompt_seconds = item.prompt_seconds
                stats.eval_tokens = item.eval_tokens
                stats.eval_seconds = item.eval_seconds
                stats.done_reason = item.reason
        stats.total = time.perf_counter() - start + stats.load


@dataclass
class DaemonBackend:
    """Streams `/api/chat` from a running daemon."""

    name: str
    client: Any

    def chat(self, messages: list[dict], overrides: dict, fmt: Any, cancel: threading.Event,
             stats: TurnStats) -> Iterator[str]:
        body: dict[str, Any] = {"model": self.name, "messages": messages, "stream": True}
        if overrides:
            body["options"] = overrides
        if fmt is not None:
            body["format"] = fmt
        thinking = False        # the daemon splits thinking off; shown in its tags, as in-process
        for chunk in self.client.stream("POST", "/api/chat", body):
            if cancel.is_set():
                break
            if chunk.get("error"):
                raise BadRequest(chunk["error"])
            message = chunk.get("message") or {}
            if message.get("thinking"):
                yield ("" if thinking else "<think>\n") + message["thinking"]
                thinking = True
            text = message.get("content") or ""
            if thinking and (text or chunk.get("done")):
                yield "\n</think>\n\n" if text else "\n</think>"
                thinking = False
            if text:
                yield text
            if chunk.get("done"):
                ns = 1e-9
                stats.total = chunk.get("total_duration", 0) * ns
                stats.load = chunk.get("load_duration", 0) * ns
                stats.prompt_tokens = chunk.get("prompt_eval_count", 0)     # the whole prompt
                stats.prompt_eval_tokens = stats.prompt_tokens - chunk.get("prompt_cached_count", 0)
                stats.prompt_seconds = chunk.get("prompt_eval_duration", 0) * ns
                stats.eval_tokens = chunk.get("eval_count", 0)
                stats.eval_seconds = chunk.get("eval_duration", 0) * ns
                stats.done_reason = chunk.get("done_reason", "stop")


def stream_turn(backend: Backend, messages: list[dict], overrides: dict, fmt: Any,
                out=None) -> tuple[str, TurnStats]:
    """One answer written to `out` as it arrives; Ctrl-C stops it (the text so far is kept)."""
    out = out or sys.stdout  # looked up per call: a default bound at import outlives redirections
    cancel = threading.Event()
    stats = TurnStats()
    pieces: list[str] = []
    stream = backend.chat(messages, overrides, fmt, cancel, stats)
    try:
        for piece in stream:
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        cancel.set()
        stats.done_reason = "cancel"
        close = getattr(stream, "close", None)
        if close:
            close()
    return "".join(pieces), stats


HELP = """Available commands:
  /set parameter NAME VALUE   set a generation option (e.g. /set parameter temperature 0)
  /set system TEXT            set the system prompt
  /show                       show the current options and system prompt
  /clear                      forget the conversation
  /bye                        exit (or Ctrl-D)
  /?                          this help
Ctrl-C stops the current answer. End a line with \\ to continue on the next one."""


def interactive(backend: Backend, overrides: dict, system: str | None, fmt: Any, verbose: bool,
                read: Callable[[str], str] = input, out=None) -> int:
    """The REPL. `read` raises EOFError on Ctrl-D."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    history: list[dict] = []
    out.write("Send a message (/? for help)\n")
    while True:
        try:
            line = read(">>> ")
            while line.endswith("\\"):
                line = line[:-1] + "\n" + read("... ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            words = text.split(None, 3)
            cmd = words[0].lower()
            if cmd in ("/bye", "/exit", "/quit"):
                return 0
            if cmd == "/clear":
                history.clear()
                out.write("Cleared session context\n")
            elif cmd in ("/?", "/help"):
                out.write(HELP + "\n")
            elif cmd == "/show":
                out.write(json.dumps({"options": overrides, "system": system}, indent=2) + "\n")
            elif cmd == "/set" and len(words) >= 3 and words[1] == "system":
                system = text.split(None, 2)[2]
                out.write("Set system message.\n")
            elif cmd == "/set" and len(words) == 4 and words[1] == "parameter":
                try:
                    value = opts.coerce(words[2], words[3], from_text=True)
                except BadRequest as exc:
                    out.write(f"error: {exc}\n")
                    continue
                overrides[words[2]] = list(value) if isinstance(value, tuple) else value
                out.write(f"Set parameter '{words[2]}' to '{words[3]}'\n")
            else:
                out.write(f"Unknown command '{text}'. Type /? for help\n")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        answer, stats = stream_turn(backend, messages, overrides, fmt, out)
        out.write("\n\n")
        if verbose:
            out.write(stats.render() + "\n\n")
        history.append({"role": "assistant", "content": answer})
