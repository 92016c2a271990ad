"""OpenAI's Responses API (`POST /v1/responses`) through the real `openai` package against
a real server on 127.0.0.1 port 0: the fake engine for exact text, prompts and events,
the tiny generated GGUF for real generations (plain and under a JSON schema)."""

import http.client
import json
import socket

import jsonschema
import openai
import pytest

from mlxlite.server import responses
from tests.fake_engine import FakeEngine, RunningServer, add_fake_model, wait_for

REPLY = "Hello there, this is a fake reply."
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
TEXT_DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


@pytest.fixture
def engine():
    return FakeEngine(REPLY)


@pytest.fixture
def srv(store, engine):
    add_fake_model(store)
    with RunningServer(engine, store) as s:
        yield s


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def test_text_input_gives_a_message_with_usage(client, srv):
    resp = client.responses.create(model="fake", input="hi", temperature=0.5, top_p=0.9)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == "fake:latest"
    assert resp.status == "completed" and resp.incomplete_details is None
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert [part.type for part in item.content] == ["output_text"] and resp.output_text == REPLY
    prompt = srv.engine.prompts[-1]
    assert prompt == "<|user|>hi\n<|assistant|>"
    assert resp.usage.input_tokens == len(prompt.encode()) and resp.usage.output_tokens == len(REPLY)
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    opts = srv.engine.options[-1]
    assert (opts.temperature, opts.top_p) == (0.5, 0.9)
    (line,) = srv.logged("/v1/responses", 1)      # written just after the response: wait for it
    assert line["status"] == 200


def test_items_and_instructions_become_the_chat_prompt(client, srv):
    resp = client.responses.create(model="fake", instructions="Be brief.", input=[
        {"type": "message", "role": "developer", "content": "Also polite."},
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"role": "user", "content": "again"},
    ])
    assert resp.output_text == REPLY and resp.instructions == "Be brief."
    assert srv.engine.prompts[-1] == ("<|system|>Be brief.\n\nAlso polite.\n<|user|>hi\n<|assistant|>Hello\n"
                                      "<|user|>again\n<|assistant|>")


