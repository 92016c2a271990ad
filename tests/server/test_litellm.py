"""The real `litellm` package against a real server on 127.0.0.1 port 0: its `ollama/`
(/api/generate), `ollama_chat/` (/api/chat) and `openai/` (/v1) providers, plain and
streamed, with tools; the fake engine where the exact text matters, a tiny real model
for the whole path. litellm must never reach past loopback: its cost map is read from
the package (LITELLM_LOCAL_MODEL_COST_MAP, set before the import) and an audit hook
records every address this process resolves or connects to while litellm runs."""

import ipaddress
import json
import os
import sys

import pytest

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"    # before the import: it may fetch the map at import

import litellm  # noqa: E402

from tests.fake_engine import FakeEngine, RunningServer, add_fake_model  # noqa: E402

REPLY = "Hello there, this is a fake reply."
ASK = [{"role": "user", "content": "Say hello"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "The city"}}}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

_reached: list[str] = []
_recording = [False]


def _audit(event: str, args: tuple) -> None:
    # Records only while a test here runs litellm (the hook lives as long as the process).
    if not _recording[0]:
        return
    if event == "socket.connect" and isinstance(args[1], tuple):
        _reached.append(str(args[1][0]))
    elif event == "socket.getaddrinfo":
        _reached.append(str(args[0]))


sys.addaudithook(_audit)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True)
def no_network():
    _reached.clear()
    _recording[0] = True
    try:
        yield
    finally:
        _recording[0] = False
    assert _reached, "the audit hook saw no connection at all: it is not recording"
    assert all(_loopback(h) for h in _reached), f"litellm reached past loopback: {_reached}"


@pytest.fixture
def fake(store):
    add_fake_model(store)
    engine = FakeEngine(REPLY)
    engine.reply_for = lambda prompt: CALL if "<|tools|>" in prompt else REPLY
    with RunningServer(engine, store) as s:
        yield s


@pytest.fixture
def real(store, tiny_gguf_model):
    with RunningServer(None, store) as s:
        yield s


def test_cost_map_is_the_local_one():
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert litellm.model_cost and "gpt-4o" in litellm.model_cost
    _reached.append("127.0.0.1")    # this test opens no socket; the fixture's check is about litellm's calls


def test_ollama_generate_and_chat_providers_exact_text(fake):
    out = litellm.completion(model="ollama/fake", api_base=fake.url, messages=ASK)
    assert out.choices[0].message.content == REPLY
    # litellm's `ollama/` flattens the chat into one /api/generate prompt of its own.
    assert fake.engine.prompts[-1] == "<|user|>### User:\nSay hello\n\n\n<|assistant|>"
    assert out.usage.completion_tokens == len(REPLY)

    out = litellm.completion(model="ollama_chat/fake", api_base=fake.url, messages=ASK,
                             temperature=0, max_tokens=5)
    assert out.choices[0].message.content == REPLY[:5] and out.choices[0].finish_reason == "length"
    assert fake.engine.options[-1].num_predict == 5 and fake.engine.options[-1].temperature == 0

    for model in ("ollama/fake", "ollama_chat/fake"):
        parts = list(litellm.completion(model=model, api_base=fake.url, messages=ASK, stream=True))
        assert "".join(p.choices[0].delta.content or "" for p in parts) == REPLY
        assert parts[-1].choices[0].finish_reason == "stop"


def test_openai_provider_on_v1_exact_text_and_stream(fake):
    kw = {"model": "openai/fake", "api_base": fake.url + "/v1", "api_key": "unused", "messages": ASK}
    out = litellm.completion(**kw, max_tokens=4)
    assert out.choices[0].message.content == REPLY[:4] and out.choices[0].finish_reason == "length"
    parts = list(litellm.completion(**kw, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == REPLY


def test_tools_through_litellm(fake):
    for model, base in (("ollama_chat/fake", fake.url), ("openai/fake", fake.url + "/v1")):
        out = litellm.completion(model=model, api_base=base, api_key="unused",
                                 messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
        assert fake.engine.prompts[-1].startswith("<|tools|>1\n")
        (call,) = out.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert out.choices[0].finish_reason == "tool_calls"


def test_tiny_real_model_through_every_provider(real, tiny_gguf_model):
    greedy = {"temperature": 0, "max_tokens": 6, "seed": 1}
    texts = {}
    for model, base in (("ollama/tiny-gguf", real.url), ("ollama_chat/tiny-gguf", real.url),
                        ("openai/tiny-gguf", real.url + "/v1")):
        out = litellm.completion(model=model, api_base=base, api_key="unused", messages=ASK, **greedy)
        assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
        streamed = list(litellm.completion(model=model, api_base=base, api_key="unused", messages=ASK,
                                           stream=True, **greedy))
        assert "".join(p.choices[0].delta.content or "" for p in streamed) == out.choices[0].message.content
        texts[model] = out.choices[0].message.content
    # /api/chat and /v1 render the same chat: greedy gives the same text.
    assert texts["ollama_chat/tiny-gguf"] == texts["openai/tiny-gguf"]
