"""Go's text/template language as `formats/gotemplate.py` runs it: every case here is also
run by Go's own text/template (gotemplate_ref/main.go, built in the test session) and the
two outputs must be equal byte for byte, or both runs must fail. Then what only Python can
show: errors name line:column, runaway templates stop, Ollama's tree surgery."""

import json

import pytest

from mlxlite.errors import BadRequest
from mlxlite.formats import gotemplate
from mlxlite.formats.gotemplate import TemplateError
from mlxlite.formats.gotemplate import execute as go_execute  # where the limits are read

DATA = {
    "s": "hi", "n": 42, "f": 1.5, "b": True, "z": None, "uni": "héllo ☃",
    "list": [1, "a", None, True, 2.5], "emptylist": [], "emptymap": {},
    "map": {"b": 1, "a": [1, 2], "c": {"k": "v"}}, "nested": {"x": {"y": "z"}},
    "html": "<a href='x'>\"&\"</a> \u2028 é",
    "msgs": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
    "floats": {"a": 1e21, "b": 1e20, "c": 123456789, "d": 0.0001, "e": 0.00001, "f": -0.0, "g": 1e-7,
               "h": 100000, "i": 1234567, "j": 0.1, "k": 2.5e-300, "l": 12345678901234567890},
}

# Each renders (or fails) the same way in Go and here.
CASES = [
    "plain text, no actions",
    "a  {{- .s -}}  b",
    "{{- /* a comment */ -}}  x",
    "a {{/* c */}} b {{- /* trimmed */}} c",
    "{{ \"quoted\\n\\t\\\"\\u00e9\\x41\" }}|{{ `raw\\n` }}",
    "{{ 'a' }} {{ '\\n' }} {{ '\\'' }}",
    "{{ 1 }} {{ -2 }} {{ 3.0 }} {{ 1e3 }} {{ 0x1F }} {{ 0o17 }} {{ 017 }} {{ 1_000 }} {{ .5 }} {{ +7 }}",
    "{{ true }} {{ false }}",
    "{{ .s }} {{ .n }} {{ .f }} {{ .b }} {{ .z }} {{ .missing }} {{ .list }} {{ .map }} {{ .nested }}",
    "{{ .emptylist }} {{ .emptymap }} {{ .uni }}",
    "{{ range $k, $v := .floats }}{{ $k }}={{ $v }} {{ end }}",
    "{{ json .floats }}",
    "{{ json .list }} {{ json .map }} {{ json .s }} {{ json .html }} {{ json .missing }} {{ json . }}",
    "{{ $x := 1 }}{{ $x }}{{ $x = 2 }}{{ $x }}{{ if true }}{{ $x = 3 }}{{ $y := 4 }}{{ $y }}{{ end }}{{ $x }}",
    "{{ $ }}",
    "{{ $.s }} {{ with .nested }}{{ $.s }}{{ .x.y }}{{ end }}",
    "{{ if .b }}T{{ else }}F{{ end }}{{ if .z }}T{{ else if .n }}N{{ else }}F{{ end }}{{ if .missing }}M{{ end }}"
    "{{ if .emptylist }}L{{ else }}empty{{ end }}{{ if .emptymap }}x{{ else }}em{{ end }}"
    "{{ if 0 }}z{{ else }}zero{{ end }}{{ if \"\" }}s{{ end }}{{ if .nested }}N{{ end }}",
    "{{ if $v := .s }}{{ $v }}{{ else if $w := .n }}{{ $v }}{{ $w }}{{ end }}",
    "{{ range .list }}[{{ . }}]{{ end }}",
    "{{ range $i, $v := .list }}{{ $i }}={{ $v }};{{ end }}",
    "{{ range $k, $v := .map }}{{ $k }}:{{ $v }};{{ end }}",
    "{{ range .emptylist }}x{{ else }}none{{ end }}{{ range .missing }}x{{ else }}nil{{ end }}",
    "{{ range $i, $v := .list }}{{ if eq $i 1 }}{{ continue }}{{ end }}{{ if eq $i 3 }}{{ break }}{{ end }}"
    "{{ $i }}{{ end }}",
    "{{ range $v := .map }}{{ $v }}{{ end }}",
    "{{ range $i, $m := .msgs }}{{ range $.list }}{{ $i }}{{ end }}|{{ end }}",
    "{{ $last := -1 }}{{ range $i, $m := .msgs }}{{ if eq $m.role \"user\" }}{{ $last = $i }}{{ end }}{{ end }}"
    "{{ $last }}",
    "{{- range $i, $_ := .msgs }}{{- $last := eq (len (slice $.msgs $i)) 1 }}{{ .role }}{{ if $last }}!{{ end }}"
    "{{ end }}",
    "{{ with .missing }}x{{ else }}no{{ end }}{{ with .s }}{{ . }}{{ end }}{{ with $x := .n }}{{ $x }}{{ end }}",
    "{{ define \"t\" }}[{{ . }}]{{ end }}{{ template \"t\" .s }}{{ template \"t\" 5 }}"
    "{{ block \"b\" .n }}<{{ . }}>{{ end }}",
    "{{ define \"t\" }}{{ . }}{{ $ }}{{ end }}{{ template \"t\" }}",
    "{{ and 1 0 }} {{ and 1 2 }} {{ or 0 \"\" }} {{ or 0 \"x\" }} {{ not .b }} {{ not .missing }} "
    "{{ and .missing .s }} {{ or .missing .z }}",
    "{{ len .s }} {{ len .list }} {{ len .map }} {{ len .uni }} {{ len \"\" }}",
    "{{ index .list 1 }} {{ index .map \"b\" }} {{ index .map \"zz\" }} {{ index .nested \"x\" \"y\" }} "
    "{{ index .s 0 }} {{ index .list 2 }}",
    "{{ slice .list 1 3 }} {{ slice .list 2 }} {{ slice .s 1 }} {{ slice .s 0 1 }} {{ slice .list }} "
    "{{ slice .uni 1 2 }}|{{ slice .uni 0 3 }}",
    "{{ eq 1 1 }} {{ eq .s \"hi\" }} {{ eq .s \"a\" \"hi\" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} "
    "{{ gt \"b\" \"a\" }} {{ ge 1.5 1.5 }} {{ eq .missing \"x\" }} {{ eq .n 42.0 }} {{ lt .f 2.0 }} "
    "{{ eq .z nil }} {{ eq .missing nil }} {{ eq .list nil }}",
    "{{ print 1 2 \"a\" \"b\" 3 .missing }}|{{ println 1 \"a\" .z }}|{{ print }}|{{ print .list .map }}",
    "{{ printf \"%d %s %q %v %5.2f %-4d| %x %X %t %c %% %03d %+d %8s|%-8s|\" 42 \"str\" \"q\\\"\" .list 3.14159 7 "
    "255 \"hi\" true 65 5 3 \"r\" \"l\" }}",
    "{{ printf \"%d %s\" \"x\" }}|{{ printf \"%s\" 1 2 }}|{{ printf \"%z\" 1 }}|{{ printf \"%s %v\" .missing .z }}"
    "|{{ printf \"%v %s %d\" .f .nested .list }}|{{ printf \"%.3s %6.1f %e %g\" \"abcdef\" 2.25 1234.5 0.00001 }}",
    "{{ html .html }}|{{ js .html }}|{{ urlquery .html }}|{{ html 1 2 }}|{{ .html | html }}|{{ html .missing }}",
    "{{ .s | printf \"%s!\" }} {{ .n | printf \"%v-%v\" 1 }} {{ \"a\" | printf \"%s%s\" \"b\" }} {{ .missing | print }}",
    "{{ (index .list 1) }} {{ (len .list) | printf \"%d\" }} {{ printf \"%v\" (eq (len .list) 5) }}",
    "{{ (index .msgs 0).role }} {{ (index .map \"c\").k }}",
    "{{ toTypeScriptType .s }} {{ len currentDate }} {{ len (yesterdayDate \"x\") }}",
    "{{- 3 -}} {{- 4 }}\n\n{{- 5 -}}\n x {{- /* c */ -}}\n\ny",
    "{{ $m := .missing }}{{ $m.x }}|{{ $m }}",
    "{{ .nested.x.y }} {{ .nested.q }} {{ .map.c.k }}",
    "{{ . . }}",
    "{{ .s 1 }}",
    "{{ 1 2 }}",
    "{{ nil }}",
    "{{ .missing.x }}",
    "{{ .list.x }}",
    "{{ range .s }}x{{ end }}",
    "{{ len .missing }}",
    "{{ index .list 10 }}",
    "{{ index .list 5 }}",
    "{{ slice .list 3 1 }}",
    "{{ lt true false }}",
    "{{ eq .n 42 }}",
    "{{ lt 1 \"a\" }}",
    "{{ eq .list .list }}",
    "{{ call .s }}",
    "{{ printf 1 }}",
    "{{ template \"nosuch\" }}",
    "{{ index .map 1 }}",
    "{{ len 3 }}",
    "{{ 3 | len }}",
    "{{ range $i, $v = .list }}{{ end }}",
]

