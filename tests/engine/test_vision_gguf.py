"""Ollama's gemma3 GGUFs, which carry their vision tower inline, take images: a tiny random one
written as Ollama's converter writes them (`tests/gguf_vision_models.py`) loads from the store
onto mlx-vlm's gemma3 classes, and its logits for a prompt with an image equal mlx-vlm's own
forward pass on the same weights (built from mlx-vlm's classes directly, fed pixels
preprocessed independently with Pillow and ids tokenized independently with `tokenizers`).
Both sides compute in float32 from identical values; a wrong name, layout, norm offset or
image scaling moves logits by whole units."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mlxlite.errors import BadRequest
from mlxlite.options import Options
from tests.gguf_vision_models import image_text, reference_logits, reference_pixels
from tests.vision_models import QUESTION, first_top, last_logits, load_model, png, render

GREEDY = Options(temperature=0, num_predict=4)


@pytest.mark.parametrize(("qtype", "float32"), [("F32", True), ("Q8_0", True), ("Q8_0", False)])
def test_logits_with_an_image_equal_mlx_vlms_on_the_same_weights(store, gemma3_vision_files, qtype, float32,
                                                                 monkeypatch):
    import mlx.nn as nn

    from mlxlite.engine import vision

    built = gemma3_vision_files[qtype]
    loaded = load_model(store, built.path, f"g3-{qtype}", monkeypatch, float32)
    assert isinstance(loaded.model, vision.VisionLM)
    assert loaded.info["vision"] is True and loaded.info["architecture"] == "gemma3"
    packed = [m for _, m in loaded.model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    # Q8_0 stays packed when float32 is off: text and vision linears, the embedding and its tied head.
    assert len(packed) == (0 if float32 or qtype == "F32" else 6 * 7 + 2 * 6 + 2)
    assert loaded.info["weights"] == ("quantized" if packed else "float32")

    rendered = render(loaded, [png(1)])
    # The file's jinja template places the image part; the processor expands it as Gemma3Processor does.
    text = "<start_of_turn>user\n" + image_text(built.tokenizer) + QUESTION + "<end_of_turn>\n<start_of_turn>model\n"
    expected = [built.tokenizer.token_to_id("<bos>")] + built.tokenizer.encode(text, add_special_tokens=False).ids
    assert rendered.tokens == expected
    pixels = np.array(rendered.vision.pixel_values)
    assert pixels.shape == (1, 3, 56, 56)
    assert np.abs(pixels - reference_pixels(png(1))).max() < 1e-5

    ref = reference_logits(built, expected, reference_pixels(png(1)))
    ours = last_logits(loaded, rendered)
    assert np.abs(ours - ref[-1]).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert ours.argmax() == ref[-1].argmax()
    other = reference_logits(built, expected, reference_pixels(png(2)))
    assert np.abs(other[-1] - ref[-1]).max() > 0.1     # the image matters to the reference too


def test_two_images_give_different_logits_and_the_same_image_the_same(store, gemma3_vision_files):
    loaded = load_model(store, gemma3_vision_files["F32"].path, "g3")
    assert first_top(loaded, [png(1)]) == first_top(loaded, [png(1)])
    assert first_top(loaded, [png(1)]) != first_top(loaded, [png(2)])
    assert first_top(loaded, [png(1)]) != first_top(loaded, [])     # text only runs on the same model


def test_the_ollama_template_layer_gets_the_image_where_ollama_tags_it(store, gemma3_vision_model,
                                                                       gemma3_vision_files):
    """Ollama's gemma3 template is a Go template: the image goes into the message's text where
    Ollama puts its `[img-N]` tag (before the text, or at each `[img]`); the tokenizer adds BOS."""
    from mlxlite.engine import runner

    tok = gemma3_vision_files["F32"].tokenizer
    loaded = runner.load(store, store.resolve(gemma3_vision_model))
    assert loaded.info["template"] == "ollama" and loaded.info["vision"] is True
    bos = tok.token_to_id("<bos>")

    def expect(content):
        text = f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
        return [bos] + tok.encode(text, add_special_tokens=False).ids

    img = image_text(tok)
    assert render(loaded, [png(1)], name="g3").tokens == expect(img + QUESTION)
    assert render(loaded, [png(1), png(2)], "Compare [img] with [img].").tokens == \
        expect(f"Compare {img} with {img}.")
    rendered = render(loaded, [png(1)])
    out = list(runner.generate(loaded, rendered.tokens, GREEDY, vision=rendered.vision))
    assert out[-1].eval_tokens == 4


def test_without_mlx_vlm_the_text_runs_and_images_say_how_to_get_them(store, gemma3_vision_files, monkeypatch):
    from mlxlite.engine import runner, vision

    monkeypatch.setitem(sys.modules, "mlx_vlm", None)       # `import mlx_vlm` now fails
    loaded = load_model(store, gemma3_vision_files["F32"].path, "g3")
    assert not isinstance(loaded.model, vision.VisionLM) and loaded.info["vision"] == "missing"
    rendered = render(loaded, [])
    assert list(runner.generate(loaded, rendered.tokens, GREEDY))[-1].eval_tokens == 4
    with pytest.raises(BadRequest) as err:
        render(loaded, [png(1)], name="g3:latest")
    assert str(err.value) == "model 'g3:latest' needs mlx-vlm for images: pip install 'mlxlite[vision]'"


def test_an_image_token_past_the_embedding_table_is_refused_by_name(gemma3_vision_files, monkeypatch):
    """mlx-vlm looks every id up in the embedding before the image replaces its tokens: an image
    token id the table lacks would read past it, so the load says so instead."""
    from mlxlite.engine import vision_gguf
    from mlxlite.errors import Unsupported
    from mlxlite.formats import gguf

    built = gemma3_vision_files["F32"]
    header = gguf.read_gguf(built.path)
    real = gguf.vision_config
    monkeypatch.setattr(gguf, "vision_config", lambda h, text: {**real(h, text), "image_token_index": 330})
    with pytest.raises(Unsupported, match="the image token's id 330 is past the 330-row embedding table"):
        vision_gguf.load(built.path, header, on_cpu=True, float32=True, budget=1 << 40)
