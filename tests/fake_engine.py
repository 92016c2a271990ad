"""A fake runner with the real runner's functions, for exact scheduler and HTTP tests.

Byte-level "tokenizer" (token i < 256 is byte i; 256 = BOS, 257 = EOS); a chat template
that writes `<|role|>content` lines (`FakeEngine(thinking=True)`: one that supports
thinking, as Qwen3's does: `enable_thinking=False` closes an empty `<think></think>`
section in the generation prompt, `opens=True` opens one there, as DeepSeek-R1's does);
generation replies with a fixed text one byte per
step (or as told by `reply_for(prompt_text)`), honouring num_predict, stop strings and
the cancel event (checked between prefill chunks and before every step, like the real
runner). Gates let a test hold generation at a known point: `hold_after` tokens, the
generator waits on `resume` (still checking cancel). Counters say what ran and what is
still running, so tests can prove nothing is stuck. Never used as the only test of a
feature: the real runner has its own tests through the same server.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mlxlite.errors import BadRequest, MlxliteError
from mlxlite.options import Options
from mlxlite.results import Finish, Piece

BOS, EOS = 256, 257


class FakeTemplate:
    source = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %} tools"
    supports_tools = True

    def __init__(self, thinking: bool = False, opens: bool = False) -> None:
        self.supports_thinking = thinking
        self.opens = opens
        self.extras: list[dict] = []        # the extra variables of each render (enable_thinking, ...)

    def render(self, messages: list[dict], tools: list | None = None,
               add_generation_prompt: bool = True, **extra: Any) -> str:
        if extra and not self.supports_thinking:
            raise TypeError(f"unexpected template variables {sorted(extra)}")
        self.extras.append(extra)
        out = "".join(f"<|{m.get('role')}|>{m.get('content') or ''}\n" for m in messages)
        if tools:
            out = f"<|tools|>{len(tools)}\n" + out
        if not add_generation_prompt:
            return out
        out += "<|assistant|>"
        if extra.get("enable_thinking") is False:
            return out + "<think>\n\n</think>\n\n"
        return out + ("<think>\n" if self.opens else "")


@dataclass
class FakeLoaded:
    name: str
    digest: str
    model: Any = None
    tokenizer: Any = None
    template: Any = field(default_factory=FakeTemplate)
    eos_token_ids: frozenset = frozenset({EOS})
    context_length: int = 2048
    size_bytes: int = 1234
    info: dict = field(default_factory=lambda: {"format": "gguf", "architecture": "fake",
                                                "parameter_size": "1K", "quantization": "F32"})
    defaults: Options = field(default_factory=Options)
    system: str | None = None
    messages: list = field(default_factory=list)


class FakeEngine:
    """Drop-in for `mlxlite.engine.runner` (pass as `Scheduler(engine=FakeEngine())`)."""

    Piece = Piece
    Finish = Finish

    def __init__(self, reply: str = "Hello there, this is a fake reply.", *, step_delay: float = 0.0,
                 prefill_delay: float = 0.0, prefill_chunks: int = 1, load_delay: float = 0.0,
                 hold_after: int | None = None, fail_after: int | None = None, thinking: bool = False,
                 opens_thinking: bool = False) -> None:
        self.reply = reply
        self.template = FakeTemplate(thinking, opens_thinking)
        self.reply_for: Callable[[str], str] | None = None
        self.step_delay = step_delay
        self.prefill_delay = prefill_delay
        self.prefill_chunks = prefill_chunks
        self.load_delay = load_delay
        self.hold_after = hold_after
        self.fail_after = fail_after
        self.resume = threading.Event()
        self.lock = threading.Lock()
        self.active = 0                 # generators currently running
        self.in_prefill = 0
        self.started = 0
        self.finished: list[str] = []   # finish reasons, in order
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.prompts: list[str] = []
        self.options: list[Options] = []
        self.constraints: list[Any] = []
        self.threads: set[str] = set()  # names of the threads that called the engine

    def _touch(self) -> None:
        self.threads.add(threading.current_thread().name)

    def load(self, store: Any, entry: Any) -> FakeLoaded:
        self._touch()
        if self.load_delay:
            time.sleep(self.load_delay)
        self.loads.append(entry.name.display)
        return FakeLoaded(entry.name.display, entry.digest, template=self.template)

    def unload(self, loaded: FakeLoaded) -> None:
        self._touch()
        self.unloads.append(loaded.name)

    def tokenize(self, loaded: FakeLoaded, text: str, add_special: bool = True) -> list[int]:
        self._touch()
        return ([BOS] if add_special else []) + list(text.encode())

    def detokenize(self, loaded: FakeLoaded, tokens: list[int]) -> str:
        return bytes(t for t in tokens if t < 256).decode("utf-8", "replace")

    def token_bytes(self, loaded: FakeLoaded) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b"", b""]

    def embed(self, loaded: FakeLoaded, texts: list[str]) -> list[list[float]]:
        self._touch()
        out = []
        for text in texts:
            raw = hashlib.sha256(text.encode()).digest()[:8]
            vec = [b - 127.5 for b in raw]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            out.append([v / norm for v in vec])
        return out

    def generate(self, loaded: FakeLoaded, prompt_tokens: list[int], options: Options,
                 cancel: threading.Event | None = None, *, truncate: bool = False,
                 constraint: Any = None, top_logprobs: int = 0) -> Iterator[Piece | Finish]:
        self._touch()
        num_ctx = min(options.num_ctx or 2048, loaded.context_length)
        if len(prompt_tokens) >= num_ctx and not truncate:
            raise BadRequest(f"prompt is {len(prompt_tokens)} tokens, longer than the context window "
                             f"num_ctx={num_ctx}")
        prompt_text = self.detokenize(loaded, prompt_tokens)
        self.prompts.append(prompt_text)
        self.options.append(options)
        self.constraints.append(constraint)
        reply = self.reply_for(prompt_text) if self.reply_for else self.reply
        with self.lock:
            self.active += 1
            self.started += 1
        reason, made, text, matched = "stop", 0, "", ""
        t0 = time.perf_counter()
        try:
            with self.lock:
                self.in_prefill += 1
            try:
                for _ in range(self.prefill_chunks):
                    if cancel is not None and cancel.is_set():
                        reason = "cancel"
                        break
                    if self.prefill_delay:
                        time.sleep(self.prefill_delay / self.prefill_chunks)
            finally:
                with self.lock:
                    self.in_prefill -= 1
            t1 = time.perf_counter()
            data = reply.encode()
            i = 0
            while reason != "cancel":
                if cancel is not None and cancel.is_set():
                    reason = "cancel"
                    break
                if self.hold_after is not None and made == self.hold_after:
                    while not self.resume.wait(0.01):
                        if cancel is not None and cancel.is_set():
                            break
                    if cancel is not None and cancel.is_set():
                        reason = "cancel"
                        break
                if self.fail_after is not None and made == self.fail_after:
                    reason = "error"
                    raise MlxliteError("the fake engine failed on purpose")
                if options.num_predict >= 0 and made >= options.num_predict:
                    reason = "length"
                    break
                if i >= len(data):
                    reason = "stop"
                    break
                if self.step_delay:
                    time.sleep(self.step_delay)
                token = data[i]
                i += 1
                made += 1
                piece = chr(token)
                # Alternatives: the chosen byte at -0.1, then the next byte values at -3, -4, ...
                top = tuple((bytes([(token + j) % 256]), -0.1 if j == 0 else -2.0 - j) for j in range(top_logprobs))
                stop_hit = next((s for s in options.stop if s in text + piece), None)
                if stop_hit is not None:
                    full = text + piece
                    keep = full[:full.index(stop_hit)]
                    yield Piece(token, keep[len(text):], -0.1, bytes([token]), top)
                    reason, matched = "stop", stop_hit
                    break
                text += piece
                yield Piece(token, piece, -0.1, bytes([token]), top)
            eval_s = time.perf_counter() - t1
            yield Finish(reason, len(prompt_tokens), len(prompt_tokens), made, t1 - t0, eval_s, stop_string=matched)
        finally:
            with self.lock:
                self.active -= 1
                self.finished.append(reason)


# ---- helpers for tests that run a real server over the fake engine ----------------------
def add_fake_model(store: Any, name: str = "fake", **config_extra: Any) -> Any:
    """A tiny model entry in the store (its 'weights' are a few bytes the fake ignores)."""
    from mlxlite import names
    from mlxlite import store as st

    cfg = store.put_json({"format": "gguf", "architecture": "fake", "parameter_size": "1K",
                          "quantization": "F32", "context_length": 2048, **config_extra})
    data = f"weights of {name}".encode()
    digest = store.put_bytes(data)
    raw = st.build_manifest(cfg, [st.Layer(st.MEDIA_FILE, digest, len(data), {st.TITLE: "weights.bin"})])
    with store.writing():
        store.write_manifest(names.parse(name), raw)
    return store.resolve(name)


class RunningServer:
    """`make_server` on 127.0.0.1:0 served from a thread; `.url`, `.log_lines()`, `.close()`."""

    def __init__(self, engine: Any = None, store: Any = None, **kwargs: Any) -> None:
        import io

        from mlxlite.server import make_server
        from mlxlite.store import Store

        self.log = io.StringIO()
        self.store = store or Store()
        self.engine = engine
        self.server = make_server("127.0.0.1:0", store=self.store, engine=engine, log_stream=self.log, **kwargs)
        self.url = self.server.url
        self.host, self.port = self.server.server_address[:2]
        self.app = self.server.app
        self.scheduler = self.app.scheduler
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def log_lines(self) -> list[dict]:
        import json

        return [json.loads(line) for line in self.log.getvalue().splitlines() if line.strip()]

    def logged(self, path: str, count: int) -> list[dict]:
        """The log lines of `path`, once there are `count` (a line is written just after its
        response, so a client can read the response first)."""
        wait_for(lambda: len([r for r in self.log_lines() if r.get("path") == path]) >= count, 10, f"{path} logs")
        return [r for r in self.log_lines() if r.get("path") == path]

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(srv: Any, path: str, body: Any, method: str = "POST", timeout: float = 120) -> tuple[int, Any]:
    """(status, body) of one request to a running server: NDJSON as a list of objects, JSON as
    an object, anything else as text; an HTTP error's status and body alike."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(srv.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        payload, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    if "ndjson" in ctype:
        return status, [json.loads(line) for line in payload.splitlines() if line.strip()]
    if "json" in ctype:
        return status, json.loads(payload)
    return status, payload.decode()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until `predicate()`; a generous bound so slow CI machines never flake."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
