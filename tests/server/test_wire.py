"""Request parsing (types, ranges, names the field), prompt building, tool-call parsing."""

import base64

import pytest

from mlxlite.errors import BadRequest, InvalidName
from mlxlite.formats import tools
from mlxlite.server import wire as api
from mlxlite.server.prompt import PromptSpec
from tests.fake_engine import FakeEngine, FakeLoaded


def test_generate_defaults_and_fields():
    req = api.parse_generate({"model": "m", "prompt": "p", "options": {"temperature": 0}, "keep_alive": "10m",
                              "format": "json"})
    assert req.stream is True and req.options == {"temperature": 0.0} and req.keep_alive == 600
    assert req.format == "json" and req.name.display == "m:latest" and not req.empty
    assert api.parse_generate({"model": "m"}).empty
    assert api.parse_generate({"model": "m", "keep_alive": -1}).keep_alive == -1


@pytest.mark.parametrize("body,match", [
    (None, "missing request body"), ([], "JSON object"), ({}, "model is required"),
    ({"model": 3}, "invalid model: expected a string"), ({"model": "m", "stream": 1}, "invalid stream"),
    ({"model": "m", "options": {"top_p": 3}}, "outside"), ({"model": "m", "options": {"top_k": "5"}}, "top_k"),
    ({"model": "m", "options": {"stop": [None]}}, "stop"), ({"model": "m", "options": []}, "options"),
    ({"model": "m", "keep_alive": "soon"}, "duration"),
    ({"model": "m", "format": "yaml"}, "format"), ({"model": "m", "raw": True, "system": "x"}, "raw mode"),
    ({"model": "m", "top_logprobs": 21}, "between 0 and 20"), ({"model": "m", "think": "sometimes"}, "invalid think"),
    ({"model": "m", "context": [1, "x"]}, "context"),
])
def test_generate_rejects_bad_fields_naming_them(body, match):
    with pytest.raises(BadRequest, match=match):
        api.parse_generate(body)


def test_null_options_are_unset_and_unknown_ones_ignored_and_logged_once(caplog):
    """Ollama's reading of `options`: LangChain's OllamaEmbeddings sends all 13 of its
    options with the unset ones null, LlamaIndex sends "temperature": null."""
    langchain = {"mirostat": None, "mirostat_eta": None, "mirostat_tau": None, "num_ctx": None, "num_gpu": None,
                 "num_thread": None, "repeat_last_n": None, "repeat_penalty": None, "temperature": None,
                 "stop": None, "tfs_z": None, "top_k": None, "top_p": None}
    assert api.parse_embed({"model": "m", "input": ["hello"], "options": langchain}).options == {}
    req = api.parse_chat({"model": "m", "messages": [], "options": {"temperature": None, "num_ctx": 2048}})
    assert req.options == {"num_ctx": 2048}
    name = "made_up_option_for_this_test"
    with caplog.at_level("WARNING", logger="mlxlite.options"):
        for _ in range(3):
            req = api.parse_generate({"model": "m", "options": {name: 1, "top_k": 5, "seed": None}})
            assert req.options == {"top_k": 5}
    assert [r.getMessage() for r in caplog.records] == [f"ignoring unknown option {name!r}"]


def test_bad_names_and_images():
    with pytest.raises(InvalidName):
        api.parse_generate({"model": "../x"})
    # Images are decoded and checked as the request is parsed: base64 of image bytes only.
    with pytest.raises(BadRequest, match=r"invalid images\[0\]: not an image"):
        api.parse_generate({"model": "m", "images": ["aGk="]})
    with pytest.raises(BadRequest, match=r"invalid images\[0\]: not valid base64"):
        api.parse_generate({"model": "m", "images": ["a*b="]})
    gif = b"GIF89a" + bytes(20)
    assert api.parse_generate({"model": "m", "images": [base64.b64encode(gif).decode()]}).prompt.images == (gif,)


def test_chat_messages_and_tools():
    req = api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": None}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert req.prompt.messages[1] == {"role": "assistant", "content": ""} and req.prompt.tools
    for bad in ([{"role": "bot"}], [{"role": "user", "content": 1}], "x"):
        with pytest.raises(BadRequest, match="messages"):
            api.parse_chat({"model": "m", "messages": bad})
    with pytest.raises(BadRequest, match="tools"):
        api.parse_chat({"model": "m", "messages": [], "tools": [{"function": {"name": ""}}]})


