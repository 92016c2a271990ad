"""Ollama library templates, rendered by `GoChatTemplate` and by Go's own text/template over
the same data (gotemplate_ref/main.go restates what Ollama's template package passes:
collated messages, typed tools that print as JSON, think flags, the legacy per-turn path):
every template x data set must match byte for byte.

The templates in gotemplates/ are written out from Ollama's library (they are public text,
reproduced as faithfully as memory allows, not downloaded); harmony-style.gotmpl is written
for these tests; smollm2 is the catalog's own (`remote/catalog.py`)."""

import json
from pathlib import Path

import pytest

from mlxlite.errors import BadRequest
from mlxlite.formats import GoChatTemplate
from mlxlite.remote.catalog import SMOLLM2_TEMPLATE

HERE = Path(__file__).resolve().parent / "gotemplates"
# A file's last newline is the file's, not the template's (library templates end without one).
TEMPLATES = {p.stem: p.read_text(encoding="utf-8").removesuffix("\n") for p in sorted(HERE.glob("*.gotmpl"))}
TEMPLATES["smollm2-catalog"] = SMOLLM2_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather <in> a city & its \"area\"",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
        "days": {"type": ["integer", "null"], "description": "How many days"},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "either": {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
    }}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time",
                                          "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {
    "city": "Paris", "days": 3, "where": {"lat": 48.85, "lon": 2.35}, "tags": ["a", "<b>"], "ok": True,
    "none": None, "big": 12345678901234567890, "small": 1e-7}}}

SYSTEM = {"role": "system", "content": "You are terse."}
DATASETS = {
    "user": {"messages": [{"role": "user", "content": "Hello!"}]},
    "system-user": {"messages": [SYSTEM, {"role": "user", "content": "Why is the sky blue?"}]},
    "multi-turn": {"messages": [
        SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Tell me a joke."}]},
    "consecutive": {"messages": [
        {"role": "system", "content": "one"}, {"role": "system", "content": "two"},
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"}]},
    "assistant-last": {"messages": [{"role": "user", "content": "Count to 3"},
                                    {"role": "assistant", "content": "1, 2,"}]},
    "tools": {"messages": [SYSTEM, {"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, CLOCK]},
    "tools-no-system": {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [CLOCK]},
    "tool-results": {"messages": [
        SYSTEM, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, {"function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "content": "{\"temp\": 21}", "tool_name": "get_weather", "tool_call_id": "call_1"},
        {"role": "tool", "content": "12:00", "tool_name": "now"}],
        "tools": [WEATHER, CLOCK]},
    "tool-results-answered": {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks & bye <3"}],
        "tools": [WEATHER]},
    "think": {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "thinking": "Two and two make four."},
        {"role": "user", "content": "And 3+3?"}], "think": True},
    "think-off": {"messages": [SYSTEM, {"role": "user", "content": "Quick: capital of France?"}], "think": False},
    "think-level": {"messages": [{"role": "user", "content": "Plan a trip"},
                                 {"role": "assistant", "content": "", "thinking": "Where to?"}], "think": "high"},
    "unicode": {"messages": [{"role": "user", "content": "héllo ☃ — «ok» \\ \"quoted\" {{ not a template }}"}]},
}


def _cases():
    for name, template in TEMPLATES.items():
        for data_name, data in DATASETS.items():
            yield name, data_name, {"template": template, "messages": data["messages"],
                                    "tools": data.get("tools"), "think": data.get("think")}


def test_the_table_covers_ten_library_models():
    library = set(TEMPLATES) - {"harmony-style", "smollm2-catalog"}
    assert len(library) >= 10
    assert {"llama3.1", "llama3.2", "qwen2.5", "qwen3", "mistral", "mistral-nemo", "gemma2", "gemma3", "phi3",
            "phi4", "deepseek-r1", "command-r", "llava"} <= library


def test_every_template_renders_every_data_set_as_go_does(go_reference):
    cases = list(_cases())
    results = go_reference([case for _, _, case in cases])
    mismatches, rendered = [], 0
    for (name, data_name, case), go in zip(cases, results, strict=True):
        assert "error" not in go, f"{name} x {data_name}: Go failed: {go['error']}"
        template = GoChatTemplate(case["template"], name=name)
        try:
            ours = template.render(case["messages"], tools=case["tools"], think=case["think"])
        except BadRequest as exc:
            ours = f"<error: {exc}>"
        rendered += 1
        if ours != go["out"]:
            mismatches.append(f"{name} x {data_name}:\n  Go:     {go['out']!r}\n  Python: {ours!r}")
    assert not mismatches, f"{len(mismatches)} of {rendered} differ:\n" + "\n".join(mismatches[:5])
    assert rendered == len(TEMPLATES) * len(DATASETS) >= 150


def test_the_renderings_say_what_the_templates_mean():
    """Spot checks that the comparison above compares something: tools reach the prompt as
    Ollama prints them, legacy templates run once per turn, think flags are seen."""
    def render(name, data_name):
        data = DATASETS[data_name]
        return GoChatTemplate(TEMPLATES[name]).render(data["messages"], tools=data.get("tools"),
                                                      think=data.get("think"))

    qwen = render("qwen2.5", "tools")
    assert '{"type": "function", "function": {"name":"get_weather","description":"Current weather \\u003cin\\u003e' in qwen
    assert render("qwen2.5", "tool-results").count("<tool_response>") == 2
    assert '"arguments": {"big":12345678901234567000,"city":"Paris","days":3,' in render("qwen2.5", "tool-results")
    assert render("llama3.1", "tools").count('{"type":"function","function":{"name":') == 2
    assert "city: string, " in render("command-r", "tools") and "days: [integer null]" in render("command-r", "tools")
    assert render("vicuna", "multi-turn") == ("You are terse.\n\nUSER: Hi\nASSISTANT: Hello. How can I help?</s>"
                                              "USER: Tell me a joke.\nASSISTANT: ")
    assert render("phi3", "assistant-last").endswith("<|assistant|>\n1, 2,")        # cut after .Response
    assert "? /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n" in render("qwen3", "think-off")
    assert "Reasoning: high" in render("harmony-style", "think-level")
    assert "days?: number | null" in render("harmony-style", "tools")
    # Collated: consecutive turns of one role are one; the system prompt goes to the last user turn.
    assert render("mistral", "consecutive") == "[INST] a\n\nb[/INST] c\n\nd</s>[INST] one\n\ntwo\n\ne[/INST]"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tools_capability_follows_the_template(name):
    uses_tools = ".Tools" in TEMPLATES[name]
    assert GoChatTemplate(TEMPLATES[name]).supports_tools == uses_tools


def test_messages_are_what_ollama_passes():
    seen = GoChatTemplate("{{ range .Messages }}{{ json . }}\n{{ end }}").render(DATASETS["tool-results"]["messages"])
    first, user, assistant, tool, _ = (json.loads(line) for line in seen.splitlines())
    assert first == {"Role": "system", "Content": "You are terse.", "Thinking": "", "Images": None, "ToolCalls": None,
                     "ToolName": "", "ToolCallID": ""}
    assert assistant["ToolCalls"][0]["Function"]["Name"] == "get_weather"
    assert assistant["ToolCalls"][0]["Function"]["Arguments"]["days"] == 3
    assert tool["ToolName"] == "get_weather" and tool["ToolCallID"] == "call_1"
