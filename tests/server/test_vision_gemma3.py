"""An mlx-community-style gemma3 directory (safetensors through mlx-vlm, `tests/st_gemma3_models.py`)
takes images on a real daemon: the real `ollama` client's `images=`, the real `openai` client's
`image_url` data URL. The prompt each sends is Gemma 3's template with the image expanded as
Gemma3Processor expands it, after one BOS: its token count is checked against `tokenizers` itself."""

from __future__ import annotations

from tests.gguf_vision_models import image_text
from tests.vision_models import QUESTION, SERVER_GREEDY, data_url, png, serving

srv = serving("gemma3_st_model")


def _prompt_tokens(built, images: int) -> int:
    tok = built.tokenizer
    text = f"<start_of_turn>user\n{image_text(tok) * images}{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    return 1 + len(tok.encode(text, add_special_tokens=False).ids)     # 1: the template's BOS


def test_the_ollama_client_sends_images_to_a_gemma3_directory(srv, gemma3_st_dirs):
    import ollama

    client = ollama.Client(host=srv.url)

    def ask(*images):
        return client.chat("tiny-gemma3-st", [{"role": "user", "content": QUESTION, "images": list(images)}],
                           options=SERVER_GREEDY, logprobs=True, top_logprobs=3)

    def top(reply):
        return [(t.token, round(t.logprob, 4)) for t in reply.logprobs[0].top_logprobs]

    one, again, two = ask(png(1)), ask(png(1)), ask(png(2))
    assert one.message.content and one.eval_count == 6
    assert one.prompt_eval_count == _prompt_tokens(gemma3_st_dirs["float"], 1)
    assert top(one) == top(again) and top(one) != top(two)
    assert ask(png(1), png(2)).prompt_eval_count == _prompt_tokens(gemma3_st_dirs["float"], 2)
    streamed = client.generate("tiny-gemma3-st", "Describe", images=[png(1)], options=SERVER_GREEDY, stream=True)
    whole = client.generate("tiny-gemma3-st", "Describe", images=[png(1)], options=SERVER_GREEDY)
    assert "".join(part.response for part in streamed) == whole.response and whole.eval_count == 6
    shown = client.show("tiny-gemma3-st")
    assert "vision" in shown.capabilities and "completion" in shown.capabilities


def test_the_openai_client_sends_an_image_url_to_a_gemma3_directory(srv, gemma3_st_dirs):
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

    def ask(seed, **kw):
        return client.chat.completions.create(
            model="tiny-gemma3-st", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, messages=[
                {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image_url", "image_url": {"url": data_url(seed)}}]}], **kw)

    a, b = ask(1), ask(2)
    assert a.choices[0].message.content and a.usage.completion_tokens == 6
    # Gemma 3's template writes the parts in order: the text, then the image.
    tok = gemma3_st_dirs["float"].tokenizer
    text = f"<start_of_turn>user\n{QUESTION}{image_text(tok)}<end_of_turn>\n<start_of_turn>model\n"
    assert a.usage.prompt_tokens == 1 + len(tok.encode(text, add_special_tokens=False).ids)
    tops = [[(t.token, round(t.logprob, 4)) for t in c.logprobs.content[0].top_logprobs]
            for c in (a.choices[0], b.choices[0])]
    assert tops[0] != tops[1]
    chunks = list(ask(1, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a.choices[0].message.content
