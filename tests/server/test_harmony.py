"""gpt-oss's harmony channels through every chat API: the fake engine renders the prompt with
a harmony Go template (tests/formats/gotemplates/harmony-style.gotmpl) and replies as gpt-oss
does; analysis comes back as thinking, final as content, a commentary message to
`functions.NAME` as a tool call, streamed and not, on /api/chat, /v1/chat/completions,
/v1/responses and /v1/messages (the official clients)."""

from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from mlxlite.formats import templates
from tests.fake_engine import FakeEngine, RunningServer, add_fake_model

TEMPLATE = (Path(__file__).resolve().parents[1] / "formats" / "gotemplates" / "harmony-style.gotmpl").read_text()
THOUGHT = "The user greets me. Reply kindly."
ANSWER = "Hello! How can I help?"
REPLY = f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>final<|message|>{ANSWER}"
CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def srv(store):
    add_fake_model(store)
    engine = FakeEngine(REPLY)
    engine.template = templates.GoChatTemplate(TEMPLATE, name="harmony")
    with RunningServer(engine, store) as s:
        yield s


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def test_native_chat_splits_the_channels(srv):
    c = ollama.Client(host=srv.url)
    whole = c.chat("fake", HI)
    assert srv.engine.prompts[-1].endswith("<|start|>user<|message|>hi<|end|><|start|>assistant")
    assert (whole.message.thinking, whole.message.content) == (THOUGHT, ANSWER)
    parts = list(c.chat("fake", HI, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content for p in parts) == ANSWER
    assert not any("<|" in (p.message.content + (p.message.thinking or "")) for p in parts)
    first_content = next(i for i, p in enumerate(parts) if p.message.content)
    assert all(not p.message.content for p in parts[:first_content]) and parts[0].message.thinking


def test_native_tool_calls_from_the_commentary_channel(srv):
    srv.engine.reply = CALL
    c = ollama.Client(host=srv.url)
    whole = c.chat("fake", HI, tools=[WEATHER])
    assert "type get_weather = (_: {" in srv.engine.prompts[-1]     # the template rendered the tools
    assert whole.message.thinking == "Need the weather." and whole.message.content == ""
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    streamed = list(c.chat("fake", HI, tools=[WEATHER], stream=True))
    assert [tc.function.name for p in streamed for tc in (p.message.tool_calls or [])] == ["get_weather"]


def test_openai_chat_completions(srv):
    c = oai(srv)
    done = c.chat.completions.create(model="fake", messages=HI)
    msg = done.choices[0].message
    assert msg.content == ANSWER and msg.model_extra["reasoning_content"] == THOUGHT
    assert done.usage.completion_tokens_details.reasoning_tokens > len(THOUGHT)     # the markup is thinking too
    chunks = list(c.chat.completions.create(model="fake", messages=HI, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == THOUGHT
    srv.engine.reply = CALL
    done = c.chat.completions.create(model="fake", messages=HI, tools=[WEATHER])
    assert done.choices[0].finish_reason == "tool_calls" and done.choices[0].message.content is None
    assert done.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_openai_responses(srv):
    c = oai(srv)
    resp = c.responses.create(model="fake", input="hi")
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    assert resp.output[0].summary[0].text == THOUGHT and resp.output_text == ANSWER
    with c.responses.stream(model="fake", input="hi") as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    assert deltas == ANSWER
    srv.engine.reply = CALL
    resp = c.responses.create(model="fake", input="hi", tools=[{"type": "function", **WEATHER["function"]}])
    calls = [item for item in resp.output if item.type == "function_call"]
    assert [(x.name, x.arguments) for x in calls] == [("get_weather", '{"city": "Paris"}')]


def test_anthropic_messages(srv):
    c = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    msg = c.messages.create(model="fake", max_tokens=500, messages=HI)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in msg.content] == [
        ("thinking", THOUGHT), ("text", ANSWER)]
    with c.messages.stream(model="fake", max_tokens=500, messages=HI) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == ANSWER
    srv.engine.reply = CALL
    tool = {"name": "get_weather", "description": "Weather", "input_schema": WEATHER["function"]["parameters"]}
    msg = c.messages.create(model="fake", max_tokens=500, messages=HI, tools=[tool])
    assert [b.type for b in msg.content] == ["thinking", "tool_use"] and msg.stop_reason == "tool_use"
    assert msg.content[1].input == {"city": "Paris"}


def test_a_model_without_harmony_keeps_its_text(store):
    """The same reply from a model whose template is not harmony's is not touched."""
    add_fake_model(store)
    with RunningServer(FakeEngine(REPLY), store) as s:
        assert ollama.Client(host=s.url).chat("fake", HI).message.content == REPLY


def test_a_json_constrained_reply_passes_as_it_is(srv):
    srv.engine.reply = '{"greeting": "hello"}'
    c = ollama.Client(host=srv.url)
    assert c.chat("fake", HI, format="json").message.content == '{"greeting": "hello"}'
    parts = list(c.chat("fake", HI, format="json", stream=True))
    assert "".join(p.message.content for p in parts) == '{"greeting": "hello"}'
    assert sum(1 for p in parts if p.message.content) > 1     # streamed as it comes, not held to the end
