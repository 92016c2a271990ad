"""Route handlers of the native (Ollama-compatible) API.

Contract: each handler takes the server's request context (`ctx.json()`, `ctx.gone()`,
`ctx.params`, `ctx.log`, `ctx.app.store`, `ctx.app.scheduler`) and returns an
`wire.Reply` or `wire.Stream`; it raises `MlxliteError`s, which `daemon.py` maps to the
wire. The model routes (tags, show, ps, copy, delete) live in `models`. Generation goes
through `generation()`, shared with the OpenAI and Anthropic routes: it submits a job to
the scheduler and yields text as it comes, so nothing waits for the end. The output's
leading `<think>...</think>` section comes out as thinking text (`formats.thinking`)
unless the request said `think: false`; tool calls are parsed from the rest; a harmony
prompt (gpt-oss, `Ready.harmony`) has its channels split instead (`formats.harmony`:
analysis -> thinking, final -> content, a message to `functions.NAME` -> a call); with
logprobs, every token's entry (`logprob_entry`: token, logprob, bytes, top_logprobs, the
shape Ollama and OpenAI share) rides on the next item. Never imports mlx.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from mlxlite import __version__
from mlxlite.errors import MlxliteError
from mlxlite.formats import harmony, thinking, tools
from mlxlite.sched import Done, Embedded, EmbedJob, GenerateJob, LoadJob, Ready, is_finish
from mlxlite.server import dist as dist_api
from mlxlite.server import wire
from mlxlite.server.wire import Reply, Stream, Summary


# ---- generation shared by the native, OpenAI and Anthropic routes ----------------------
@dataclass(frozen=True)
class Text:
    """Generated text: content, or (`thinking`) the model's reasoning. `logprobs`: one entry
    per token generated since the previous item (when the request asked for logprobs)."""

    text: str
    thinking: bool = False
    logprobs: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Calls:
    calls: list


@dataclass(frozen=True)
class Whole:
    """A generation gathered for a non-streamed reply: text, reasoning, calls, logprobs."""

    text: str
    thinking: str
    calls: list
    logprobs: list


def gather(items: Iterator[Text | Calls]) -> Whole:
    """Drain `generation()`'s items into one `Whole` (the OpenAI and Responses routes)."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list = []
    logprobs: list = []
    for item in items:
        if isinstance(item, Calls):
            calls.extend(item.calls)
            continue
        (thoughts if item.thinking else texts).append(item.text)
        logprobs.extend(item.logprobs)
    return Whole("".join(texts), "".join(thoughts), calls, logprobs)


def resolve(ctx: Any, name: Any) -> Any:
    ctx.log["model"] = getattr(name, "display", str(name))     # logged even when it is not found
    entry = ctx.app.store.resolve(name)
    ctx.log["model"] = entry.name.display
    return entry


def _token(raw: bytes, logprob: float) -> dict:
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def logprob_entry(piece: Any, top: int) -> dict:
    """One token's logprobs, shaped as Ollama, OpenAI chat and Responses all shape them."""
    entry = _token(piece.raw or piece.text.encode(), piece.logprob)
    entry["top_logprobs"] = [_token(raw, logprob) for raw, logprob in piece.top[:top]]
    return entry


def generation(ctx: Any, job: GenerateJob, summary: Summary, tool_names: list[str] | None = None,
               logprobs: bool = False) -> Iterator[Text | Calls]:
    """Submit `job`; yield `Text` (thinking, then content) as the engine produces it, then
    `Calls` (if tools were given and the output was tool calls). Fills `summary` as it
    goes. Errors before the first token (load, prompt too long) are raised before anything
    is yielded."""
    if job.logprobs != logprobs:    # unread logprobs are not computed (one gather and read a step fewer)
        job = replace(job, logprobs=logprobs)
    ticket = ctx.app.scheduler.submit(job)
    try:
        yield from _events(ctx, ticket, job, summary, tool_names, logprobs)
    finally:
        ticket.cancel()     # closed early (client gone, write failed): stop the engine too


