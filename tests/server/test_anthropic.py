"""Anthropic's Messages API through the official `anthropic` package: the fake engine where
the exact text matters, the real runner on the tiny models for the rest."""

import http.client
import json

import anthropic
import ollama
import pytest

from mlxlite import options
from mlxlite.errors import Busy, OutOfMemory
from mlxlite.server.anthropic import parse_messages
from mlxlite.server.errors import error_body
from tests.fake_engine import FakeEngine, RunningServer, add_fake_model

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def srv(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(), store) as s:
        yield s


def client(srv, **kw):
    return anthropic.Anthropic(base_url=srv.url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def streamed(c, **kw):
    with c.messages.stream(**kw) as stream:
        events = list(stream)
        return events, stream.get_final_message()


# ---- the fake engine: exact text --------------------------------------------------------
def test_system_and_turns_make_the_prompt_and_the_reply_comes_back_whole(srv):
    c = client(srv)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": [{"type": "text", "text": "again"}, {"type": "text", "text": "please"}]}]
    msg = c.messages.create(model="fake", max_tokens=100, system="Be brief.", messages=turns)
    assert srv.engine.prompts[-1] == ("<|system|>Be brief.\n<|user|>hi\n<|assistant|>Hello\n"
                                      "<|user|>again\nplease\n<|assistant|>")
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "fake:latest"
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == srv.engine.reply
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens == len(srv.engine.prompts[-1]) and msg.usage.output_tokens == len(srv.engine.reply)
    # System as text blocks is the same prompt.
    c.messages.create(model="fake", max_tokens=100, messages=turns,
                      system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}])
    assert srv.engine.prompts[-1] == srv.engine.prompts[-2]


def test_the_stream_is_anthropics_event_sequence_and_adds_up_to_the_whole(srv):
    c = client(srv)
    whole = c.messages.create(model="fake", max_tokens=100, messages=HI)
    events, final = streamed(c, model="fake", max_tokens=100, messages=HI)
    raw = [e.type for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                "content_block_stop", "message_delta", "message_stop")]
    n = len(srv.engine.reply)
    assert raw == (["message_start", "content_block_start"] + ["content_block_delta"] * n
                   + ["content_block_stop", "message_delta", "message_stop"])
    start = events[0].message
    assert start.content == [] and start.stop_reason is None and start.usage.input_tokens == whole.usage.input_tokens
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_max_tokens_is_stop_reason_max_tokens(srv):
    c = client(srv)
    msg = c.messages.create(model="fake", max_tokens=4, messages=HI)
    assert msg.content[0].text == "Hell" and msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 4
    _, final = streamed(c, model="fake", max_tokens=4, messages=HI)
    assert final.content[0].text == "Hell" and final.stop_reason == "max_tokens"


def test_stop_sequences_cut_the_text_and_are_named(srv):
    c = client(srv)
    msg = c.messages.create(model="fake", max_tokens=100, messages=HI, stop_sequences=["zzz", ","])
    assert msg.content[0].text == "Hello there"
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == ","
    assert srv.engine.options[-1].stop == ("zzz", ",")
    _, final = streamed(c, model="fake", max_tokens=100, messages=HI, stop_sequences=[","])
    assert final.content[0].text == "Hello there" and final.stop_sequence == ","
    # A sequence that never comes: the model ends its turn.
    msg = c.messages.create(model="fake", max_tokens=100, messages=HI, stop_sequences=["zzz"])
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None


class _CommaStops(FakeEngine):
    def load(self, store, entry):
        loaded = super().load(store, entry)
        loaded.defaults = options.parse({"stop": [","]})   # the model's own PARAMETER stop
        return loaded


def test_a_models_own_stop_string_ends_its_turn_not_a_stop_sequence(store):
    add_fake_model(store)
    with RunningServer(_CommaStops(), store) as srv:
        msg = client(srv).messages.create(model="fake", max_tokens=100, messages=HI)
        assert msg.content[0].text == "Hello there"
        assert msg.stop_reason == "end_turn" and msg.stop_sequence is None


