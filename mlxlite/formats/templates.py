"""Chat messages -> prompt text, with the model's template: jinja, or Ollama's Go template.

Contract:
  - `ChatTemplate(source, bos_token=, eos_token=, name=)`; `render(messages, tools=None,
    add_generation_prompt=True, **extra) -> str` renders with the variables Hugging Face
    templates expect (`messages`, `tools`, `add_generation_prompt`, `bos_token`,
    `eos_token`, `raise_exception`, `strftime_now`, `tojson`) in a sandbox.
  - `GoChatTemplate(source, name=)`: an Ollama template layer (Go's text/template, run by
    `gotemplate`) over the data Ollama's template package passes: messages collated
    (consecutive turns of one role joined by a blank line, tool results kept apart, every
    system text in `.System`), `.Messages` (`.Role .Content .Thinking .ToolCalls .ToolName
    .ToolCallID`; a call's `.Function.Name`/`.Function.Arguments`), `.Tools` (`.Function.Name
    .Description .Parameters.Properties` ...; printed as JSON), `.Think .ThinkLevel
    .IsThinkSet`. A template that never names `.Messages` is a legacy one: it runs once per
    prompt/response pair with `.System .Prompt .Response`, the last pair cut after
    `.Response`, as Ollama does. Its `render` has the same signature (plus `think`).
  - Both have `supports_tools` (the template reads `tools`/`.Tools`) and `add_special`
    (whether tokenizing the prompt should add the tokenizer's BOS: jinja templates write it
    themselves, Ollama's never do). `load(source, go=...)` builds either; `is_go_template`
    tells them apart by their syntax.
  - `find_template(files, gguf_meta)` picks the template source: `chat_template.jinja`,
    then `tokenizer_config.json`'s `chat_template` (a string, or the named list's
    "default"), then GGUF `tokenizer.chat_template`. `fallback(vocab)` chooses a named
    fallback (chatml, llama3, plain) for models without one.
  - `with_system(messages, system)` puts a system prompt first (replacing none the
    caller gave); `raw` prompts never go through a template (callers skip it).
A template error (bad jinja or Go syntax, `raise_exception`, a failed execution) is a
`BadRequest` that says so. A jinja render is bounded as a Go one is (`jinja_bounds`:
`MAX_STEPS` template lines executed, `MAX_OUTPUT` characters, and `*`/`**` that would build
a value past those limits refused), since a template from a Modelfile or a pulled model must
not spin a server thread forever. Pure: jinja2 and `gotemplate` only, never mlx.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from mlxlite.errors import BadRequest
from mlxlite.formats import gotemplate, jinja_bounds
from mlxlite.formats.gotemplate import GoList, GoMap, GoStruct

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] or '') | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + (message['content'] or '') + '\n' }}"
    "{% else %}{{ 'Assistant: ' + (message['content'] or '') + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
FALLBACKS = {"chatml": CHATML, "llama3": LLAMA3, "plain": PLAIN}


def _raise(message: str) -> None:
    raise BadRequest(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template; `render` is thread-safe (jinja templates are)."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 name: str = "model") -> None:
        from jinja2 import TemplateError

        # Same environment settings as transformers' apply_chat_template.
        env = jinja_bounds.sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise BadRequest(f"invalid chat template ({name}): {exc}") from None
        except (RecursionError, SyntaxError):  # deep nesting: jinja's parser or Python's compiler
            raise BadRequest(f"invalid chat template ({name}): nested too deeply") from None
        self.source = source
        self.name = name
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self._env = env
        self._tools: bool | None = None

    add_special = False     # the template writes bos_token itself

    @property
    def supports_tools(self) -> bool:
        """Whether the template reads the `tools` variable."""
        if self._tools is None:
            from jinja2 import meta

            self._tools = "tools" in meta.find_undeclared_variables(self._env.parse(self.source))
        return self._tools

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, think: bool | str | None = None, **extra: Any) -> str:
        from jinja2 import TemplateError

        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a list of objects")
        try:
            return jinja_bounds.bounded(lambda: self._template.generate(
                messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra))
        except BadRequest:
            raise
        except jinja_bounds.OverBudget as exc:
            raise BadRequest(f"chat template ({self.name}) stopped: {exc}") from None
        except (TemplateError, TypeError, KeyError, ValueError, AttributeError) as exc:
            raise BadRequest(f"chat template ({self.name}) failed to render: {exc}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


# ---- Ollama's Go templates: the values a template sees ----------------------------------------
# Go types restated from Ollama's template package (api.Tool and friends): what a template
# reads, what it prints (Stringers print JSON) and how `json` writes it (JSON tags).
def _any(value: Any) -> Any:
    """A JSON value as Go decodes it into `any`: every number a float64."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_any(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _any(v) for k, v in value.items()}
    return value


