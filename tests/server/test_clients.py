"""The official `ollama` and `openai` Python packages against a real server running the
real runner on tiny generated models (and, marked e2e, on the default model)."""

import base64
import http.client
import json
import socket
import urllib.request

import jsonschema
import ollama
import openai
import pytest

from tests.fake_engine import RunningServer, wait_for

GREEDY = {"temperature": 0, "num_predict": 8, "seed": 1}


@pytest.fixture
def real(store, tiny_gguf_model):
    with RunningServer(None, store) as s:
        yield s


def test_ollama_client_list_show_generate_chat_embed_ps_copy_delete(real, tiny_gguf_model):
    client = ollama.Client(host=real.url)
    listed = client.list()
    assert [m.model for m in listed.models] == ["tiny-gguf:latest"]
    assert listed.models[0].details.format == "gguf" and listed.models[0].size > 0
    shown = client.show("tiny-gguf")
    assert "<|im_start|>" in shown.template and shown.details.family == "llama"
    assert shown.modelinfo["general.architecture"] == "llama"

    whole = client.generate("tiny-gguf", "Hello", options=GREEDY)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 8
    assert whole.prompt_eval_count > 0 and whole.total_duration > 0 and whole.context
    parts = list(client.generate("tiny-gguf", "Hello", options=GREEDY, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole.response

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat("tiny-gguf", msgs, options=GREEDY)
    assert chat.message.role == "assistant" and chat.eval_count == 8
    streamed = list(client.chat("tiny-gguf", msgs, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in streamed) == chat.message.content
    assert streamed[-1].done_reason == "length"

    emb = client.embed("tiny-gguf", ["hello", "world"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 64
    assert abs(sum(v * v for v in emb.embeddings[0]) - 1) < 1e-4
    assert emb.embeddings[0] != emb.embeddings[1]

    (running,) = client.ps().models
    assert running.model == "tiny-gguf:latest" and running.size > 0 and running.expires_at

    client.copy("tiny-gguf", "copied:v1")
    assert {m.model for m in client.list().models} == {"tiny-gguf:latest", "copied:v1"}
    client.delete("copied:v1")
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("copied:v1")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.chat("missing-model", msgs)
    assert err.value.status_code == 404 and "not found" in err.value.error


def test_structured_output_parses_and_validates(real, tiny_gguf_model):
    client = ollama.Client(host=real.url)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Answer in JSON"}]
    for seed in range(3):
        out = client.chat("tiny-gguf", msgs, format=schema, options={"seed": seed, "num_predict": 200})
        jsonschema.validate(json.loads(out.message.content), schema)
    out = client.generate("tiny-gguf", "json please", format="json", options={"seed": 1, "num_predict": 200})
    assert isinstance(json.loads(out.response), dict)
    oa = openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0)
    resp = oa.chat.completions.create(model="tiny-gguf", messages=msgs, seed=2, max_tokens=200,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": schema}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)


def test_openai_client_models_chat_completions_embeddings(real, tiny_gguf_model):
    client = openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-gguf:latest"]
    assert client.models.retrieve("tiny-gguf").id == "tiny-gguf:latest"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model="tiny-gguf", messages=msgs, max_tokens=8, temperature=0, seed=3)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model="tiny-gguf", messages=msgs, max_tokens=8, temperature=0,
                                            seed=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    comp = client.completions.create(model="tiny-gguf", prompt="The quick brown", max_tokens=5, temperature=0)
    assert comp.object == "text_completion" and comp.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-gguf", prompt="The quick brown", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == comp.choices[0].text
    emb = client.embeddings.create(model="tiny-gguf", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64
    small = client.embeddings.create(model="tiny-gguf", input="a", dimensions=16, encoding_format="base64")
    assert len(base64.b64decode(small.data[0].embedding)) == 16 * 4     # little-endian float32
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=msgs)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-gguf", messages=msgs, temperature=7)


def test_langchain_ollama_embeddings_send_null_options_and_get_vectors(real, tiny_gguf_model):
    # Imported here: langchain is heavy and only this test needs it.
    from langchain_ollama import OllamaEmbeddings

    # It sends all of its 13 options, the unset ones as null: Ollama skips those.
    vector = OllamaEmbeddings(model="tiny-gguf", base_url=real.url).embed_query("hello")
    assert vector == ollama.Client(host=real.url).embed("tiny-gguf", "hello").embeddings[0]
    assert len(vector) == 64
    assert [r["status"] for r in real.logged("/api/embed", 2)] == [200, 200]


def test_langchain_chat_ollama_counts_the_whole_prompt_when_it_comes_from_the_cache(real, tiny_gguf_model):
    # Imported here: langchain is heavy and only these tests need it.
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model="tiny-gguf", base_url=real.url, num_predict=4, seed=1)
    first = llm.invoke("What is the capital of France?")
    second = llm.invoke("What is the capital of France?")    # all but its last token are cached
    n = first.usage_metadata["input_tokens"]
    assert n > 5 and second.usage_metadata["input_tokens"] == n
    one, two = real.logged("/api/chat", 2)
    assert one["prompt_tokens"] == two["prompt_tokens"] == n
    assert two["cached_tokens"] == n - 1 and two["prompt_eval_tokens"] == 1


def test_llama_index_ollama_complete_with_null_temperature(real, tiny_gguf_model):
    # Imported here: llama-index is heavy and only this test needs it.
    from llama_index.llms.ollama import Ollama

    # Built as its docs show: it sends "temperature": null (and num_ctx from /api/show).
    llm = Ollama(model="tiny-gguf", base_url=real.url, request_timeout=120,
                 additional_kwargs={"num_predict": 8, "seed": 1})
    out = llm.complete("Hello")
    assert isinstance(out.text, str) and out.raw["eval_count"] == 8 and out.raw["done_reason"] == "length"
    assert [r["status"] for r in real.logged("/api/chat", 1)] == [200]


def test_safetensors_model_serves_too(store, tiny_safetensors_model):
    with RunningServer(None, store) as srv:
        client = ollama.Client(host=srv.url)
        out = client.chat("tiny-st", [{"role": "user", "content": "hi"}], options=GREEDY)
        assert out.eval_count == 8
        assert "<|im_start|>" in client.show("tiny-st").template


def test_prompt_longer_than_context_is_a_400_unless_truncated(real, tiny_gguf_model):
    client = ollama.Client(host=real.url)
    long = "word " * 400      # the tiny model's context is 256 tokens
    with pytest.raises(ollama.ResponseError) as err:
        client.generate("tiny-gguf", long, options={"num_predict": 2})
    assert err.value.status_code == 400 and "context" in err.value.error


def test_a_chat_longer_than_the_context_keeps_its_system_prompt_and_latest_turns(real, tiny_gguf_model):
    client = ollama.Client(host=real.url)
    history = []
    for i in range(8):      # ~400 tokens; the tiny model's context is 256
        history += [{"role": "user", "content": f"Question {i}: what is the capital of France?"},
                    {"role": "assistant", "content": f"Answer {i}: Paris is the capital of France."}]
    msgs = [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "And Germany?"}]
    out = client.chat("tiny-gguf", msgs, options={"num_predict": 8, "temperature": 0})
    assert out.done_reason == "length" and out.eval_count == 8 and out.prompt_eval_count < 256
    (line,) = real.logged("/api/chat", 1)
    dropped = line["truncated_messages"]
    assert 0 < dropped < len(history) and dropped % 2 == 0
    # Exactly the kept messages, sent as they are, give the same prompt and the same reply.
    kept = [msgs[0], *history[dropped:], msgs[-1]]
    again = client.chat("tiny-gguf", kept, options={"num_predict": 8, "temperature": 0})
    assert again.prompt_eval_count == out.prompt_eval_count and again.message.content == out.message.content


@pytest.mark.e2e
def test_default_model_end_to_end(store, default_model):
    with RunningServer(None, store) as srv:
        client = ollama.Client(host=srv.url)
        msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        out = client.chat(default_model, msgs, options={"temperature": 0, "num_predict": 16})
        assert "paris" in out.message.content.lower()
        oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        text = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
            model=default_model, messages=msgs, temperature=0, max_tokens=16, stream=True) if c.choices)
        assert text == out.message.content
        # A client that leaves mid-stream stops its generation (num_predict unbounded).
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        conn.request("POST", "/api/generate", json.dumps({"model": default_model, "prompt": "Count to one thousand.",
                                                          "options": {"num_predict": -1, "num_ctx": 4096}}))
        resp = conn.getresponse()
        assert b'"done":false' in resp.readline()
        assert srv.scheduler.busy()     # the first line came while the model was still generating
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: not srv.scheduler.busy(), 60, "generation to stop")
        wait_for(lambda: any(r["status"] == 499 for r in srv.log_lines()), 10, "499 log line")