# Each fails to parse, in Go and here.
BAD = [
    "{{ .s", "{{ if }}{{ end }}", "{{ end }}", "{{ range .list }}", "{{ $x }}", "{{ nosuch }}",
    "{{ .s | 1 }}", "{{ break }}", "{{ else }}", "{{ define \"a\" }}x{{ end }}{{ define \"a\" }}y{{ end }}",
    "{{ \"unterminated }}", "{{ 1x }}", "{{ (1 }}", "{{ 1) }}", "{{ /* spaced comment */ }}",
    "{{/* unclosed }}", "{{ $x := 1 }}{{ $x := }}", "{{ range $i, $j, $k := .list }}{{ end }}",
    "{{ if .s }}a{{ else }}b{{ else }}c{{ end }}", "{{ with .s }}{{ else if .n }}{{ end }}",
    "{{ 'ab' }}", "{{ \"\\q\" }}", "{{ .s.1 }}", "{{ 99999999999999999999 }}", "{{ 1.2.3 }}",
    "{{ template .s }}", "{{ .s := 1 }}", "{{ $x = }}", "{{ if .s }}{{ $y := 1 }}{{ end }}{{ $y }}",
    "{{ \"a\".x }}", "x {{ .s }",
]


def go_data():
    """DATA as Go decodes JSON: every number a float64."""
    return json.loads(json.dumps(DATA), parse_int=float)


