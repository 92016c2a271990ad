"""Routes `/api/pull` and `/api/push`, as Ollama's API has them.

Body `{model (or name), insecure, stream}`; bad fields are a 400 before any line.
`stream` (default true) -> NDJSON progress in Ollama's shapes (`progress.py`), one line
per event, ending in `{"status":"success"}` or a final `{"error": ...}` line;
`stream: false` -> only the final object, or a real error status. The work runs on a
worker thread; a client that goes away cancels the pull (its partial download is kept
and resumes next time). Never imports mlx.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from mlxlite import names
from mlxlite.errors import BadRequest
from mlxlite.remote import check_url, pull, push
from mlxlite.server.wire import Reply, Stream, body_object


def _fields(ctx: Any) -> tuple[str, bool, bool]:
    body = body_object(ctx.json())
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model:
        raise BadRequest("missing 'model'")
    if model.lower().startswith("oci-layout:"):
        # A layout is a path on the server's disk: not something a remote client may name.
        raise BadRequest("oci-layout: sources are local paths; run `mlxlite pull oci-layout:PATH` "
                         "or `mlxlite import PATH` on the server's machine")
    # A bad name or URL is a 400 now, not an error line later (and never a DNS lookup).
    if model.startswith(("http://", "https://")):
        check_url(model)
    else:
        names.parse(model)
    flags = []
    for key, default in (("insecure", False), ("stream", True)):
        value = body.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise BadRequest(f"invalid '{key}': expected true or false")
        flags.append(value)
    ctx.log["model"] = model
    return model, flags[0], flags[1]


def _events(work: Callable[[Callable[[dict], None], threading.Event], object]) -> Iterator[dict]:
    """Run `work(emit, cancel)` on a thread; yield its events; re-raise its error here."""
    events: queue.Queue = queue.Queue()
    end = object()
    cancel = threading.Event()

    def run() -> None:
        try:
            work(events.put, cancel)
        except BaseException as exc:  # handed to the HTTP thread, which maps it
            events.put(exc)
        events.put(end)

    threading.Thread(target=run, name="pull", daemon=True).start()
    try:
        while (item := events.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()  # the client went away (or we are done): stop the transfer


def _reply(items: Iterator[dict], stream: bool) -> Reply | Stream:
    if stream:
        return Stream(items)
    last: dict = {}
    for item in items:
        last = item
    return Reply(last)


def handle_pull(ctx: Any) -> Reply | Stream:
    model, insecure, stream = _fields(ctx)
    store = ctx.app.store

    def work(emit: Callable[[dict], None], cancel: threading.Event) -> None:
        pull(store, model, insecure=insecure, progress=emit, cancel=cancel)

    return _reply(_events(work), stream)


def handle_push(ctx: Any) -> Reply | Stream:
    model, insecure, stream = _fields(ctx)
    store = ctx.app.store
    store.resolve(model)  # an unknown model is a 404 before any line

    def work(emit: Callable[[dict], None], cancel: threading.Event) -> None:
        push(store, model, insecure=insecure, progress=emit)

    return _reply(_events(work), stream)


ROUTES = {
    ("POST", "/api/pull"): handle_pull,
    ("POST", "/api/push"): handle_push,
}
