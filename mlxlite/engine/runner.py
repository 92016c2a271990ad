"""The engine's protocol: what the scheduler (and `mlxlite run`) calls to run a model on MLX.

Contract:
  - `load(store, entry) -> Loaded`, `unload`, `tokenize`, `detokenize`, `token_bytes`,
    `context_window`, `new_cache`, `prefill` (from `model.py`).
  - `generate(loaded, prompt_tokens, options, cancel, truncate=, constraint=, prompt_cache=,
    cached_tokens=, top_logprobs=, logprobs=)` yields `Piece`s then one `Finish` (`results.py`): stop
    strings are cut exactly (the one that matched is `Finish.stop_string`), the cancel
    event is checked between prefill chunks and decode steps, a constraint masks the logits
    before sampling. Each Piece has its token's logprob (log-softmax of the logits the
    sampler saw) and bytes; with `top_logprobs=k` also the k most likely tokens of that
    step and their logprobs (computed only then). `logprobs=False` (nobody reads them): no
    logprob is gathered or read back, `Piece.logprob` is 0.0; the tokens are the same.
    A prompt that is empty, or longer than num_ctx without `truncate`, is a `BadRequest`
    before any work.
  - `embed(loaded, texts, truncate)` -> one normalized vector per text (bert-family
    encoders pool as their GGUF says; a generate request to one is a `BadRequest`).
  - `decoder(loaded, max_batch, keep_caches)`: continuous batching (`batch.Decoder`), whose
    sequences produce what `generate` would alone; `cache_nbytes`, `cache_prefix`,
    `save_cache`, `load_cache` for the scheduler's prefix cache.
  - Samplers and text streaming per sequence: `make_sampler`, `make_processors`,
    `allowed_logits`, `TextStream`, `StopMatcher`.
  - Images (`vision.py`, mlx-vlm's optional extra): `check_images(loaded)` (a 400 unless
    the model takes images), `image_marker(loaded)` (what a Go template's message holds per
    image, or None), `vision_tokens(loaded, text, images)` -> (token ids, inputs) for
    `generate(..., vision=)` and the decoder's `add(..., vision=)`.
  - `memory_budget()` (the device's), `end_thread()`: the MLX thread's last call, which frees
    MLX's per-thread streams before the thread exits (else a clean exit can abort).
Never called from more than one thread at a time (the scheduler owns the MLX thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import mlx.core as mx

from mlxlite.engine import vision as vision_mod
from mlxlite.engine.batch import Decoder, cache_nbytes, cache_prefix, load_cache, save_cache
from mlxlite.engine.encoder import Encoder
from mlxlite.engine.model import (
    GENERATION_STREAM,
    Loaded,
    alternatives,
    check_prompt,
    context_window,
    detokenize,
    end_thread,
    load,
    memory_budget,
    new_cache,
    on_cpu,
    prefill,
    token_bytes,
    token_piece,
    tokenize,
    unload,
)
from mlxlite.engine.sampling import allowed_logits, make_processors, make_sampler, top_alternatives
from mlxlite.engine.text import StopMatcher, TextStream
from mlxlite.engine.vision import check_images, image_marker, vision_tokens
from mlxlite.errors import BadRequest, Unsupported
from mlxlite.options import Options
from mlxlite.results import Finish, Piece, SerialDecoder

__all__ = [
    "Loaded", "Piece", "Finish", "load", "unload", "tokenize", "detokenize", "token_bytes", "token_piece", "generate",
    "embed", "context_window", "make_sampler", "make_processors", "allowed_logits", "new_cache", "prefill",
    "TextStream", "StopMatcher", "on_cpu", "memory_budget", "decoder", "cache_nbytes", "cache_prefix",
    "save_cache", "load_cache", "end_thread", "check_images", "image_marker", "vision_tokens",
]


# ---- generation ----------------------------------------------------------------------------
def generate(loaded: Loaded, prompt_tokens: list[int], options: Options, cancel: threading.Event | None = None,
             *, truncate: bool = False, constraint: object | None = None,
             prompt_cache: list[Any] | None = None, cached_tokens: int = 0,
             top_logprobs: int = 0, logprobs: bool = True, vision: Any = None) -> Iterator[Piece | Finish]:
    """Stream Pieces then one Finish (the contract is in this module's docstring).

    `prompt_cache` (from `new_cache`, updated in place) may already hold the KV of the first
    `cached_tokens` prompt tokens (a prefix cache hit); only the rest is computed. Afterwards
    it holds the prompt, the generated tokens and possibly one look-ahead token: its
    `offset` says how many, `trim_prompt_cache` cuts it back.
    A vision model (`vision.py`) prefills the whole prompt from its embeddings, `vision`'s
    images merged in (`vision_tokens` made both), and never from a cached prefix.
    """

    num_ctx = context_window(loaded, options)
    given = [int(t) for t in prompt_tokens]
    prompt = _checked(loaded, given, num_ctx, options, truncate, vision)
    sees = vision_mod.is_vision(loaded)
    if prompt_cache is None or len(prompt) != len(given) or sees:  # truncation invalidates a prefix
        prompt_cache, cached_tokens = None, 0
    cached_tokens = max(0, min(cached_tokens, len(prompt) - 1))
    limit = num_ctx - len(prompt)
    if options.num_predict >= 0:
        limit = min(limit, options.num_predict)
    t0 = time.perf_counter()
    n_prompt = len(prompt)
    if limit <= 0:
        yield Finish("length", n_prompt, 0, 0, 0.0, 0.0)  # nothing computed
        return
    model, eos = loaded.model, loaded.eos_token_ids
    sampler = make_sampler(options)
    processors = make_processors(options, num_ctx)
    stops = StopMatcher(options.stop)
    text = TextStream(loaded.table)
    cache = prompt_cache if prompt_cache is not None else new_cache(loaded)
    history = mx.array(prompt[:-1], dtype=mx.uint32) if processors else None
    logprobs = logprobs or top_logprobs > 0

    def step(inp: mx.array) -> tuple[mx.array, ...]:
        """(token [1], its logprob [1, 1] (unless not read)) and, with top_logprobs, (ids [1, k],
        logprobs [1, k])."""
        nonlocal history
        with mx.stream(GENERATION_STREAM):
            logits = model(inp[None], cache=cache)[:, -1, :]
            if processors:
                history = mx.concatenate([history, inp])
                for proc in processors:
                    logits = proc(history, logits)
            if constraint is not None:
                logits = allowed_logits(logits, constraint, eos)
            lps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tok = sampler(lps)
            if not logprobs:
                return (tok,)
            chosen = mx.take_along_axis(lps, tok[:, None], axis=-1)
            if top_logprobs > 0:
                return (tok, chosen, *top_alternatives(lps, top_logprobs))
            return tok, chosen

    def finish(reason: str, n_eval: int, t_first: float | None, tail: str = "") -> Finish:
        now = time.perf_counter()
        t_first = now if t_first is None else t_first
        return Finish(reason, n_prompt, n_prompt - cached_tokens, n_eval, t_first - t0, now - t_first, tail,
                      stops.matched)

    def flush_tail() -> str:
        out, hit = stops.feed(text.flush())
        return out if hit else out + stops.flush()

    with mx.stream(GENERATION_STREAM):
        if sees:
            done = vision_mod.prefill(loaded.model, prompt, vision, cache, max(1, options.num_batch), cancel)
        else:
            done = prefill(loaded, prompt[cached_tokens:-1], cache, max(1, options.num_batch), cancel)
    if not done or (cancel is not None and cancel.is_set()):
        yield finish("cancel", 0, None)
        return
    # Without a constraint the next step is queued before this token is handed out
    # (mlx-lm's one-token lookahead); a constraint must see each token first.
    lookahead = constraint is None
    cur = step(mx.array(prompt[-1:], dtype=mx.uint32))
    mx.async_eval(*cur)
    t_first: float | None = None
    n = 0
    while True:
        y = cur[0]
        nxt = None
        if lookahead and n + 1 < limit:
            nxt = step(y)
            mx.async_eval(*nxt)
        token = int(y.item())
        if t_first is None:
            t_first = time.perf_counter()
        if token in eos:
            yield finish("stop", n, t_first, flush_tail())
            return
        if constraint is not None:
            constraint.advance(token)
        n += 1
        emit, hit = stops.feed(text.add(token))
        top = alternatives(loaded, cur[2][0].tolist(), cur[3][0].tolist()) if len(cur) > 2 else ()
        yield Piece(token, emit, float(cur[1].item()) if logprobs else 0.0, token_piece(loaded, token), top)
        if hit:
            yield finish("stop", n, t_first)
            return
        if n >= limit:
            yield finish("length", n, t_first, flush_tail())
            return
        if cancel is not None and cancel.is_set():
            yield finish("cancel", n, t_first, flush_tail())
            return
        if nxt is None:
            nxt = step(y)
            mx.async_eval(*nxt)
        cur = nxt
        if n % 256 == 0:
            mx.clear_cache()


# ---- embeddings ---------------------------------------------------------------------------
def embed(loaded: Loaded, texts: list[str], truncate: bool = True) -> list[list[float]]:
    """One L2-normalized vector per text: an encoder's own pooling (bert family), else the
    mean of a decoder's final hidden states (after the final norm, before lm_head)."""
    if isinstance(loaded.model, Encoder):
        return _encode(loaded, texts, truncate)
    inner = getattr(loaded.model, "model", None)
    if inner is None or not callable(inner):
        raise Unsupported(f"model '{loaded.name}' does not expose hidden states for embeddings")
    out = []
    for text in texts:
        if not isinstance(text, str):
            raise BadRequest("input must be a string or a list of strings")
        ids = tokenize(loaded, text) or [0]
        if len(ids) > loaded.context_length:
            if not truncate:
                raise BadRequest(f"input is {len(ids)} tokens, longer than the context length {loaded.context_length}")
            ids = ids[: loaded.context_length]
        hidden = inner(mx.array(ids)[None]).astype(mx.float32)
        pooled = hidden[0].mean(axis=0)
        pooled = pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)
        out.append(pooled.tolist())
    return out