def _events(ctx: Any, ticket: Any, job: GenerateJob, summary: Summary, tool_names: list[str] | None,
            logprobs: bool) -> Iterator[Text | Calls]:
    parser = tools.ToolCallParser(tool_names) if tool_names is not None else None
    split = getattr(job.prompt, "think", None) is not False     # think: false leaves the text as it is
    thinker = thinking.ThinkingParser() if split else None
    pending: list[dict] = []        # logprobs of tokens whose text is not out yet
    thought, before_content = False, 0
    channels: harmony.HarmonyParser | None = None   # gpt-oss: its own thinking and calls, always split

    def emit(text: str, is_thinking: bool = False) -> Text:
        item = Text(text, is_thinking, tuple(pending))
        pending.clear()
        return item

    def route(text: str, end: bool = False) -> Iterator[Text | Calls]:
        nonlocal thought
        if channels is not None:
            yield from _harmony_route(channels, text, end, emit)
            if end and pending:
                yield emit("")      # the last tokens' logprobs, when their text was markup
            return
        parts = thinker.feed(text) if thinker is not None else [("content", text)]
        if end and thinker is not None:
            parts += thinker.finish()
        for kind, part in parts:
            if kind == "thinking":
                thought = True
                yield emit(part, True)
                continue
            shown = parser.feed(part) if parser is not None else part
            if shown:
                yield emit(shown)
        if end and parser is not None:
            rest, calls = parser.finish()
            if rest:
                yield emit(rest)
            if calls:
                yield Calls(calls)
        if end and pending:
            yield emit("")

    for event in ticket.events(gone=ctx.gone):
        if isinstance(event, Ready):
            if split:
                thinker = thinking.ThinkingParser(thinking=getattr(event, "thinking", False))
            if getattr(event, "harmony", None) is not None and job.format is None:
                # (a constrained reply is the JSON alone, no channels: it passes as it is)
                channels = harmony.HarmonyParser(event.harmony)
            summary.load_seconds = event.load_seconds
            summary.tokens = list(event.prompt_tokens)
            summary.prompt_tokens = len(event.prompt_tokens)    # known now; Finish has the final count
            ctx.log["queue_ms"] = round(getattr(event, "queue_seconds", 0.0) * 1e3, 2)
            ctx.log["batch_size"] = getattr(event, "batch_size", 0)
            summary.truncated_messages = getattr(event, "truncated_messages", 0)
            if summary.truncated_messages:
                ctx.log["truncated_messages"] = summary.truncated_messages
            continue
        if is_finish(event):
            summary.reason = event.reason
            summary.stop_string = getattr(event, "stop_string", "")
            summary.prompt_tokens = event.prompt_tokens
            summary.prompt_eval_tokens = event.prompt_eval_tokens
            summary.eval_tokens = event.eval_tokens
            summary.prompt_seconds = event.prompt_seconds
            summary.eval_seconds = event.eval_seconds
            ctx.log.update(prompt_tokens=event.prompt_tokens, prompt_eval_tokens=event.prompt_eval_tokens,
                           eval_tokens=event.eval_tokens, load_ms=round(summary.load_seconds * 1e3, 2),
                           prompt_ms=round(event.prompt_seconds * 1e3, 2),
                           eval_ms=round(event.eval_seconds * 1e3, 2), done_reason=event.reason,
                           cached_tokens=event.prompt_tokens - event.prompt_eval_tokens,
                           eval_tps=round(event.eval_tokens / event.eval_seconds, 2) if event.eval_seconds > 0 else 0)
            yield from route(event.text_tail, end=True)
            thought = thought or (channels is not None and channels.thought)
            summary.thinking_tokens = before_content if thought else 0
            return
        summary.tokens.append(event.token)
        if logprobs:
            pending.append(logprob_entry(event, job.top_logprobs))
        if (channels.thinking if channels is not None else thinker is not None and thinker.state != "content"):
            before_content += 1
        yield from route(event.text)


