"""Images through every API on a real daemon and a real (tiny, random) Qwen2-VL on MLX:
Ollama's native `images`, OpenAI's `image_url` parts, Anthropic's `image` blocks, Responses'
`input_image`, the real `ollama`, `openai` and `anthropic` clients; limits and bad images are
400s before the first byte; http(s) image URLs only when the setting allows (fetched here
from a loopback server, with the `private` opt-in, never the internet)."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading

import pytest

from tests.fake_engine import FakeEngine, RunningServer, add_fake_model, call, wait_for
from tests.vision_models import data_url, png, png_b64, send_png

GREEDY = {"temperature": 0, "num_predict": 6, "seed": 1}


@pytest.fixture
def srv(store, tiny_vision_model):
    with RunningServer(None, store) as s:
        yield s


def _top(entries):
    """The first token's alternatives as comparable (token, logprob) pairs."""
    return [(t["token"], round(t["logprob"], 5)) for t in entries[0]["top_logprobs"]]


# ---- every API returns text, and the image changes it ------------------------------------------
def test_native_chat_and_generate_take_base64_images(srv):
    def chat(seed):
        status, body = call(srv, "/api/chat", {
            "model": "tiny-vl", "stream": False, "options": GREEDY, "logprobs": True, "top_logprobs": 3,
            "messages": [{"role": "user", "content": "What is in this picture?", "images": [png_b64(seed)]}]})
        assert status == 200, body
        return body

    a, b = chat(1), chat(2)
    assert a["done"] and a["eval_count"] == 6 and a["message"]["content"]
    assert a["prompt_eval_count"] > 20          # the image's tokens are part of the prompt
    assert _top(a["logprobs"]) != _top(b["logprobs"])
    assert a["message"]["content"] != b["message"]["content"]
    assert _top(chat(1)["logprobs"]) == _top(a["logprobs"])

    def generate(seed, stream):
        status, body = call(srv, "/api/generate", {"model": "tiny-vl", "prompt": "Describe", "stream": stream,
                                                   "options": GREEDY, "images": [png_b64(seed)]})
        assert status == 200, body
        return "".join(line["response"] for line in body) if stream else body["response"]

    assert generate(1, False) == generate(1, True)
    assert generate(1, False) != generate(2, False)


def test_a_draft_option_on_a_vision_model_changes_nothing(srv):
    """A vision model decodes one sequence at a time and does not speculate: a `draft` (here
    the model itself) is ignored, not a 500."""
    body = {"model": "tiny-vl", "prompt": "Describe", "stream": False, "options": GREEDY, "images": [png_b64(1)]}
    status, plain = call(srv, "/api/generate", body)
    drafted_status, drafted = call(srv, "/api/generate", {**body, "options": {**GREEDY, "draft": "tiny-vl"}})
    assert (status, drafted_status) == (200, 200), drafted
    assert drafted["response"] == plain["response"] and drafted["eval_count"] == plain["eval_count"]


def test_openai_chat_takes_image_url_data_urls(srv):
    def ask(seed):
        status, body = call(srv, "/v1/chat/completions", {
            "model": "tiny-vl", "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_url(seed), "detail": "low"}}]}]})
        assert status == 200, body
        return body["choices"][0]

    a, b = ask(1), ask(2)
    assert a["message"]["content"] and a["finish_reason"] == "length"
    assert _top(a["logprobs"]["content"]) != _top(b["logprobs"]["content"])


def test_anthropic_messages_take_image_blocks(srv):
    def ask(seed):
        status, body = call(srv, "/v1/messages", {
            "model": "tiny-vl", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_b64(seed)}},
                {"type": "text", "text": "What is this?"}]}]})
        assert status == 200, body
        return body

    a, b = ask(1), ask(2)
    assert a["content"][0]["type"] == "text" and a["usage"]["output_tokens"] == 6
    assert a["content"][0]["text"] != b["content"][0]["text"]
    status, body = call(srv, "/v1/messages", {
        "model": "tiny-vl", "max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]})
    assert status == 400 and "base64 or url image source" in body["error"]["message"]


def test_responses_take_input_image(srv):
    def ask(seed):
        status, body = call(srv, "/v1/responses", {
            "model": "tiny-vl", "max_output_tokens": 6, "temperature": 0, "top_logprobs": 3,
            "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": data_url(seed), "detail": "auto"}]}]})
        assert status == 200, body
        (message,) = [o for o in body["output"] if o["type"] == "message"]
        return message["content"][0]

    a, b = ask(1), ask(2)
    assert a["text"] and a["text"] != b["text"]
    assert _top(a["logprobs"]) != _top(b["logprobs"])
    status, body = call(srv, "/v1/responses", {"model": "tiny-vl", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}]})
    assert status == 400 and "files are not stored" in body["error"]["message"]


