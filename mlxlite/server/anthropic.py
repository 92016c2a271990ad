"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Contract: request fields are validated (400 naming the field) and mapped onto the native
machinery as `openai.py` maps OpenAI's (`native.generation`, the same scheduler jobs):
`system` (a string or text blocks) and `messages` (a string or blocks: `text`, `tool_use`,
`tool_result`, `thinking`) -> native chat messages, tool results as `tool` messages;
`max_tokens` (required) -> num_predict, `stop_sequences` -> stop, `temperature`, `top_p`,
`top_k` when given (else the model's defaults); custom `tools` (name, description,
input_schema) -> native tools, and calls in the output -> `tool_use` blocks;
`tool_choice` "none" drops the tools, "any" and "tool" force a call by decoding under a
JSON-schema constraint. Output that opens with `<think>` comes back as a `thinking` block
(split off by `native.generation`, as for every API). `stop_reason` is end_turn,
max_tokens, stop_sequence (naming the `stop_sequence` the request gave) or tool_use;
usage counts prompt tokens served from the prefix cache as `cache_read_input_tokens`.
Streams are SSE with named events:
message_start, content_block_start/delta/stop per block, message_delta (stop_reason and
usage), message_stop; an error after the first byte is an `error` event. `count_tokens`
renders the prompt with the model's template and tokenizes it on the MLX thread
(`TokenizeJob`), generating nothing. Images, documents and server tools are a 400. The
`thinking` setting: `disabled` renders the template with thinking off (where it can be
turned off) and leaves the output unsplit; `enabled` and `adaptive` leave it to the
model (agent clients send `enabled` by default, so a model that cannot think is no error).
Errors use Anthropic's shape (`errors.error_body`, chosen by route). Never imports mlx.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mlxlite import options
from mlxlite.errors import BadRequest, MlxliteError, Unsupported
from mlxlite.names import ModelName
from mlxlite.sched import GenerateJob, Tokenized, TokenizeJob
from mlxlite.server import images, wire
from mlxlite.server.native import Calls, generation, resolve
from mlxlite.server.prompt import PromptSpec
from mlxlite.server.wire import Reply, Stream, Summary


# ---- requests ------------------------------------------------------------------------
@dataclass(frozen=True)
class MessagesRequest:
    name: ModelName
    prompt: PromptSpec
    options: dict
    format: dict | None             # a forced tool call's schema (tool_choice any / tool)
    tool_names: tuple[str, ...] | None
    stop_sequences: tuple[str, ...]
    stream: bool
    keep_alive: float | None


def _string(block: dict, key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"invalid {where}.{key}: expected a string")
    return value


