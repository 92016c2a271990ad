"""JSON request bodies: the native API's `wire.parse_generate/parse_chat/parse_embed`, every
JSON route's handler up to the scheduler (native and OpenAI, with a fake store and a
scheduler that stops at `submit`), and `/api/create`'s `spec_from_request`.

Bodies are any value `json.loads` can return (huge ints, 1e400 as inf, lone surrogates,
nesting), biased toward each route's field names and plausible values. Properties: a
handler either refuses with an MlxliteError before anything is submitted, or submits a job
that is whole: its options validate again, its format compiles, its keep-alive is a
number. Never another exception."""

from types import SimpleNamespace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlxlite import names, options
from mlxlite.constrain import compile_spec
from mlxlite.errors import MlxliteError
from mlxlite.modelfile import CreateSpec
from mlxlite.sched import EmbedJob, GenerateJob, TokenizeJob
from mlxlite.sched.jobs import LoadJob
from mlxlite.server import anthropic, create, native, openai, responses, wire
from mlxlite.server.wire import Stream
from tests.fuzz.common import (
    DEEP,
    deep,
    examples,
    json_scalars,
    json_values,
    mostly,
    outcome,
    texts,
    typed_or_value,
)


# ---- a request context that stops at the scheduler ---------------------------------------
class Submitted(Exception):
    def __init__(self, job) -> None:
        super().__init__("submitted")
        self.job = job


class _Store:
    def resolve(self, name):
        parsed = names.parse(name) if isinstance(name, str) else name
        return SimpleNamespace(name=parsed, digest="sha256:" + "0" * 64)


class _Scheduler:
    def submit(self, job):
        raise Submitted(job)


class Ctx:
    def __init__(self, body) -> None:
        self.body, self.log, self.params = body, {}, {}
        self.app = SimpleNamespace(store=_Store(), scheduler=_Scheduler())

    def json(self):
        return self.body

    def gone(self) -> bool:
        return False


def run_handler(handler, body):
    """The job the handler submitted, or None when it refused with an MlxliteError."""
    try:
        out = handler(Ctx(body))
        if isinstance(out, Stream):
            next(out.items)  # the server pulls the first item before any header
    except Submitted as done:
        job = done.job
        check_job(job)
        outcome(f"submitted: {type(job).__name__}")
        return job
    except MlxliteError as exc:
        assert str(exc) and 400 <= exc.status < 600
        outcome(f"refused: {type(exc).__name__}")
        return None
    raise AssertionError(f"{handler.__name__} returned {out!r} without submitting a job")


def check_job(job) -> None:
    if isinstance(job, GenerateJob):
        assert options.parse_partial(job.options) == job.options
        if job.format is not None:
            compile_spec(job.format)  # refused with a 400 before the model loads, never after
    elif isinstance(job, EmbedJob):
        assert all(isinstance(t, str) for t in job.texts)
    elif isinstance(job, TokenizeJob):
        pass
    else:
        assert isinstance(job, LoadJob)
    assert job.keep_alive is None or isinstance(job.keep_alive, float)


# ---- bodies ----------------------------------------------------------------------------
# Each field is mostly plausible and sometimes hostile, so that requests get past their
# first bad field often enough to reach the deeper checks (and the scheduler).
def _option_value(spec) -> st.SearchStrategy:
    if spec.kind is bool:
        return st.booleans()
    if spec.kind is list:
        return st.lists(st.text(min_size=1, max_size=6), max_size=3)
    if spec.kind is str:     # `draft`: a model name
        return st.sampled_from(["", "m", "fake:latest"])
    if spec.kind is int:
        return st.integers(int(spec.low), min(int(spec.high), 1 << 40))
    return st.floats(spec.low, spec.high)


VALID_OPTIONS = st.fixed_dictionaries({}, optional={n: _option_value(s) for n, s in options.SPECS.items()})
MODELS = mostly(st.sampled_from(["m", "fake:latest", "ns/m:t", "hf.co/a/b:q4"]),
                st.sampled_from(["", "../x", "a b", "m:"]) | texts(10) | json_scalars)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"])
GOOD_SCHEMAS = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "string"}}},
    {"type": "string", "pattern": "^a+$"}, {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    {"enum": ["x", 1, None]}, {"anyOf": [{"type": "null"}, {"type": "boolean"}]}])
