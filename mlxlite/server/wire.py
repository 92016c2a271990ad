"""Wire types of the native (Ollama-compatible) API: request parsing, response shapes.

Contract: `parse_*` functions take a decoded JSON body and return frozen dataclasses or
raise `BadRequest` naming the field (wrong type, out of range), before any byte of a
response is written; the prompt they carry is a `prompt.PromptSpec` (rendered on the MLX
thread).
`think` is true, false or a level (`check_think`); how it renders is `prompt.py`'s.
`Reply` and `Stream` are what route handlers return to `daemon.py`. Shapes follow
Ollama's `docs/api.md`: durations in nanoseconds, `created_at` RFC 3339 in UTC.
Never imports mlx.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mlxlite import config, names, options
from mlxlite.constrain import compile_spec
from mlxlite.errors import BadRequest
from mlxlite.names import ModelName
from mlxlite.server import images
from mlxlite.server.prompt import PromptSpec


# ---- what handlers hand back to the server ------------------------------------------
@dataclass(frozen=True)
class Reply:
    """A whole response: dict/list -> JSON; str/bytes as is; None -> empty body."""

    body: Any = None
    status: int = 200
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Stream:
    """A streamed response: one NDJSON line (or SSE `data:` event) per item. The server
    pulls the first item before sending headers, so errors until then get a real status."""

    items: Iterator[Any]
    sse: bool = False
    done_marker: bool = False           # SSE: end with `data: [DONE]`
    named_events: bool = False          # SSE: an `event: <item's type>` line before each data line


# ---- field helpers -------------------------------------------------------------------
_MISSING = object()


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def replace_lone_surrogates(value: Any, raw: bytes | None = None) -> Any:
    """A decoded JSON value with every lone UTF-16 surrogate (JSON `"\\ud800"`; a valid pair
    is already one character) replaced by U+FFFD, in keys and strings at any depth.

    Go's encoding/json does this, so Ollama accepts such bodies; left in, one fails the
    tokenizer (TypeError) or a UTF-8 encoder on the MLX thread: a 500. `raw`, the JSON
    text, lets a body without a `\\uD8..`-`\\uDF..` escape skip the walk. The walk is
    iterative: a value may nest as deep as the JSON decoder allows."""
    if raw is not None and not _SURROGATE_ESCAPE.search(raw):
        return value
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, str):
                    node[i] = _SURROGATE.sub("\ufffd", item)
                elif isinstance(item, (list, dict)):
                    stack.append(item)
        elif isinstance(node, dict):
            items = list(node.items())
            node.clear()
            for key, item in items:
                if isinstance(item, str):
                    item = _SURROGATE.sub("\ufffd", item)
                elif isinstance(item, (list, dict)):
                    stack.append(item)
                node[_SURROGATE.sub("\ufffd", key)] = item
    return value


def body_object(body: Any) -> dict:
    if body is None:
        raise BadRequest("missing request body")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def get(body: dict, key: str, kind: type | tuple[type, ...], default: Any = None, *,
        required: bool = False, allow_null: bool = True) -> Any:
    """One field, type-checked (bool is not an int; ints are accepted as floats)."""
    value = body.get(key, _MISSING)
    if value is _MISSING or (value is None and allow_null):
        if required:
            raise BadRequest(f"{key} is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an int past float's range (JSON allows any length)
            raise BadRequest(f"invalid {key}: out of range") from None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        want = " or ".join(_kind_name(k) for k in kinds)
        raise BadRequest(f"invalid {key}: expected {want}, got {_kind_name(type(value))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"invalid {key}: must be finite")
    return value


def _kind_name(kind: type) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
            dict: "an object", type(None): "null"}.get(kind, kind.__name__)


def model_name(body: dict, key: str = "model") -> ModelName:
    text = get(body, key, str, required=True)
    if not text:
        raise BadRequest(f"{key} is required")
    return names.parse(text)


def keep_alive(body: dict) -> float | None:
    value = body.get("keep_alive")
    if value is None:
        return None
    seconds = config.parse_duration(value)
    if abs(seconds) > 1e10:
        raise BadRequest(f"invalid keep_alive: {value!r} is out of range")
    return seconds


def format_spec(value: Any, key: str = "format") -> str | dict | None:
    """`"json"`, a JSON-schema object, or nothing."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        compile_spec(value)  # a bad or unsupported schema is a 400 now, before any model loads
        return value
    raise BadRequest(f'invalid {key}: expected "json" or a JSON schema object')


