"""Routes for creating models over HTTP, as Ollama's API has them.

  - `HEAD /api/blobs/:digest`: 200 when the blob is stored, 404 when not.
  - `POST /api/blobs/:digest`: the body streams into the store, hashed as written; 201
    when stored, 200 when it already was; 400 (and nothing kept) when the bytes do not
    hash to `digest`; 507 when the disk fills (the rest of the body is read and dropped
    first, so the client gets the answer). No body-size limit beyond the disk.
  - `POST /api/create`: `{model, from | files {name: digest}, template, system,
    parameters, messages, license, quantize, stream}` -> NDJSON `{"status": ...}` lines ending in
    `{"status": "success"}` (or the last line alone when `stream` is false). Bad fields
    are a 400 before any line is sent. The older shape `{name, modelfile}` works too
    (FROM must then name a model: the server reads no client paths).
`quantize` (q4, q8, mxfp4, nvfp4, or Ollama's q4_K_M / q8_0 names) runs the engine's
quantizer on the create thread; an unknown type or a quantized source is a 400.
Imports mlx only for a quantizing create; the work is `modelfile.create`.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
from collections.abc import Iterator
from typing import Any

from mlxlite import modelfile, names
from mlxlite.errors import (
    BadRequest,
    InsufficientStorage,
    IntegrityError,
    MlxliteError,
    NotFound,
    Unsupported,
)
from mlxlite.server.wire import Reply, Stream, body_object

_CHUNK = 1 << 20
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")  # a chunk's size line (RFC 9112 §7.1)


def _digest(ctx: Any) -> str:
    text = ctx.params.get("digest", "")
    if text.startswith("sha256-"):  # Ollama's on-disk spelling
        text = "sha256:" + text[7:]
    return names.parse_digest(text)


def _body_chunks(ctx: Any) -> Iterator[bytes]:
    """The raw request body, streamed (Content-Length or chunked)."""
    rfile, headers = ctx.handler.rfile, ctx.headers
    coding = (headers.get("Transfer-Encoding") or "").strip().lower()
    if coding and coding != "chunked":
        ctx.handler.close_connection = True
        raise MlxliteError(f"Transfer-Encoding {coding!r} is not supported: send chunked or Content-Length",
                           status=501)
    if coding:
        while True:
            line = rfile.readline(1024)
            size_text = line.split(b";")[0].strip()
            if not _HEX.fullmatch(size_text):  # int(..., 16) also took "-5" (a 500) and "0x5"
                ctx.handler.close_connection = True
                raise BadRequest("malformed chunked body")
            size = int(size_text, 16)
            if size == 0:
                while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                break
            while size:
                data = rfile.read(min(size, _CHUNK))
                if not data:
                    raise BadRequest("request body ended early")
                size -= len(data)
                yield data
            if rfile.readline(16) not in (b"\r\n", b"\n"):
                ctx.handler.close_connection = True
                raise BadRequest("malformed chunked body: a chunk does not end where its size says")
    else:
        left = ctx._length()
        while left:
            data = rfile.read(min(left, _CHUNK))
            if not data:
                ctx.handler.close_connection = True
                raise BadRequest("request body ended early")
            left -= len(data)
            yield data
    ctx.body_pending = False


def handle_blob_head(ctx: Any) -> Reply:
    if ctx.app.store.has_blob(_digest(ctx)):
        return Reply(None, 200)
    raise NotFound("blob not found")


def handle_blob_post(ctx: Any) -> Reply:
    digest = _digest(ctx)
    store = ctx.app.store
    if store.has_blob(digest):
        for _ in _body_chunks(ctx):  # drain, so the connection stays usable
            pass
        return Reply(None, 200)
    chunks = _body_chunks(ctx)
    try:
        # A writer like any import: prune waits, or it could take the temp file mid-upload.
        with store.writing(), store.blob_writer() as writer:
            for data in chunks:
                writer.write(data)
            try:
                writer.commit(digest)
            except IntegrityError as exc:
                raise BadRequest(str(exc)) from None
    except (InsufficientStorage, OSError):
        # The client is still sending: read its body to the end first, or closing the
        # socket on unread bytes resets the connection before it reads our 507 (or 500).
        with contextlib.suppress(MlxliteError, OSError):   # a client gone meanwhile hears nothing
            for _ in chunks:
                pass
        raise
    return Reply(None, 201)


def spec_from_request(body: Any) -> tuple[names.ModelName, modelfile.CreateSpec, bool]:
    """Validate an /api/create body (Ollama's shape) into (name, spec, stream)."""
    body = body_object(body)
    name = names.parse(body.get("model") or body.get("name") or "")
    quantize = body.get("quantize") or body.get("quantization")  # Ollama's field, and its older name
    quantize = modelfile.parse_quantize_type(quantize) if quantize is not None else None
    if body.get("adapters"):
        raise Unsupported("adapters (LoRA) are not supported by mlxlite")
    text = body.get("modelfile")
    if text is not None:  # the older request shape: a whole Modelfile in one field
        if not isinstance(text, str):
            raise BadRequest("invalid 'modelfile': expected a string")
        mf = modelfile.parse(text)
        if not names.is_name(mf.from_.source):
            raise BadRequest(f"Modelfile:{mf.from_.line}:{mf.from_.column}: FROM over the API must name "
                             "a model (upload files with POST /api/blobs and use 'files')")
        body = {**{k: v for k, v in body.items() if k != "modelfile"}, "from": mf.from_.source,
                "template": mf.template, "system": mf.system, "parameters": mf.parameters or None,
                "messages": mf.messages or None, "license": mf.licenses or None, "requires": mf.requires}
    source = body.get("from")
    if source is not None and not isinstance(source, str):  # named by type: a deep value's repr recurses
        raise BadRequest(f"invalid 'from': expected a model name, got {type(source).__name__}")
    if source is not None and not names.is_name(source):
        raise BadRequest(f"invalid 'from': {source!r} is not a model name")
    files = body.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BadRequest("invalid 'files': expected an object of file name -> sha256 digest")
    template = body.get("template")
    if template is not None:
        if not isinstance(template, str):
            raise BadRequest("invalid 'template': expected a string")
        modelfile.check_template(template)     # Go (kept as Ollama's layer) or jinja; a 400 if neither parses
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRequest("invalid 'system': expected a string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("invalid 'parameters': expected an object")
    params = modelfile.normalize_params({k: v for k, v in params.items() if v is not None})
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
                for m in messages):
            raise BadRequest("invalid 'messages': expected a list of {role, content}")
        messages = tuple((m["role"], m.get("content") or "") for m in messages)
    lic = body.get("license")
    if isinstance(lic, str):
        lic = (lic,)
    elif lic is not None:
        if not isinstance(lic, list) or not all(isinstance(x, str) for x in lic):
            raise BadRequest("invalid 'license': expected a string or a list of strings")
        lic = tuple(lic)
    requires = body.get("requires")
    if requires is not None and not isinstance(requires, str):
        raise BadRequest(f"invalid 'requires': expected a string, got {type(requires).__name__}")
    if requires is not None and not modelfile.is_semver(requires):
        raise BadRequest(f"invalid 'requires': {requires!r} is not a semantic version like 0.14.0")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest("invalid 'stream': expected true or false")
    spec = modelfile.CreateSpec(from_=source, files=tuple(sorted(files.items())), template=template, system=system,
                         parameters=params, messages=messages, licenses=lic,
                         requires=requires.removeprefix("v") if requires else None, quantize=quantize)
    if not spec.from_ and not spec.files:
        raise BadRequest("neither 'from' nor 'files' was given")
    return name, spec, stream


def _quantizer(source: Any, qtype: str, out: Any, say: Any) -> None:
    from mlxlite.engine import quantize  # lazy: mlx only when a create asks to quantize

    quantize.quantize_model(source, qtype, out, say)


def _run(store: Any, name: names.ModelName, spec: modelfile.CreateSpec) -> Iterator[dict]:
    """Status lines as `create` makes them (it runs on a worker thread)."""
    lines: queue.Queue = queue.Queue()
    end = object()

    def work() -> None:
        try:
            modelfile.create(store, name, spec, say=lambda text: lines.put({"status": text}), quantizer=_quantizer)
        except BaseException as exc:  # handed to the HTTP thread, which maps it
            lines.put(exc)
        lines.put(end)

    threading.Thread(target=work, name="create", daemon=True).start()
    while (item := lines.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def handle_create(ctx: Any) -> Reply | Stream:
    name, spec, stream = spec_from_request(ctx.json())
    ctx.log["model"] = name.display
    if stream:
        return Stream(_run(ctx.app.store, name, spec))
    lines = list(_run(ctx.app.store, name, spec))
    return Reply(lines[-1] if lines else None)


ROUTES = {
    ("HEAD", "/api/blobs/{digest}"): handle_blob_head,
    ("POST", "/api/blobs/{digest}"): handle_blob_post,
    ("POST", "/api/create"): handle_create,
}
