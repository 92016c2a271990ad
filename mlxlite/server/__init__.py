"""The server wing: the HTTP daemon.

Owns `daemon` (ThreadingHTTPServer: one request's life, the Host/CORS/API-key checks,
NDJSON and SSE writers, `make_server`/`serve_forever`), `routes` (the route table, as
data), `errors` (`error_body`, the one place an error becomes a status and a JSON body),
`context` (what a handler sees: `App`, `RequestContext`), `lock` (one daemon per store),
`connections` (the read timeouts per phase of a request and the cap on open connections),
`rules` (pure route matching and the DNS-rebinding and CORS rules), `wire` (the native
API's request parsing and response shapes), `prompt` (a request's prompt rendered to
tokens, chats fitted to num_ctx), `images` (images in requests: base64, data URLs, limits,
http(s) fetches when allowed), and the route handlers per API (`native` for Ollama's
generation and embeddings, `models` for its model routes: tags, show, ps, copy, delete;
`openai` for OpenAI's, `responses` for OpenAI's Responses API, `anthropic` for Anthropic's
Messages API, `pull` and `create` for the store routes). Handlers reach the scheduler by
submitting jobs; they never import mlx or the engine, and nothing below imports this wing.
"""

from mlxlite.server.context import App
from mlxlite.server.daemon import make_server, serve_forever

__all__ = ["App", "make_server", "serve_forever"]
