"""The Modelfile parser (`mlxlite/modelfile/parser.py`) under arbitrary and mutated input.

Properties: any bytes or text give a Modelfile (one FROM, typed parameters) or a
ModelfileError whose line:column lies inside the input; `quote(x)` written after SYSTEM,
MESSAGE or LICENSE parses back to exactly x (or quote refuses with BadRequest); a
PARAMETER written by `format_parameter` reads back as the same value."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlxlite import options
from mlxlite.errors import BadRequest
from mlxlite.modelfile import From, ModelfileError
from mlxlite.modelfile import parser as modelfile
from tests.fuzz.common import examples, mutated, texts

CORPUS = [
    "FROM llama3.2\n# a comment\nPARAMETER temperature 1\nPARAMETER num_ctx 4096\n\nSYSTEM You are Mario.\n",
    'FROM llama3.2:latest\nTEMPLATE """{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n'
    '{{ .System }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"""\n'
    'PARAMETER stop "<|start_header_id|>"\nPARAMETER stop "<|eot_id|>"\n',
    "FROM x\nMESSAGE user Is Toronto in Canada?\nMESSAGE assistant yes\n",
    'from ./m.gguf\nparameter seed 42\nPARAMETER top_p 0.9\nSYSTEM """<system\nmessage>"""\n'
    'LICENSE """\n<license>\n"""\nLICENSE MIT\nREQUIRES 0.14.0\n',
    "FROM x\nTEMPLATE \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"\r\nADAPTER ./a.bin\n",
]
CORPUS_BYTES = [c.encode() for c in CORPUS] + [CORPUS[0].encode("utf-16"), b"\xef\xbb\xbf" + CORPUS[2].encode()]

WORDS = ["FROM", "from", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "REQUIRES", "ADAPTER",
         "DRAFT", "PARSER", "user", "assistant", "robot", "temperature", "stop", "top_k", "num_ctx", "seed",
         "bogus", "0.14.0", "v1", "1e400", "-1", "nan", "true", "x", "./m.gguf", "#", '"', '"""', " ", "\t",
         "\n", "\r\n", "{{ .Prompt }}", "{{ if .System }}", "{{ end }}", "{% if %}", "{{", "<|im_start|>",
         "<|im_end|>", "\x00", "é"]
token_soup = st.lists(st.sampled_from(WORDS) | texts(6), max_size=30).map("".join)


def check(data):
    """Parse; on success the result keeps the contract, on failure the position is real."""
    try:
        mf = modelfile.parse(data)
    except ModelfileError as exc:
        assert exc.line >= 1 and exc.column >= 1
        text = data if isinstance(data, str) else data.decode("utf-8", "replace")
        assert exc.line <= text.count("\n") + text.count("\r") + 1
        return None
    froms = [i for i in mf.instructions if isinstance(i, From)]
    assert len(froms) == 1 and froms[0].source.strip()
    for name, value in mf.parameters.items():
        assert name in options.SPECS
        if name == "stop":
            assert all(isinstance(s, str) and s for s in value)
    return mf


@settings(max_examples=examples(300))
@given(st.binary(max_size=200))
@example(b"\xff\xfeF\x00R")           # UTF-16 with an odd byte count
@example(b"\xff\xfe\x00\xd8")          # UTF-16 holding a lone surrogate
@example(b"\xfe\xff\xd8\x00")
@example(b"FROM x\n\xc3")
def test_any_bytes_parse_or_raise_modelfile_error(data):
    check(data)


@settings(max_examples=examples(300))
@given(st.one_of(texts(120), token_soup))
@example("FROM x\nPARAMETER temperature 1e400\n")
@example("FROM x\nPARAMETER seed " + "9" * 5000 + "\n")
@example("FROM x\nTEMPLATE {{ " + "(" * 400 + "x" + ")" * 400 + " }}\n")
@example('FROM x\nTEMPLATE """{% for a in b %}\n\n{% endfor"""\n')
@example("FROM x\nTEMPLATE {{ .Prompt }}\n")
def test_any_text_parses_or_raises_modelfile_error(text):
    check(text)


@settings(max_examples=examples(400))
@given(st.sampled_from(CORPUS_BYTES).flatmap(lambda b: mutated(b, max_ops=3)))
def test_mutated_modelfiles_parse_or_raise_modelfile_error(data):
    check(data)


values = st.one_of(texts(60), st.lists(st.sampled_from(['"', '"""', "\n", " ", "a", "\t", "\r", "#", "x\n"]),
                                       max_size=12).map("".join))


@settings(max_examples=examples(400))
@given(values, st.sampled_from(["SYSTEM", "MESSAGE user", "MESSAGE assistant", "LICENSE"]))
@example("a\rb", "SYSTEM")
@example("line\r\n", "SYSTEM")
@example("bell\x07", "LICENSE")
@example('x\n"', "SYSTEM")
@example('"""\n"', "SYSTEM")
def test_quote_parses_back_to_the_same_value(value, keyword):
    try:
        quoted = modelfile.quote(value)
    except BadRequest:
        return  # a value Modelfile syntax cannot hold: refused, never written wrong
    mf = modelfile.parse(f"FROM base\n{keyword} {quoted}\n# after\n")
    got = (mf.system if keyword == "SYSTEM" else mf.licenses[0] if keyword == "LICENSE"
           else mf.messages[0]["content"])
    assert got == value


@settings(max_examples=examples(300))
@given(st.one_of(st.tuples(st.just("stop"), values.filter(bool)),
                 st.tuples(st.sampled_from(["temperature", "top_p", "min_p", "repeat_penalty"]),
                           st.floats(0, 1, allow_nan=False)),
                 st.tuples(st.sampled_from(["seed", "num_ctx", "top_k", "num_predict"]), st.integers(4, 1 << 20))))
def test_format_parameter_reads_back_as_the_same_value(pair):
    name, value = pair
    try:
        text = modelfile.format_parameter(value)
    except BadRequest:
        return
    try:
        mf = modelfile.parse(f"FROM base\nPARAMETER {name} {text}\n")
    except ModelfileError as exc:
        # The only refusal allowed is options' own (a stop string over its limits).
        assert name == "stop" and "stop" in str(exc)
        return
    got = mf.parameters[name]
    assert (got == [value]) if name == "stop" else (got == value)