def test_prompt_spec_uses_model_system_messages_and_template():
    engine, loaded = FakeEngine(), FakeLoaded("m", "sha256:0")
    loaded.system = "model system"
    loaded.messages = [{"role": "user", "content": "earlier"}]
    spec = PromptSpec("m", messages=({"role": "user", "content": "now"},))
    text = engine.detokenize(loaded, spec.to_tokens(loaded, engine))
    assert text == "<|system|>model system\n<|user|>earlier\n<|user|>now\n<|assistant|>"
    own = PromptSpec("m", prompt="q", system="mine")
    assert engine.detokenize(loaded, own.to_tokens(loaded, engine)).startswith("<|system|>mine\n<|user|>earlier")
    given = PromptSpec("m", messages=({"role": "system", "content": "req"}, {"role": "user", "content": "x"}))
    # A request's own system prompt also goes first (Ollama would put it after the model's
    # MESSAGEs, which makes templates like SmolLM2's inject their default system prompt).
    assert engine.detokenize(loaded, given.to_tokens(loaded, engine)).startswith("<|system|>req\n<|user|>earlier")
    with pytest.raises(BadRequest, match="does not support insert"):
        PromptSpec("m", prompt="a", suffix="b").to_tokens(loaded, engine)
    loaded.template.supports_tools = False
    with pytest.raises(BadRequest, match="does not support tools"):
        PromptSpec("m", messages=(), tools=({"function": {"name": "f"}},)).to_tokens(loaded, engine)


def test_think_renders_the_template_accordingly_and_is_a_400_for_a_model_that_cannot():
    """`think` reaches a thinking template as `enable_thinking` (and a level as
    `reasoning_effort`); asked of a template without thinking it is Ollama's 400 (or, for
    the routes whose clients send it by default, ignored); `false` is never an error."""
    engine = FakeEngine(thinking=True)
    loaded = FakeLoaded("m", "sha256:0", template=engine.template)
    chat = ({"role": "user", "content": "q"},)
    for think, extra in [(None, {}), (True, {"enable_thinking": True}), (False, {"enable_thinking": False}),
                         ("high", {"enable_thinking": True, "reasoning_effort": "high"})]:
        out = PromptSpec("m", messages=chat, think=think).render(loaded, engine)
        assert engine.template.extras[-1] == extra and not out.thinking
        text = engine.detokenize(loaded, out.tokens)
        assert text.endswith("<|assistant|><think>\n\n</think>\n\n" if think is False else "<|assistant|>")
    engine.template.opens = True        # DeepSeek-R1's: the generation prompt opens the section
    assert PromptSpec("m", messages=chat).render(loaded, engine).thinking
    # An earlier turn's thinking reaches jinja templates as `reasoning_content` (Qwen3's name).
    seen = []
    engine.template.render = lambda msgs, **kw: seen.extend(msgs) or "x"
    PromptSpec("m", messages=({"role": "assistant", "content": "a", "thinking": "t"},)).render(loaded, engine)
    assert seen[0]["reasoning_content"] == "t"

    plain = FakeLoaded("m", "sha256:0")
    for think in (True, "low"):
        with pytest.raises(BadRequest, match='"m" does not support thinking'):
            PromptSpec("m", messages=chat, think=think).render(plain, engine)
        with pytest.raises(BadRequest, match="does not support thinking"):
            PromptSpec("m", prompt="p", raw=True, think=think).render(plain, engine)
        lenient = PromptSpec("m", messages=chat, think=think, think_strict=False).render(plain, engine)
        assert engine.detokenize(plain, lenient.tokens).endswith("<|assistant|>")
    assert PromptSpec("m", messages=chat, think=False).render(plain, engine).tokens
    assert plain.template.extras == [{}, {}, {}]         # nothing passed to a template that can't think
    # A request's own Go template reads .Think (true by default for a model that can think;
    # a true think's .ThinkLevel is "medium", as Ollama's ThinkValue prints it).
    go = "{{ if .Think }}T{{ else }}F{{ end }}:{{ .ThinkLevel }}:{{ .Prompt }}"
    for think, model, want in [(None, loaded, "T:medium:p"), (False, loaded, "F::p"), ("low", loaded, "T:low:p"),
                               (None, plain, "F::p")]:
        tokens = PromptSpec("m", prompt="p", template=go, think=think).to_tokens(model, engine)
        assert engine.detokenize(model, tokens) == want
    assert [api.check_think({"think": v}) for v in (None, True, False, "medium")] == [None, True, False, "medium"]