def _harmony_route(channels: harmony.HarmonyParser, text: str, end: bool, emit: Any) -> Iterator[Text | Calls]:
    """gpt-oss's channels: analysis as thinking, final and commentary as content, calls at the end."""
    parts = channels.feed(text)
    calls: list = []
    if end:
        more, calls = channels.finish()
        parts += more
    for kind, part in parts:
        yield emit(part, kind == "thinking")
    if calls:
        yield Calls(calls)


def _load_or_unload(ctx: Any, entry: Any, req: wire.GenerateRequest, chat: bool) -> Reply | Stream:
    ticket = ctx.app.scheduler.submit(LoadJob(entry, req.keep_alive))
    reason, load_seconds = "load", 0.0
    for event in ticket.events(gone=ctx.gone):
        if isinstance(event, Done):
            reason, load_seconds = event.reason, event.load_seconds
    out = {"model": req.name.display, "created_at": wire.now_rfc3339()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason=reason)
    if reason == "load":
        out["load_duration"] = wire.ns(load_seconds)
    return Stream(iter([out])) if req.stream else Reply(out)


def _native(ctx: Any, chat: bool) -> Reply | Stream:
    req = wire.parse_chat(ctx.json()) if chat else wire.parse_generate(ctx.json())
    entry = resolve(ctx, req.name)
    if req.empty:
        return _load_or_unload(ctx, entry, req, chat)
    job = GenerateJob(entry, req.prompt, req.options, req.keep_alive, req.format, req.truncate, req.top_logprobs)
    tool_names = [t["function"]["name"] for t in req.prompt.tools] if req.prompt.tools else None
    items = _native_chunks(ctx, req, job, chat, tool_names)
    if req.stream:
        return Stream(items)
    return Reply(_join(items, chat))


def _native_chunks(ctx: Any, req: wire.GenerateRequest, job: GenerateJob, chat: bool,
                   tool_names: list[str] | None) -> Iterator[dict]:
    model = req.name.display
    summary = Summary()
    for item in generation(ctx, job, summary, tool_names, req.logprobs):
        chunk: dict[str, Any] = {"model": model, "created_at": wire.now_rfc3339()}
        if isinstance(item, Calls):
            if chat:
                chunk["message"] = {"role": "assistant", "content": "", "tool_calls": item.calls}
            else:
                chunk.update(response="", tool_calls=item.calls)
        else:
            # As Ollama streams it: reasoning in `thinking`, beside an empty content.
            text = {"thinking": item.text} if item.thinking else {}
            if chat:
                chunk["message"] = {"role": "assistant", "content": "" if item.thinking else item.text, **text}
            else:
                chunk.update(response="" if item.thinking else item.text, **text)
        chunk["done"] = False
        if isinstance(item, Text) and item.logprobs:
            chunk["logprobs"] = list(item.logprobs)
        yield chunk
    final: dict[str, Any] = {"model": model, "created_at": wire.now_rfc3339()}
    if chat:
        final["message"] = {"role": "assistant", "content": ""}
    else:
        final["response"] = ""
    final.update(done=True, done_reason=summary.reason if summary.reason != "cancel" else "stop")
    final.update(summary.metrics())
    if not chat and not req.prompt.raw:
        final["context"] = summary.tokens
    yield final


