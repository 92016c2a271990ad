"""Chat messages -> prompt text, with the model's own jinja chat template.

Contract:
  - `ChatTemplate(source, bos_token=, eos_token=, name=)`; `render(messages, tools=None,
    add_generation_prompt=True, **extra) -> str` renders with the variables Hugging Face
    templates expect (`messages`, `tools`, `add_generation_prompt`, `bos_token`,
    `eos_token`, `raise_exception`, `strftime_now`, `tojson`) in a sandbox.
  - `find_template(files, gguf_meta)` picks the template source: `chat_template.jinja`,
    then `tokenizer_config.json`'s `chat_template` (a string, or the named list's
    "default"), then GGUF `tokenizer.chat_template`. `fallback(vocab)` chooses a named
    fallback (chatml, llama3, plain) for models without one.
  - `with_system(messages, system)` puts a system prompt first (replacing none the
    caller gave); `raw` prompts never go through a template (callers skip it).
A template error (bad jinja, `raise_exception`) is a `BadRequest` that says so.
Pure: jinja2 only, never mlx.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from mlxlite.errors import BadRequest

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
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # Same environment settings as transformers' apply_chat_template.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise BadRequest(f"invalid chat template ({name}): {exc}") from None
        self.source = source
        self.name = name
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **extra: Any) -> str:
        from jinja2 import TemplateError

        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a list of objects")
        try:
            return self._template.render(
                messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except BadRequest:
            raise
        except (TemplateError, TypeError, KeyError, ValueError, AttributeError) as exc:
            raise BadRequest(f"chat template ({self.name}) failed to render: {exc}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


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
