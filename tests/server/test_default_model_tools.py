"""The default model takes tools (issue 13): the catalog gives `smollm2:135m` a template that
renders them, its `<tool_call>[...]</tool_call>` replies come back as tool_calls, and
`show`'s capabilities say what each catalog entry's template really renders. The fake
engine where the exact text matters; the real model, marked e2e, for the whole path."""

import json

import ollama
import openai
import pytest

from mlxlite.formats import ChatTemplate, GoChatTemplate, gguf, templates, tools
from mlxlite.remote import catalog
from tests.fake_engine import FakeEngine, RunningServer, add_fake_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "The city"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]
TWO_CALLS = ('<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}},\n'
             '{"name": "get_time", "arguments": {}}\n]</tool_call>')


class CatalogTemplateEngine(FakeEngine):
    """The fake engine, its model carrying the catalog's smollm2 template."""

    def load(self, store, entry):
        loaded = super().load(store, entry)
        loaded.template = GoChatTemplate(catalog.SMOLLM2_TEMPLATE, name="ollama")
        return loaded


@pytest.fixture
def srv(store):
    add_fake_model(store)
    engine = CatalogTemplateEngine()
    engine.reply_for = lambda prompt: TWO_CALLS if "<tools>" in prompt else "Hello!"
    with RunningServer(engine, store) as s:
        yield s


def test_tools_reach_the_prompt_and_the_calls_come_back_native_and_openai(srv):
    client = ollama.Client(host=srv.url)
    out = client.chat("fake", ASK, tools=[WEATHER, CLOCK])
    prompt = srv.engine.prompts[-1]
    assert prompt.startswith("<|im_start|>system\nYou are an expert in composing functions.")
    assert '<tools>[{"type":"function","function":{"name":"get_weather","description":"Current weather in a city"' in prompt
    assert prompt.endswith("<|im_start|>user\n" + ASK[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    assert out.message.content == ""
    assert [(c.function.name, dict(c.function.arguments)) for c in out.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]

    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    choice = oa.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER, CLOCK]).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]

    # Without tools: SmolLM2's own prompt (its default system prompt), and plain text back.
    plain = client.chat("fake", ASK)
    assert plain.message.content == "Hello!" and not plain.message.tool_calls
    assert srv.engine.prompts[-1].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_a_tool_round_trip_renders_the_calls_the_way_the_model_writes_them(srv):
    client = ollama.Client(host=srv.url)
    first = client.chat("fake", ASK, tools=[WEATHER, CLOCK])
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": c.function.name, "arguments": dict(c.function.arguments)}}
        for c in first.message.tool_calls]},
        {"role": "tool", "content": "18°C, sunny", "tool_name": "get_weather"},
        {"role": "tool", "content": "12:00", "tool_name": "get_time"}]
    srv.engine.reply_for = lambda prompt: "It is 18 C and sunny in Paris; the time is 12:00."  # (ASCII: the fake replies a byte a step)
    answer = client.chat("fake", history, tools=[WEATHER, CLOCK])
    assert answer.message.content.startswith("It is 18 C")
    prompt = srv.engine.prompts[-1]
    turn = prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    # The history's calls are written in the format the model answers in, and parse back.
    assert tools.parse(turn)[1] == tools.parse(TWO_CALLS)[1]
    assert "<|im_start|>tool\n18°C, sunny<|im_end|>\n<|im_start|>tool\n12:00<|im_end|>\n" in prompt


def test_the_default_models_template_writes_what_its_own_jinja_template_writes(default_gguf):
    """Chats without tools get the very prompt SmolLM2's GGUF template writes (its default
    system prompt included): the template layer only adds tools."""
    jinja = ChatTemplate(gguf.read_metadata(default_gguf)["tokenizer.chat_template"])
    go = GoChatTemplate(catalog.CATALOG[catalog.DEFAULT_MODEL].template)
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "What is 2+2? {{ .Not }} <b>&</b>"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    ]
    for chat in chats:
        assert go.render(chat) == jinja.render(chat)
    assert go.supports_tools and not jinja.supports_tools
    with_tools = go.render(chats[1], tools=[{"type": "function", "function": {"name": "lookup"}}])
    assert with_tools.startswith("<|im_start|>system\nBe brief.\n\nYou are an expert in composing functions.")
    assert '<tools>[{"type":"function","function":{"name":"lookup","description":"","parameters":' in with_tools


def _renders_tools(store, entry) -> bool:
    """Whether the model's prompt for a chat with a tool shows that tool (what `tools` needs)."""
    layer = entry.manifest.template_layer()
    if layer is not None:
        source, go = store.read_blob(layer.digest).decode(), layer.media_type == catalog.MEDIA_OLLAMA_TEMPLATE
    else:
        path = store.blob_path(next(iter(entry.manifest.files().values())).digest)
        source, go = gguf.read_metadata(path)["tokenizer.chat_template"], False
    template = templates.load(source, go=go)
    probe = {"type": "function", "function": {"name": "probe_tool_7f3a", "parameters": {"type": "object"}}}
    return "probe_tool_7f3a" in template.render([{"role": "user", "content": "hi"}], tools=[probe])


def test_every_catalog_entry_shows_the_capabilities_its_template_has(store, default_gguf):
    entries = {e.name: e for e in catalog.CATALOG.values()}
    with RunningServer(FakeEngine(), store) as srv:
        client = ollama.Client(host=srv.url)
        for name in entries:
            entry = catalog.install(store, name)
            capabilities = client.show(name).capabilities
            assert ("tools" in capabilities) == _renders_tools(store, entry), name
        # The default model is one that takes tools (Ollama's smollm2:135m does).
        assert "tools" in client.show(catalog.DEFAULT_MODEL).capabilities


@pytest.mark.e2e
def test_default_model_answers_tool_requests_openai_and_ollama(store, default_gguf):
    catalog.install(store, catalog.DEFAULT_MODEL)
    model = catalog.DEFAULT_MODEL
    with RunningServer(None, store) as srv:
        client = ollama.Client(host=srv.url)
        plain = client.chat(model, ASK, options={"temperature": 0, "num_predict": 1})

        oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        done = oa.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, CLOCK], temperature=0,
                                          max_tokens=48)
        choice = done.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert choice.message.content or choice.message.tool_calls       # it answered, one way or the other
        assert done.usage.prompt_tokens > plain.prompt_eval_count + 100   # the tools were in the prompt

        out = client.chat(model, ASK, tools=[WEATHER, CLOCK], options={"temperature": 0, "num_predict": 48})
        assert out.done and (out.message.content or out.message.tool_calls)
        assert out.prompt_eval_count == done.usage.prompt_tokens
        for call in out.message.tool_calls or []:
            assert call.function.name in ("get_weather", "get_time")
        streamed = list(client.chat(model, ASK, tools=[WEATHER], stream=True, options={"num_predict": 16}))
        assert streamed[-1].done and all(not p.done for p in streamed[:-1])