SCHEMAS = mostly(GOOD_SCHEMAS, st.sampled_from([
    {"type": "object", "not": {}},                      # unsupported keyword
    {"type": "string", "pattern": "(?=x)"},             # unsupported pattern
    {"enum": ["\ud800"]},                               # a lone surrogate: no UTF-8 output has it
    {"type": "array", "items": {"$ref": "#/nowhere"}},
]) | json_values(keys=st.sampled_from(["type", "properties", "items", "enum", "pattern", "$ref"])))
DURATIONS = mostly(st.sampled_from(["5m", "-1", "1h30m", "0", "10ms", 0, -1, 300, 2.5]),
                   st.sampled_from(["1e400", "5x", "", ".", "-", "m"]) | json_scalars)
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": texts(12)})
MESSAGE = mostly(GOOD_MESSAGE, st.fixed_dictionaries(
    {"role": ROLES | json_scalars},
    optional={"content": texts(12) | json_values(max_leaves=4) | st.lists(st.fixed_dictionaries(
                  {"type": st.sampled_from(["text", "image_url", "bogus"]) | json_scalars},
                  optional={"text": texts(8) | json_scalars}), max_size=3),
              "images": json_values(max_leaves=3), "tool_call_id": json_scalars, "name": json_scalars,
              "thinking": json_scalars,
              "tool_calls": st.lists(st.fixed_dictionaries({}, optional={
                  "id": json_scalars, "function": st.fixed_dictionaries({}, optional={
                      "name": texts(6) | json_scalars,
                      "arguments": st.sampled_from(["{}", '{"a": 1}', "[", "1e400"]) | json_values(max_leaves=3)})}),
                  max_size=2) | json_values(max_leaves=3)}) | json_values(max_leaves=3))
MESSAGES = mostly(st.lists(MESSAGE, min_size=1, max_size=3), json_values(max_leaves=3))
TOOLS = mostly(st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "get_weather"])}, optional={"parameters": st.just({"type": "object"})})}),
    max_size=2), json_values(max_leaves=3))


def _field(valid, hostile=json_scalars) -> st.SearchStrategy:
    return mostly(valid, hostile)