def _turns(n: int, size: int = 100) -> list[dict]:
    """user/assistant turns, each `size` bytes (the fake tokenizer: one token a byte), a user last."""
    roles = ["user", "assistant"] * n
    return [{"role": r, "content": f"{r[0]}{i}".ljust(size, ".")} for i, r in enumerate(roles[:2 * n - 1])]


def test_a_long_chat_drops_its_oldest_whole_messages_and_keeps_the_system_prompt():
    engine, loaded = FakeEngine(), FakeLoaded("m", "sha256:0")
    chat = ({"role": "system", "content": "S" * 50}, *_turns(3))      # system, u0 a1 u2 a3 u4
    spec = PromptSpec("m", messages=chat)
    full = spec.render(loaded, engine)
    assert len(full.tokens) > 500 and full.truncated_messages == 0
    # 600 tokens, 100 kept for the reply: u0 a1 go (a cut starts at a user message).
    fitted = spec.render(loaded, engine, num_ctx=600, num_predict=100)
    text = engine.detokenize(loaded, fitted.tokens)
    assert fitted.truncated_messages == 2 and len(fitted.tokens) + 100 <= 600
    assert text == engine.detokenize(loaded, PromptSpec("m", messages=(chat[0], *chat[3:])).to_tokens(
        loaded, engine))
    # Without num_predict the reply gets half the window: only the latest message stays.
    alone = spec.render(loaded, engine, num_ctx=600)
    assert alone.truncated_messages == 4 and engine.detokenize(loaded, alone.tokens).startswith("<|system|>SSS")
    assert "u4" in engine.detokenize(loaded, alone.tokens) and "a3" not in engine.detokenize(loaded, alone.tokens)
    # A chat that fits is never touched, even with little room left; `fit=False` never drops.
    assert spec.render(loaded, engine, num_ctx=len(full.tokens) + 1, num_predict=400) == full
    assert PromptSpec("m", messages=chat, fit=False).render(loaded, engine, num_ctx=600) == full
    # Room for the reply is what it can get when only the latest message is left.
    tight = spec.render(loaded, engine, num_ctx=200, num_predict=150)
    assert tight.truncated_messages == 4 and len(tight.tokens) < 200
    with pytest.raises(BadRequest, match=r"latest message does not fit .* num_ctx=150"):
        spec.render(loaded, engine, num_ctx=150)
    # /api/generate prompts are not chats: left to the engine (400, or `truncate: true`).
    long = PromptSpec("m", prompt="x" * 700)
    assert len(long.render(loaded, engine, num_ctx=600).tokens) > 600


def test_chat_truncate_false_refuses_and_the_engine_never_cuts_a_chat():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert api.parse_chat(body).prompt.fit and api.parse_chat({**body, "truncate": True}).prompt.fit
    refuse = api.parse_chat({**body, "truncate": False})
    assert not refuse.prompt.fit
    assert refuse.truncate is False and api.parse_chat({**body, "truncate": True}).truncate is False
    assert api.parse_generate({"model": "m", "prompt": "p", "truncate": True}).truncate is True


@pytest.mark.parametrize("template,expected", [
    ("{{ .System }}|{{ .Prompt }}", "S|P"),
    ("{{ if .System }}<s>{{ .System }}</s>{{ end }}{{ .Prompt }}", "<s>S</s>P"),
    ("A  {{- .Prompt -}}  B", "APB"),
    ("{{ if .Response }}x{{ else }}y{{ end }}", "y"),
    # What the old subset refused: a request's own template is Ollama's whole language.
    ("{{ range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}|{{ len .Messages }}", "<system>S<user>P|2"),
    ("{{ $n := 0 }}{{ with .System }}{{ printf \"%q\" . }}{{ end }}", '"S"'),
])
def test_a_request_template_runs_as_ollama_runs_it(template, expected):
    engine, loaded = FakeEngine(), FakeLoaded("m", "sha256:0")
    spec = PromptSpec("m", prompt="P", system="S", template=template)
    tokens = spec.to_tokens(loaded, engine)
    assert engine.detokenize(loaded, tokens) == expected
    assert tokens[0] == 256     # the tokenizer adds BOS: Ollama's templates never write it