class _Recording:
    """The real runner, with every Finish it yields recorded (to see how a job ended)."""

    def __init__(self):
        from mlxlite.engine import runner

        self.runner = runner
        self.finishes = []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def generate(self, *args, **kwargs):
        for item in self.runner.generate(*args, **kwargs):
            if isinstance(item, self.runner.Finish):
                self.finishes.append(item)
            yield item

    def decoder(self, *args, **kwargs):     # the batched path (the scheduler's usual one)
        dec = self.runner.decoder(*args, **kwargs)
        step = dec.step

        def recording_step(is_cancelled):
            out = step(is_cancelled)
            self.finishes.extend(item for _, item in out if isinstance(item, self.runner.Finish))
            return out

        dec.step = recording_step
        return dec


@pytest.mark.e2e
def test_default_model_disconnect_during_prompt_processing_stops_prefill(store, default_model):
    engine = _Recording()
    with RunningServer(engine, store) as srv:
        client = ollama.Client(host=srv.url)
        client.generate(default_model, "", keep_alive=-1)          # load first
        long_prompt = "The history of the city begins with a small settlement on the river. " * 200
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
        conn.request("POST", "/api/generate", json.dumps({
            "model": default_model, "prompt": long_prompt, "stream": False,
            "options": {"num_batch": 32, "num_ctx": 8192, "num_predict": 4}}))
        wait_for(srv.scheduler.busy, 30, "the job to start")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: len(engine.finishes) == 1, 120, "the job to end")
        (finish,) = engine.finishes
        assert finish.reason == "cancel" and finish.eval_tokens == 0
        assert finish.prompt_tokens > 2000


