"""What HTTP threads submit to the scheduler, and what comes back on a ticket.

Jobs (`GenerateJob`, `EmbedJob`, `TokenizeJob`, `LoadJob`) are frozen requests; a `Ticket`
is one submitted job: its reply queue and cancel event. Events come back in order: `Ready`,
then the engine's `Piece`s and one `Finish` (`results.py`), or `Embedded` / `Tokenized` /
`Done`, or a single `Failed`. `Ticket.events(gone)` yields them, raising `Failed`'s error, and `ClientGone`
(after cancelling) when the client left. Shared by `scheduler.py` and `batch.py`, below
both. Never imports mlx.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mlxlite.errors import MlxliteError


# ---- jobs (what HTTP threads submit) -----------------------------------------------
@dataclass(frozen=True)
class GenerateJob:
    """Generate from a prompt. `prompt` is duck-typed: `prompt.render(loaded, engine, num_ctx,
    num_predict)` renders and tokenizes it on the MLX thread (the template lives on the
    loaded model), fitting a chat to num_ctx: `.tokens`, `.truncated_messages`."""

    entry: Any                      # store.ModelEntry
    prompt: Any
    options: dict = field(default_factory=dict)     # validated overrides over the model's defaults
    keep_alive: float | None = None
    format: Any = None              # None, "json" or a JSON-schema dict -> constrained decoding
    truncate: bool = False
    top_logprobs: int = 0           # alternatives wanted per token (0: only the chosen token's logprob)
    logprobs: bool = True           # the chosen tokens' logprobs are read (False: the engine skips them)


@dataclass(frozen=True)
class EmbedJob:
    entry: Any
    texts: tuple[str, ...]
    keep_alive: float | None = None
    truncate: bool = True
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizeJob:
    """Render and tokenize a prompt as a GenerateJob would, and generate nothing (token counts)."""

    entry: Any
    prompt: Any                     # duck-typed like GenerateJob.prompt
    keep_alive: float | None = None


@dataclass(frozen=True)
class LoadJob:
    """Load a model (empty prompt), or unload it when keep_alive == 0."""

    entry: Any
    keep_alive: float | None = None


# ---- events (what comes back on a ticket) --------------------------------------------
@dataclass(frozen=True)
class Ready:
    load_seconds: float
    prompt_tokens: tuple[int, ...] = ()
    queue_seconds: float = 0.0
    batch_size: int = 0             # sequences of this model decoding or waiting, this one included
    truncated_messages: int = 0     # the chat's oldest messages left out to fit num_ctx
    thinking: bool = False          # the prompt opened a thinking section: the output starts inside it
    harmony: str | None = None      # a harmony prompt (gpt-oss): the message its output continues


@dataclass(frozen=True)
class Embedded:
    vectors: list
    prompt_tokens: int
    load_seconds: float
    seconds: float


@dataclass(frozen=True)
class Tokenized:
    tokens: tuple[int, ...]
    load_seconds: float


@dataclass(frozen=True)
class Done:
    reason: str                     # "load" or "unload"
    load_seconds: float = 0.0


@dataclass(frozen=True)
class Failed:
    error: MlxliteError


_ENDS = (Embedded, Tokenized, Done, Failed)


class ClientGone(Exception):
    """The HTTP client went away; the ticket has been cancelled."""


class Ticket:
    """One submitted job: its reply queue and cancel event."""

    _ids = itertools.count(1)

    def __init__(self, job: Any) -> None:
        self.id = next(self._ids)
        self.job = job
        self.cancel_event = threading.Event()
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def events(self, gone: Callable[[], bool] | None = None, poll: float = 0.05) -> Iterator[Any]:
        """Events until the job ends. `gone()` is polled while waiting; when it says the
        client left, the job is cancelled and `ClientGone` raised. `Failed` is raised as
        its error. Closing the iterator early also cancels the job."""
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = self.replies.get(timeout=poll)
                except queue.Empty:
                    event = None
                # Also while events flow fast (a GPU makes a token every few ms): look at
                # the client at least every `poll` seconds, not only when the queue is idle.
                if gone is not None and (event is None or time.monotonic() - checked >= poll):
                    checked = time.monotonic()
                    if gone():
                        self.cancel()
                        raise ClientGone() from None
                if event is None:
                    continue
                if isinstance(event, Failed):
                    raise event.error
                yield event
                if isinstance(event, _ENDS) or is_finish(event):
                    return
        finally:
            # Reached on normal end too, where cancelling a finished job is harmless.
            self.cancel()


def is_finish(event: Any) -> bool:
    """The runner's `Finish` (duck-typed, so a fake engine's counts too)."""
    return type(event).__name__ == "Finish" and hasattr(event, "reason")
