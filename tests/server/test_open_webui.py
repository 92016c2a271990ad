"""Open WebUI's browser chat, replayed: the body it sends to /api/chat (and to
/v1/chat/completions) with its 36 built-in tools (tests/open_webui_request.py), through
a real server. The fake engine carrying the default model's catalog template proves the
whole body is accepted, every tool reaches the prompt, and the stream ends `done: true`;
marked e2e, the default model answers the same body."""

import http.client
import json

import pytest

from mlxlite.formats import GoChatTemplate
from mlxlite.remote import catalog
from tests import open_webui_request as ow
from tests.fake_engine import FakeEngine, RunningServer, add_fake_model

# The fake's tokens are bytes: the 36 tools take ~13k of them. Open WebUI sends num_ctx
# when the user sets it (its "Context Length" control).
BIG = {"num_ctx": 32768}


class CatalogTemplateEngine(FakeEngine):
    """The fake engine, its model carrying the catalog's smollm2 template and context."""

    def load(self, store, entry):
        loaded = super().load(store, entry)
        loaded.template = GoChatTemplate(catalog.SMOLLM2_TEMPLATE, name="ollama")
        loaded.context_length = 65536    # the fake's byte tokens: one per character
        return loaded


def _post_stream(srv, path: str, body: dict) -> tuple[int, list[bytes]]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=900)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, [line for line in resp.read().splitlines() if line.strip()]


def _check_native(status: int, lines: list[bytes]) -> str:
    assert status == 200, lines
    chunks = [json.loads(line) for line in lines]
    assert chunks[-1]["done"] is True and not any(c["done"] for c in chunks[:-1])
    content = "".join(c["message"].get("content", "") for c in chunks)
    calls = [t for c in chunks for t in c["message"].get("tool_calls") or []]
    assert content.strip() or calls
    return content


def _check_openai(status: int, lines: list[bytes]) -> str:
    assert status == 200, lines
    assert lines[-1] == b"data: [DONE]"
    events = [json.loads(line[len(b"data: "):]) for line in lines[:-1]]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content.strip() or any(d.get("tool_calls") for d in deltas)
    assert any(e["choices"] and e["choices"][0]["finish_reason"] for e in events)
    assert events[-1]["usage"]["prompt_tokens"] > 0      # stream_options.include_usage
    return content


def test_open_webui_chat_with_36_tools_streams_an_answer(store):
    add_fake_model(store)
    engine = CatalogTemplateEngine("Paris is the capital of France.")
    with RunningServer(engine, store) as srv:
        assert _check_native(*_post_stream(srv, "/api/chat", ow.ollama_chat_body("fake", options=BIG))) == \
            "Paris is the capital of France."
        prompt = engine.prompts[-1]
        assert all(f'"name":"{t["function"]["name"]}"' in prompt for t in ow.BUILTIN)
        assert ow.SYSTEM in prompt and prompt.endswith(ow.USER + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.e2e
@pytest.mark.slow
def test_open_webui_chat_with_36_tools_on_the_default_model(store, default_gguf):
    catalog.install(store, catalog.DEFAULT_MODEL)
    model = catalog.DEFAULT_MODEL
    # Open WebUI's chat controls send what the user set: here a reply limit, so the test ends.
    opts = {"num_predict": 32, "seed": 1}
    with RunningServer(None, store) as srv:
        _check_native(*_post_stream(srv, "/api/chat", ow.ollama_chat_body(model, options=opts)))
        _check_openai(*_post_stream(srv, "/v1/chat/completions",
                                    ow.openai_chat_body(model, max_tokens=32, seed=1)))