def test_a_models_go_template_gets_the_tokenizers_bos_and_a_jinja_one_does_not():
    from mlxlite.formats import GoChatTemplate

    engine, loaded = FakeEngine(), FakeLoaded("m", "sha256:0")
    spec = PromptSpec("m", messages=({"role": "user", "content": "hi"},))
    assert spec.to_tokens(loaded, engine)[0] != 256         # the fake's template stands for jinja: it writes BOS
    loaded.template = GoChatTemplate("{{ range .Messages }}{{ .Content }}{{ end }}")
    assert spec.to_tokens(loaded, engine) == [256, *b"hi"]
    assert PromptSpec("m", messages=spec.messages, context=(7,)).to_tokens(loaded, engine) == [7, *b"hi"]


def test_a_request_template_that_does_not_parse_or_run_is_a_400():
    engine, loaded = FakeEngine(), FakeLoaded("m", "sha256:0")
    with pytest.raises(BadRequest, match=r"invalid Go template \(request\): unexpected EOF"):
        PromptSpec("m", prompt="P", template="{{ if .System }}").to_tokens(loaded, engine)
    with pytest.raises(BadRequest, match=r"failed to render: template: 1:13: .*can't evaluate field X in type"):
        PromptSpec("m", prompt="P", template="{{ .Messages.X }}").to_tokens(loaded, engine)


def test_embed_inputs_and_resize():
    assert api.parse_embed({"model": "m", "input": "a"}).inputs == ("a",)
    assert api.parse_embed({"model": "m", "prompt": "a"}, legacy=True).inputs == ("a",)
    with pytest.raises(BadRequest, match="input"):
        api.parse_embed({"model": "m", "input": [1]})
    (vec,) = api.resize([[3.0, 4.0, 12.0]], 2)
    assert vec == pytest.approx([0.6, 0.8])


@pytest.mark.parametrize("text,calls", [
    ('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', [("f", {"x": 1})]),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>{"name": "g", "arguments": {"y": "z"}}'
     '</tool_call>', [("f", {}), ("g", {"y": "z"})]),
    ('[TOOL_CALLS][{"name": "f", "arguments": {"x": 2}}]', [("f", {"x": 2})]),
    ('<|python_tag|>{"name": "f", "parameters": {"x": 3}}', [("f", {"x": 3})]),
    ('{"name": "f", "parameters": {"x": 4}}', [("f", {"x": 4})]),
    ('```json\n[{"name": "f", "arguments": "{\\"x\\": 5}"}]\n```', [("f", {"x": 5})]),
    ('{"name": "unknown_tool", "arguments": {}}', []),
    ('{"answer": 42}', []),
    ("Just text.", []),
])
def test_tool_call_formats(text, calls):
    content, found = tools.parse(text, frozenset({"f", "g"}))
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in found] == calls
    if not calls:
        assert content == text


def test_tool_parser_streams_plain_text_and_holds_calls():
    p = tools.ToolCallParser(["f"])
    out = "".join(p.feed(t) for t in ["Sure", ", here", " it is <tool", "_call>", '{"name":"f","arguments":{}}',
                                      "</tool_call>"])
    assert out == "Sure, here it is "
    text, calls = p.finish()
    assert text == "" and calls[0]["function"]["name"] == "f"   # the text before was already out
    p = tools.ToolCallParser(["f"])
    assert "".join(p.feed(t) for t in ["{", '"not": "a call"}']) == ""
    assert p.finish() == ('{"not": "a call"}', [])
    p = tools.ToolCallParser(["f"])
    assert p.feed("Hello") == "Hello" and p.feed(" <") == " " and p.feed("b>") == "<b>"
    assert p.finish() == ("", [])