# ---- the real clients ------------------------------------------------------------------------
def test_the_ollama_client_sends_images(srv, tmp_path):
    import ollama

    client = ollama.Client(host=srv.url)
    path = tmp_path / "one.png"
    path.write_bytes(png(1))
    by_bytes = client.chat("tiny-vl", [{"role": "user", "content": "What is this?", "images": [png(1)]}],
                           options=GREEDY)
    by_path = client.chat("tiny-vl", [{"role": "user", "content": "What is this?", "images": [str(path)]}],
                          options=GREEDY)
    other = client.chat("tiny-vl", [{"role": "user", "content": "What is this?", "images": [png(2)]}],
                        options=GREEDY)
    assert by_bytes.message.content and by_bytes.message.content == by_path.message.content
    assert other.message.content != by_bytes.message.content
    streamed = client.generate("tiny-vl", "Describe", images=[png(1)], options=GREEDY, stream=True)
    whole = client.generate("tiny-vl", "Describe", images=[png(1)], options=GREEDY)
    assert "".join(part.response for part in streamed) == whole.response and whole.eval_count == 6
    shown = client.show("tiny-vl")
    assert "vision" in shown.capabilities and "completion" in shown.capabilities
    with pytest.raises(ollama.ResponseError) as err:
        client.generate("tiny-vl", "x", images=[b"GIF89a not really a gif"], options=GREEDY)
    assert err.value.status_code == 400 and "could not be decoded" in err.value.error


def test_the_openai_client_sends_image_url(srv):
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

    def ask(seed, **kw):
        return client.chat.completions.create(model="tiny-vl", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": data_url(seed)}}]}], **kw)

    a, b = ask(1), ask(2)
    assert a.choices[0].message.content and a.choices[0].message.content != b.choices[0].message.content
    chunks = list(ask(1, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="image URLs are not fetched"):
        client.chat.completions.create(model="tiny-vl", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}]}])
    response = client.responses.create(model="tiny-vl", max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": data_url(1), "detail": "auto"}]}])
    assert response.output_text


def test_the_anthropic_client_sends_an_image_block(srv):
    import anthropic

    client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    # greedy (this client takes temperature only in the body): a sampled reply may end early
    msg = client.messages.create(model="tiny-vl", max_tokens=6, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_b64(1)}},
            {"type": "text", "text": "What is this?"}]}])
    assert msg.content[0].text and msg.usage.output_tokens == 6


# ---- limits and bad images: 400s before the first byte ------------------------------------------
def _chat(images, stream=False):
    return {"model": "tiny-vl", "stream": stream, "options": GREEDY,
            "messages": [{"role": "user", "content": "hi", "images": images}]}


def test_bad_images_are_400s_on_every_api(srv, monkeypatch):
    cases = [
        ("/api/chat", _chat(["not base64!"]), "messages[0].images[0]: not valid base64"),
        ("/api/chat", _chat([png_b64(1)[:40] + "AAAA"]), "could not be decoded"),
        ("/api/chat", _chat(["aGVsbG8gd29ybGQ="], stream=True), "not an image"),
        ("/api/generate", {"model": "tiny-vl", "prompt": "x", "images": "abc"}, "expected an array"),
        ("/v1/chat/completions", {"model": "tiny-vl", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]}]}, "must be base64"),
        ("/v1/chat/completions", {"model": "tiny-vl", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, "data URL or an http(s) URL"),
        ("/v1/messages", {"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@@"}}]}]},
         "not valid base64"),
        ("/v1/responses", {"model": "tiny-vl", "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://127.0.0.1:9/x.png"}]}]}, "image URLs are not fetched"),
    ]
    for path, body, needle in cases:
        status, got = call(srv, path, body)
        message = got["error"] if isinstance(got.get("error"), str) else got["error"]["message"]
        assert status == 400 and needle in message, (path, status, got)
        assert "\n" not in message