def request_options(body: dict) -> dict:
    return options.parse_partial(body.get("options"))


THINK_LEVELS = ("low", "medium", "high", "max")


def check_think(body: dict) -> bool | str | None:
    """The request's `think`: None (the model's default), true, false or a level. Whether
    the model can think is known once its template is (`PromptSpec.render`)."""
    think = body.get("think")
    if think is None or isinstance(think, bool) or think in THINK_LEVELS:
        return think
    raise BadRequest('invalid think: expected a boolean or "low", "medium", "high", "max"')


_EFFORTS = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "max",
            "max": "max"}


def reasoning_effort(value: Any, key: str) -> bool | str | None:
    """OpenAI's reasoning effort as a `think` value: "none" turns thinking off, a level asks
    for it (and is handed to templates that read `reasoning_effort`)."""
    if value is None:
        return None
    if value not in _EFFORTS:
        raise BadRequest(f"invalid {key}: expected one of {', '.join(_EFFORTS)}")
    return _EFFORTS[value]


def parse_images(value: Any, key: str = "images") -> tuple[bytes, ...]:
    """Ollama's `images`: base64 strings, checked and decoded (`images.py`)."""
    if value in (None, []):
        return ()
    if not isinstance(value, list):
        raise BadRequest(f"invalid {key}: expected an array of base64 strings")
    return tuple(images.from_base64(v, f"{key}[{i}]") for i, v in enumerate(value))


# ---- native requests -----------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    name: ModelName
    prompt: PromptSpec
    stream: bool
    options: dict
    format: str | dict | None
    keep_alive: float | None
    truncate: bool
    logprobs: bool
    top_logprobs: int
    empty: bool                     # empty prompt: load (or unload with keep_alive 0)


_ROLES = {"system", "user", "assistant", "tool"}


def _common(body: dict) -> dict:
    logprobs = get(body, "logprobs", bool, False)
    top = get(body, "top_logprobs", int, 0)
    if not 0 <= top <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")
    return {
        "stream": get(body, "stream", bool, True),
        "options": request_options(body),
        "format": format_spec(body.get("format")),
        "keep_alive": keep_alive(body),
        "truncate": get(body, "truncate", bool, False),
        "logprobs": logprobs or top > 0,
        "top_logprobs": top,
    }


def parse_generate(body: Any) -> GenerateRequest:
    body = body_object(body)
    name = model_name(body)
    common = _common(body)
    think = check_think(body)
    prompt = get(body, "prompt", str, "")
    system = get(body, "system", str)
    template = get(body, "template", str)
    raw = get(body, "raw", bool, False)
    suffix = get(body, "suffix", str)
    context = get(body, "context", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in context):
        raise BadRequest("invalid context: expected an array of token ids")
    if raw and (template or system or context):
        raise BadRequest("raw mode does not support template, system, or context")
    pictures = parse_images(body.get("images"))
    images.check_count((), len(pictures))
    spec = PromptSpec(name.display, prompt=prompt, system=system, template=template or None, raw=raw,
                      suffix=suffix, context=tuple(context), think=think, images=pictures)
    return GenerateRequest(name, spec, empty=not prompt and not suffix and not context, **common)


def _message(i: int, m: Any) -> dict:
    if not isinstance(m, dict):
        raise BadRequest(f"invalid messages[{i}]: expected an object")
    role = m.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise BadRequest(f"invalid messages[{i}].role: expected one of system, user, assistant, tool")
    content = m.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise BadRequest(f"invalid messages[{i}].content: expected a string")
    out: dict[str, Any] = {"role": role, "content": content}
    pictures = parse_images(m.get("images"), f"messages[{i}].images")
    if pictures:
        out["images"] = pictures
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise BadRequest(f"invalid messages[{i}].tool_calls: expected an array of objects")
        out["tool_calls"] = calls
    for key in ("tool_name", "tool_call_id", "name", "thinking"):
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise BadRequest(f"invalid messages[{i}].{key}: expected a string")
            out[key] = m[key]
    return out


def parse_tools(value: Any, key: str = "tools") -> tuple[dict, ...] | None:
    if value in (None, []):
        return None
    if not isinstance(value, list):
        raise BadRequest(f"invalid {key}: expected an array")
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"invalid {key}[{i}]: expected {{type: function, function: {{name, ...}}}}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise BadRequest(f"invalid {key}[{i}].function.parameters: expected an object")
    return tuple(value)


