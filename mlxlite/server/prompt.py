"""A request's prompt on its way to token ids: the model's template, tools, thinking, and a chat
fitted to num_ctx by whole messages.

Contract: `PromptSpec` is what a route hands the scheduler; `PromptSpec.render(loaded, engine,
num_ctx, num_predict)` runs on the MLX thread (the template lives on the loaded model) and
returns `Rendered` (token ids, how many of the chat's oldest messages were left out, whether
the prompt itself opened a `<think>` section, for a harmony template (gpt-oss) the message
the output continues, which the routes parse channels from, and a vision model's image
inputs). Images ride on their messages (`images`: bytes, checked by `images.py`); a jinja
template places them as content parts (`{"type": "image"}`, Hugging Face's convention), an
Ollama Go template gets the model's image marker (`engine.image_marker`: gemma3's
`<start_of_image>`) in the message's text where Ollama puts its `[img-N]` tags (in place of
each `[img]`, else before the text), and
the engine's `vision_tokens` turns the text and images into token ids and pixel inputs (its
`check_images` first says whether the model takes images at all). A chat longer than
num_ctx loses its oldest whole messages (never the system prompt, never the latest message,
never part of one) unless `fit` is off; a latest message that cannot fit is a `BadRequest`.
Never imports mlx.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from mlxlite.errors import BadRequest
from mlxlite.formats import harmony, templates, thinking


# ---- rendering -------------------------------------------------------------------------
def supports_tools(template: Any) -> bool:
    flag = getattr(template, "supports_tools", None)
    if flag is not None:
        return bool(flag)
    return "tools" in (getattr(template, "source", "") or "")


def supports_thinking(template: Any) -> bool:
    flag = getattr(template, "supports_thinking", None)
    if flag is not None:
        return bool(flag)
    return thinking.supported_by(getattr(template, "source", "") or "")


@dataclass(frozen=True)
class Rendered:
    """A prompt as token ids, how many of the chat's oldest messages were left out, and
    whether it ends inside a thinking section its template opened (`<think>`)."""

    tokens: list[int]
    truncated_messages: int = 0
    thinking: bool = False
    harmony: str | None = None      # a harmony template's prompt: the message the output continues
    vision: Any = None              # the engine's image inputs for these tokens (None: text only)


def _opens_thinking(text: str) -> bool:
    return text.rstrip().endswith(thinking.OPENING)


def output_room(num_ctx: int, num_predict: int) -> int:
    """Tokens kept free for the reply when a prompt must shrink to fit: num_predict when
    set, else half the window (the engine's `truncate` keeps the same room)."""
    room = num_predict if num_predict > 0 else num_ctx // 2
    return max(1, min(room, num_ctx // 2))


@dataclass(frozen=True)
class PromptSpec:
    """A request's prompt before the model's template is known."""

    model: str                                  # display name, for error messages
    prompt: str | None = None                   # /api/generate
    messages: tuple[dict, ...] | None = None    # /api/chat
    system: str | None = None
    template: str | None = None
    raw: bool = False
    suffix: str | None = None
    tools: tuple[dict, ...] | None = None
    context: tuple[int, ...] = ()
    fit: bool = True                            # chat: drop the oldest messages to fit num_ctx
    think: bool | str | None = None             # None: the template's default
    think_strict: bool = True                   # think asked of a model that can't: 400, else ignored
    images: tuple[bytes, ...] = ()              # /api/generate's images (a chat's ride on its messages)

    def to_tokens(self, loaded: Any, engine: Any) -> list[int]:
        return self.render(loaded, engine).tokens

    def render(self, loaded: Any, engine: Any, num_ctx: int = 0, num_predict: int = -1) -> Rendered:
        """Token ids of the prompt. A chat (`messages`) of num_ctx tokens or more, with
        `fit`, keeps its system messages and its latest messages: the oldest others are
        dropped whole until the prompt leaves `output_room` for the reply; if even the
        latest message alone cannot fit, that is a `BadRequest`."""
        if self.suffix:
            raise BadRequest(f'"{self.model}" does not support insert')
        if self.tools and not supports_tools(loaded.template):
            raise BadRequest(f'"{self.model}" does not support tools')
        think, thinks = self.think, supports_thinking(loaded.template)
        if think not in (None, False) and not thinks:
            if self.think_strict:
                raise BadRequest(f'"{self.model}" does not support thinking')
            think = None
        context = list(self.context)
        pictures = bool(self.images) or any(m.get("images") for m in self.messages or ())
        if pictures:    # before any template sees an image part: a text model says so plainly
            if getattr(engine, "check_images", None) is None:
                raise BadRequest(f'"{self.model}" does not support images')
            engine.check_images(loaded)
        if pictures and (self.raw or self.template is not None):
            raise BadRequest("images need the model's own template: not with raw or a request template")
        if self.raw:
            return Rendered(context + engine.tokenize(loaded, self.prompt or "", add_special=not context))
        system = self.system if self.system is not None else loaded.system
        template = loaded.template
        if self.template is not None:
            # Ollama's generate with its own template: [system,] (the model's MESSAGEs unless
            # there is a context,) the prompt, run as an Ollama Go template. As in Ollama,
            # `.Think` is true by default for a model that can think.
            template = templates.GoChatTemplate(self.template, name="request")
            turns = [] if context else list(loaded.messages or [])
            chat = [*([{"role": "system", "content": system}] if system else []), *turns,
                    {"role": "user", "content": self.prompt or ""}]
            text = template.render(chat, tools=[], think=think if think is not None else thinks)
            return Rendered(context + engine.tokenize(loaded, text, add_special=not context),
                            thinking=_opens_thinking(text))
        chat = list(self.messages) if self.messages is not None else [
            {"role": "user", "content": self.prompt or "", **({"images": self.images} if self.images else {})}]
        # Jinja templates (Qwen3's) read an earlier turn's reasoning as `reasoning_content`.
        messages = [{**m, "reasoning_content": m["thinking"]} if m.get("thinking") and "reasoning_content" not in m
                    else m for m in templates.assemble(chat, system, loaded.messages)]
        # /api/generate passes an empty tool list, /api/chat the request's (Ollama's rule).
        tools = list(self.tools) if self.tools else ([] if self.messages is None else None)
        extra: dict[str, Any] = {}
        if think is not None and thinks:
            if isinstance(template, templates.GoChatTemplate):
                extra["think"] = think                  # Ollama's templates read .Think, .ThinkLevel
            else:
                extra["enable_thinking"] = bool(think)  # jinja: Qwen3's, SmolLM3's
                if isinstance(think, str):
                    extra["reasoning_effort"] = think
        add_special = bool(getattr(template, "add_special", False)) and not context
        opened: list[Any] = [False, None]
        is_harmony = harmony.is_harmony(getattr(template, "source", ""))
        seen: list[tuple[list[int], Any]] = []      # each render's tokens and image inputs
        placed = _with_image_parts
        if pictures and isinstance(template, templates.GoChatTemplate):
            marker = getattr(engine, "image_marker", lambda _: None)(loaded)
            if not marker:
                raise BadRequest(f'"{self.model}": its template (an Ollama Go template) cannot place images')
            placed = partial(_with_image_tags, marker=marker)

        def tokens_of(msgs: list[dict]) -> list[int]:
            text = template.render([placed(m) for m in msgs] if pictures else msgs,
                                   tools=tools, add_generation_prompt=True, **extra)
            opened[0] = _opens_thinking(text)
            opened[1] = harmony.open_message(text) if is_harmony else None
            shown = [image for m in msgs for image in m.get("images") or ()]
            if not shown:
                return context + engine.tokenize(loaded, text, add_special=add_special)
            ids, vision = engine.vision_tokens(loaded, text, shown, add_special=add_special)
            seen.append((context + list(ids), vision))
            return seen[-1][0]

        def vision_of(tokens: list[int]) -> Any:
            return next((vision for ids, vision in seen if ids is tokens), None)

        tokens = tokens_of(messages)
        if self.messages is None or not self.fit or num_ctx <= 0 or len(tokens) < num_ctx:
            return Rendered(tokens, thinking=opened[0], harmony=opened[1], vision=vision_of(tokens))
        fitted = _fit_chat(messages, tokens_of, num_ctx, output_room(num_ctx, num_predict))
        return Rendered(fitted.tokens, fitted.truncated_messages, opened[0], opened[1], vision_of(fitted.tokens))


def _with_image_parts(message: dict) -> dict:
    """A message with images as Hugging Face's content parts: one `{"type": "image"}` per
    image, then the text (what vision models' jinja templates read)."""
    shown = message.get("images")
    if not shown:
        return message
    rest = {k: v for k, v in message.items() if k != "images"}
    return {**rest, "content": [*({"type": "image"} for _ in shown),
                                {"type": "text", "text": message.get("content") or ""}]}


def _with_image_tags(message: dict, marker: str) -> dict:
    """A message with its images as `marker` in its text, as Ollama tags them for a Go
    template: each image takes the next `[img]` of the text, else goes before it."""
    shown = message.get("images")
    if not shown:
        return message
    text, prefix = str(message.get("content") or ""), ""
    for _ in shown:
        if "[img]" in text:
            text = text.replace("[img]", marker, 1)
        else:
            prefix += marker
    return {**{k: v for k, v in message.items() if k != "images"}, "content": prefix + text}


def _fit_chat(messages: list[dict], tokens_of: Any, num_ctx: int, room: int) -> Rendered:
    """The chat without its oldest non-system messages, dropped whole: the fewest that
    leave `room` tokens for the reply. A cut only ever starts the kept turns at a user
    message (templates that insist on user/assistant alternation stay happy) or at the
    latest message. The latest message is always kept; if it cannot fit, a 400."""
    turns = [i for i, m in enumerate(messages) if m.get("role") != "system"]
    # cuts[k]: drop turns[:cuts[k]]; ascending, so the prompt shrinks (or stays) along it.
    cuts = [j for j in range(1, len(turns)) if messages[turns[j]].get("role") == "user"]
    if turns and (not cuts or cuts[-1] != len(turns) - 1):
        cuts.append(len(turns) - 1)

    def kept(cut: int) -> list[dict]:
        gone = set(turns[:cut])
        return [m for i, m in enumerate(messages) if i not in gone]

    best: Rendered | None = None
    lo, hi = 0, len(cuts) - 1
    while lo <= hi:         # the fewest dropped that fit, in log2(len) renders
        mid = (lo + hi) // 2
        tokens = tokens_of(kept(cuts[mid]))
        if len(tokens) + room <= num_ctx:
            best, hi = Rendered(tokens, cuts[mid]), mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return best
    if cuts:                # nothing leaves the whole room: the latest message alone, if it fits at all
        tokens = tokens_of(kept(cuts[-1]))
        if len(tokens) < num_ctx:
            return Rendered(tokens, cuts[-1])
    else:
        tokens = tokens_of(messages)
    raise BadRequest(f"the chat's latest message does not fit the context window: the prompt is {len(tokens)} "
                     f"tokens with every older message dropped, num_ctx={num_ctx}; shorten it or raise num_ctx")