def _block_type(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise BadRequest(f"invalid {where}: expected a content block with a type")
    if block["type"] == "document":
        raise Unsupported(f"invalid {where}: this model does not support documents")
    return block["type"]


def _text(value: Any, where: str) -> str:
    """A string, or an array of text blocks, as one string."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise BadRequest(f"invalid {where}: expected a string or an array of text blocks")
    texts = []
    for i, block in enumerate(value):
        if _block_type(block, f"{where}[{i}]") != "text":
            raise BadRequest(f"invalid {where}[{i}]: expected a text block, got {block['type']!r}")
        texts.append(_string(block, "text", f"{where}[{i}]"))
    return "\n".join(texts)


def _messages(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("invalid messages: expected a non-empty array")
    out: list[dict] = []
    called: dict[str, str] = {}         # tool_use id -> tool name, for the results that answer it
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"invalid {where}: expected an object")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest(f"invalid {where}.role: expected user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"invalid {where}.content: expected a string or an array of content blocks")
        texts: list[str] = []
        calls: list[dict] = []
        results: list[dict] = []
        thoughts: list[str] = []
        pictures: list[bytes] = []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = _block_type(block, at)
            if kind == "text":
                texts.append(_string(block, "text", at))
            elif kind == "tool_use" and role == "assistant":
                call_id, name = _string(block, "id", at), _string(block, "name", at)
                args = block.get("input", {})
                if not isinstance(args, dict):
                    raise BadRequest(f"invalid {at}.input: expected an object")
                called[call_id] = name
                calls.append({"id": call_id, "function": {"name": name, "arguments": args}})
            elif kind == "tool_result" and role == "user":
                call_id = _string(block, "tool_use_id", at)
                result = {"role": "tool", "content": _text(block.get("content"), f"{at}.content"),
                          "tool_call_id": call_id}
                if call_id in called:
                    result["name"] = called[call_id]
                results.append(result)
            elif kind == "thinking" and role == "assistant":
                thoughts.append(_string(block, "thinking", at))
            elif kind == "image" and role == "user":
                pictures.append(images.anthropic_image(block, at))
            elif kind == "redacted_thinking" and role == "assistant":
                continue                # opaque to anything but Anthropic's own models
            else:
                raise BadRequest(f"invalid {at}: a {kind!r} block is not supported in a {role} message")
        out.extend(results)             # they answer the previous turn's calls, so they come first
        if texts or calls or thoughts or pictures or not results:
            msg: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
            if pictures:
                msg["images"] = tuple(pictures)
            if calls:
                msg["tool_calls"] = calls
            if thoughts:
                msg["thinking"] = "\n".join(thoughts)
            out.append(msg)
    images.check_count(out)
    return tuple(out)


def _tools(value: Any) -> tuple[dict, ...] | None:
    if value in (None, []):
        return None
    if not isinstance(value, list):
        raise BadRequest("invalid tools: expected an array")
    out, seen = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise BadRequest(f"invalid {where}: expected an object")
        if tool.get("type") not in (None, "custom"):
            raise Unsupported(f"invalid {where}: tool type {tool['type']!r} is not supported "
                              "(only custom tools with an input_schema)")
        name = _string(tool, "name", where)
        if not name or name in seen:
            raise BadRequest(f"invalid {where}.name: expected a unique, non-empty name")
        seen.add(name)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise BadRequest(f"invalid {where}.input_schema: expected an object")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise BadRequest(f"invalid {where}.description: expected a string")
        out.append({"type": "function",
                    "function": {"name": name, "description": description or "", "parameters": schema}})
    return tuple(out)


def _tool_choice(value: Any, tools_: tuple[dict, ...] | None) -> tuple[tuple[dict, ...] | None, dict | None]:
    """(tools to offer, the schema a forced call is decoded under)."""
    if value is None:
        return tools_, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise BadRequest('invalid tool_choice: expected {"type": "auto" | "any" | "tool" | "none"}')
    if kind == "none":
        return None, None
    if kind == "auto":
        return tools_, None
    if not tools_:
        raise BadRequest(f"invalid tool_choice: {kind!r} needs tools")
    chosen = [t["function"] for t in tools_]
    if kind == "tool":
        chosen = [f for f in chosen if f["name"] == value.get("name")]
        if not chosen:
            raise BadRequest(f"invalid tool_choice.name: no tool named {value.get('name')!r}")
    # The call as a bare JSON object ({"name", "arguments"}), which formats.tools parses.
    shapes = [{"type": "object", "required": ["name", "arguments"],
               "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]}} for f in chosen]
    schema = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
    return tools_, wire.format_spec(schema, "tool_choice")   # a schema we cannot enforce is a 400 now


def _sampling(body: dict, count_only: bool) -> tuple[dict, tuple[str, ...]]:
    out: dict[str, Any] = {}
    max_tokens = wire.get(body, "max_tokens", int, required=not count_only)
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequest("invalid max_tokens: must be at least 1")
        out["num_predict"] = max_tokens
    for key in ("temperature", "top_p"):
        value = wire.get(body, key, float)
        if value is not None:
            if not 0.0 <= value <= 1.0:
                raise BadRequest(f"invalid {key}: must be between 0 and 1")
            out[key] = value
    top_k = wire.get(body, "top_k", int)
    if top_k is not None:
        if top_k < 0:
            raise BadRequest("invalid top_k: must be at least 0")
        out["top_k"] = top_k
    stops = wire.get(body, "stop_sequences", list, [])
    if not all(isinstance(s, str) for s in stops):
        raise BadRequest("invalid stop_sequences: expected an array of strings")
    stops = [s for s in stops if s]
    if stops:
        out["stop"] = stops
    return options.parse_partial(out), tuple(stops)


def parse_messages(body: Any, count_only: bool = False) -> MessagesRequest:
    """A Messages request (or, with `count_only`, a count_tokens one: no max_tokens, no stream)."""
    body = wire.body_object(body)
    name = wire.model_name(body)
    overrides, stops = _sampling(body, count_only)
    system = _text(body.get("system"), "system")
    messages = _messages(body.get("messages"))
    offered, forced = _tool_choice(body.get("tool_choice"), _tools(body.get("tools")))
    setting = body.get("thinking")
    if setting is not None and (not isinstance(setting, dict)
                                or setting.get("type") not in ("enabled", "disabled", "adaptive")):
        raise BadRequest('invalid thinking: expected {"type": "enabled" | "disabled" | "adaptive", ...}')
    if system:
        messages = ({"role": "system", "content": system}, *messages)
    think = False if isinstance(setting, dict) and setting.get("type") == "disabled" else None
    spec = PromptSpec(name.display, messages=messages, tools=offered, think=think, think_strict=False)
    return MessagesRequest(
        name, spec, overrides, forced,
        tuple(t["function"]["name"] for t in offered) if offered else None, stops,
        False if count_only else wire.get(body, "stream", bool, False), wire.keep_alive(body))


# ---- responses -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Part:
    kind: str                       # "thinking", "text" or "tool_use"
    text: str = ""
    call: dict | None = None


def _parts(items: Iterator[Any]) -> Iterator[_Part]:
    """Generated items (thinking split off first, so a call written after it is still
    found) -> thinking, text and tool_use parts."""
    for item in items:
        if isinstance(item, Calls):
            for call in item.calls:
                yield _Part("tool_use", call=call["function"])
        elif item.text:
            yield _Part("thinking" if item.thinking else "text", item.text)


def _block_events(parts: Iterator[_Part]) -> Iterator[dict]:
    """content_block_start/delta/stop events: one block per run of one kind, one per call."""
    index, open_kind = -1, None
    for part in parts:
        if part.kind != open_kind or part.kind == "tool_use":
            if open_kind is not None:
                yield {"type": "content_block_stop", "index": index}
            index, open_kind = index + 1, part.kind
            if part.kind == "thinking":
                block: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
            elif part.kind == "text":
                block = {"type": "text", "text": ""}
            else:
                block = {"type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}", "name": part.call["name"],
                         "input": {}}
            yield {"type": "content_block_start", "index": index, "content_block": block}
        if part.kind == "thinking":
            delta = {"type": "thinking_delta", "thinking": part.text}
        elif part.kind == "text":
            delta = {"type": "text_delta", "text": part.text}
        else:
            delta = {"type": "input_json_delta", "partial_json": json.dumps(part.call["arguments"])}
        yield {"type": "content_block_delta", "index": index, "delta": delta}
    if open_kind is not None:
        yield {"type": "content_block_stop", "index": index}


def _content(events: Iterator[dict]) -> list[dict]:
    """The blocks a stream of block events describes (a non-streamed response's content)."""
    blocks: list[dict] = []
    partial: dict[int, str] = {}
    for event in events:
        if event["type"] == "content_block_start":
            blocks.append(dict(event["content_block"]))
        elif event["type"] == "content_block_delta":
            block, delta = blocks[event["index"]], event["delta"]
            if delta["type"] == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
            else:
                key = "thinking" if delta["type"] == "thinking_delta" else "text"
                block[key] += delta[key]
        elif event["index"] in partial:
            blocks[event["index"]]["input"] = json.loads(partial.pop(event["index"]))
    return blocks


def _stop_reason(summary: Summary, req: MessagesRequest, called: bool) -> tuple[str, str | None]:
    if called:
        return "tool_use", None
    # Only the request's own sequences: a model's default stop (say <|im_end|>) ends its turn.
    if summary.stop_string and summary.stop_string in req.stop_sequences:
        return "stop_sequence", summary.stop_string
    return ("max_tokens" if summary.reason == "length" else "end_turn"), None


def _usage(summary: Summary) -> dict:
    cached = max(0, summary.prompt_tokens - summary.prompt_eval_tokens)
    return {"input_tokens": summary.prompt_tokens - cached, "output_tokens": summary.eval_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def handle_messages(ctx: Any) -> Reply | Stream:
    req = parse_messages(ctx.json())
    entry = resolve(ctx, req.name)
    job = GenerateJob(entry, req.prompt, req.options, req.keep_alive, req.format)
    summary = Summary()
    items = generation(ctx, job, summary, list(req.tool_names) if req.tool_names is not None else None)
    message = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
               "model": req.name.display}
    if not req.stream:
        content = _content(_block_events(_parts(items)))
        reason, sequence = _stop_reason(summary, req, any(b["type"] == "tool_use" for b in content))
        return Reply({**message, "content": content, "stop_reason": reason, "stop_sequence": sequence,
                      "usage": _usage(summary)})

    def events() -> Iterator[dict]:
        blocks = _block_events(_parts(items))
        try:
            # The first block is pulled before message_start is written, so that errors until
            # the first token (unknown model, prompt too long) still get a real status.
            first = next(blocks, None)
            yield {"type": "message_start",
                   "message": {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                               "usage": {"input_tokens": summary.prompt_tokens, "output_tokens": 0}}}
            called = False
            for event in itertools.chain([first] if first is not None else [], blocks):
                if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
                    called = True
                yield event
            reason, sequence = _stop_reason(summary, req, called)
            yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": _usage(summary)}
            yield {"type": "message_stop"}
        finally:
            items.close()       # the client left or a write failed: stop the generation too

    return Stream(events(), sse=True, named_events=True)


def handle_count_tokens(ctx: Any) -> Reply:
    req = parse_messages(ctx.json(), count_only=True)
    entry = resolve(ctx, req.name)
    ticket = ctx.app.scheduler.submit(TokenizeJob(entry, req.prompt, req.keep_alive))
    for event in ticket.events(gone=ctx.gone):
        if isinstance(event, Tokenized):
            ctx.log.update(prompt_tokens=len(event.tokens), load_ms=round(event.load_seconds * 1e3, 2))
            return Reply({"input_tokens": len(event.tokens)})
    raise MlxliteError("counting tokens produced no result")
