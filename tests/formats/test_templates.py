"""Chat templates: the model's own jinja, where it is found, fallbacks, errors."""

from __future__ import annotations

import json

import pytest

from mlxlite.errors import BadRequest
from mlxlite.formats import jinja_bounds, templates

SMOL = (  # the default model's template (GGUF tokenizer.chat_template)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


def test_multi_turn_renders_every_turn_and_the_generation_prompt():
    out = templates.ChatTemplate(SMOL).render(CHAT)
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = templates.ChatTemplate(SMOL).render(CHAT, add_generation_prompt=False)
    assert no_prompt.endswith("What is 2+2?<|im_end|>\n")


def test_system_replaces_the_template_default_and_is_not_duplicated():
    msgs = templates.with_system(CHAT, "Be brief.")
    out = templates.ChatTemplate(SMOL).render(msgs)
    assert out.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in out
    own = [{"role": "system", "content": "Mine."}, *CHAT]
    assert templates.with_system(own, "Be brief.") == own
    assert templates.with_system(CHAT, None) == CHAT


def test_tools_bos_and_hf_helpers_reach_the_template():
    src = ("{{ bos_token }}{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
           "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}"
           "{{ strftime_now('%Y') | length }}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = templates.ChatTemplate(src, bos_token="<s>", eos_token="</s>").render(CHAT[:1], tools=tools)
    assert out.startswith('<s>TOOLS:[{"type": "function", "function": {"name": "get_weather"')
    assert "user: Hi</s>\n4" in out


def test_named_fallbacks():
    assert templates.fallback({"<|im_start|>": 1, "<|im_end|>": 2}) == "chatml"
    assert templates.fallback({"<|start_header_id|>", "<|eot_id|>"}) == "llama3"
    assert templates.fallback({"a", "b"}) == "plain"
    llama3 = templates.ChatTemplate(templates.LLAMA3, bos_token="<|begin_of_text|>").render(CHAT[:1])
    assert llama3 == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    plain = templates.ChatTemplate(templates.PLAIN).render([{"role": "system", "content": "S"}, *CHAT[:2]])
    assert plain == "S\n\nUser: Hi\nAssistant: Hello!\nAssistant:"
    chatml = templates.ChatTemplate(templates.CHATML).render(CHAT[:1])
    assert chatml == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_sources_in_order(tmp_path):
    meta = {"tokenizer.chat_template": "GGUF"}
    assert templates.find_template(tmp_path, meta) == "GGUF"
    assert templates.find_template(tmp_path, None) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]}))
    assert templates.find_template(tmp_path, meta) == "DEFAULT"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "CONFIG"}))
    assert templates.find_template(tmp_path, meta) == "CONFIG"
    (tmp_path / "chat_template.jinja").write_text("JINJA")
    assert templates.find_template(tmp_path, meta) == "JINJA"


def test_template_errors_are_bad_requests():
    with pytest.raises(BadRequest, match="invalid chat template"):
        templates.ChatTemplate("{% for %}")
    strict = templates.ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(BadRequest, match="user first"):
        strict.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(BadRequest, match="list of objects"):
        templates.ChatTemplate(SMOL).render("hi")


def test_template_sandbox_blocks_attribute_escapes():
    evil = templates.ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(BadRequest, match="unsafe"):
        evil.render(CHAT)


# ---- a jinja render is bounded, as a Go one is ----------------------------------------------
@pytest.mark.parametrize("source, words", [
    # Empty nested loops: 10^10 iterations that write nothing (jinja's own range limit is per range).
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% set s = 'ab' * 500 %}{% for c in s %}{% for d in s %}{% for e in s %}{% endfor %}{% endfor %}{% endfor %}",
     "steps"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "characters"),
    ("{{ 'a' * 100000000 }}", "items"),
    ("{{ [1, 2] * 50000000 }}", "items"),
    ("{{ 7 ** 100000000 }}", "too large"),
])
def test_a_jinja_template_that_would_spin_or_balloon_is_stopped(source, words, monkeypatch):
    monkeypatch.setattr(jinja_bounds, "MAX_STEPS", 200_000)
    monkeypatch.setattr(jinja_bounds, "MAX_OUTPUT", 1 << 20)
    with pytest.raises(BadRequest, match=f"stopped: .*{words}"):
        templates.ChatTemplate(source, name="hostile").render([{"role": "user", "content": "hi"}])


def test_the_bounds_leave_a_real_template_and_its_output_unchanged():
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 50} for i in range(40)]
    out = templates.ChatTemplate(SMOL).render(msgs)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(SMOL)
    assert out == plain.render(messages=msgs, add_generation_prompt=True, bos_token="", eos_token="", tools=None)
    assert templates.ChatTemplate("{{ 'ab' * 3 }}{{ 2 ** 10 }}").render([]) == "ababab1024"
