"""The model routes of the native API: list (`/api/tags`), describe (`/api/show`), loaded
(`/api/ps`), copy (`/api/copy`) and delete (`/api/delete`).

Owns what a stored model is shown as: its tags record (`model_record`), the show body
(`show_model`: template, parameters, GGUF metadata, modelfile), its capabilities, and the
GGUF readers behind them (`cannot_run`: why nothing can run it; `takes_images`: a vision
tower inline), each GGUF header read once per blob and kept per process. Never loads a
model, never generates, never imports mlx: describing reads the store's manifests,
configs and blob headers; delete only asks the scheduler to unload. Handlers take the
request context and return a `wire.Reply`, as `native`'s do.
"""

from __future__ import annotations

import json
from typing import Any

from mlxlite import store as st
from mlxlite.errors import MlxliteError
from mlxlite.formats import archs, gguf, templates, thinking
from mlxlite.modelfile import read_json_layer, to_modelfile
from mlxlite.sched import LoadJob
from mlxlite.server import wire
from mlxlite.server.native import resolve
from mlxlite.server.wire import Reply

FOREVER = 10987200000.0       # 2318-03-04, the expires_at of a model kept loaded forever


def model_record(store: Any, entry: Any) -> dict:
    try:
        info = store.read_config(entry)
    except MlxliteError:
        info = {}
    unsupported = cannot_run(store, entry, info)
    return {
        "name": entry.name.display,
        "model": entry.name.display,
        "modified_at": wire.rfc3339(entry.modified),
        "size": entry.size,
        "digest": st.digest_hex(entry.digest),
        "details": _details(info, unsupported),
        # What the stored config says (show adds what the template says: tools, thinking).
        "capabilities": _capabilities(info, vision=takes_images(store, entry, info), unsupported=unsupported),
    }


def handle_tags(ctx: Any) -> Reply:
    store = ctx.app.store
    return Reply({"models": [model_record(store, e) for e in store.list()]})


def _layer_text(store: Any, entry: Any, *medias: str) -> str | None:
    parts = [store.read_blob(layer.digest).decode("utf-8", "replace")
             for media in medias for layer in entry.manifest.layers_of(media)]
    return "\n".join(parts) if parts else None


def _gguf_layer(entry: Any) -> Any:
    return next((layer for title, layer in entry.manifest.files().items()
                 if title.endswith(".gguf") or layer.media_type == st.MEDIA_GGUF), None)


def _gguf_meta(store: Any, entry: Any) -> dict:
    layer = _gguf_layer(entry)
    if layer is None:
        return {}
    return gguf.read_metadata(store.blob_path(layer.digest))


_CANNOT_LOAD: dict[str, str | None] = {}   # GGUF blob digest -> `gguf.cannot_load` (its bytes never change)


def cannot_run(store: Any, entry: Any, info: dict) -> str | None:
    """Why nothing can run this model, as `show` prints after `runs on: nothing:` (a GGUF of
    an architecture with no map, a tensor type that does not load), or None. Each GGUF's
    header is read once per process: /api/tags asks for every model."""
    if info.get("format") != "gguf" or (layer := _gguf_layer(entry)) is None:
        return None
    if layer.digest not in _CANNOT_LOAD:
        try:
            header = gguf.read_gguf(store.blob_path(layer.digest))
        except MlxliteError as exc:
            return str(exc)     # not kept: a missing or damaged blob can be pulled again
        _CANNOT_LOAD[layer.digest] = gguf.cannot_load(header)
    return _CANNOT_LOAD[layer.digest]


_TAKES_IMAGES: dict[str, bool] = {}    # GGUF blob digest -> whether it carries a vision tower


def takes_images(store: Any, entry: Any, info: dict) -> bool:
    """Whether the model takes images: its config says so, or (a GGUF pulled with Ollama's
    config) its file carries a vision tower, as Ollama asks its metadata. Read once per blob."""
    if info.get("vision"):
        return True
    if info.get("format") != "gguf" or (layer := _gguf_layer(entry)) is None:
        return False
    if layer.digest not in _TAKES_IMAGES:
        try:
            _TAKES_IMAGES[layer.digest] = gguf.takes_images(gguf.read_gguf(store.blob_path(layer.digest)))
        except MlxliteError:
            return False    # not kept: a missing or damaged blob can be pulled again
    return _TAKES_IMAGES[layer.digest]


def _details(info: dict, unsupported: str | None) -> dict:
    # Ollama's clients parse `details` into a struct (Go) or a model (Python) that ignore
    # keys they do not know, so the reason rides there, in tags and show alike.
    return {**wire.details(info), "unsupported": unsupported} if unsupported else wire.details(info)


def _capabilities(info: dict, template: str | None = None, go: bool = False, vision: bool = False,
                  unsupported: str | None = None) -> list[str]:
    """What the model can do: nothing when nothing can run it (`unsupported` says why); the
    bert family embeds and never generates; a template that renders the request's tools adds
    "tools", one that thinks "thinking"; images "vision"."""
    if unsupported:
        return []
    if archs.is_encoder(str(info.get("architecture") or "")):
        capabilities = ["embedding"]
    else:
        capabilities = ["completion", "embedding"]
        if template:
            try:
                if templates.load(template, go=go, name="show").supports_tools:
                    capabilities.append("tools")
            except MlxliteError:
                pass        # a template that does not parse renders nothing
    if template and thinking.supported_by(template):
        capabilities.append("thinking")
    if vision:
        capabilities.append("vision")       # images in, through mlx-vlm (the `vision` extra)
    return capabilities


