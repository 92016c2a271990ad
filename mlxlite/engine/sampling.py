"""Per-sequence sampling pieces on MLX: Ollama's options -> mlx-lm samplers and logits
processors, the constraint mask, and the top-k alternatives `top_logprobs` asks for.
Engine-internal; `runner.py` re-exports them for the scheduler, so a batch can hold one
sampler and processor list per sequence).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlite.options import Options


def _filters(options: Options) -> list[Callable[[mx.array], mx.array]]:
    """The sampler's truncations (top_p, min_p, top_k), in mlx-lm's order."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < options.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, options.top_p))
    if options.min_p > 0:
        filters.append(lambda x: apply_min_p(x, options.min_p, 1))
    if options.top_k > 0:
        filters.append(lambda x: apply_top_k(x, options.top_k))
    return filters


def make_sampler(options: Options) -> Callable[[mx.array], mx.array]:
    """logprobs [B, V] -> token ids [B]. A seed gives the sampler its own key chain, so a
    seeded sequence is reproducible whatever else runs in the process."""
    from mlx_lm.sample_utils import categorical_sampling

    temp = options.temperature
    if temp <= 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    filters = _filters(options)
    key = [mx.random.key(options.seed & ((1 << 64) - 1))] if options.seed >= 0 else None

    def sampler(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        if key is None:
            return categorical_sampling(logprobs, temp)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1.0 / temp), key=sub)

    return sampler


def make_distribution(options: Options) -> Callable[[mx.array], mx.array]:
    """logprobs [N, V] -> the log-probabilities [N, V] that `make_sampler` draws from (its
    filters, then the temperature, normalized): what speculative sampling must preserve.
    Only for temperature > 0."""
    temp = options.temperature
    filters = _filters(options)

    def distribution(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        scaled = logprobs * (1.0 / temp)
        return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)

    return distribution


def top_alternatives(logprobs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The `k` most likely token ids [B, k] of logprobs [B, V] and their logprobs, most
    likely first (a partition, then a sort of only k values per row)."""
    k = max(1, min(k, logprobs.shape[-1]))
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def make_processors(options: Options, num_ctx: int) -> list[Callable[[mx.array, mx.array], mx.array]]:
    """Ollama's penalties as mlx-lm logits processors (empty when all are off)."""
    from mlx_lm.sample_utils import make_logits_processors

    n = options.repeat_last_n
    if n == 0:
        return []
    n = num_ctx if n < 0 else n
    return make_logits_processors(
        None,
        options.repeat_penalty if options.repeat_penalty != 1.0 else None, n,
        options.presence_penalty or None, n,
        options.frequency_penalty or None, n,
    )


def constraint_mask(constraint: Any, eos_ids: frozenset[int], vocab: int) -> np.ndarray:
    """The bool mask [vocab] of what the constraint allows next (only EOS once it is complete)."""
    if constraint.is_complete():
        mask = np.zeros(vocab, dtype=bool)
        mask[[i for i in eos_ids if i < vocab]] = True
        return mask
    mask = np.asarray(constraint.allowed_mask(), dtype=bool)[:vocab]
    if mask.shape[0] < vocab:
        mask = np.concatenate([mask, np.zeros(vocab - mask.shape[0], dtype=bool)])
    if not mask.any():  # a stuck constraint ends the answer rather than emitting garbage
        mask[[i for i in eos_ids if i < vocab]] = True
    return mask


def allowed_logits(logits: mx.array, constraint: Any, eos_ids: frozenset[int]) -> mx.array:
    """Mask logits [1, V] to what the constraint allows (only EOS once it is complete)."""
    mask = constraint_mask(constraint, eos_ids, logits.shape[-1])
    return mx.where(mx.array(mask), logits, mx.array(-float("inf"), dtype=logits.dtype))