def test_created_model_shows_its_layers_and_uses_its_system_prompt(real, tiny_gguf_model):
    client = ollama.Client(host=real.url)
    list(client.create(model="pirate", from_="tiny-gguf", system="You are a pirate.",
                       parameters={"temperature": 0, "num_predict": 3, "stop": ["<|im_end|>"]}, stream=True))
    shown = client.show("pirate")
    raw = json.loads(urllib.request.urlopen(urllib.request.Request(
        real.url + "/api/show", data=b'{"model": "pirate"}'), timeout=30).read())
    assert raw["system"] == "You are a pirate."       # (the ollama package drops this field)
    assert "temperature" in shown.parameters and "num_predict" in shown.parameters
    assert "SYSTEM You are a pirate." in shown.modelfile.splitlines()  # create.to_modelfile's text
    msgs = [{"role": "user", "content": "hi"}]
    plain = client.chat("tiny-gguf", msgs, options={"temperature": 0, "num_predict": 3})
    pirate = client.chat("pirate", msgs)
    # The model's own system prompt and parameters apply when the request gives none.
    assert pirate.prompt_eval_count > plain.prompt_eval_count and pirate.eval_count <= 3


@pytest.mark.e2e
def test_default_model_twenty_clients_leaving_mid_stream_all_stop(store, default_model):
    import threading

    engine = _Recording()
    with RunningServer(engine, store) as srv:
        ollama.Client(host=srv.url).generate(default_model, "", keep_alive=-1)

        def client(i):
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
            conn.request("POST", "/api/generate", json.dumps({
                "model": default_model, "prompt": f"Once upon a time {i}", "raw": True,   # short prefill
                "options": {"num_predict": -1, "num_ctx": 4096}}))
            resp = conn.getresponse()
            assert b'"done":false' in resp.readline() and b'"done":false' in resp.readline()
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wait_for(lambda: len(engine.finishes) == 20, 120, "all twenty generations to end")
        assert [f.reason for f in engine.finishes] == ["cancel"] * 20
        assert all(f.eval_tokens < 200 for f in engine.finishes)
        assert not srv.scheduler.busy() and srv.scheduler.depth() == 0
        wait_for(lambda: sum(r.get("path") == "/api/generate" for r in srv.log_lines()) == 21, 30, "logs")
        assert sorted(r["status"] for r in srv.log_lines() if r.get("path") == "/api/generate") == [200] + [499] * 20


def test_a_schema_the_constraint_cannot_follow_is_a_400_before_any_output(real, tiny_gguf_model):
    client = ollama.Client(host=real.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat("tiny-gguf", [{"role": "user", "content": "x"}], format={"type": "no-such-type"})
    assert err.value.status_code == 400


def test_tool_calls_from_a_real_model_with_a_tools_template(real, tiny_gguf_model):
    # A tools-aware chat template on the tiny model; the schema constraint makes its
    # (random) weights write a call, which the server returns as tool_calls.
    template = ("{% if tools %}<|im_start|>system\n{{ tools | length }} tools<|im_end|>\n{% endif %}"
                "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
                " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
    client = ollama.Client(host=real.url)
    list(client.create(model="tooly", from_="tiny-gguf", template=template, stream=True))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    call_schema = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                   "properties": {"name": {"enum": ["get_weather"]},
                                  "arguments": {"type": "object", "additionalProperties": False,
                                                "required": ["city"],
                                                "properties": {"city": {"type": "string", "maxLength": 3}}}}}
    msgs = [{"role": "user", "content": "Paris?"}]       # short: the tiny model's context is 256
    out = client.chat("tooly", msgs, tools=tools, format=call_schema, options={"seed": 1, "num_predict": 200})
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.arguments["city"], str)
    oa = openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0)
    resp = oa.chat.completions.create(model="tooly", messages=msgs, tools=tools, seed=1, max_tokens=200,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "call", "schema": call_schema}})
    assert resp.choices[0].finish_reason == "tool_calls"
    assert resp.choices[0].message.tool_calls[0].function.name == "get_weather"
    # The default template of the tiny model has no tools: asking for them is a 400.
    with pytest.raises(ollama.ResponseError) as err:
        client.chat("tiny-gguf", msgs, tools=tools)
    assert err.value.status_code == 400 and "does not support tools" in err.value.error
