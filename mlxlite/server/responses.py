"""OpenAI's Responses API: `POST /v1/responses`, stateless (as Ollama's is).

Contract: the request's fields are validated (400 naming the field) and mapped onto the
same machinery as the chat route (`native.generation`, one `GenerateJob`): `input` (a
string, or `message` / `function_call` / `function_call_output` items) and
`instructions` -> chat messages with tool calls and tool results; `max_output_tokens`
-> num_predict; `temperature`, `top_p`; `text.format` (json_object -> "json",
json_schema -> its schema, decoded under a constraint); function `tools` -> tool calls
parsed by `formats.tools`; `reasoning.effort` -> think ("none" turns it off; a model
that cannot think ignores it); `top_logprobs` and `include: ["message.output_text.logprobs"]`
-> logprobs on the text. The answer is a `response` object whose `output` holds a
`reasoning` item (the model's thinking as its summary text, its tokens counted as
`reasoning_tokens`) when the model thought, a `message` item (`output_text`) and
`function_call` items, with `usage` and `status` ("incomplete" with reason
max_output_tokens when the token budget ran out). A reasoning item sent back in `input`
becomes the thinking of the assistant turn after it. Streams are
SSE events named by their `type`, numbered by `sequence_number`, in the order the
`openai` package's typed stream expects. Nothing is stored: `previous_response_id`,
`conversation` and `background` are refused with a 400 that says so; `store` is
accepted and ignored. Errors use OpenAI's shape (daemon.py). Never imports mlx.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from mlxlite import options
from mlxlite.errors import BadRequest, Unsupported
from mlxlite.sched import GenerateJob
from mlxlite.server import images, wire
from mlxlite.server.native import Calls, gather, generation, resolve
from mlxlite.server.prompt import PromptSpec
from mlxlite.server.wire import Reply, Stream, Summary

_STATEFUL = {
    "previous_response_id": "previous_response_id is not supported: mlxlite's Responses API is stateless "
                            "and stores nothing; send the whole conversation in input",
    "conversation": "conversation is not supported: mlxlite's Responses API is stateless and stores "
                    "nothing; send the whole conversation in input",
}
_TEXT_PARTS = ("input_text", "output_text", "text")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio", "image_url")


# ---- the request ---------------------------------------------------------------------
def _refuse_stateful(body: dict) -> None:
    for key, message in _STATEFUL.items():
        if body.get(key) is not None:
            raise BadRequest(message)
    if wire.get(body, "background", bool, False):
        raise BadRequest("background is not supported: responses are not stored, so there is nothing to poll")
    wire.get(body, "store", bool)       # accepted (OpenAI's default is true) and ignored: nothing is kept


def _sampling(body: dict) -> dict:
    """Responses sampling fields -> native option overrides (validated by options.py)."""
    temperature = wire.get(body, "temperature", float, 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise BadRequest("invalid temperature: must be between 0 and 2")
    top_p = wire.get(body, "top_p", float, 1.0)
    if not 0.0 <= top_p <= 1.0:
        raise BadRequest("invalid top_p: must be between 0 and 1")
    out: dict[str, Any] = {"temperature": temperature, "top_p": top_p}
    limit = wire.get(body, "max_output_tokens", int)
    if limit is not None:
        if limit < 1:
            raise BadRequest("invalid max_output_tokens: must be at least 1")
        out["num_predict"] = limit
    return options.parse_partial(out)


def _text_format(body: dict) -> tuple[str | dict | None, dict]:
    """(the constraint for the engine, the `text` object echoed back)."""
    text = body.get("text")
    if text is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(text, dict):
        raise BadRequest("invalid text: expected an object")
    fmt = text.get("format")
    if fmt is None:
        return None, {**text, "format": {"type": "text"}}
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise BadRequest("invalid text.format: expected an object with a type")
    kind = fmt["type"]
    if kind == "text":
        return None, text
    if kind == "json_object":
        return "json", text
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequest("invalid text.format.schema: expected a JSON schema object")
        return wire.format_spec(fmt["schema"], "text.format.schema"), text
    raise BadRequest(f"invalid text.format.type {kind!r}: expected text, json_object or json_schema")


_LOGPROBS = "message.output_text.logprobs"


def _reasoning(body: dict) -> tuple[bool | str | None, dict]:
    """(think, the `reasoning` object echoed back) from the request's `reasoning`."""
    value = body.get("reasoning")
    if value is None:
        return None, {"effort": None, "summary": None}
    if not isinstance(value, dict):
        raise BadRequest("invalid reasoning: expected an object")
    summary = value.get("summary")
    if summary is not None and summary not in ("auto", "concise", "detailed"):
        raise BadRequest('invalid reasoning.summary: expected "auto", "concise" or "detailed"')
    return wire.reasoning_effort(value.get("effort"), "reasoning.effort"), {"effort": value.get("effort"),
                                                                             "summary": summary}