def _join(items: Iterator[dict], chat: bool) -> dict:
    """A non-streamed response: the chunks' text joined onto the final chunk."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list = []
    logprobs: list = []
    final: dict = {}
    for chunk in items:
        if chunk.get("done"):
            final = chunk
            break
        part = chunk["message"] if chat else chunk
        texts.append(part.get("content" if chat else "response", ""))
        thoughts.append(part.get("thinking", ""))
        calls.extend(part.get("tool_calls") or [])
        logprobs.extend(chunk.get("logprobs") or [])
    text, thought = "".join(texts), "".join(thoughts)
    if chat:
        final["message"] = {"role": "assistant", "content": text}
        if thought:
            final["message"]["thinking"] = thought
        if calls:
            final["message"]["tool_calls"] = calls
    else:
        final["response"] = text
        if thought:
            final["thinking"] = thought
        if calls:
            final["tool_calls"] = calls
    if logprobs:
        final["logprobs"] = logprobs
    return final


def handle_generate(ctx: Any) -> Reply | Stream:
    return _native(ctx, chat=False)


def handle_chat(ctx: Any) -> Reply | Stream:
    return _native(ctx, chat=True)


def embed_vectors(ctx: Any, entry: Any, inputs: tuple[str, ...], truncate: bool,
                  keep_alive: float | None, options: dict) -> Embedded:
    ticket = ctx.app.scheduler.submit(EmbedJob(entry, inputs, keep_alive, truncate, options))
    for event in ticket.events(gone=ctx.gone):
        if isinstance(event, Embedded):
            ctx.log.update(prompt_tokens=event.prompt_tokens, load_ms=round(event.load_seconds * 1e3, 2))
            return event
    raise MlxliteError("embedding produced no result")


def handle_embed(ctx: Any) -> Reply:
    started = time.perf_counter()
    req = wire.parse_embed(ctx.json())
    entry = resolve(ctx, req.name)
    result = embed_vectors(ctx, entry, req.inputs, req.truncate, req.keep_alive, req.options)
    return Reply({
        "model": req.name.display,
        "embeddings": wire.resize(result.vectors, req.dimensions),
        "total_duration": wire.ns(time.perf_counter() - started),
        "load_duration": wire.ns(result.load_seconds),
        "prompt_eval_count": result.prompt_tokens,
    })


def handle_embeddings(ctx: Any) -> Reply:
    req = wire.parse_embed(ctx.json(), legacy=True)
    entry = resolve(ctx, req.name)
    result = embed_vectors(ctx, entry, req.inputs, req.truncate, req.keep_alive, req.options)
    return Reply({"embedding": result.vectors[0] if result.vectors else []})


# ---- small routes ----------------------------------------------------------------------
def handle_root(ctx: Any) -> Reply:
    return Reply("mlxlite is running", content_type="text/plain; charset=utf-8")


def handle_version(ctx: Any) -> Reply:
    return Reply({"version": __version__})


def handle_health(ctx: Any) -> Reply:
    sched = ctx.app.scheduler
    body = {"status": "ok", "version": __version__,
            "models": [r.name for r in sched.ps()], "queue": sched.depth(),
            "active": sched.busy(), "uptime": round(time.time() - ctx.app.started, 3)}
    engine = dist_api.dist_engine(ctx)
    if engine is not None:      # serve --ranks/--hostfile: the group's state, per-rank memory
        body["dist"] = engine.health()
        if body["dist"]["state"] != "ready":
            body["status"] = "degraded"
    return Reply(body)


def handle_metrics(ctx: Any) -> Reply:
    """Prometheus text: requests by route and status (the server's), then the scheduler's
    registry (queue, batch size, tokens, tok/s, prefix cache, loaded models)."""
    sched, app = ctx.app.scheduler, ctx.app
    lines = ["# HELP mlxlite_requests_total HTTP requests by route and status",
             "# TYPE mlxlite_requests_total counter"]
    with app.log_lock:
        counts = sorted(app.request_counts.items())
    for (route, status), count in counts:
        lines.append(f'mlxlite_requests_total{{route="{route}",status="{status}"}} {count}')
    registry = getattr(sched, "metrics", None)
    text = "\n".join(lines) + "\n" + (registry.render() if registry is not None else "")
    return Reply(text, content_type="text/plain; version=0.0.4")