def test_sampling_fields_reach_the_engine_and_are_checked(srv):
    c = client(srv)
    # (The anthropic package of today no longer has these as arguments; older clients send them.)
    c.messages.create(model="fake", max_tokens=5, messages=HI, extra_body={"temperature": 0.25, "top_p": 0.5,
                                                                           "top_k": 7})
    opts = srv.engine.options[-1]
    assert (opts.temperature, opts.top_p, opts.top_k, opts.num_predict) == (0.25, 0.5, 7, 5)
    c.messages.create(model="fake", max_tokens=5, messages=HI)
    defaults = options.Options()
    assert (srv.engine.options[-1].temperature, srv.engine.options[-1].top_k) == (defaults.temperature, defaults.top_k)
    for bad in ({"temperature": 1.5}, {"top_p": -0.1}, {"top_k": -1}, {"max_tokens": 0}, {"stop_sequences": [1]},
                {"thinking": {"type": "sometimes"}}, {"tool_choice": {"type": "tool", "name": "nope"}}):
        with pytest.raises(anthropic.BadRequestError) as err:
            c.messages.create(model="fake", max_tokens=5, messages=HI, extra_body=bad)
        assert err.value.body["type"] == "error"
        assert err.value.body["error"]["type"] == "invalid_request_error", bad


def test_tools_give_tool_use_blocks(srv):
    c = client(srv)
    srv.engine.reply = "Let me look." + CALL
    msg = c.messages.create(model="fake", max_tokens=200, messages=HI, tools=[WEATHER])
    assert srv.engine.prompts[-1].startswith("<|tools|>1\n")
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.content[0].text == "Let me look."
    call = msg.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    assert msg.stop_reason == "tool_use"
    events, final = streamed(c, model="fake", max_tokens=200, messages=HI, tools=[WEATHER])
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[1].input == {"city": "Paris"}
    deltas = [e.delta for e in events if e.type == "content_block_delta" and e.index == 1]
    assert [d.type for d in deltas] == ["input_json_delta"] and json.loads(deltas[0].partial_json) == {"city": "Paris"}
    # tool_choice none: no tools offered, the same text is text.
    msg = c.messages.create(model="fake", max_tokens=200, messages=HI, tools=[WEATHER], tool_choice={"type": "none"})
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == srv.engine.reply
    assert not srv.engine.prompts[-1].startswith("<|tools|>")


def test_tool_choice_any_or_tool_decodes_under_the_call_schema(srv):
    c = client(srv)
    srv.engine.reply = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    msg = c.messages.create(model="fake", max_tokens=200, messages=HI, tools=[WEATHER],
                            tool_choice={"type": "tool", "name": "get_weather"})
    assert msg.content[0].type == "tool_use" and msg.content[0].input == {"city": "Paris"}
    assert srv.engine.constraints[-1] is not None
    clock = {"name": "clock", "input_schema": {"type": "object", "properties": {}}}
    c.messages.create(model="fake", max_tokens=200, messages=HI, tools=[WEATHER, clock], tool_choice={"type": "any"})
    assert srv.engine.constraints[-1] is not None
    c.messages.create(model="fake", max_tokens=200, messages=HI, tools=[WEATHER], tool_choice={"type": "auto"})
    assert srv.engine.constraints[-1] is None