def _strings(value: Any) -> GoList:
    return GoList([v for v in value if isinstance(v, str)] if isinstance(value, list) else [], nil=value is None)


class _PropertyType(GoList):
    """api.PropertyType: a string or a list of them; prints the one string alone."""

    go_type = "api.PropertyType"

    def go_string(self) -> str:
        return "" if not self else self[0] if len(self) == 1 else "[" + " ".join(self) + "]"

    def go_json(self) -> str:
        return gotemplate.go_json(self[0]) if len(self) == 1 else GoList.go_json(self)


class _ToolProperty(GoStruct):
    _go_type = "api.ToolProperty"
    _go_fields = (("AnyOf", "anyOf,omitempty"), ("Type", "type,omitempty"), ("Items", "items,omitempty"),
                  ("Description", "description,omitempty"), ("Enum", "enum,omitempty"),
                  ("Properties", "properties,omitempty"), ("Required", "required,omitempty"))


class _Properties(GoMap):
    """Parameter properties by name (a map: ranged and written in key order)."""

    go_type = "map[string]api.ToolProperty"

    def go_zero(self) -> Any:
        return _property({})

    def go_string(self) -> str:
        return "{}" if self.nil else self.go_json()


def _property(d: Any) -> _ToolProperty:
    d = d if isinstance(d, dict) else {}
    kind = d.get("type")
    props = d.get("properties")
    return _ToolProperty(
        AnyOf=GoList([_property(x) for x in d["anyOf"]] if isinstance(d.get("anyOf"), list) else [], nil=True),
        Type=_PropertyType([kind] if isinstance(kind, str) else _strings(kind) if isinstance(kind, list) else []),
        Items=_any(d.get("items")),
        Description=d.get("description") if isinstance(d.get("description"), str) else "",
        Enum=GoList(_any(d["enum"]) if isinstance(d.get("enum"), list) else [], nil=True),
        Properties=_properties(props) if isinstance(props, dict) else None,
        Required=_strings(d.get("required")))


def _properties(d: Any) -> _Properties:
    if not isinstance(d, dict):
        return _Properties(nil=True)
    return _Properties({str(k): _property(v) for k, v in d.items()})


class _JSONStruct(GoStruct):
    """A struct whose String() is its JSON, as Ollama's api.Tool, api.ToolFunction and
    api.ToolFunctionParameters print. (The copies Ollama's template package makes of the
    last two lost their String() in 2026, so there `{{ .Function }}` prints Go's struct
    syntax; qwen2.5-style templates were written for the JSON, which is what they get here.)
    Tool values never change once built, so the JSON is made once."""

    def go_json(self) -> str:
        text = self.__dict__.get("_json")
        if text is None:
            text = self.__dict__["_json"] = GoStruct.go_json(self)
        return text

    def go_string(self) -> str:
        return self.go_json()


class _Parameters(_JSONStruct):
    _go_type = "api.ToolFunctionParameters"
    _go_fields = (("Type", "type"), ("Defs", "$defs,omitempty"), ("Items", "items,omitempty"),
                  ("Required", "required,omitempty"), ("Properties", "properties"))


class _Function(_JSONStruct):
    _go_type = "api.ToolFunction"
    _go_fields = (("Name", "name"), ("Description", "description"), ("Parameters", "parameters"))


class _Tool(_JSONStruct):
    _go_type = "api.Tool"
    _go_fields = (("Type", "type"), ("Items", "items,omitempty"), ("Function", "function"))


class _Tools(GoList):
    go_type = "api.Tools"

    def go_string(self) -> str:
        return self.go_json()


def _text(d: dict, key: str) -> str:
    value = d.get(key)
    return value if isinstance(value, str) else ""


