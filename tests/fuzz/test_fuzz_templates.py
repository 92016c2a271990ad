"""Template parsers: Ollama's Go templates (`formats.gotemplate`: lex, parse, execute, and
`formats.templates.GoChatTemplate` over chat messages), jinja chat templates
(`formats.templates.ChatTemplate`, from GGUF metadata or tokenizer_config), and the
Modelfile/`/api/create` check that tells them apart (`modelfile.parser.check_template`).

Properties: any text parses (or compiles) or is refused with a BadRequest; a parsed Go
template executes over any data to a string or a TemplateError (bounded steps and output:
never a hang); a template `check_template` accepts, the runner can load; a Go chat
template renders any messages and tools or refuses them with a BadRequest."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlxlite.errors import BadRequest
from mlxlite.formats import gotemplate
from mlxlite.formats.templates import ChatTemplate, GoChatTemplate
from mlxlite.modelfile import parser
from tests.fuzz.common import examples, json_values, texts, typed_or_value

# Pieces of Go's template grammar, Ollama's functions and chat fields; numbers stay small so
# no generated range runs near the step limit (that limit is tested on its own below).
GO_PIECES = ["{{", "}}", "{{-", "-}}", " ", "\n", "x", "{{ .System }}", "{{ .Prompt }}", "{{ .Response }}",
             "{{ if .System }}", "{{ else }}", "{{ else if .Prompt }}", "{{ end }}", "{{- end }}",
             "{{ range .Messages }}", "{{ range $i, $m := .Messages }}", "{{ .Role }}", "{{ .Content }}",
             "{{ with .Tools }}", "{{ range .Tools }}{{ .Function.Name }}{{ end }}", "{{ break }}", "{{ continue }}",
             '{{ define "t" }}', '{{ template "t" . }}', '{{ block "b" . }}', "{{/* c */}}", "{{ $x := 1 }}",
             "{{ $x = 2 }}", "{{ $x }}", "{{ len .Messages }}", "{{ index .Messages 0 }}", "{{ slice .Prompt 1 }}",
             '{{ printf "%d %s %v" 1 "a" . }}', "{{ json . }}", "{{ eq .Role \"user\" }}", "{{ and 1 0 }}",
             "{{ or .A .B }}", "{{ not . }}", "{{ lt 1 2.5 }}", "{{ print nil }}", "{{ currentDate }}",
             "{{ toTypeScriptType .Tools }}", "{{ html . }}", "{{ js . }}", "{{ urlquery . }}", "{{ call . }}",
             "{{ (", ")", " | ", "0x1p3", "1e3", "'a'", "\"s\"", "`raw`", "$", ".", "3", "-1", "true", "nil",
             "<|im_start|>", "<|im_end|>"]
JINJA_PIECES = ["{% for m in messages %}", "{% endfor %}", "{% if x %}", "{% elif y %}", "{% else %}",
                "{% endif %}", "{{ m['content'] }}", "{{ x|tojson }}", "{{ x|nosuchfilter }}", "{% set a = 1 %}",
                "{% raw %}", "{% endraw %}", "{# c #}", "{{ (", ")", " }}", "{%", "%}", "{% break %}",
                "{% macro f() %}", "{% endmacro %}", "{{ raise_exception('no') }}", "\n", "x"]
go_soup = st.lists(st.sampled_from(GO_PIECES) | texts(4), max_size=25).map("".join)
jinja_soup = st.lists(st.sampled_from(JINJA_PIECES) | texts(4), max_size=25).map("".join)
templates = st.one_of(texts(80), go_soup, jinja_soup)
go_data = json_values(keys=st.sampled_from(["System", "Prompt", "Messages", "Role", "Content", "Tools", "A", "B"]),
                      max_leaves=10)

NESTED_FOR = "{% for a in b %}" * 21 + "x" + "{% endfor %}" * 21  # past Python's 20 nested blocks
DEEP_PARENS = "{{ " + "(" * 300 + "x" + ")" * 300 + " }}"
DEEP_IFS = "{% if a %}" * 120 + "x" + "{% endif %}" * 120
GO_DEEP = "{{ if 1 }}" * 2000 + "x" + "{{ end }}" * 2000


@settings(max_examples=examples(300))
@given(templates)
@example(NESTED_FOR)
@example(DEEP_PARENS)
@example(DEEP_IFS)
@example(GO_DEEP)
@example("{{ 0x1p99999 }}")
@example("{{ .Prompt }}<|im_start|><|im_end|>")
def test_check_template_tells_go_from_jinja_or_refuses(text):
    ok, go = typed_or_value(parser.check_template, text)
    if not ok:
        return
    assert go == parser.is_go_template(text)
    # What create accepts, the runner loads.
    GoChatTemplate(text) if go else ChatTemplate(text)


@settings(max_examples=examples(300))
@given(st.one_of(go_soup, texts(60)), go_data)
@example("{{ 0x1p99999 }}", None)
@example("{{ 0X1P-99999 }}", None)
@example('{{ define "a" }}{{ template "a" . }}{{ end }}{{ template "a" . }}', None)
@example("{{ range $i, $x := . }}{{ $i }}{{ end }}", {"b": 1, "a": [1, 2]})
@example("{{ index . 99999999999999999999 }}", [1])
@example("{{ slice . 3 1 }}", "abc")
@example("{{ printf \"%v\" . }}", float("inf"))
@example("{{ urlquery . }}", {"\ud800": None})
def test_go_templates_parse_and_execute_or_raise_a_template_error(text, data):
    ok, template = typed_or_value(gotemplate.parse, text)
    if not ok:
        return
    template.identifiers()
    ok, out = typed_or_value(template.execute, data)
    if ok:
        assert isinstance(out, str) and len(out) <= gotemplate.MAX_OUTPUT


def test_go_execution_is_bounded():
    # A hostile template cannot spin or grow without end: each stops with a TemplateError.
    for text in ("{{ range 100000000 }}{{ end }}", '{{ printf "%0999999999d" 1 }}'):
        ok, err = typed_or_value(gotemplate.parse(text).execute, {})
        assert not ok and isinstance(err, gotemplate.TemplateError)


# What the request parsers hand a template (wire._message, parse_tools): roles and strings
# checked, tool calls any objects, tool parameters any JSON object.
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": texts(12)},
    optional={"thinking": texts(6), "tool_name": texts(6), "tool_call_id": texts(4),
              "tool_calls": st.lists(st.dictionaries(st.sampled_from(["id", "function", "type"]),
                                                     json_values(keys=st.sampled_from(["name", "arguments"]),
                                                                 max_leaves=5), max_size=3), max_size=2)}),
    max_size=4)
tools = st.none() | st.lists(st.fixed_dictionaries({"type": st.just("function"),
    "function": st.fixed_dictionaries({"name": texts(6).filter(bool)}, optional={
        "description": json_values(max_leaves=1),
        "parameters": st.dictionaries(st.sampled_from(["type", "properties", "required", "enum", "x"]),
                                      json_values(keys=st.sampled_from(["type", "description", "enum", "items"]),
                                                  max_leaves=6), max_size=4)})}), min_size=1, max_size=2)
CHAT_GO = ["{{ .Prompt }}", "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}{{ .Response }}",
           "{{ range .Messages }}<|{{ .Role }}|>{{ .Content }}{{ range .ToolCalls }}{{ .Function.Name }}"
           "{{ json .Function.Arguments }}{{ end }}{{ end }}",
           "{{ if .Tools }}{{ range .Tools }}{{ json . }}{{ .Function.Parameters.Properties }}{{ end }}{{ end }}"
           "{{ range .Messages }}{{ .Content }}{{ end }}",
           "{{ range $i, $m := .Messages }}{{ if eq $m.Role \"tool\" }}{{ $m.ToolName }}{{ end }}{{ end }}"
           "{{ toTypeScriptType .Tools }}"]


@settings(max_examples=examples(200))
@given(st.sampled_from(CHAT_GO) | go_soup, messages, tools, st.sampled_from([None, True, False, "high"]))
def test_go_chat_templates_render_any_messages_or_refuse(source, msgs, tool_list, think):
    ok, template = typed_or_value(GoChatTemplate, source)
    if ok:
        typed_or_value(template.render, msgs, tool_list, think=think)


@settings(max_examples=examples(300))
@given(templates)
@example(NESTED_FOR)
@example(DEEP_PARENS)
@example(DEEP_IFS)
def test_jinja_chat_templates_compile_or_raise_bad_request(text):
    try:
        ChatTemplate(text, name="fuzz")
    except BadRequest as exc:
        assert "fuzz" in str(exc)