def _logprobs(body: dict) -> tuple[bool, int]:
    """(logprobs wanted, top_logprobs) from `include` and `top_logprobs`."""
    include = wire.get(body, "include", list, [])
    if not all(isinstance(i, str) for i in include):
        raise BadRequest("invalid include: expected an array of strings")
    top = wire.get(body, "top_logprobs", int, 0)
    if not 0 <= top <= 20:
        raise BadRequest("invalid top_logprobs: must be between 0 and 20")
    return _LOGPROBS in include or top > 0, top


def _tools(body: dict) -> tuple[dict, ...] | None:
    """Responses' flat function tools -> the chat shape the templates and parser know."""
    value = body.get("tools")
    if value in (None, []):
        return None
    if not isinstance(value, list):
        raise BadRequest("invalid tools: expected an array")
    chat = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise BadRequest(f"invalid tools[{i}]: only function tools are supported, not {kind!r}")
        fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        chat.append({"type": "function", "function": fn})
    tools = wire.parse_tools(chat)
    choice = body.get("tool_choice")
    if choice == "none":
        return None
    if choice not in (None, "auto", "required") and not (isinstance(choice, dict) and isinstance(choice.get("type"), str)):
        raise BadRequest('invalid tool_choice: expected "none", "auto", "required" or an object')
    return tools


def _text(where: str, content: Any, pictures: list | None = None) -> str:
    """A message's content: a string, or text parts joined; `input_image` parts go to
    `pictures` where a user message may carry them (other media is refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRequest(f"invalid {where}: expected a string or an array of parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind == "input_image" and pictures is not None:
            pictures.append(images.responses_image(part, f"{where}[{j}]"))
        elif kind in _MEDIA_PARTS:
            raise Unsupported("this model does not support images, files or audio")
        else:
            raise BadRequest(f"invalid {where}[{j}]: expected an input_text or output_text part")
    return "\n".join(texts)


def _arguments(where: str, value: Any) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise BadRequest(f"invalid {where}.arguments: not JSON") from None
        if isinstance(parsed, dict):
            return parsed
    raise BadRequest(f"invalid {where}.arguments: expected a JSON object in a string")


def _messages(body: dict) -> tuple[dict, ...]:
    """`instructions` + `input` -> chat messages. System and developer text goes first as
    one system message (the template takes one); function calls join the assistant turn
    before them; each function_call_output becomes a tool message."""
    instructions = wire.get(body, "instructions", str)
    value = body.get("input")
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRequest("invalid input: expected a non-empty string or array of items")
    system = [instructions] if instructions else []
    turns: list[dict] = []
    call_names: dict[str, str] = {}
    thought: list[str] = []         # reasoning items, for the assistant turn that follows them

    def assistant(turn: dict) -> dict:
        if thought:
            turn["thinking"] = "\n".join(thought)
            thought.clear()
        turns.append(turn)
        return turn
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"invalid {where}: expected an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            pictures: list[bytes] = []
            content = _text(f"{where}.content", item.get("content"), pictures if role == "user" else None)
            if role in ("system", "developer"):
                system.append(content)
            elif role == "assistant":
                assistant({"role": role, "content": content})
            elif role == "user":
                turns.append({"role": role, "content": content, **({"images": tuple(pictures)} if pictures else {})})
            else:
                raise BadRequest(f"invalid {where}.role: expected user, assistant, system or developer")
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not name or not isinstance(call_id, str):
                raise BadRequest(f"invalid {where}: a function_call needs a name and a call_id")
            call = {"id": call_id, "function": {"name": name, "arguments": _arguments(where, item.get("arguments"))}}
            call_names[call_id] = name
            if turns and turns[-1]["role"] == "assistant" and not thought:
                turns[-1].setdefault("tool_calls", []).append(call)
            else:
                assistant({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise BadRequest(f"invalid {where}: a function_call_output needs a call_id")
            msg = {"role": "tool", "content": _text(f"{where}.output", item.get("output")), "tool_call_id": call_id}
            if call_id in call_names:
                msg["tool_name"] = call_names[call_id]
            turns.append(msg)
        elif kind == "reasoning":
            thought.extend(_reasoning_text(f"{where}", item))
        elif kind == "item_reference":
            raise BadRequest(f"invalid {where}: item_reference needs stored items, and nothing is stored")
        else:
            raise BadRequest(f"invalid {where}.type {kind!r}: expected message, function_call or "
                             "function_call_output")
    if system:
        turns.insert(0, {"role": "system", "content": "\n\n".join(system)})
    images.check_count(turns)
    return tuple(turns)


# ---- the response --------------------------------------------------------------------
def _usage(summary: Summary) -> dict:
    return {"input_tokens": summary.prompt_tokens,
            "input_tokens_details": {"cached_tokens": max(summary.prompt_tokens - summary.prompt_eval_tokens, 0)},
            "output_tokens": summary.eval_tokens,
            "output_tokens_details": {"reasoning_tokens": summary.thinking_tokens},
            "total_tokens": summary.prompt_tokens + summary.eval_tokens}


def _reasoning_text(where: str, item: dict) -> list[str]:
    """The text of a reasoning input item: its summary (what we send), else its content
    (reasoning_text parts); encrypted content from another server carries nothing we can use."""
    texts = []
    for key in ("summary", "content"):
        parts = item.get(key) or []
        if not isinstance(parts, list):
            raise BadRequest(f"invalid {where}.{key}: expected an array")
        texts = [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if texts:
            break
    return texts


def _message_item(item_id: str, text: str, status: str, logprobs: list | None = None) -> dict:
    content = ([{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]
               if status != "in_progress" else [])
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str | None, status: str = "completed") -> dict:
    """The model's thinking as a reasoning item: its text is the summary (`summary_text`)."""
    summary = [{"type": "summary_text", "text": text}] if text is not None else []
    return {"id": item_id, "type": "reasoning", "summary": summary, "status": status}