def _tool(t: Any) -> _Tool:
    t = t if isinstance(t, dict) else {}
    fn = t.get("function") if isinstance(t.get("function"), dict) else {}
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    return _Tool(Type=_text(t, "type"), Items=_any(t.get("items")), Function=_Function(
        Name=_text(fn, "name"), Description=_text(fn, "description"), Parameters=_Parameters(
            Type=_text(params, "type"), Defs=_any(params.get("$defs")), Items=_any(params.get("items")),
            Required=_strings(params.get("required")), Properties=_properties(params.get("properties")))))


class _Arguments(GoMap):
    """A tool call's arguments (a map: ranged in key order; prints as JSON)."""

    def go_string(self) -> str:
        return "{}" if self.nil else self.go_json()


class _CallFunction(GoStruct):
    _go_type = "template.ToolCallFunction"
    _go_fields = (("Index", ""), ("Name", ""), ("Arguments", ""))


class _Call(GoStruct):
    _go_type = "template.ToolCall"
    _go_fields = (("ID", ""), ("Function", ""))


class _Message(GoStruct):
    _go_type = "*template.Message"
    _go_fields = (("Role", ""), ("Content", ""), ("Thinking", ""), ("Images", ""), ("ToolCalls", ""),
                  ("ToolName", ""), ("ToolCallID", ""))
    _go_pointer = True


def _call(c: Any) -> _Call:
    c = c if isinstance(c, dict) else {}
    fn = c.get("function") if isinstance(c.get("function"), dict) else {}
    args = fn.get("arguments")
    if isinstance(args, str):       # OpenAI's JSON text
        try:
            args = json.loads(args)
        except ValueError:
            args = None
    index = fn.get("index")
    return _Call(ID=_text(c, "id"), Function=_CallFunction(
        Index=index if isinstance(index, int) and not isinstance(index, bool) else 0, Name=_text(fn, "name"),
        Arguments=_Arguments(_any(args), nil=False) if isinstance(args, dict) else _Arguments(nil=True)))


def _message(m: dict) -> _Message:
    calls = m.get("tool_calls") if isinstance(m.get("tool_calls"), list) else []
    return _Message(Role=_text(m, "role"), Content=_text(m, "content"), Thinking=_text(m, "thinking"),
                    Images=GoList(nil=True), ToolCalls=GoList([_call(c) for c in calls], nil=True),
                    ToolName=_text(m, "tool_name") or _text(m, "name"), ToolCallID=_text(m, "tool_call_id"))


def collate(messages: list[dict]) -> tuple[str, list[_Message]]:
    """Ollama's collate: (every system text joined by a blank line, the messages with
    consecutive ones of one role, tool results aside, joined into the first)."""
    systems: list[str] = []
    out: list[_Message] = []
    for m in messages:
        msg = _message(m)
        if msg.Role == "system":
            systems.append(msg.Content)
        if out and out[-1].Role == msg.Role and msg.Role != "tool":
            out[-1].Content += "\n\n" + msg.Content
        else:
            out.append(msg)
    return "\n\n".join(systems), out


def _think_values(think: bool | str | None) -> dict[str, Any]:
    if isinstance(think, str):
        return {"Think": think in ("low", "medium", "high", "max"), "ThinkLevel": think, "IsThinkSet": True}
    return {"Think": bool(think), "ThinkLevel": "medium" if think else "", "IsThinkSet": think is not None}


