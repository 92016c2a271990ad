"""What a generation yields, shared by the engine and everything that consumes it.

`Piece` is one generated token with the text it made final, its logprob, its own bytes
and, when the request asked for them, the most likely alternatives at that step as
(token bytes, logprob) pairs, most likely first; `Finish` always comes last and carries
the counts and timings. `SerialDecoder` hands out generations one sequence at a time
through the scheduler's decoder protocol (the engine's for vision models, the scheduler's
for engines that cannot batch). Pure: the scheduler, server, CLI and test fakes use
these without importing mlx (semantics in `runner.generate`); never imports a wing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mlxlite.errors import MlxliteError


@dataclass(frozen=True)
class Piece:
    token: int
    text: str  # "" while held back (partial UTF-8, a possible stop string)
    logprob: float
    raw: bytes = b""  # this token's own bytes (a special token's name), for logprobs
    top: tuple[tuple[bytes, float], ...] = ()  # the top_logprobs alternatives, when asked


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop", "length" or "cancel"
    prompt_tokens: int
    prompt_eval_tokens: int  # computed, not served from the prefix cache
    eval_tokens: int
    prompt_seconds: float
    eval_seconds: float
    text_tail: str = ""  # held-back text flushed at the end
    stop_string: str = ""  # the stop string that ended it, when one did


class _Flag:
    """A cancel event for one key, read through the decoder's latest `is_cancelled`."""

    def __init__(self, decoder: SerialDecoder, key: Any) -> None:
        self.decoder, self.key = decoder, key

    def is_set(self) -> bool:
        check = self.decoder.is_cancelled
        return check is not None and check(self.key)


class SerialDecoder:
    """The scheduler's decoder protocol over a `generate` function, one sequence at a time.

    For engines that cannot batch (a test fake) and models whose sequences must not share a
    batch (vision models: mlx-vlm's language models keep per-sequence state, such as
    Qwen2-VL's multimodal RoPE deltas). `generate(loaded, tokens, options, cancel, truncate=,
    constraint=[, top_logprobs=][, vision=])` yields Pieces then one Finish; the keywords in
    brackets go only when asked for. `add(key, tokens, options, truncate=, constraint=,
    prompt_cache=, cached_tokens=, top_logprobs=, logprobs=, vision=, draft=) -> prompt
    length`: `check(tokens, options, truncate, vision) -> prompt length` runs the engine's
    prompt checks at once (they raise, as the batch decoder's `add` does); prefix caches,
    `logprobs=False` and drafts are only savings, so they are ignored. `step(is_cancelled) ->
    [(key, Piece | Finish | MlxliteError | None)]`: one item of the running generation (None:
    cancelled before it ran); a typed error from a generation fails that sequence alone (its
    event, and the next one starts), any other error raises. Cancellation reaches the running
    generation through its `cancel.is_set()`, between prefill chunks and decode steps.
    `len()`, `active`, `waiting`, `take_cache(key)` (always None), `close()`. Never called
    from more than one thread; never imports mlx (the scheduler builds one without it).
    """

    def __init__(self, loaded: Any, generate: Callable[..., Iterator[Piece | Finish]],
                 check: Callable[[list[int], Any, bool, Any], int] | None = None) -> None:
        self.loaded, self.generate, self.check = loaded, generate, check
        self.is_cancelled: Callable[[Any], bool] | None = None
        self._waiting: deque = deque()
        self._current: tuple[Any, Iterator[Piece | Finish]] | None = None

    def __len__(self) -> int:
        return len(self._waiting) + (self._current is not None)

    @property
    def active(self) -> int:
        return int(self._current is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def add(self, key: Any, tokens: list[int], options: Any, *, truncate: bool = False,
            constraint: Any = None, prompt_cache: Any = None, cached_tokens: int = 0,
            top_logprobs: int = 0, logprobs: bool = True, vision: Any = None, draft: Any = None) -> int:
        n = len(tokens) if self.check is None else self.check(tokens, options, truncate, vision)
        extra: dict[str, Any] = {}
        if top_logprobs:        # an engine without alternatives or images need not know the words
            extra["top_logprobs"] = top_logprobs
        if vision is not None:
            extra["vision"] = vision
        self._waiting.append((key, tokens, options, truncate, constraint, extra))
        return n

    def step(self, is_cancelled: Callable[[Any], bool]) -> list[tuple[Any, Any]]:
        self.is_cancelled = is_cancelled
        out: list[tuple[Any, Any]] = []
        for item in [w for w in self._waiting if is_cancelled(w[0])]:
            self._waiting.remove(item)
            out.append((item[0], None))
        if self._current is None and self._waiting:
            key, tokens, options, truncate, constraint, extra = self._waiting.popleft()
            gen = self.generate(self.loaded, tokens, options, _Flag(self, key), truncate=truncate,
                                constraint=constraint, **extra)
            self._current = (key, gen)
        if self._current is not None:
            key, gen = self._current
            try:
                item = next(gen)
            except StopIteration:
                self._current = None
                return out
            except MlxliteError as exc:     # this sequence's own failure: the next one runs
                self._current = None
                out.append((key, exc))
                return out
            except BaseException:
                self._current = None
                raise
            out.append((key, item))
            if isinstance(item, Finish):
                self._current = None
        return out

    def take_cache(self, key: Any) -> None:
        return None

    def close(self) -> None:
        self._waiting.clear()
        if self._current is not None:
            close = getattr(self._current[1], "close", None)
            if close is not None:       # a generator: its cleanup runs now
                close()
        self._current = None
