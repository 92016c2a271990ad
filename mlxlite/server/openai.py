"""The OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, `/v1/models[/{model}]`.

Contract: OpenAI request fields are validated (400 naming the field) and mapped onto
the native machinery (`native.generation`, the same scheduler jobs): `max_tokens` /
`max_completion_tokens` -> num_predict, `stop`, `seed`, `temperature` and `top_p`
(1.0 when absent, as Ollama does), penalties, `response_format` (json_object ->
"json", json_schema -> its schema, both decoded under a constraint), `tools` ->
`tool_calls`, `reasoning_effort` -> think ("none" turns it off; a model that cannot think
ignores it), `logprobs` / `top_logprobs` -> `logprobs.content` with the real alternatives
(on /v1/completions `logprobs` is an int, N alternatives in OpenAI's legacy shape: `_Offsets`).
The model's thinking comes back as `reasoning_content` (and `reasoning`, Ollama's name) in
the message or delta, its tokens counted as `completion_tokens_details.reasoning_tokens`.
Streams are SSE (`data: {...}` events, then `data: [DONE]`), with a usage
chunk when `stream_options.include_usage`. Errors use OpenAI's shape (daemon.py).
Never imports mlx.
"""

from __future__ import annotations

import base64
import codecs
import json
import secrets
import struct
import time
from collections.abc import Iterator
from typing import Any

from mlxlite import names, options
from mlxlite.errors import BadRequest, Unsupported
from mlxlite.sched import GenerateJob
from mlxlite.server import images, wire
from mlxlite.server.native import Calls, Text, embed_vectors, gather, generation, resolve
from mlxlite.server.prompt import PromptSpec
from mlxlite.server.wire import Reply, Stream, Summary

FINGERPRINT = "fp_mlxlite"