def _call_item(call: dict, status: str = "completed") -> dict:
    fn = call["function"]
    return {"id": f"fc_{secrets.token_hex(12)}", "type": "function_call", "status": status,
            "call_id": f"call_{secrets.token_hex(8)}", "name": fn["name"],
            "arguments": json.dumps(fn["arguments"])}


def handle_responses(ctx: Any) -> Reply | Stream:
    body = wire.body_object(ctx.json())
    name = wire.model_name(body)
    _refuse_stateful(body)
    overrides = _sampling(body)
    messages = _messages(body)
    tools = _tools(body)
    fmt, text_echo = _text_format(body)
    stream = wire.get(body, "stream", bool, False)
    metadata = wire.get(body, "metadata", dict, {})
    parallel = wire.get(body, "parallel_tool_calls", bool, True)
    truncation = wire.get(body, "truncation", str, "disabled")
    if truncation not in ("auto", "disabled"):
        raise BadRequest('invalid truncation: expected "auto" or "disabled"')
    think, reasoning = _reasoning(body)
    want_logprobs, top = _logprobs(body)
    entry = resolve(ctx, name)
    spec = PromptSpec(name.display, messages=messages, tools=tools, think=think, think_strict=False)
    job = GenerateJob(entry, spec, overrides, wire.keep_alive(body), fmt, truncate=truncation == "auto",
                      top_logprobs=top)
    tool_names = [t["function"]["name"] for t in tools] if tools else None
    summary = Summary()
    items = generation(ctx, job, summary, tool_names, want_logprobs)
    base = {"id": f"resp_{secrets.token_hex(12)}", "object": "response", "created_at": int(time.time()),
            "model": name.display, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "metadata": metadata,
            "parallel_tool_calls": parallel,
            "previous_response_id": None, "reasoning": reasoning, "store": False,
            "temperature": overrides["temperature"], "top_p": overrides["top_p"], "text": text_echo,
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "truncation": truncation, "user": body.get("user"), "error": None}

    def finished(output: list[dict]) -> dict:
        incomplete = summary.reason == "length"
        return {**base, "status": "incomplete" if incomplete else "completed",
                "completed_at": None if incomplete else int(time.time()),
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "output": output, "usage": _usage(summary)}

    if not stream:
        whole = gather(items)
        text, thinking, calls, logprobs = whole.text, whole.thinking, whole.calls, whole.logprobs
        status = "incomplete" if summary.reason == "length" else "completed"
        output = [_reasoning_item(f"rs_{secrets.token_hex(12)}", thinking)] if thinking else []
        if text or not calls:
            output.append(_message_item(f"msg_{secrets.token_hex(12)}", text, status, logprobs))
        output.extend(_call_item(c) for c in calls)
        return Reply(finished(output))
    return Stream(_events(items, base, summary, finished), sse=True, named_events=True)


