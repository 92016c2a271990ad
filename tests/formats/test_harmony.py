"""gpt-oss's harmony channels: analysis -> thinking, final/commentary -> content, a recipient
-> a tool call; the same split whether the text arrives whole or a character at a time."""

import pytest

from mlxlite.formats import harmony

REPLY = ("<|channel|>analysis<|message|>The user wants the weather. Use the tool.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.")
CALL = ("<|channel|>analysis<|message|>Need weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Paris", "unit": "celsius"}<|call|>')


def run(text: str, opened: str = "<|start|>assistant", step: int | None = None):
    parser = harmony.HarmonyParser(opened)
    parts = []
    for i in range(0, len(text), step or len(text) or 1):
        parts += parser.feed(text[i:i + (step or len(text))])
    more, calls = parser.finish()
    parts += more
    thinking = "".join(t for kind, t in parts if kind == "thinking")
    content = "".join(t for kind, t in parts if kind == "content")
    return thinking, content, calls, parts


@pytest.mark.parametrize("step", [None, 1, 2, 7])
def test_analysis_is_thinking_and_final_is_content(step):
    thinking, content, calls, parts = run(REPLY, step=step)
    assert thinking == "The user wants the weather. Use the tool."
    assert content == "It is sunny in Paris." and calls == []
    assert [kind for kind, _ in parts][0] == "thinking" and all("<|" not in t for _, t in parts)


@pytest.mark.parametrize("step", [None, 1, 3])
def test_a_commentary_message_to_a_function_is_a_tool_call(step):
    thinking, content, calls, _ = run(CALL, step=step)
    assert (thinking, content) == ("Need weather.", "")
    assert calls == [{"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]


@pytest.mark.parametrize(("header", "want"), [
    ("assistant<|channel|>analysis", ("assistant", "analysis", "")),
    ("assistant to=functions.get_weather<|channel|>commentary json", ("assistant", "commentary", "functions.get_weather")),
    ("assistant<|channel|>commentary to=functions.f <|constrain|>json", ("assistant", "commentary", "functions.f")),
    ("assistant<|channel|>commentary to=functions.f<|constrain|>json", ("assistant", "commentary", "functions.f")),
    ("to=functions.f<|channel|>commentary", ("tool", "commentary", "functions.f")),
    ("assistant", ("assistant", "", "")),
])
def test_headers(header, want):
    assert harmony.parse_header(header) == want


def test_a_recipient_on_the_analysis_channel_is_a_call_too_and_two_calls_are_two():
    text = ('<|channel|>analysis to=functions.a<|message|>{"x": 1}<|end|>'
            '<|start|>assistant to=functions.b<|channel|>commentary<|message|>{}<|call|>')
    assert [c["function"]["name"] for c in run(text)[2]] == ["a", "b"]
    assert [c["function"]["index"] for c in run(text)[2]] == [0, 1]


def test_commentary_without_recipient_is_content_and_nothing_is_dropped():
    text = "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final<|message|>Done."
    assert run(text)[1] == "Let me check.Done."
    # arguments that are no JSON object: the text comes back as content
    bad = "<|channel|>commentary to=functions.f<|message|>not json<|call|>"
    assert run(bad)[1:3] == ("not json", [])
    # text outside any message (a model off its format) is content too
    assert run("<|channel|>final<|message|>a<|end|>stray")[1] == "astray"


def test_a_prefilled_answer_continues_in_its_channel():
    opened = harmony.open_message("<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>Hel")
    assert opened == "<|start|>assistant<|channel|>final<|message|>Hel"
    assert run("lo!<|return|>", opened)[:2] == ("", "lo!")
    assert harmony.open_message("<|start|>user<|message|>hi<|end|>") == ""
    assert harmony.open_message("plain text") == ""


def test_a_tag_cut_off_at_the_end_and_an_unclosed_analysis():
    assert run("<|channel|>analysis<|message|>still thinking<|en")[:2] == ("still thinking<|en", "")
    assert run("<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|chan")[:2] == ("hmm", "")


def test_is_harmony():
    assert harmony.is_harmony("<|start|>{{ .Role }}<|channel|>final<|message|>")
    assert not harmony.is_harmony("{% for m in messages %}<|im_start|>{% endfor %}")
    assert not harmony.is_harmony(None)


@pytest.mark.parametrize("step", [None, 1])
def test_a_reply_that_never_writes_a_header_is_content(step):
    """A model off its format, or a reply constrained to JSON: its text is the answer."""
    assert run("Hello there", step=step)[:3] == ("", "Hello there", [])
    assert run('{"a": 1}', step=step)[1] == '{"a": 1}'
    assert run("<|channel|>analys", step=step)[:2] == ("", "")        # a cut header is markup
    assert run(" to=functions.get_we", step=step)[:2] == ("", "")
