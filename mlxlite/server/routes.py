"""The route table, as data: `ROUTES = {(method, path): handler}`.

A path segment `{name}` matches one segment and `{name*}` the rest (slashes included),
exposed as `ctx.params[name]` (`rules.match`). A handler takes a `context.RequestContext`
and returns `wire.Reply` or `wire.Stream`. Adding a route is adding an entry; the store
routes bring their own (`create.ROUTES`, `pull.ROUTES`). Never imports mlx.
"""


from __future__ import annotations

from collections.abc import Callable

from mlxlite.server import anthropic as anthropic_api
from mlxlite.server import create as create_api
from mlxlite.server import dist as dist_api
from mlxlite.server import models as models_api
from mlxlite.server import native
from mlxlite.server import openai as openai_api
from mlxlite.server import pull as pull_api
from mlxlite.server import responses as responses_api
from mlxlite.server.context import RequestContext
from mlxlite.server.wire import Reply, Stream

Handler = Callable[[RequestContext], Reply | Stream]

ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/"): native.handle_root,
    ("HEAD", "/"): native.handle_root,
    ("GET", "/api/version"): native.handle_version,
    ("HEAD", "/api/version"): native.handle_version,
    ("GET", "/api/health"): native.handle_health,
    ("GET", "/metrics"): native.handle_metrics,
    ("POST", "/api/generate"): native.handle_generate,
    ("POST", "/api/chat"): native.handle_chat,
    ("POST", "/api/embed"): native.handle_embed,
    ("POST", "/api/embeddings"): native.handle_embeddings,
    ("GET", "/api/tags"): models_api.handle_tags,
    ("HEAD", "/api/tags"): models_api.handle_tags,
    ("POST", "/api/show"): models_api.handle_show,
    ("GET", "/api/ps"): models_api.handle_ps,
    ("POST", "/api/copy"): models_api.handle_copy,
    ("DELETE", "/api/delete"): models_api.handle_delete,
    ("POST", "/v1/chat/completions"): openai_api.handle_chat_completions,
    ("POST", "/v1/completions"): openai_api.handle_completions,
    ("POST", "/v1/embeddings"): openai_api.handle_embeddings,
    ("POST", "/v1/responses"): responses_api.handle_responses,
    ("GET", "/v1/models"): openai_api.handle_models,
    ("GET", "/v1/models/{model*}"): openai_api.handle_model,
    ("POST", "/v1/messages"): anthropic_api.handle_messages,
    ("POST", "/v1/messages/count_tokens"): anthropic_api.handle_count_tokens,
    **create_api.ROUTES,  # /api/create, /api/blobs/:digest
    **pull_api.ROUTES,  # /api/pull, /api/push
    **dist_api.ROUTES,  # GET /api/blobs/:digest (ranks fetch blobs), /api/dist/restart
}