def _events(items: Iterator[Any], base: dict, summary: Summary,
            finished: Callable[[list[dict]], dict]) -> Iterator[dict]:
    """The Responses event stream. Its first event waits for the first generated piece, so
    errors until then (load, prompt too long) still get a real status."""
    seq = itertools.count()

    def event(kind: str, **fields: Any) -> dict:
        return {"type": kind, "sequence_number": next(seq), **fields}

    try:
        first = next(items, None)
        snapshot = {**base, "status": "in_progress", "completed_at": None, "incomplete_details": None,
                    "output": [], "usage": None}
        yield event("response.created", response=snapshot)
        yield event("response.in_progress", response=snapshot)
        output: list[dict] = []
        msg_id, msg_index, texts, logprobs = f"msg_{secrets.token_hex(12)}", -1, [], []
        rs_id, rs_index, thoughts = f"rs_{secrets.token_hex(12)}", -1, []

        def open_reasoning() -> Iterator[dict]:
            nonlocal rs_index
            rs_index = len(output)
            output.append(_reasoning_item(rs_id, None, "in_progress"))
            yield event("response.output_item.added", output_index=rs_index, item=output[rs_index])
            yield event("response.reasoning_summary_part.added", item_id=rs_id, output_index=rs_index,
                        summary_index=0, part={"type": "summary_text", "text": ""})

        def close_reasoning() -> Iterator[dict]:
            text = "".join(thoughts)
            output[rs_index] = done = _reasoning_item(rs_id, text)
            yield event("response.reasoning_summary_text.done", item_id=rs_id, output_index=rs_index,
                        summary_index=0, text=text)
            yield event("response.reasoning_summary_part.done", item_id=rs_id, output_index=rs_index,
                        summary_index=0, part=done["summary"][0])
            yield event("response.output_item.done", output_index=rs_index, item=done)

        def open_message() -> Iterator[dict]:
            nonlocal msg_index
            msg_index = len(output)
            output.append(_message_item(msg_id, "", "in_progress"))
            yield event("response.output_item.added", output_index=msg_index, item=output[msg_index])
            yield event("response.content_part.added", item_id=msg_id, output_index=msg_index, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

        def close_message() -> Iterator[dict]:
            text = "".join(texts)
            status = "incomplete" if summary.reason == "length" else "completed"
            output[msg_index] = done = _message_item(msg_id, text, status, logprobs)
            yield event("response.output_text.done", item_id=msg_id, output_index=msg_index, content_index=0,
                        text=text, logprobs=logprobs)
            yield event("response.content_part.done", item_id=msg_id, output_index=msg_index, content_index=0,
                        part=done["content"][0])
            yield event("response.output_item.done", output_index=msg_index, item=done)

        calls: list[dict] = []
        thinking_open = False
        carried: list[dict] = []        # logprobs of thinking tokens: they ride on the text's first delta
        for item in itertools.chain([first] if first is not None else [], items):
            if isinstance(item, Calls):
                calls.extend(item.calls)
                continue
            if item.thinking:
                if rs_index < 0:
                    thinking_open = True
                    yield from open_reasoning()
                thoughts.append(item.text)
                carried.extend(item.logprobs)
                yield event("response.reasoning_summary_text.delta", item_id=rs_id, output_index=rs_index,
                            summary_index=0, delta=item.text)
                continue
            if thinking_open:
                thinking_open = False
                yield from close_reasoning()
            if msg_index < 0:
                yield from open_message()
            texts.append(item.text)
            delta_logprobs, carried = carried + list(item.logprobs), []
            logprobs.extend(delta_logprobs)
            yield event("response.output_text.delta", item_id=msg_id, output_index=msg_index, content_index=0,
                        delta=item.text, logprobs=delta_logprobs)
        if thinking_open:
            yield from close_reasoning()
        if msg_index < 0 and not calls:
            yield from open_message()       # an empty answer (or only thinking) is still one message
        logprobs.extend(carried)
        if msg_index >= 0:
            yield from close_message()
        for call in calls:
            done = _call_item(call)
            index = len(output)
            output.append({**done, "status": "in_progress", "arguments": ""})
            yield event("response.output_item.added", output_index=index, item=output[index])
            yield event("response.function_call_arguments.delta", item_id=done["id"], output_index=index,
                        delta=done["arguments"])
            yield event("response.function_call_arguments.done", item_id=done["id"], output_index=index,
                        name=done["name"], arguments=done["arguments"])
            output[index] = done
            yield event("response.output_item.done", output_index=index, item=done)
        final = finished(output)
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                    response=final)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()         # a client gone mid-stream: stop its generation now, not at garbage collection
