"""The server wing: the HTTP daemon.

Owns `daemon` (ThreadingHTTPServer, the route table as data, the Host/CORS/API-key
checks, NDJSON and SSE writers, and `error_body`, the one place an error becomes a status
and a JSON body), `rules` (pure route matching and the DNS-rebinding and CORS rules),
`wire` (the native API's request parsing and response shapes), the route handlers per
API (`native` for Ollama's, `openai` for OpenAI's, `responses` for OpenAI's Responses
API, `anthropic` for Anthropic's Messages API, `pull` and `create` for the store routes),
`connections` (the read timeouts per phase of a request and the cap on open connections).
Handlers reach the scheduler by submitting jobs; they never import mlx or the engine, and
nothing below imports this wing.
"""

from mlxlite.server.daemon import App, make_server, serve_forever

__all__ = ["App", "make_server", "serve_forever"]