def parse_chat(body: Any) -> GenerateRequest:
    body = body_object(body)
    name = model_name(body)
    common = _common(body)
    think = check_think(body)
    messages = get(body, "messages", list, [])
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    images.check_count(parsed)
    tools = parse_tools(body.get("tools"))
    # A chat is fitted to num_ctx by whole messages (Ollama's default); `truncate: false`
    # refuses instead. The engine never cuts a chat's tokens.
    spec = PromptSpec(name.display, messages=parsed, tools=tools, fit=body.get("truncate") is not False,
                      think=think)
    common["truncate"] = False
    return GenerateRequest(name, spec, empty=not parsed, **common)


@dataclass(frozen=True)
class EmbedRequest:
    name: ModelName
    inputs: tuple[str, ...]
    truncate: bool
    dimensions: int | None
    keep_alive: float | None
    options: dict
    legacy: bool


def embed_inputs(value: Any, key: str = "input") -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) > 2048:
            raise BadRequest(f"invalid {key}: at most 2048 inputs")
        return tuple(value)
    raise BadRequest(f"invalid {key}: expected a string or an array of strings")


def parse_embed(body: Any, legacy: bool = False) -> EmbedRequest:
    body = body_object(body)
    name = model_name(body)
    inputs = (get(body, "prompt", str, ""),) if legacy else embed_inputs(body.get("input"))
    if legacy and not inputs[0]:
        inputs = ()
    dims = get(body, "dimensions", int)
    if dims is not None and not 1 <= dims <= 1 << 16:
        raise BadRequest("invalid dimensions: must be a positive integer")
    return EmbedRequest(name, inputs, get(body, "truncate", bool, True), dims, keep_alive(body),
                        request_options(body), legacy)


def resize(vectors: list[list[float]], dims: int | None) -> list[list[float]]:
    """Cut embeddings to `dims` and re-normalize (Matryoshka-style, as Ollama does)."""
    if dims is None:
        return vectors
    out = []
    for vec in vectors:
        cut = list(vec[:dims])
        norm = math.sqrt(sum(v * v for v in cut)) or 1.0
        out.append([v / norm for v in cut])
    return out


# ---- native responses ----------------------------------------------------------------
def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


@dataclass
class Summary:
    """Counts and timings of one generation, for final chunks, usage and logs."""

    reason: str = "stop"
    stop_string: str = ""               # the stop string that ended it, if one did
    prompt_tokens: int = 0
    prompt_eval_tokens: int = 0
    eval_tokens: int = 0
    load_seconds: float = 0.0
    prompt_seconds: float = 0.0
    eval_seconds: float = 0.0
    truncated_messages: int = 0     # the chat's oldest messages left out to fit num_ctx
    thinking_tokens: int = 0        # generated tokens that went into the thinking section
    started: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)     # prompt + output ids (for `context`)

    def metrics(self) -> dict:
        """The final chunk's counts. `prompt_eval_count` is the whole prompt, as Ollama
        reports it (LangChain and Open WebUI read it as the input tokens); the part served
        from the prefix cache is `prompt_cached_count`, sent when there is one, and
        `prompt_eval_duration` is the time spent on the rest. `truncated_messages` (when
        non-zero): how many of the chat's oldest messages were left out to fit num_ctx."""
        cached = self.prompt_tokens - self.prompt_eval_tokens
        out = {
            "total_duration": ns(time.perf_counter() - self.started),
            "load_duration": ns(self.load_seconds),
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": ns(self.prompt_seconds),
            "eval_count": self.eval_tokens,
            "eval_duration": ns(self.eval_seconds),
        }
        if cached > 0:
            out["prompt_cached_count"] = cached
        if self.truncated_messages:
            out["truncated_messages"] = self.truncated_messages
        return out


def details(info: dict) -> dict:
    return {
        "parent_model": "",
        "format": info.get("format", ""),
        "family": info.get("family") or info.get("architecture", ""),
        "families": info.get("families") or ([info["architecture"]] if info.get("architecture") else None),
        "parameter_size": str(info.get("parameter_size") or ""),
        "quantization_level": str(info.get("quantization") or ""),
    }


def params_text(params: dict) -> str:
    """A params layer as Ollama's `parameters` string: one `name value` line each."""
    lines = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<24} {json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines)