FIELDS = {
    "prompt": _field(texts(20), json_values(max_leaves=3)),
    "system": _field(texts(10)), "suffix": _field(st.none(), texts(5) | json_scalars),
    "template": _field(st.sampled_from(["{{ .Prompt }}", "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}"]),
                       st.sampled_from(["{{ if .System }}x", "{{ .Bogus }}"]) | texts(10) | json_scalars),
    "raw": _field(st.just(False)), "context": _field(st.lists(st.integers(0, 1000), max_size=4),
                                                    st.lists(st.integers(-1, 2**32) | json_scalars, max_size=4)),
    "images": _field(st.sampled_from([None, []]), json_values(max_leaves=3)), "stream": _field(st.booleans()),
    "options": _field(VALID_OPTIONS, st.dictionaries(st.sampled_from(sorted(options.SPECS)) | texts(8),
                                                     json_scalars, max_size=4) | json_values()),
    "format": _field(st.sampled_from(["json", ""]) | GOOD_SCHEMAS, SCHEMAS), "keep_alive": DURATIONS,
    "truncate": _field(st.booleans()), "logprobs": _field(st.booleans()),
    "top_logprobs": _field(st.integers(0, 20)), "think": _field(st.sampled_from([None, False]),
                                                                 st.sampled_from(["low", True]) | json_scalars),
    "messages": MESSAGES, "tools": TOOLS,
    "input": _field(texts(6) | st.lists(texts(6), max_size=3), json_values(max_leaves=3)),
    "dimensions": _field(st.integers(1, 4096)),
    # OpenAI
    "temperature": _field(st.floats(0, 2)), "top_p": _field(st.floats(0, 1)),
    "frequency_penalty": _field(st.floats(-2, 2)), "presence_penalty": _field(st.floats(-2, 2)),
    "seed": _field(st.integers(-(2**63), 2**63 - 1)), "max_tokens": _field(st.integers(1, 4096)),
    "max_completion_tokens": _field(st.integers(1, 4096)),
    "stop": _field(st.lists(texts(4), max_size=3) | texts(4)), "n": _field(st.just(1)),
    "tool_choice": _field(st.sampled_from(["none", "auto"])),
    "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values(max_leaves=2)),
    "response_format": _field(st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | GOOD_SCHEMAS.map(
        lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}),
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "x"])},
                              optional={"json_schema": st.fixed_dictionaries({}, optional={"schema": SCHEMAS})})
        | json_values(max_leaves=3)),
    "echo": _field(st.just(False)), "best_of": _field(st.just(1)),
    "encoding_format": _field(st.sampled_from(["float", "base64"])),
    # Anthropic
    "max_tokens_required": st.integers(1, 4096), "top_k": _field(st.integers(0, 100)),
    "stop_sequences": _field(st.lists(texts(4).filter(bool), max_size=3)),
    "system_blocks": _field(texts(10) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts(8)}),
                                                  max_size=2), json_values(max_leaves=3)),
    "anthropic_messages": _field(st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant"]),
        "content": texts(10) | st.lists(st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": texts(8)}),
            st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.just("t1"), "name": st.just("f"),
                                   "input": json_values(max_leaves=3)}),
            st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.just("t1"),
                                   "content": texts(6) | json_values(max_leaves=3)}),
            st.fixed_dictionaries({"type": st.sampled_from(["thinking", "image", "document", "bogus"])},
                                  optional={"thinking": texts(6), "source": json_values(max_leaves=2)})),
            min_size=1, max_size=3)}), min_size=1, max_size=3), MESSAGES),
    "anthropic_tools": _field(st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["f", "get_weather"])},
        optional={"description": texts(6), "input_schema": GOOD_SCHEMAS | SCHEMAS, "type": st.sampled_from(
            ["custom", "web_search_20250305"])}), max_size=2), json_values(max_leaves=3)),
    "anthropic_tool_choice": _field(st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none"])},
                                                          optional={"name": st.sampled_from(["f", "g"])})),
    "thinking": _field(st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled", "adaptive"])},
                                             optional={"budget_tokens": st.integers(0, 4096)})),
    "metadata": _field(st.dictionaries(st.sampled_from(["user_id", "x"]), texts(6), max_size=2)),
    # Responses
    "input_items": _field(texts(12) | st.lists(st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer"]),
                               "content": texts(8) | st.lists(st.fixed_dictionaries(
                                   {"type": st.sampled_from(["input_text", "output_text", "input_image"]),
                                    "text": texts(6)}), max_size=2)}),
        st.fixed_dictionaries({"type": st.sampled_from(["message", "function_call", "function_call_output",
                                                        "reasoning", "bogus"])},
                              optional={"call_id": st.just("c1"), "name": st.just("f"),
                                        "arguments": st.sampled_from(["{}", "[", '{"a":1}']),
                                        "output": texts(6), "role": st.just("user"), "content": texts(6)})),
        min_size=1, max_size=3), json_values(max_leaves=3)),
    "instructions": _field(texts(10)), "max_output_tokens": _field(st.integers(1, 4096)),
    "responses_tools": _field(st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "web_search"]), "name": st.sampled_from(["f", "g"])},
        optional={"parameters": GOOD_SCHEMAS | SCHEMAS, "strict": st.booleans()}), max_size=2),
        json_values(max_leaves=3)),
    "text": _field(st.fixed_dictionaries({"format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
        st.fixed_dictionaries({"type": st.just("json_schema"), "name": st.just("x"), "schema": GOOD_SCHEMAS | SCHEMAS}))}),
        json_values(max_leaves=3)),
    "reasoning": _field(st.fixed_dictionaries({}, optional={"effort": st.sampled_from(["low", "medium", "high", "x"]),
                                                            "summary": st.sampled_from(["auto", "none"])})),
    "truncation": _field(st.sampled_from(["auto", "disabled"])), "parallel_tool_calls": _field(st.booleans()),
    "store": _field(st.booleans()), "previous_response_id": _field(st.none(), st.just("resp_1") | json_scalars),
    "background": _field(st.just(False)), "include": _field(st.just([])), "user": _field(texts(6)),
}
# Routes whose field names collide with another API's (messages, tools, ...) get their own
# spellings above and are renamed here.
RENAMES = {"max_tokens_required": "max_tokens", "system_blocks": "system", "anthropic_messages": "messages",
           "anthropic_tools": "tools", "anthropic_tool_choice": "tool_choice", "input_items": "input",
           "responses_tools": "tools"}


def bodies(*keys: str, required: tuple[str, ...] = ()) -> st.SearchStrategy:
    body = st.fixed_dictionaries({"model": MODELS, **{RENAMES.get(k, k): FIELDS[k] for k in required}},
                                 optional={RENAMES.get(k, k): FIELDS[k] for k in keys if k not in required})
    return mostly(body, json_values())


GENERATE = ("prompt", "system", "template", "suffix", "raw", "context", "images", "stream", "options", "format",
            "keep_alive", "truncate", "logprobs", "top_logprobs", "think")
CHAT = ("messages", "tools", "stream", "options", "format", "keep_alive", "think", "logprobs", "top_logprobs")
EMBED = ("input", "prompt", "dimensions", "truncate", "keep_alive", "options")
SAMPLING = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "max_tokens",
            "max_completion_tokens", "stop", "n", "response_format", "stream", "stream_options", "keep_alive")