class GoChatTemplate:
    """An Ollama template layer, executed as Go's text/template (see the module doc)."""

    add_special = True      # Ollama's templates never write BOS: the tokenizer adds it

    def __init__(self, source: str, *, name: str = "model") -> None:
        try:
            parsed = gotemplate.parse(source)
            names = parsed.identifiers()
        except gotemplate.TemplateError as exc:
            raise BadRequest(f"invalid Go template ({name}): {exc.reason}"
                             + (f" (line {exc.line}, column {exc.column})" if exc.line else "")) from None
        if "messages" not in names and "response" not in names:
            parsed = parsed.with_response()     # Ollama appends {{ .Response }} to such templates
        self._template = parsed
        self._cut: gotemplate.Template | None = None
        self._tools: tuple[Any, _Tools] | None = None   # (the request's list, its Go values)
        self.source = source
        self.name = name
        self.legacy = "messages" not in names
        self.supports_tools = "tools" in names

    def _run(self, template: gotemplate.Template, data: dict, funcs: bool = True) -> str:
        try:
            return template.execute(data, funcs=funcs)
        except gotemplate.TemplateError as exc:
            raise BadRequest(f"chat template ({self.name}) failed to render: {exc}") from None

    def _go_tools(self, tools: list[dict] | None) -> _Tools:
        """The tools as Go values; the same list again (a chat fitted to num_ctx renders a
        few times) reuses them."""
        if tools is None:
            return _Tools(nil=True)
        cached = self._tools
        if cached is not None and cached[0] is tools:
            return cached[1]
        converted = _Tools([_tool(t) for t in tools])
        self._tools = (tools, converted)
        return converted

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, think: bool | str | None = None, **extra: Any) -> str:
        """The prompt for `messages`: Go templates always end where the reply starts, so
        `add_generation_prompt` changes nothing; `extra` is ignored."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a list of objects")
        system, collated = collate(messages)
        flags = _think_values(think)
        if not self.legacy:
            return self._run(self._template, {
                "System": system, "Messages": GoList(collated, nil=not collated), "Tools": self._go_tools(tools),
                "Response": "", **flags})
        out: list[str] = []
        pair = {"System": "", "Prompt": "", "Response": ""}

        def flush() -> None:
            out.append(self._run(self._template, {**pair, **flags}))
            pair.update(System="", Prompt="", Response="")

        for msg in collated:
            if msg.Role == "system":
                if pair["Prompt"] or pair["Response"]:
                    flush()
                pair["System"] = msg.Content
            elif msg.Role == "user":
                if pair["Response"]:
                    flush()
                pair["Prompt"] = msg.Content
            elif msg.Role == "assistant":
                pair["Response"] = msg.Content
        if self._cut is None:
            self._cut = self._template.cut_after_response()
        # The last pass runs a bare parse tree, as Ollama's does: Go's builtins only.
        out.append(self._run(self._cut, {**pair, **flags}, funcs=False))
        return "".join(out)

    def __repr__(self) -> str:
        return f"GoChatTemplate({self.name!r})"


_GO_ACTION = re.compile(r"\{\{-?\s*(\.|\$|/\*|(if|range|with|end|else|template|block|define)\b)")


def is_go_template(text: str) -> bool:
    """Whether a template is Go syntax (`{{ .Field }}`, `{{ if }}`, `$x`) rather than jinja
    (`{% ... %}` blocks, bare names)."""
    return "{%" not in text and bool(_GO_ACTION.search(text))


def load(source: str, *, go: bool, bos_token: str | None = None, eos_token: str | None = None,
         name: str = "model") -> ChatTemplate | GoChatTemplate:
    """The template object for a source: an Ollama Go template, or a jinja one."""
    if go:
        return GoChatTemplate(source, name=name)
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token, name=name)


def _from_tokenizer_config(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tpl = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def find_template(model_dir: Path | None = None, gguf_meta: dict | None = None) -> str | None:
    """The model's own template source, or None (see module doc for the order)."""
    if model_dir is not None:
        jinja_file = Path(model_dir) / "chat_template.jinja"
        if jinja_file.is_file():
            text = jinja_file.read_text(encoding="utf-8")
            if text.strip():
                return text
        cfg = Path(model_dir) / "tokenizer_config.json"
        if cfg.is_file():
            found = _from_tokenizer_config(cfg)
            if found:
                return found
        chat_json = Path(model_dir) / "chat_template.json"
        if chat_json.is_file():
            found = _from_tokenizer_config(chat_json)
            if found:
                return found
    if gguf_meta:
        tpl = gguf_meta.get("tokenizer.chat_template")
        if isinstance(tpl, str) and tpl.strip():
            return tpl
    return None


def fallback(vocab: set[str] | dict[str, int]) -> str:
    """The named fallback that fits a vocabulary's special tokens."""
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    return "plain"


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Messages with `system` first, unless the caller already gave a system message."""
    if not system or any(m.get("role") == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def assemble(chat: list[dict], system: str | None, model_messages: list[dict] | None) -> list[dict]:
    """Ollama's order: the system prompt (the chat's own, else the model's), then the
    model's example MESSAGEs, then the chat's turns."""
    own = next((m.get("content") for m in chat if m.get("role") == "system"), None)
    turns = [m for m in chat if m.get("role") != "system"]
    return with_system([*(model_messages or []), *turns], own if own is not None else system)