def python_render(template: str) -> tuple[str | None, str | None]:
    try:
        return gotemplate.parse(template).execute(go_data()), None
    except TemplateError as exc:
        return None, str(exc)


def test_go_and_python_render_every_case_alike(go_reference):
    results = go_reference([{"template": t, "data": DATA} for t in CASES])
    mismatches = []
    for template, go in zip(CASES, results, strict=True):
        ours, error = python_render(template)
        if "error" in go:
            if error is None:
                mismatches.append(f"{template!r}: Go failed ({go['error']}), Python gave {ours!r}")
        elif ours != go["out"]:
            mismatches.append(f"{template!r}:\n  Go:     {go['out']!r}\n  Python: {ours if error is None else error!r}")
    assert not mismatches, "\n".join(mismatches)
    failing = sum("error" in r for r in results)
    assert 15 <= failing < len(CASES) - 30      # the table holds both kinds, plenty of each


def test_go_and_python_refuse_the_same_broken_templates(go_reference):
    results = go_reference([{"template": t, "data": {}} for t in BAD])
    for template, go in zip(BAD, results, strict=True):
        assert "error" in go, f"Go accepts {template!r}"
        with pytest.raises(TemplateError):
            gotemplate.parse(template)


@pytest.mark.parametrize(("template", "line", "column", "words"), [
    ("a\nb\n{{ .s", 3, 6, "unclosed action"),
    ("{{ if .s }}\nx\n", 3, 1, "unexpected EOF"),
    ("line one\n  {{ nosuch 1 }}", 2, 6, 'function "nosuch" not defined'),
    ("{{ $x := 1 }}\n{{ $y }}", 2, 4, 'undefined variable "$y"'),
    ("ok\n\n   {{ index .list 9 }}", 3, 7, "error calling index: index out of range: 9"),
    ("{{ range .s }}{{ end }}", 1, 10, "range can't iterate over hi"),
    ("{{ .list.x }}", 1, 9, "can't evaluate field x in type []interface {}"),
])
def test_errors_name_the_line_and_column(template, line, column, words):
    with pytest.raises(TemplateError) as info:
        gotemplate.parse(template).execute(go_data())
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert words in err.reason and str(err).startswith(f"template: {line}:{column}: ")
    assert isinstance(err, BadRequest) and err.status == 400