OA_CHAT = SAMPLING + ("messages", "tools", "tool_choice", "logprobs", "top_logprobs")
OA_COMPLETIONS = SAMPLING + ("prompt", "suffix", "echo", "best_of")
OA_EMBED = ("input", "encoding_format", "dimensions", "keep_alive")
ANTHROPIC = ("system_blocks", "stop_sequences", "temperature", "top_p", "top_k", "anthropic_tools",
             "anthropic_tool_choice", "thinking", "stream", "metadata", "keep_alive")
RESPONSES = ("instructions", "max_output_tokens", "temperature", "top_p", "responses_tools", "tool_choice", "text",
             "reasoning", "truncation", "parallel_tool_calls", "stream", "store", "previous_response_id",
             "background", "include", "metadata", "user", "top_logprobs", "keep_alive")

BIG = 10**400


# ---- the native parsers, pure -------------------------------------------------------------
@settings(max_examples=examples(300))
@given(bodies(*GENERATE))
@example({"model": "m", "prompt": "hi", "options": {"temperature": BIG}})
@example({"model": "m", "prompt": "hi", "options": {"seed": BIG}})
@example({"model": "m", "prompt": "hi", "keep_alive": BIG})
@example({"model": "m", "prompt": "hi", "format": {"enum": ["\ud800"]}})
@example({"model": "m", "prompt": "hi", "format": {"type": "object", "properties": {"\udfff": {}}}})
def test_parse_generate_returns_a_request_or_a_typed_error(body):
    ok, req = typed_or_value(wire.parse_generate, body)
    if ok:
        assert options.parse_partial(req.options) == req.options
        if req.format is not None:
            compile_spec(req.format)


@settings(max_examples=examples(300))
@given(bodies(*CHAT))
def test_parse_chat_returns_a_request_or_a_typed_error(body):
    ok, req = typed_or_value(wire.parse_chat, body)
    if ok:
        assert all(isinstance(m["content"], str) for m in req.prompt.messages)


@settings(max_examples=examples(200))
@given(bodies(*EMBED), st.booleans())
def test_parse_embed_returns_a_request_or_a_typed_error(body, legacy):
    ok, req = typed_or_value(wire.parse_embed, body, legacy=legacy)
    if ok:
        assert all(isinstance(t, str) for t in req.inputs)


# ---- every JSON route, up to the scheduler --------------------------------------------------
@settings(max_examples=examples(200))
@given(st.sampled_from([native.handle_generate]), bodies(*GENERATE))
def test_native_generate_route_refuses_or_submits_a_whole_job(handler, body):
    run_handler(handler, body)


@settings(max_examples=examples(200))
@given(st.sampled_from([native.handle_chat, native.handle_embed, native.handle_embeddings]),
       bodies(*(CHAT + EMBED)))
def test_native_chat_and_embed_routes_refuse_or_submit_a_whole_job(handler, body):
    run_handler(handler, body)