def test_tool_results_go_back_as_tool_messages(srv):
    c = client(srv)
    turns = [{"role": "user", "content": "weather in Paris?"},
             {"role": "assistant", "content": [
                 {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
                 {"type": "text", "text": "Checking."},
                 {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                 {"type": "text", "text": "And now?"}]}]
    spec = parse_messages({"model": "fake", "max_tokens": 9, "messages": turns, "tools": [WEATHER]}).prompt
    assert list(spec.messages) == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "thinking": "Use the tool.",
         "tool_calls": [{"id": "toolu_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C", "tool_call_id": "toolu_1", "name": "get_weather"},
        {"role": "user", "content": "And now?"}]
    srv.engine.reply = "It is 18C."
    msg = c.messages.create(model="fake", max_tokens=100, messages=turns, tools=[WEATHER])
    assert srv.engine.prompts[-1].endswith("<|assistant|>Checking.\n<|tool|>18C\n<|user|>And now?\n<|assistant|>")
    assert msg.content[0].text == "It is 18C." and msg.stop_reason == "end_turn"


def test_thinking_comes_back_as_thinking_blocks(srv):
    c = client(srv)
    srv.engine.reply = "<think>\nParis is in France.\n</think>\n\nParis."
    msg = c.messages.create(model="fake", max_tokens=200, messages=HI)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Paris is in France.\n" and msg.content[1].text == "Paris."
    events, final = streamed(c, model="fake", max_tokens=200, messages=HI,
                             thinking={"type": "enabled", "budget_tokens": 1024})
    kinds = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert kinds[0] == "thinking_delta" and kinds[-1] == "text_delta"
    assert kinds == sorted(kinds, key=lambda k: k != "thinking_delta")
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        ("thinking", "Paris is in France.\n"), ("text", "Paris.")]
    # Thinking, then a bare JSON call: the call is still found after the thinking is split off.
    srv.engine.reply = '<think>Need the tool.</think>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    msg = c.messages.create(model="fake", max_tokens=200, messages=HI, tools=[WEATHER])
    assert [b.type for b in msg.content] == ["thinking", "tool_use"] and msg.content[1].input == {"city": "Oslo"}


def test_count_tokens_renders_the_template_and_generates_nothing(srv):
    c = client(srv)
    counted = c.messages.count_tokens(model="fake", system="S", messages=HI)
    assert srv.engine.started == 0
    assert counted.input_tokens == len("<|system|>S\n<|user|>hi\n<|assistant|>")
    msg = c.messages.create(model="fake", max_tokens=3, system="S", messages=HI)
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == counted.input_tokens
    with_tools = c.messages.count_tokens(model="fake", system="S", messages=HI, tools=[WEATHER])
    assert with_tools.input_tokens == counted.input_tokens + len("<|tools|>1\n")
    with pytest.raises(anthropic.NotFoundError):
        c.messages.count_tokens(model="missing", messages=HI)
    with pytest.raises(anthropic.BadRequestError):
        c.messages.count_tokens(model="fake", messages=[])


def test_errors_have_anthropics_shape_and_status(srv):
    c = client(srv)
    with pytest.raises(anthropic.NotFoundError) as err:
        c.messages.create(model="missing", max_tokens=5, messages=HI)
    assert err.value.status_code == 404
    assert err.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                          "message": "model 'missing:latest' not found"}}
    for bad_messages in ([], [{"role": "system", "content": "x"}], [{"role": "user", "content": 7}],
                         [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}],
                         [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
                                                                                   "media_type": "image/png",
                                                                                   "data": "AAAA"}}]}]):
        with pytest.raises(anthropic.BadRequestError) as err:
            c.messages.create(model="fake", max_tokens=5, messages=bad_messages)
        assert err.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="web_search"):
        c.messages.create(model="fake", max_tokens=5, messages=HI,
                          tools=[{"type": "web_search_20250305", "name": "web_search"}])
    # A body that is not JSON, or lacks max_tokens, straight over HTTP.
    for body in (b"{not json", b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}'):
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.request("POST", "/v1/messages", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == 400 and payload["type"] == "error"
        assert payload["error"]["type"] == "invalid_request_error"
        conn.close()
    assert "max_tokens is required" in payload["error"]["message"]
    # The other statuses, in the one mapping.
    assert error_body(Busy("full"), True, True) == (503, {"type": "error", "error": {"type": "overloaded_error",
                                                                                      "message": "full"}})
    assert error_body(OutOfMemory("big"), True, True)[1]["error"]["type"] == "overloaded_error"
    assert error_body(ValueError("x"), True, True)[1]["error"]["type"] == "api_error"


def test_an_error_after_the_first_byte_is_an_error_event(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(fail_after=3), store) as srv:
        with pytest.raises(anthropic.APIStatusError) as err:
            streamed(client(srv), model="fake", max_tokens=100, messages=HI)
        assert err.value.body == {"type": "error", "error": {"type": "api_error",
                                                              "message": "the fake engine failed on purpose"}}


def test_events_are_named_and_arrive_as_generated(store):
    engine = FakeEngine(hold_after=3)
    add_fake_model(store)
    with RunningServer(engine, store) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.request("POST", "/v1/messages", json.dumps({"model": "fake", "max_tokens": 50, "messages": HI,
                                                         "stream": True}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        assert resp.readline() == b"event: message_start\n"
        assert json.loads(resp.readline()[len(b"data: "):])["type"] == "message_start"
        assert engine.active == 1 and engine.finished == []     # generation is parked after 3 tokens
        engine.resume.set()
        rest = resp.read().decode()
        assert rest.rstrip().endswith('event: message_stop\ndata: {"type":"message_stop"}')
        conn.close()


def test_x_api_key_is_accepted_as_the_api_key(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(), store, api_key="s3cret") as srv:
        def keyed(key):     # the header Claude Code and earlier anthropic packages send
            return anthropic.Anthropic(base_url=srv.url, api_key=None, default_headers={"x-api-key": key},
                                       max_retries=0)

        assert keyed("s3cret").messages.create(model="fake", max_tokens=2, messages=HI).content
        with pytest.raises(anthropic.AuthenticationError) as err:
            keyed("wrong").messages.create(model="fake", max_tokens=2, messages=HI)
        assert err.value.body["error"]["type"] == "authentication_error"
        # Today's package sends api_key as a bearer token: that is the key too.
        assert client(srv, api_key="s3cret").messages.create(model="fake", max_tokens=2, messages=HI).content
        with pytest.raises(anthropic.AuthenticationError):
            client(srv, api_key="wrong").messages.create(model="fake", max_tokens=2, messages=HI)
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.request("GET", "/api/tags", headers={"x-api-key": "s3cret", "anthropic-version": "2023-06-01"})
        assert conn.getresponse().status == 200
        conn.close()


# ---- the real runner on the tiny models ---------------------------------------------------
@pytest.fixture
def real(store, tiny_gguf_model):
    with RunningServer(None, store) as s:
        yield s


def test_anthropic_client_on_a_real_model(real, tiny_gguf_model):
    c = client(real)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Tell me"}]
    kw = dict(model="tiny-gguf", system="Be brief.", messages=turns, extra_body={"temperature": 0})
    whole = c.messages.create(max_tokens=8, **kw)
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 8
    counted = c.messages.count_tokens(model="tiny-gguf", system="Be brief.", messages=turns)
    assert whole.usage.input_tokens + whole.usage.cache_read_input_tokens == counted.input_tokens
    _, final = streamed(c, max_tokens=8, **kw)
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "max_tokens"
    # The prompt was seen before: the prefix cache serves part of it.
    assert final.usage.cache_read_input_tokens > 0
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == counted.input_tokens
    text = c.messages.create(max_tokens=30, **kw).content[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    cut = c.messages.create(max_tokens=30, stop_sequences=[stop], **kw)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:text.find(stop)]


def test_tool_use_and_tool_result_on_a_real_model(real, tiny_gguf_model):
    # A tools-aware template on the tiny model; tool_choice forces the call (decoded under
    # its schema, so the random weights write a valid one).
    template = ("{% if tools %}<|im_start|>system\n{{ tools | length }} tools<|im_end|>\n{% endif %}"
                "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
                " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
    list(ollama.Client(host=real.url).create(model="tooly", from_="tiny-gguf", template=template, stream=True))
    tool = {"name": "get_weather", "description": "Weather in a city",
            "input_schema": {"type": "object", "additionalProperties": False, "required": ["city"],
                             "properties": {"city": {"type": "string", "maxLength": 3}}}}
    c = client(real)
    ask = [{"role": "user", "content": "Paris?"}]       # short: the tiny model's context is 256
    msg = c.messages.create(model="tooly", max_tokens=200, messages=ask, tools=[tool],
                            tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0.7})
    (call,) = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and call.name == "get_weather" and isinstance(call.input["city"], str)
    answer = c.messages.create(model="tooly", max_tokens=4, tools=[tool], messages=[
        *ask, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                 "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]}])
    assert answer.stop_reason in ("max_tokens", "end_turn")
    assert (answer.usage.input_tokens + answer.usage.cache_read_input_tokens
            > msg.usage.input_tokens + msg.usage.cache_read_input_tokens)
    # The tiny model's own template has no tools: asking for them is a 400.
    with pytest.raises(anthropic.BadRequestError, match="does not support tools"):
        c.messages.create(model="tiny-gguf", max_tokens=4, messages=ask, tools=[tool])