def show_model(store: Any, entry: Any, verbose: bool = False) -> dict:
    info = store.read_config(entry)
    own = entry.manifest.template_layer()
    template = store.read_blob(own.digest).decode("utf-8", "replace") if own is not None else None
    go = bool(template) and own.media_type == st.MEDIA_OLLAMA_TEMPLATE
    system = _layer_text(store, entry, st.MEDIA_SYSTEM)
    license_ = _layer_text(store, entry, st.MEDIA_LICENSE)
    params: dict = {}
    for layer in entry.manifest.layers_of(st.MEDIA_PARAMS):
        value = read_json_layer(store, entry, layer, "params")
        params.update(value if isinstance(value, dict) else {})
    messages: list = []
    for layer in entry.manifest.layers_of(st.MEDIA_MESSAGES):
        value = read_json_layer(store, entry, layer, "messages")
        messages.extend(m for m in (value if isinstance(value, list) else []) if isinstance(m, dict))
    model_info: dict = {}
    vision = takes_images(store, entry, info)
    if info.get("format") == "gguf":
        meta = _gguf_meta(store, entry)
        for key, value in meta.items():
            if isinstance(value, list) and not verbose:
                value = [] if key.startswith("tokenizer.ggml.") else value
            model_info[key] = value
        template = template or meta.get("tokenizer.chat_template")
        license_ = license_ or meta.get("general.license")
    else:
        files = entry.manifest.files()
        if "config.json" in files:
            cfg = json.loads(store.read_blob(files["config.json"].digest))
            arch = cfg.get("model_type", info.get("architecture", ""))
            model_info = {"general.architecture": arch,
                          **{f"{arch}.{k}": v for k, v in cfg.items() if isinstance(v, (int, float, str))}}
            vision = vision or isinstance(cfg.get("vision_config"), dict)   # imported before the flag
        if template is None:
            view = store.view(entry)
            if (view / "chat_template.jinja").exists():
                template = (view / "chat_template.jinja").read_text()
            elif (view / "tokenizer_config.json").exists():
                tc = json.loads((view / "tokenizer_config.json").read_text())
                template = tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else None
    if info.get("parameter_count"):
        model_info.setdefault("general.parameter_count", info["parameter_count"])
    if info.get("context_length"):
        model_info.setdefault("general.context_length", info["context_length"])
    unsupported = cannot_run(store, entry, info)
    capabilities = _capabilities(info, template, go, vision, unsupported)
    return {
        "license": license_ or "",
        "modelfile": to_modelfile(store, entry),  # the same text `show --modelfile` prints: it round-trips
        "parameters": wire.params_text(params),
        "template": template or "",
        "system": system or "",
        "details": _details(info, unsupported),
        "messages": messages,
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": wire.rfc3339(entry.modified),
    }


def handle_show(ctx: Any) -> Reply:
    body = wire.body_object(ctx.json())
    if "model" not in body and isinstance(body.get("name"), str):
        body = {**body, "model": body["name"]}      # older clients send "name"
    entry = resolve(ctx, wire.model_name(body))
    shown = show_model(ctx.app.store, entry, wire.get(body, "verbose", bool, False))
    placed = [r.info["placement"] for r in ctx.app.scheduler.ps() if r.digest == entry.digest and "placement" in r.info]
    if placed:      # loaded across a distributed group: which rank holds which part
        shown["placement"] = placed[0]
    return Reply(shown)


def handle_copy(ctx: Any) -> Reply:
    body = wire.body_object(ctx.json())
    source = wire.model_name(body, "source")
    destination = wire.model_name(body, "destination")
    ctx.app.store.copy(source, destination)
    ctx.log["model"] = destination.display
    return Reply(None)


def handle_delete(ctx: Any) -> Reply:
    body = wire.body_object(ctx.json())
    if "model" not in body and isinstance(body.get("name"), str):
        body = {**body, "model": body["name"]}
    entry = resolve(ctx, wire.model_name(body))
    ctx.app.store.remove(entry.name)
    if any(r.digest == entry.digest for r in ctx.app.scheduler.ps()):
        # Release its memory too; don't wait for it (the queue may be busy).
        try:
            ctx.app.scheduler.submit(LoadJob(entry, 0))
        except MlxliteError:
            pass
    return Reply(None)


def handle_ps(ctx: Any) -> Reply:
    models = []
    for r in ctx.app.scheduler.ps():
        # "Forever" as Ollama shows it: a date in 2318 (Go's time.Now() + max duration).
        expires = r.expires_at if r.expires_at is not None else FOREVER
        on_gpu = r.info.get("device", "gpu") != "cpu"
        models.append({
            "name": r.name, "model": r.name, "size": r.size, "digest": st.digest_hex(r.digest),
            "details": wire.details(r.info), "expires_at": wire.rfc3339(expires),
            "size_vram": r.size if on_gpu else 0, "context_length": r.context_length,
            "load_duration": wire.ns(r.load_seconds),    # ours: how long its load took
            **({"placement": r.info["placement"]} if "placement" in r.info else {}),   # ours: across ranks
        })
    return Reply({"models": models})