@settings(max_examples=examples(300))
@given(bodies(*OA_CHAT, required=("messages",)))
@example({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": BIG})
@example({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": BIG, "top_p": -BIG})
@example({"model": "m", "messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "not": {}}}}})
def test_openai_chat_route_refuses_or_submits_a_whole_job(body):
    run_handler(openai.handle_chat_completions, body)


@settings(max_examples=examples(200))
@given(st.sampled_from([openai.handle_completions, openai.handle_embeddings]),
       bodies(*(OA_COMPLETIONS + OA_EMBED), required=("prompt", "input")))
@example(openai.handle_completions, {"model": "m", "prompt": "x", "frequency_penalty": BIG})
def test_openai_completion_and_embedding_routes_refuse_or_submit_a_whole_job(handler, body):
    run_handler(handler, body)


@settings(max_examples=examples(200))
@given(st.sampled_from([anthropic.handle_messages, anthropic.handle_count_tokens]),
       bodies(*ANTHROPIC, required=("anthropic_messages", "max_tokens_required")))
def test_anthropic_routes_refuse_or_submit_a_whole_job(handler, body):
    run_handler(handler, body)


@settings(max_examples=examples(200))
@given(bodies(*RESPONSES, required=("input_items",)))
def test_responses_route_refuses_or_submits_a_whole_job(body):
    run_handler(responses.handle_responses, body)


# ---- /api/create ----------------------------------------------------------------------------
CREATE_FIELDS = {
    "from": MODELS,
    "files": _field(st.dictionaries(st.sampled_from(["model.gguf", "config.json", "a/b.json"]), st.just(
        "sha256:" + "a" * 64), max_size=2), st.dictionaries(texts(8), texts(8) | json_scalars, max_size=2)
        | json_values(max_leaves=3)),
    "template": _field(st.sampled_from(["{{ messages }}", "{% for m in messages %}{{ m.content }}{% endfor %}"]),
                       st.sampled_from(["{{ .Prompt }}", "{% if %}", "{{ ((x)) }}"]) | texts(10) | json_scalars),
    "system": FIELDS["system"], "parameters": FIELDS["options"],
    "messages": _field(st.lists(GOOD_MESSAGE, max_size=3), MESSAGES),
    "license": _field(texts(6) | st.lists(texts(6), max_size=2)), "requires": _field(
        st.sampled_from(["0.14.0", "v1.2"]), st.sampled_from(["x", "1.02"]) | json_scalars),
    "stream": _field(st.booleans()), "quantize": _field(st.none()), "adapters": _field(st.none()),
    "modelfile": _field(st.sampled_from(["FROM m\nSYSTEM hi\n", "FROM m\nPARAMETER top_k 3\nLICENSE MIT\n"]),
                        st.sampled_from(["FROM ./x.gguf\n", "SYSTEM x\n"]) | texts(30) | json_scalars),
}


@settings(max_examples=examples(300))
@given(mostly(st.fixed_dictionaries({"model": MODELS}, optional=CREATE_FIELDS), json_values()))
def test_create_request_becomes_a_spec_or_a_typed_error(body):
    ok, got = typed_or_value(create.spec_from_request, body)
    if ok:
        name, spec, stream = got
        assert isinstance(name, names.ModelName) and isinstance(spec, CreateSpec) and isinstance(stream, bool)
        assert spec.from_ or spec.files


# ---- nesting as deep as json.loads goes in a server thread ----------------------------------
def _collect(crashes: list, label: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # collected, so one run names every case
        crashes.append((label, type(exc).__name__))


def test_bodies_nested_as_deep_as_json_allows_are_refused_or_handled():
    crashes: list = []
    routes = [(native.handle_generate, GENERATE), (native.handle_chat, CHAT), (native.handle_embed, EMBED),
              (openai.handle_chat_completions, OA_CHAT), (openai.handle_completions, OA_COMPLETIONS),
              (openai.handle_embeddings, OA_EMBED),
              (anthropic.handle_messages, tuple(RENAMES.get(k, k) for k in ANTHROPIC) + ("messages", "max_tokens")),
              (anthropic.handle_count_tokens, ("messages", "system", "tools")),
              (responses.handle_responses, tuple(RENAMES.get(k, k) for k in RESPONSES) + ("input",))]
    base = {"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "x"}], "input": "x", "max_tokens": 16}
    for handler, keys in routes:
        for key in keys:
            for value in (deep(DEEP), deep(DEEP, kind="dict", key=key), deep(DEEP, kind="dict", key="items"),
                          deep(DEEP, kind="dict", key="schema")):
                _collect(crashes, f"{handler.__name__} {key}", run_handler, handler, {**base, key: value})
    d = deep(DEEP)
    inner = [{"messages": [{"role": d, "content": "x"}]}, {"messages": [{"role": "user", "content": d}]},
             {"messages": [{"role": "user", "content": [{"type": "text", "text": d}]}]},
             {"messages": [{"role": "assistant", "content": "", "tool_calls": d}]},
             {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": d}}]}]},
             {"messages": [{"role": "user", "content": "x", "images": d}]},
             {"options": {"temperature": d}}, {"options": {"stop": d}}, {"options": {"seed": d}},
             {"tools": [{"type": "function", "function": {"name": "f", "parameters": d}}]},
             {"response_format": {"type": "json_schema", "json_schema": {"schema": {"items": d}}}},
             {"response_format": {"type": d}}, {"stream_options": {"include_usage": d}}, {"model": d},
             {"format": {"$ref": d}}, {"format": {"enum": [d]}}, {"format": {"const": d, "enum": [d]}}]
    for handler, _ in routes:
        for extra in inner:
            _collect(crashes, f"{handler.__name__} {next(iter(extra))}", run_handler, handler, {**base, **extra})
    arguments = '{"a": ' * DEEP + "1" + "}" * DEEP
    _collect(crashes, "tool_calls arguments", run_handler, openai.handle_chat_completions, {"model": "m", "messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}]})
    for key in CREATE_FIELDS:
        _collect(crashes, f"create {key}", typed_or_value, create.spec_from_request,
                 {"model": "m", "from": "m", key: deep(DEEP)})
    assert sorted(set(crashes)) == [], sorted(set(crashes))