def test_a_runaway_template_stops_with_an_error(monkeypatch):
    forever = gotemplate.parse('{{ define "a" }}{{ template "a" . }}{{ end }}{{ template "a" . }}')
    with pytest.raises(TemplateError, match="exceeded maximum template depth"):
        forever.execute({})
    cubic = gotemplate.parse("{{ range .l }}{{ range $.l }}{{ range $.l }}x{{ end }}{{ end }}{{ end }}")
    assert len(cubic.execute({"l": list(range(10))})) == 1000
    monkeypatch.setattr(go_execute, "MAX_STEPS", 10_000)
    with pytest.raises(TemplateError, match="more than 10000 steps"):
        cubic.execute({"l": list(range(1000))})
    monkeypatch.setattr(go_execute, "MAX_OUTPUT", 100)
    with pytest.raises(TemplateError, match="output longer than 100 characters"):
        gotemplate.parse("{{ range .l }}{{ . }}{{ end }}").execute({"l": list(range(1000))})


def test_identifiers_are_ollamas_vars():
    t = gotemplate.parse('{{ range $i, $m := .Messages }}{{ $.Tools }}{{ .Function.Name }}{{ end }}'
                         '{{ define "x" }}{{ .Suffix }}{{ end }}{{ if .System }}{{ end }}')
    assert t.identifiers() == {"messages", "$", "tools", "function", "name", "suffix", "system"}
    with pytest.raises(TemplateError, match="undefined template specified"):
        gotemplate.parse('{{ define "x" }}{{ end }}{{ template "x" }}').identifiers()


def test_the_legacy_cut_keeps_the_first_response_and_drops_the_rest():
    t = gotemplate.parse("{{ if .System }}S{{ .System }}{{ end }}U{{ .Prompt }}A{{ .Response }}E{{ .Prompt }}")
    assert t.cut_after_response().execute({"System": "s", "Prompt": "p", "Response": "r"}) == "SsUpAr"
    # Ollama appends {{ .Response }} to a template that never names it (or .Messages).
    bare = gotemplate.parse("U{{ .Prompt }}A").with_response()
    assert bare.execute({"Prompt": "p", "Response": "r"}) == "UpAr"
    # The last pass is a bare parse tree: no Ollama functions there.
    with pytest.raises(TemplateError, match='"json" is not a defined function'):
        gotemplate.parse("{{ json .Prompt }}").execute({"Prompt": "p"}, funcs=False)


def test_go_values_print_and_marshal_as_go_does():
    assert gotemplate.go_float(1e21) == "1e+21" and gotemplate.go_float(1e21, "json") == "1e+21"
    assert gotemplate.go_float(123456.0) == "123456" and gotemplate.go_float(1234567.0) == "1.234567e+06"
    assert gotemplate.go_float(1e-7, "json") == "1e-7" and gotemplate.go_float(0.5, "json") == "0.5"
    assert gotemplate.go_json({"b": [1, 2.0, None], "a": "<&>"}) == '{"a":"\\u003c\\u0026\\u003e","b":[1,2,null]}'
    assert gotemplate.fmt_v({"b": [1.0, None], "a": True}) == "map[a:true b:[1 <nil>]]"


def test_newer_go_forms_that_ollamas_go_accepts():
    """Go 1.22 ranges over an int, Go 1.23 has `else with`; Ollama builds with a newer Go than
    Debian's reference, so these are checked here rather than against it."""
    t = gotemplate.parse("{{ with .a }}A{{ else with .b }}B{{ . }}{{ else }}C{{ end }}")
    assert t.execute({"b": "x"}) == "Bx" and t.execute({}) == "C" and t.execute({"a": 1}) == "A"
    assert gotemplate.parse("{{ range 3 }}{{ . }}{{ end }}|{{ range $i := 2 }}{{ $i }}{{ end }}").execute({}) == "012|01"
