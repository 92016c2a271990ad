"""mlx-community's gemma-3-*-it directories (safetensors, through mlx-vlm) take images: a tiny random
one written as mlx-vlm's convert writes them (`tests/st_gemma3_models.py`), float and 4-bit, loads
from the store, its template's `<start_of_image>` becomes gemma3's image sequence with one BOS, and
its logits for a prompt with an image equal mlx-vlm's own model loaded from the same directory
(fed ids tokenized independently with `tokenizers` and pixels preprocessed independently with
Pillow), and transformers' Gemma3 on the same values says how the image features enter."""

from __future__ import annotations

import numpy as np
import pytest

from mlxlite.options import Options
from tests.gguf_vision_models import image_text, reference_pixels
from tests.st_gemma3_models import hf_logits
from tests.vision_models import QUESTION, first_top, last_logits, load_model, png, render

GREEDY = Options(temperature=0, num_predict=4)


def _expected(built, content, system=""):
    """Gemma 3's template and Gemma3Processor's expansion, tokenized with `tokenizers` itself:
    one BOS, the template's."""
    tok = built.tokenizer
    text = f"<start_of_turn>user\n{system}{content}<end_of_turn>\n<start_of_turn>model\n"
    return [tok.token_to_id("<bos>")] + tok.encode(text, add_special_tokens=False).ids


def _mlx_vlm(built, hidden_size=None):
    """mlx-vlm's own load of the directory (its processor unused), float32 as ours on the CPU."""
    import mlx.core as mx
    from mlx_vlm.utils import load

    model, _ = load(str(built.path))
    model.set_dtype(mx.float32)
    if hidden_size is not None:
        model.config.hidden_size = hidden_size
    return model


def _forward(model, ids, pixels):
    import mlx.core as mx

    arr = mx.array(ids)[None]
    features = model.get_input_embeddings(arr, mx.array(pixels), mask=mx.ones_like(arr))
    return np.array(model.language_model(arr, inputs_embeds=features.inputs_embeds).logits[0].astype(mx.float32))


def test_the_template_places_each_image_as_gemma3s_image_sequence_after_one_bos(store, gemma3_st_dirs):
    """The template writes `<bos>` and `<start_of_image>`; the processor must expand the latter
    (not count the soft token it expands to) and its tokenizer must not add a second BOS."""
    from mlxlite.engine import vision

    built = gemma3_st_dirs["float"]
    loaded = load_model(store, built.path, "g3")
    assert isinstance(loaded.model, vision.VisionLM) and loaded.model.marker == "<start_of_image>"
    assert loaded.info["vision"] is True and loaded.info["architecture"] == "gemma3"
    img = image_text(built.tokenizer)
    rendered = render(loaded, [png(1)])
    assert rendered.tokens == _expected(built, img + QUESTION)
    assert rendered.vision.images == 1 and rendered.vision.placeholders == 4
    pixels = np.array(rendered.vision.pixel_values)
    assert pixels.shape == (1, 3, 56, 56) and np.abs(pixels - reference_pixels(png(1))).max() < 1e-5
    two = render(loaded, [png(1), png(2)], system="Be brief.")
    assert two.tokens == _expected(built, img + img + QUESTION, system="Be brief.\n\n")
    assert render(loaded, []).tokens == _expected(built, QUESTION)     # text alone: one BOS too


@pytest.mark.parametrize(("kind", "float32"), [("float", True), ("4bit", True), ("4bit", False)])
def test_logits_with_an_image_equal_mlx_vlms_own_load_of_the_directory(store, gemma3_st_dirs, kind, float32,
                                                                       monkeypatch):
    import mlx.nn as nn

    from mlxlite.engine import runner

    built = gemma3_st_dirs[kind]
    loaded = load_model(store, built.path, f"g3-{kind}", monkeypatch, float32)
    packed = [m for _, m in loaded.model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    # mlx-vlm's 4-bit convert packs the text linears, the embedding and its head; on the CPU they
    # become float32 when that fits, as a text model's do.
    assert len(packed) == (6 * 7 + 2 if kind == "4bit" and not float32 else 0)
    assert loaded.info["weights"] == {"float": "float", "4bit": "float32" if float32 else "quantized"}[kind]

    rendered = render(loaded, [png(1)])
    ids = _expected(built, image_text(built.tokenizer) + QUESTION)
    assert rendered.tokens == ids
    width = built.config["text_config"]["hidden_size"]
    ref = _forward(_mlx_vlm(built, hidden_size=width), ids, reference_pixels(png(1)))[-1]
    ours = last_logits(loaded, rendered)
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert ours.argmax() == ref.argmax()
    out = list(runner.generate(loaded, rendered.tokens, GREEDY, vision=rendered.vision))
    assert out[0].token == int(ref.argmax()) and out[-1].eval_tokens == 4
    other = _forward(_mlx_vlm(built, hidden_size=width), ids, reference_pixels(png(2)))[-1]
    assert np.abs(other - ref).max() > 0.1      # the image matters to the reference too


def test_image_features_enter_unscaled_as_transformers_gemma3_puts_them(store, gemma3_st_dirs):
    """mlx-vlm scales image features by sqrt(text width / config.hidden_size), and Google's
    config.json states no hidden_size (mlx-vlm's default: 2048); transformers never scales them.
    Ours equals transformers' forward on the same values (called causally, as mlx-vlm and we run
    gemma3: without its token_type_ids, which would let an image's tokens see each other)."""
    built = gemma3_st_dirs["float"]
    loaded = load_model(store, built.path, "g3")
    rendered = render(loaded, [png(1)])
    ref = hf_logits(built, rendered.tokens, reference_pixels(png(1)))[-1]
    ours = last_logits(loaded, rendered)
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    default = _forward(_mlx_vlm(built), rendered.tokens, reference_pixels(png(1)))[-1]
    assert np.abs(default - ref).max() > 0.1     # mlx-vlm's 2048 would have moved them


def test_two_images_give_different_logits_and_the_same_image_the_same(store, gemma3_st_dirs):
    loaded = load_model(store, gemma3_st_dirs["float"].path, "g3")
    assert first_top(loaded, [png(1)]) == first_top(loaded, [png(1)])
    assert first_top(loaded, [png(1)]) != first_top(loaded, [png(2)])
    assert first_top(loaded, [png(1)]) != first_top(loaded, [])
