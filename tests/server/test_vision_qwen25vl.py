"""An Ollama-library-style qwen2.5vl GGUF (`qwen25vl`: tower and merger inline, a Go template
layer) takes images on a real daemon: the real `ollama` client's `images=`, the real `openai`
client's `image_url` data URL, Anthropic's image blocks and Responses' `input_image`; `show`
and `/api/tags` say `vision`, also under Ollama's own config blob (what `pull` stores)."""

from __future__ import annotations

from tests import vision_models as vm

MODEL = "tiny-qwen25vl"
srv = vm.serving("qwen25vl_model")


def _top(logprobs) -> list:
    return [(t.token, round(t.logprob, 4)) for t in logprobs[0].top_logprobs]


def test_the_ollama_client_sends_images_to_a_qwen25vl_gguf(srv):
    import ollama

    client = ollama.Client(host=srv.url)

    def ask(image):
        return client.chat(MODEL, [{"role": "user", "content": "What is this?", "images": [image]}],
                           options=vm.SERVER_GREEDY, logprobs=True, top_logprobs=3)

    one, again, two = ask(vm.png(1)), ask(vm.png(1)), ask(vm.png(2))
    assert one.message.content and one.eval_count == 6
    assert one.prompt_eval_count > 4 + 2    # the image's 4 tokens, its two markers and the text
    assert _top(one.logprobs) == _top(again.logprobs) and _top(one.logprobs) != _top(two.logprobs)
    streamed = client.generate(MODEL, "Describe", images=[vm.png(1)], options=vm.SERVER_GREEDY, stream=True)
    whole = client.generate(MODEL, "Describe", images=[vm.png(1)], options=vm.SERVER_GREEDY)
    assert "".join(part.response for part in streamed) == whole.response and whole.eval_count == 6
    shown = client.show(MODEL)
    assert "vision" in shown.capabilities and "completion" in shown.capabilities
    assert shown.details.family == "qwen25vl"


def test_openai_anthropic_and_responses_images_reach_a_qwen25vl_gguf(srv):
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

    def chat(seed):
        return client.chat.completions.create(
            model=MODEL, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": vm.data_url(seed)}}]}])

    a, b = chat(1), chat(2)
    assert a.choices[0].message.content and a.usage.completion_tokens == 6
    assert [t.logprob for t in a.choices[0].logprobs.content[0].top_logprobs] != \
        [t.logprob for t in b.choices[0].logprobs.content[0].top_logprobs]
    message = vm.post_json(srv, "/v1/messages", {"model": MODEL, "max_tokens": 6, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/vm.png",
                                                                  "data": vm.png_b64(1)}},
                                     {"type": "text", "text": "What is this?"}]}]})
    assert message["usage"]["output_tokens"] == 6 and message["usage"]["input_tokens"] == a.usage.prompt_tokens
    response = vm.post_json(srv, "/v1/responses", {"model": MODEL, "max_output_tokens": 6, "temperature": 0, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": vm.data_url(1)}]}]})
    assert response["usage"]["output_tokens"] == 6
    assert response["usage"]["input_tokens"] == a.usage.prompt_tokens     # the same prompt every way


def test_tags_and_show_say_vision_also_for_ollamas_config_blob(srv, store):
    """A model pulled from Ollama's registry keeps Ollama's config blob (no vision flag): the
    GGUF's own metadata says it, as Ollama reads `qwen25vl.vision.block_count`."""
    assert "vision" in vm.capabilities(srv)[f"{MODEL}:latest"]
    vm.vision_under_ollamas_config(store, MODEL, "qwen25vl", "registry.ollama.ai/library/qwen2.5vl-like:7b")
