"""An Ollama-library-style gemma3 GGUF (vision tower inline, Ollama's Go template layer) takes
images on a real daemon: the real `ollama` client's `images=`, the real `openai` client's
`image_url` data URL; `show` and `/api/tags` say `vision`, also for a GGUF stored with Ollama's
own config blob (what `pull` from Ollama's registry stores, which has no vision flag)."""

from __future__ import annotations

from tests.vision_models import (
    SERVER_GREEDY,
    capabilities,
    data_url,
    png,
    png_b64,
    post_json,
    serving,
    vision_under_ollamas_config,
)

srv = serving("gemma3_vision_model")


def _top(logprobs) -> list:
    first = logprobs[0]
    return [(t.token, round(t.logprob, 4)) for t in first.top_logprobs]


def test_the_ollama_client_sends_images_to_a_gemma3_gguf(srv):
    import ollama

    client = ollama.Client(host=srv.url)

    def ask(image):
        return client.chat("tiny-gemma3-vl", [{"role": "user", "content": "What is this?", "images": [image]}],
                           options=SERVER_GREEDY, logprobs=True, top_logprobs=3)

    one, again, two = ask(png(1)), ask(png(1)), ask(png(2))
    assert one.message.content and one.eval_count == 6
    assert one.prompt_eval_count > 4 + 5    # the image's 4 tokens, its markers and the text
    assert _top(one.logprobs) == _top(again.logprobs) and _top(one.logprobs) != _top(two.logprobs)
    streamed = client.generate("tiny-gemma3-vl", "Describe", images=[png(1)], options=SERVER_GREEDY, stream=True)
    whole = client.generate("tiny-gemma3-vl", "Describe", images=[png(1)], options=SERVER_GREEDY)
    assert "".join(part.response for part in streamed) == whole.response and whole.eval_count == 6
    shown = client.show("tiny-gemma3-vl")
    assert "vision" in shown.capabilities and "completion" in shown.capabilities


def test_the_openai_client_sends_an_image_url_to_a_gemma3_gguf(srv):
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

    def ask(seed, **kw):
        return client.chat.completions.create(
            model="tiny-gemma3-vl", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": data_url(seed)}}]}], **kw)

    a, b = ask(1), ask(2)
    assert a.choices[0].message.content and a.usage.completion_tokens == 6
    tops = [[(t.token, round(t.logprob, 4)) for t in c.logprobs.content[0].top_logprobs] for c in (a.choices[0],
                                                                                                  b.choices[0])]
    assert tops[0] != tops[1]
    chunks = list(ask(1, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a.choices[0].message.content


def test_tags_and_show_say_vision_also_for_ollamas_config_blob(srv, store, tiny_gguf_model):
    """A model pulled from Ollama's registry keeps Ollama's config blob (no vision flag): the
    GGUF's own metadata says it, as Ollama reads `gemma3.vision.block_count`."""
    caps = capabilities(srv)
    assert "vision" in caps["tiny-gemma3-vl:latest"] and "vision" not in caps["tiny-gguf:latest"]
    vision_under_ollamas_config(store, "tiny-gemma3-vl", "gemma3", "registry.ollama.ai/library/gemma3-like:4b")


def test_anthropic_and_responses_images_reach_a_gemma3_gguf(srv):
    def message(seed):
        return post_json(srv, "/v1/messages", {"model": "tiny-gemma3-vl", "max_tokens": 6, "temperature": 0,
                                           "messages": [{"role": "user", "content": [
                                               {"type": "image", "source": {"type": "base64", "media_type":
                                                                            "image/png", "data": png_b64(seed)}},
                                               {"type": "text", "text": "What is this?"}]}]})

    one = message(1)
    assert one["usage"]["output_tokens"] == 6 and one["usage"]["input_tokens"] > 4 + 5
    response = post_json(srv, "/v1/responses", {"model": "tiny-gemma3-vl", "max_output_tokens": 6, "temperature": 0,
                                            "input": [{"role": "user", "content": [
                                                {"type": "input_text", "text": "What is this?"},
                                                {"type": "input_image", "image_url": data_url(1)}]}]})
    assert response["usage"]["output_tokens"] == 6
    assert response["usage"]["input_tokens"] == one["usage"]["input_tokens"]   # the same prompt either way