def test_max_output_tokens_cuts_the_answer_and_says_incomplete(client, srv):
    resp = client.responses.create(model="fake", input="hi", max_output_tokens=3)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == REPLY[:3] and resp.output[0].status == "incomplete"
    assert resp.usage.output_tokens == 3 and srv.engine.options[-1].num_predict == 3
    events = list(client.responses.create(model="fake", input="hi", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == REPLY[:3]


def test_text_format_reaches_the_engine_as_a_constraint(client, srv):
    constrain = pytest.importorskip("mlxlite.constrain.tokens")
    srv.engine.reply = '{"ok": true}'
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    resp = client.responses.create(model="fake", input="json", text={
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert isinstance(srv.engine.constraints[-1], constrain.TokenConstraint)
    assert resp.text.format.type == "json_schema" and json.loads(resp.output_text) == {"ok": True}
    client.responses.create(model="fake", input="json", text={"format": {"type": "json_object"}})
    assert isinstance(srv.engine.constraints[-1], constrain.TokenConstraint)
    client.responses.create(model="fake", input="plain", text={"format": {"type": "text"}})
    assert srv.engine.constraints[-1] is None


def test_tools_function_call_and_its_output_round_trip(client, srv):
    def reply_for(prompt):
        return "It is sunny in Paris." if "<|tool|>" in prompt else CALL

    srv.engine.reply_for = reply_for
    first = client.responses.create(model="fake", input="weather in Paris?", tools=TOOLS)
    assert first.status == "completed" and first.output_text == ""
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and json.loads(call.arguments) == {"city": "Paris"}
    assert srv.engine.prompts[-1].startswith("<|tools|>1\n")
    second = client.responses.create(model="fake", tools=TOOLS, input=[
        {"role": "user", "content": "weather in Paris?"}, *first.output,
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}])
    assert second.output_text == "It is sunny in Paris." and [o.type for o in second.output] == ["message"]
    assert srv.engine.prompts[-1] == ('<|tools|>1\n<|user|>weather in Paris?\n<|assistant|>\n'
                                      '<|tool|>{"sky": "sunny"}\n<|assistant|>')
    # tool_choice "none" sends no tools: the same text is plain output.
    srv.engine.reply_for = None
    srv.engine.reply = CALL
    plain = client.responses.create(model="fake", input="weather?", tools=TOOLS, tool_choice="none")
    assert plain.output_text == CALL and not srv.engine.prompts[-1].startswith("<|tools|>")


def test_input_items_map_onto_chat_messages_with_tool_calls_and_results():
    body = {"instructions": "Sys.", "input": [
        {"role": "user", "content": "weather?"},
        {"type": "message", "role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": ""},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
    ]}
    assert responses._messages(body) == (
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "tool_name": "get_weather"},
        {"role": "tool", "content": "noon", "tool_call_id": "call_2", "tool_name": "get_time"},
    )


def test_streaming_events_come_in_order_and_add_up(client, srv):
    events = list(client.responses.create(model="fake", input="hi", stream=True))
    types = [e.type for e in events]
    assert types == TEXT_EVENTS + ["response.output_text.delta"] * len(REPLY) + TEXT_DONE + ["response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == REPLY
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in deltas) and events[-2].item.id == item_id
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.status == "completed" and final.output_text == REPLY and final.id == events[0].response.id
    assert final.usage.output_tokens == len(REPLY)
    # The typed stream helper accumulates the same answer.
    with client.responses.stream(model="fake", input="hi") as stream:
        assert "".join(e.delta for e in stream if e.type == "response.output_text.delta") == REPLY
        assert stream.get_final_response().output_text == REPLY


def test_streamed_tool_calls_are_function_call_items(client, srv):
    srv.engine.reply = CALL
    with client.responses.stream(model="fake", input="weather?", tools=TOOLS) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert types == ["response.created", "response.in_progress", *CALL_EVENTS, "response.completed"]
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}


def test_sse_events_are_named_by_their_type(srv):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("POST", "/v1/responses", json.dumps({"model": "fake", "input": "hi", "stream": True,
                                                      "max_output_tokens": 2}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    frames = [f for f in resp.read().decode().split("\n\n") if f]
    conn.close()
    for frame in frames:
        name, data = frame.split("\n")
        assert name == "event: " + json.loads(data.removeprefix("data: "))["type"]
    assert frames[-1].startswith("event: response.incomplete\n")


def test_an_error_after_the_first_event_ends_the_stream_with_an_error_event(store):
    add_fake_model(store)
    with RunningServer(FakeEngine(REPLY, fail_after=3), store) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        seen = []
        with pytest.raises(openai.APIError, match="the fake engine failed on purpose"):
            for event in client.responses.create(model="fake", input="hi", stream=True):
                seen.append(event.type)
        assert seen[:4] == TEXT_EVENTS and "response.completed" not in seen
        # Before the first event it is a real status.
        srv.engine.fail_after = 0
        with pytest.raises(openai.InternalServerError):
            client.responses.create(model="fake", input="hi", stream=True)


def test_a_client_gone_mid_stream_stops_its_generation(store):
    engine = FakeEngine(hold_after=3)
    add_fake_model(store)
    with RunningServer(engine, store) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.request("POST", "/v1/responses", json.dumps({"model": "fake", "input": "hi", "stream": True}))
        resp = conn.getresponse()
        assert resp.readline() == b"event: response.created\n"
        assert engine.active == 1       # the event came while generation was parked, not at the end
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: engine.finished == ["cancel"], what="generation to be cancelled")
        wait_for(lambda: any(r["path"] == "/v1/responses" for r in srv.log_lines()), what="log line")
        assert srv.log_lines()[-1]["status"] == 499


@pytest.mark.parametrize("fields,words", [
    ({"previous_response_id": "resp_123"}, "stateless"),
    ({"conversation": "conv_123"}, "stateless"),
    ({"background": True}, "background"),
    ({"temperature": 5}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": []}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "must be base64"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "call_id"),
    ({"tools": [{"type": "web_search"}]}, "function tools"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
])
def test_bad_fields_are_400s_in_openais_shape(client, srv, fields, words):
    body = {"model": "fake", "input": "hi", **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/responses", body=body, cast_to=dict)
    assert err.value.status_code == 400 and words in err.value.message
    assert err.value.body["type"] == "invalid_request_error"
    assert srv.engine.started == 0      # refused before any generation


def test_unknown_model_is_a_404_and_store_is_accepted(client, srv):
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="missing", input="hi")
    assert "not found" in err.value.message
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="fake", input="hi", previous_response_id="resp_1")
    for store in (False, True):     # nothing is stored either way; OpenAI's default is true
        assert client.responses.create(model="fake", input="hi", store=store).output_text == REPLY


def test_a_real_model_answers_streamed_and_whole_alike(store, tiny_gguf_model):
    with RunningServer(None, store) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        whole = client.responses.create(model="tiny-gguf", instructions="Be brief.", input="Hello there",
                                        max_output_tokens=8, temperature=0)
        assert whole.status == "incomplete" and whole.usage.output_tokens == 8
        assert whole.usage.input_tokens > 0
        with client.responses.stream(model="tiny-gguf", instructions="Be brief.", input="Hello there",
                                     max_output_tokens=8, temperature=0) as stream:
            streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        assert streamed == whole.output_text
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
                  "required": ["ok", "n"], "additionalProperties": False}
        out = client.responses.create(model="tiny-gguf", input="Answer in JSON", max_output_tokens=200,
                                      text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                                                       "strict": True}})
        assert out.status == "completed"
        jsonschema.validate(json.loads(out.output_text), schema)