def test_size_and_count_limits_are_400s(srv, monkeypatch):
    monkeypatch.setenv("MLXLITE_MAX_IMAGES", "2")
    status, body = call(srv, "/api/chat", {"model": "tiny-vl", "messages": [
        {"role": "user", "content": "a", "images": [png_b64(1), png_b64(2)]},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c", "images": [png_b64(3)]}]})
    assert status == 400 and body["error"] == "too many images: the request has 3, the limit is 2 (max_images)"
    status, body = call(srv, "/v1/chat/completions", {"model": "tiny-vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(i)}} for i in range(3)]}]})
    assert status == 400 and "too many images" in body["error"]["message"]
    monkeypatch.setenv("MLXLITE_MAX_IMAGE_BYTES", "200")
    status, body = call(srv, "/api/generate", {"model": "tiny-vl", "prompt": "x", "images": [png_b64(1)]})
    assert status == 400 and "more than the limit of 200 bytes (max_image_bytes)" in body["error"]
    monkeypatch.delenv("MLXLITE_MAX_IMAGE_BYTES")
    monkeypatch.setenv("MLXLITE_MAX_IMAGE_PIXELS", "100")
    status, body = call(srv, "/api/generate", {"model": "tiny-vl", "prompt": "x", "images": [png_b64(1)]})
    assert status == 400 and "64x64 pixels, more than the limit of 100" in body["error"]


def test_a_text_model_answers_images_with_a_400(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(), store) as fake:
        status, body = call(fake, "/api/chat", {"model": "fake", "messages": [
            {"role": "user", "content": "hi", "images": [png_b64(1)]}]})
        assert status == 400 and body["error"] == '"fake:latest" does not support images'
        status, body = call(fake, "/v1/messages", {"model": "fake", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": png_b64(1)}}]}]})
        assert status == 400 and "does not support images" in body["error"]["message"]


# ---- fetching http(s) image URLs, when allowed (from loopback only) -----------------------------
@pytest.fixture
def image_host():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/one.png":
                self.send_error(404)
                return
            send_png(self, png(1))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_image_urls_are_fetched_only_when_the_setting_allows(srv, image_host, monkeypatch):
    def ask(url):
        return call(srv, "/v1/chat/completions", {
            "model": "tiny-vl", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]})

    status, body = ask(image_host + "/one.png")
    assert status == 400 and "MLXLITE_IMAGE_FETCH=1" in body["error"]["message"]
    monkeypatch.setenv("MLXLITE_IMAGE_FETCH", "1")     # public addresses only: loopback is refused
    status, body = ask(image_host + "/one.png")
    assert status == 400 and "127.0.0.1 is a loopback address" in body["error"]["message"]
    monkeypatch.setenv("MLXLITE_IMAGE_FETCH", "private")
    status, fetched = ask(image_host + "/one.png")
    assert status == 200, fetched
    assert fetched["choices"][0]["message"]["content"] == ask(data_url(1))[1]["choices"][0]["message"]["content"]
    status, body = ask(image_host + "/missing.png")
    assert status == 400 and "fetching the image failed: HTTP 404" in body["error"]["message"]


# ---- capabilities, scheduling, cancellation, keep-alive ---------------------------------------
def test_tags_and_show_report_the_vision_capability(srv, tiny_safetensors_model):
    status, tags = call(srv, "/api/tags", None, method="GET")
    caps = {m["name"]: m["capabilities"] for m in tags["models"]}
    assert "vision" in caps["tiny-vl:latest"] and "vision" not in caps["tiny-st:latest"]
    assert "vision" in call(srv, "/api/show", {"model": "tiny-vl"})[1]["capabilities"]
    assert "vision" not in call(srv, "/api/show", {"model": "tiny-st"})[1]["capabilities"]


def test_image_and_text_requests_at_once_all_finish_alone_equal(srv):
    """A vision model runs its sequences one at a time; concurrent requests queue and each
    gets what it gets alone."""
    bodies = [_chat([png_b64(i)]) if i % 2 else {"model": "tiny-vl", "stream": False, "options": GREEDY,
                                                 "messages": [{"role": "user", "content": f"text {i}"}]}
              for i in range(1, 5)]
    alone = [call(srv, "/api/chat", b)[1]["message"]["content"] for b in bodies]
    results: dict = {}
    threads = [threading.Thread(target=lambda i=i, b=b: results.__setitem__(i, call(srv, "/api/chat", b)))
               for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i][1]["message"]["content"] for i in range(len(bodies))] == alone


def test_a_client_that_leaves_stops_its_image_generation_and_keep_alive_0_unloads(srv):
    body = _chat([png_b64(1)], stream=True)
    body["options"] = {"temperature": 0, "num_predict": 100000, "num_ctx": 2048}
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    conn.request("POST", "/api/chat", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert b'"done":false' in resp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    (logged,) = srv.logged("/api/chat", 1)
    assert logged["status"] == 499
    wait_for(lambda: not srv.scheduler.busy(), 30, "the generation to stop")
    status, body = call(srv, "/api/chat", {**_chat([png_b64(2)]), "keep_alive": 0})
    assert status == 200 and body["done_reason"] == "length"
    wait_for(lambda: not call(srv, "/api/ps", None, method="GET")[1]["models"], 30, "the model to unload")


def test_a_context_holding_an_earlier_images_tokens_is_a_400_not_a_failed_batch(srv):
    """`/api/generate`'s `context` from an image turn holds that image's placeholder tokens;
    sent back with a new image they do not match its pixels: one 400 for that request."""
    status, first = call(srv, "/api/generate", {"model": "tiny-vl", "prompt": "Describe", "stream": False,
                                                "options": GREEDY, "images": [png_b64(1)]})
    assert status == 200
    status, body = call(srv, "/api/generate", {"model": "tiny-vl", "prompt": "And this?", "stream": False,
                                               "options": GREEDY, "images": [png_b64(2)],
                                               "context": first["context"]})
    assert status == 400 and "image tokens its images do not fill" in body["error"]
    status, body = call(srv, "/api/generate", {"model": "tiny-vl", "prompt": "Describe", "stream": False,
                                               "options": GREEDY, "images": [png_b64(1)]})
    assert status == 200 and body["response"] == first["response"]
