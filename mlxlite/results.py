"""What a generation yields, shared by the engine and everything that consumes it.

`Piece` is one generated token with the text it made final, its logprob, its own bytes
and, when the request asked for them, the most likely alternatives at that step as
(token bytes, logprob) pairs, most likely first; `Finish` always comes last and carries
the counts and timings. Pure: the scheduler, server, CLI and test fakes use
these without importing mlx (semantics in `runner.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass


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