ENCODE_BATCH_TOKENS = 8192  # padded tokens per encoder forward pass (bounds its memory)


def _encode(loaded: Loaded, texts: list[str], truncate: bool) -> list[list[float]]:
    """Encoder embeddings, inputs of similar length batched together (padding is masked)."""
    batch_ids = []
    for text in texts:
        if not isinstance(text, str):
            raise BadRequest("input must be a string or a list of strings")
        ids = tokenize(loaded, text)
        if len(ids) > loaded.context_length:
            if not truncate:
                raise BadRequest(f"input is {len(ids)} tokens, longer than the context length {loaded.context_length}")
            ids = ids[: loaded.context_length - 1] + ids[-1:]  # keep the closing [SEP]
        batch_ids.append(ids)
    order = sorted(range(len(batch_ids)), key=lambda i: len(batch_ids[i]))
    out: list[list[float]] = [[] for _ in texts]
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(batch_ids[order[end]]) <= ENCODE_BATCH_TOKENS:
            end += 1
        chunk = order[start:end]
        vectors = loaded.model.pooled([batch_ids[i] for i in chunk]).tolist()
        for i, vec in zip(chunk, vectors, strict=True):
            out[i] = vec
        start = end
    return out


def _checked(loaded: Loaded, given: list[int], num_ctx: int, options: Options, truncate: bool,
             vision: Any) -> list[int]:
    """The prompt `generate` runs (`truncate`: cut to fit num_ctx); `BadRequest` for one that
    is empty or too long, whose image tokens its images don't fill, or with images and cut."""
    prompt = check_prompt(loaded, given, num_ctx, options, truncate)
    vision_mod.check_placeholders(given, vision)
    if vision is not None and len(prompt) != len(given):
        raise BadRequest(f"the prompt with its images is {len(given)} tokens, longer than the context window "
                         f"num_ctx={num_ctx}; raise num_ctx or send fewer or smaller images")
    return prompt


# ---- continuous batching (batch.py) ---------------------------------------------------------
def decoder(loaded: Loaded, max_batch: int, keep_caches: bool = False) -> Decoder | SerialDecoder:
    """A `batch.Decoder`: many sequences of this model decoded together; for a vision model
    a `results.SerialDecoder` over `generate` (one at a time: mlx-vlm's models keep
    per-sequence state), which checks each prompt as it is added, as `Decoder.add` does."""
    if vision_mod.is_vision(loaded):
        def check(tokens: list[int], options: Options, truncate: bool, vision: Any) -> int:
            given = [int(t) for t in tokens]
            return len(_checked(loaded, given, context_window(loaded, options), options, truncate, vision))

        return SerialDecoder(loaded, generate, check)
    return Decoder(loaded, max_batch, keep_caches=keep_caches)
