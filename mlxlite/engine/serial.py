"""One sequence at a time: the scheduler's decoder protocol over `runner.generate`.

For models whose sequences cannot share a batch: vision models (mlx-vlm's language models
keep per-sequence state, such as Qwen2-VL's multimodal RoPE deltas, so two prompts must not
interleave). Same protocol as `batch.Decoder`: `add(key, tokens, options, truncate=,
constraint=, prompt_cache=, cached_tokens=, top_logprobs=, vision=) -> prompt length`
(prompt errors raise at once, as `Decoder.add` does); `step(is_cancelled) -> [(key, Piece |
Finish | None)]`, one item of the running sequence per step (None: cancelled before it
ran); `len()`, `active`, `waiting`, `take_cache(key)` (always None: no prefix cache for
these), `close()`. Cancellation reaches the running generation between prefill chunks and
decode steps, as with a batch. Never called from more than one thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from mlxlite.engine.model import check_prompt, context_window
from mlxlite.engine.vision import check_placeholders
from mlxlite.errors import BadRequest
from mlxlite.options import Options
from mlxlite.results import Finish


class _Flag:
    """A cancel event for one key, read through the decoder's latest `is_cancelled`."""

    def __init__(self, decoder: SerialDecoder, key: Any) -> None:
        self.decoder, self.key = decoder, key

    def is_set(self) -> bool:
        check = self.decoder.is_cancelled
        return check is not None and check(self.key)


class SerialDecoder:
    def __init__(self, loaded: Any, generate: Callable[..., Any]) -> None:
        self.loaded, self.generate = loaded, generate
        self.is_cancelled: Callable[[Any], bool] | None = None
        self._waiting: deque = deque()
        self._current: tuple[Any, Any] | None = None

    def __len__(self) -> int:
        return len(self._waiting) + (self._current is not None)

    @property
    def active(self) -> int:
        return int(self._current is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def add(self, key: Any, prompt_tokens: list[int], options: Options, *, truncate: bool = False,
            constraint: Any = None, prompt_cache: Any = None, cached_tokens: int = 0,
            top_logprobs: int = 0, logprobs: bool = True, vision: Any = None) -> int:
        given = [int(t) for t in prompt_tokens]
        check_placeholders(given, vision)
        prompt = check_prompt(self.loaded, given, context_window(self.loaded, options), options, truncate)
        if vision is not None and len(prompt) != len(given):
            raise BadRequest(f"the prompt with its images is {len(given)} tokens, longer than the context window; "
                             "raise num_ctx or send fewer or smaller images")
        self._waiting.append((key, given, options, truncate, constraint, top_logprobs, vision))
        return len(prompt)

    def step(self, is_cancelled: Callable[[Any], bool]) -> list[tuple[Any, Any]]:
        self.is_cancelled = is_cancelled
        out: list[tuple[Any, Any]] = []
        for item in [w for w in self._waiting if is_cancelled(w[0])]:
            self._waiting.remove(item)
            out.append((item[0], None))
        if self._current is None and self._waiting:
            key, tokens, options, truncate, constraint, top, vision = self._waiting.popleft()
            gen = self.generate(self.loaded, tokens, options, _Flag(self, key), truncate=truncate,
                                constraint=constraint, top_logprobs=top, vision=vision)
            self._current = (key, gen)
        if self._current is not None:
            key, gen = self._current
            try:
                item = next(gen)
            except StopIteration:
                self._current = None
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
            self._current[1].close()
        self._current = None