def _sampling(body: dict) -> dict:
    """OpenAI sampling fields -> native option overrides (validated by options.py)."""
    out: dict[str, Any] = {}
    temperature = wire.get(body, "temperature", float, 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise BadRequest("invalid temperature: must be between 0 and 2")
    top_p = wire.get(body, "top_p", float, 1.0)
    if not 0.0 <= top_p <= 1.0:
        raise BadRequest("invalid top_p: must be between 0 and 1")
    out.update(temperature=temperature, top_p=top_p)
    for key in ("frequency_penalty", "presence_penalty"):
        value = wire.get(body, key, float)
        if value is not None:
            if not -2.0 <= value <= 2.0:
                raise BadRequest(f"invalid {key}: must be between -2 and 2")
            out[key] = value
    seed = wire.get(body, "seed", int)
    if seed is not None:
        out["seed"] = seed
    for key in ("max_completion_tokens", "max_tokens"):
        value = wire.get(body, key, int)
        if value is not None:
            if value < 1:
                raise BadRequest(f"invalid {key}: must be at least 1")
            out.setdefault("num_predict", value)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
            raise BadRequest("invalid stop: expected a string or an array of at most 16 strings")
        out["stop"] = [s for s in stop if s]
    n = wire.get(body, "n", int, 1)
    if n != 1:
        raise BadRequest("invalid n: only n=1 is supported")
    return options.parse_partial(out)


def _response_format(body: dict) -> str | dict | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise BadRequest("invalid response_format: expected an object with a type")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("invalid response_format: json_schema.schema must be an object")
        return wire.format_spec(schema, "response_format")  # compiled now: a bad schema is a 400 before any load
    raise BadRequest(f"invalid response_format.type {kind!r}: expected text, json_object or json_schema")


def _content(i: int, content: Any, pictures: list | None = None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(f"invalid messages[{i}].content: expected text parts")
            if part["type"] == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part["type"] == "image_url" and pictures is not None:
                pictures.append(images.openai_image(part, f"messages[{i}].content[{j}]"))
            elif part["type"] in ("image_url", "input_image", "input_audio"):
                raise Unsupported("this model does not support images or audio")
            else:
                raise BadRequest(f"invalid messages[{i}].content part of type {part['type']!r}")
        return "\n".join(texts)
    raise BadRequest(f"invalid messages[{i}].content: expected a string or an array of parts")


def _messages(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("invalid messages: expected a non-empty array")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRequest(f"invalid messages[{i}]: expected an object")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            shown = repr(role) if isinstance(role, str) else type(role).__name__  # a deep value's repr recurses
            raise BadRequest(f"invalid messages[{i}].role: {shown}")
        pictures: list[bytes] = []
        msg: dict[str, Any] = {"role": role, "content": _content(i, m.get("content"), pictures)}
        if pictures:
            msg["images"] = tuple(pictures)
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise BadRequest(f"invalid messages[{i}].tool_calls: expected an array")
            native = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest(f"invalid messages[{i}].tool_calls: expected function calls")
                args = fn.get("arguments") or "{}"
                try:
                    args = wire.replace_lone_surrogates(json.loads(args)) if isinstance(args, str) else args
                except (ValueError, RecursionError):
                    raise BadRequest(f"invalid messages[{i}].tool_calls: arguments are not JSON") from None
                native.append({"id": call.get("id"), "function": {"name": fn["name"], "arguments": args}})
            msg["tool_calls"] = native
        for key in ("reasoning_content", "reasoning"):     # an earlier turn's thinking
            if isinstance(m.get(key), str) and m[key] and role == "assistant":
                msg.setdefault("thinking", m[key])
        if isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    images.check_count(out)
    return tuple(out)


def _usage(summary: Summary) -> dict:
    usage = {"prompt_tokens": summary.prompt_tokens, "completion_tokens": summary.eval_tokens,
             "total_tokens": summary.prompt_tokens + summary.eval_tokens}
    cached = summary.prompt_tokens - summary.prompt_eval_tokens
    if cached > 0:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if summary.thinking_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": summary.thinking_tokens}
    return usage


def _finish_reason(summary: Summary, calls: bool) -> str:
    if calls:
        return "tool_calls"
    return "length" if summary.reason == "length" else "stop"


def _openai_calls(calls: list, *, streamed: bool) -> list[dict]:
    """OpenAI's tool calls: `index` only in stream deltas (where it says which call a
    fragment belongs to), never in a whole message, as OpenAI sends them."""
    out = []
    for i, c in enumerate(calls):
        call = {"id": f"call_{secrets.token_hex(8)}", "type": "function",
                "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
        out.append({"index": i, **call} if streamed else call)
    return out


def _reasoning(text: str) -> dict:
    """Thinking text under both names clients read: `reasoning_content` (DeepSeek's, vLLM's)
    and `reasoning` (Ollama's)."""
    return {"reasoning_content": text, "reasoning": text}


def _include_usage(body: dict) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise BadRequest("invalid stream_options: expected an object")
    return wire.get(so, "include_usage", bool, False)


def handle_chat_completions(ctx: Any) -> Reply | Stream:
    body = wire.body_object(ctx.json())
    name = wire.model_name(body)
    overrides = _sampling(body)
    messages = _messages(body.get("messages"))
    tools = wire.parse_tools(body.get("tools"))
    if body.get("tool_choice") == "none":
        tools = None
    fmt = _response_format(body)
    stream = wire.get(body, "stream", bool, False)
    usage = _include_usage(body)
    top = wire.get(body, "top_logprobs", int, 0)
    if not 0 <= top <= 20:
        raise BadRequest("invalid top_logprobs: must be between 0 and 20")
    want_logprobs = wire.get(body, "logprobs", bool, False) or top > 0
    think = wire.reasoning_effort(body.get("reasoning_effort"), "reasoning_effort")
    entry = resolve(ctx, name)
    spec = PromptSpec(name.display, messages=messages, tools=tools, think=think, think_strict=False)
    job = GenerateJob(entry, spec, overrides, wire.keep_alive(body), fmt, top_logprobs=top)
    tool_names = [t["function"]["name"] for t in tools] if tools else None
    cid, created, model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), name.display
    summary = Summary()
    items = generation(ctx, job, summary, tool_names, want_logprobs)
    if not stream:
        whole = gather(items)
        text, thinking, calls, logprobs = whole.text, whole.thinking, whole.calls, whole.logprobs
        # OpenAI sends `content: null` beside tool calls when the model wrote no text.
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if thinking:
            message.update(_reasoning(thinking))
        if calls:
            message["tool_calls"] = _openai_calls(calls, streamed=False)
        return Reply({"id": cid, "object": "chat.completion", "created": created, "model": model,
                      "system_fingerprint": FINGERPRINT,
                      "choices": [{"index": 0, "message": message,
                                   "logprobs": {"content": logprobs} if want_logprobs else None,
                                   "finish_reason": _finish_reason(summary, bool(calls))}],
                      "usage": _usage(summary)})

    def chunks() -> Iterator[dict]:
        def chunk(delta: dict, finish: str | None = None, lp: list | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [{"index": 0, "delta": delta, "logprobs": {"content": lp} if lp else None,
                                 "finish_reason": finish}]}
        first, any_calls = True, False
        for item in items:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            first = False
            if isinstance(item, Calls):
                any_calls = True
                delta["tool_calls"] = _openai_calls(item.calls, streamed=True)
                delta.setdefault("content", None)
            elif item.thinking:
                delta.update(_reasoning(item.text))
            else:
                delta["content"] = item.text
            yield chunk(delta, lp=list(item.logprobs) if isinstance(item, Text) and item.logprobs else None)
        yield chunk({"role": "assistant", "content": ""} if first else {},
                    _finish_reason(summary, any_calls))
        if usage:
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": FINGERPRINT, "choices": [], "usage": _usage(summary)}

    return Stream(chunks(), sse=True, done_marker=True)


class _Offsets:
    """Legacy completions' logprobs (`tokens`, `token_logprobs`, `top_logprobs` as {token:
    logprob}, `text_offset`) from our entries; offsets count characters of the returned text
    (no echo: the prompt is not in it), carried across the chunks of a stream."""

    def __init__(self) -> None:
        # Decoded as the text is: invalid bytes become U+FFFD; a token that completes a
        # character begun by the previous one sits at that character's start.
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = 0

    def legacy(self, entries: Any) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            raw = bytes(e["bytes"])
            pending = self.decoder.getstate()[0]     # the start of a character not yet whole
            joins = pending and not (pending + raw).decode("utf-8", "replace").startswith("\ufffd")
            out["text_offset"].append(self.chars + (0 if joins else len(pending.decode("utf-8", "replace"))))
            self.chars += len(self.decoder.decode(raw))
            out["tokens"].append(e["token"])
            out["token_logprobs"].append(e["logprob"])
            top = {}
            for alt in e["top_logprobs"]:
                top.setdefault(alt["token"], alt["logprob"])
            top.setdefault(e["token"], e["logprob"])  # OpenAI: the sampled token always, so up to N + 1
            out["top_logprobs"].append(top)
        return out


def handle_completions(ctx: Any) -> Reply | Stream:
    body = wire.body_object(ctx.json())
    name = wire.model_name(body)
    overrides = _sampling(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("invalid prompt: expected a string")
    suffix = wire.get(body, "suffix", str)
    if wire.get(body, "echo", bool, False):
        raise BadRequest("invalid echo: echo is not supported")
    if wire.get(body, "best_of", int, 1) != 1:
        raise BadRequest("invalid best_of: only 1 is supported")
    stream = wire.get(body, "stream", bool, False)
    usage = _include_usage(body)
    fmt = _response_format(body)
    top = wire.get(body, "logprobs", int)  # legacy: an int, the alternatives per token
    if top is not None and not 0 <= top <= 20:
        raise BadRequest("invalid logprobs: must be between 0 and 20")
    entry = resolve(ctx, name)
    # Completions are raw: the prompt goes to the model as written, like Ollama's raw mode.
    spec = PromptSpec(name.display, prompt=prompt, raw=True, suffix=suffix, think=False)
    job = GenerateJob(entry, spec, overrides, wire.keep_alive(body), fmt, top_logprobs=top or 0)
    cid, created, model = f"cmpl-{secrets.token_hex(12)}", int(time.time()), name.display
    summary = Summary()
    items = generation(ctx, job, summary, logprobs=top is not None)
    offsets = _Offsets()
    if not stream:
        whole = gather(items)
        return Reply({"id": cid, "object": "text_completion", "created": created, "model": model,
                      "system_fingerprint": FINGERPRINT,
                      "choices": [{"text": whole.text, "index": 0,
                                   "logprobs": offsets.legacy(whole.logprobs) if top is not None else None,
                                   "finish_reason": _finish_reason(summary, False)}],
                      "usage": _usage(summary)})

    def chunks() -> Iterator[dict]:
        def chunk(text: str, finish: str | None = None, lp: dict | None = None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}
        for item in items:
            yield chunk(item.text, lp=offsets.legacy(item.logprobs) if top is not None else None)
        yield chunk("", _finish_reason(summary, False))
        if usage:
            yield {"id": cid, "object": "text_completion", "created": created, "model": model,
                   "system_fingerprint": FINGERPRINT, "choices": [], "usage": _usage(summary)}

    return Stream(chunks(), sse=True, done_marker=True)


def handle_embeddings(ctx: Any) -> Reply:
    body = wire.body_object(ctx.json())
    name = wire.model_name(body)
    inputs = wire.embed_inputs(body.get("input"))
    if not inputs:
        raise BadRequest("invalid input: expected a non-empty string or array of strings")
    encoding = wire.get(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("invalid encoding_format: expected float or base64")
    dims = wire.get(body, "dimensions", int)
    if dims is not None and not 1 <= dims <= 1 << 16:
        raise BadRequest("invalid dimensions: must be a positive integer")
    entry = resolve(ctx, name)
    result = embed_vectors(ctx, entry, inputs, True, wire.keep_alive(body), {})
    data = []
    for i, vec in enumerate(wire.resize(result.vectors, dims)):
        value: Any = vec
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "embedding": value, "index": i})
    return Reply({"object": "list", "data": data, "model": name.display,
                  "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}})


def _model_object(entry: Any) -> dict:
    return {"id": entry.name.display, "object": "model", "created": int(entry.modified),
            "owned_by": entry.name.namespace if entry.name.namespace != "library" else "library"}


def handle_models(ctx: Any) -> Reply:
    return Reply({"object": "list", "data": [_model_object(e) for e in ctx.app.store.list()]})


def handle_model(ctx: Any) -> Reply:
    return Reply(_model_object(resolve(ctx, names.parse(ctx.params["model"]))))
