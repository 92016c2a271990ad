"""Vision models on the engine: a tiny random Qwen2-VL (mlx-vlm's classes, `tests/vision_models.py`)
loaded from the store, images turned into tokens and pixels, prefilled from embeddings."""

from __future__ import annotations

import sys

import pytest

from mlxlite.errors import BadRequest
from mlxlite.options import Options
from mlxlite.server.prompt import PromptSpec
from tests.vision_models import png

GREEDY = Options(temperature=0, num_predict=6)


@pytest.fixture
def loaded(store, tiny_vision_model):
    from mlxlite.engine import runner

    return runner.load(store, store.resolve(tiny_vision_model))


def _run(loaded, images=(), text="Describe it", top=3, options=GREEDY):
    from mlxlite.engine import runner

    message = {"role": "user", "content": text, **({"images": tuple(images)} if images else {})}
    rendered = PromptSpec("tiny-vl", messages=(message,)).render(loaded, runner, 2048, 6)
    out = list(runner.generate(loaded, rendered.tokens, options, vision=rendered.vision, top_logprobs=top))
    return rendered, out


def test_a_vision_model_loads_through_mlx_vlm_and_says_so(loaded):
    from mlxlite.engine import vision

    assert isinstance(loaded.model, vision.VisionLM)
    assert loaded.info["vision"] is True and loaded.info["architecture"] == "qwen2_vl"
    vision.check_images(loaded)     # takes images: no error


def test_an_image_becomes_its_placeholder_tokens_and_pixels(loaded):
    rendered, out = _run(loaded, [png(1)])
    pad = loaded.model.vlm.config.image_token_id
    # 64x64 -> resized to 56x56 -> 4x4 patches, merged 2x2: 4 image tokens.
    assert rendered.tokens.count(pad) == 4
    assert rendered.vision.images == 1 and rendered.vision.pixel_values.shape[0] == 16
    assert out[-1].reason == "length" and out[-1].eval_tokens == 6


def test_two_images_give_different_logits_and_the_same_image_the_same(loaded):
    _, first = _run(loaded, [png(1)])
    _, again = _run(loaded, [png(1)])
    _, other = _run(loaded, [png(2)])
    assert [p.top for p in first[:-1]] == [p.top for p in again[:-1]]
    assert first[0].top != other[0].top
    assert [p.token for p in first[:-1]] != [p.token for p in other[:-1]]


def test_a_text_request_after_an_image_request_is_unchanged(loaded):
    """mlx-vlm's Qwen2-VL keeps the last prompt's RoPE deltas on the model; each sequence
    (text ones too) must decode at its own prompt's positions, never the previous one's."""
    _, before = _run(loaded)
    _run(loaded, [png(3)], text="Something much longer than the text prompt, to move positions")
    _, after = _run(loaded)
    assert [(p.token, p.top) for p in after[:-1]] == [(p.token, p.top) for p in before[:-1]]


def test_several_images_in_one_prompt(loaded):
    rendered, out = _run(loaded, [png(1), png(2, (100, 60))])
    assert rendered.vision.images == 2 and out[-1].eval_tokens == 6


def test_an_image_that_does_not_decode_is_a_bad_request(loaded):
    truncated = png(1)[:60]
    with pytest.raises(BadRequest, match="image 0 could not be decoded"):
        _run(loaded, [truncated])


def test_an_image_past_the_pixel_limit_is_a_bad_request(loaded, monkeypatch):
    monkeypatch.setenv("MLXLITE_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(BadRequest, match=r"64x64 pixels, more than the limit of 1000"):
        _run(loaded, [png(1)])


def test_the_serial_decoder_runs_image_and_text_sequences_one_after_another(loaded):
    from mlxlite.engine import runner
    from mlxlite.results import Finish

    dec = runner.decoder(loaded, 8)
    assert type(dec).__name__ == "SerialDecoder"
    rendered_img, alone_img = _run(loaded, [png(1)], top=0)
    rendered_txt, alone_txt = _run(loaded, top=0)
    dec.add("img", rendered_img.tokens, GREEDY, vision=rendered_img.vision)
    dec.add("txt", rendered_txt.tokens, GREEDY)
    dec.add("gone", rendered_txt.tokens, GREEDY)
    got: dict = {"img": [], "txt": [], "gone": []}
    while len(dec):
        assert dec.active <= 1
        for key, item in dec.step(lambda key: key == "gone"):
            got[key].append(item)
    assert got["gone"] == [None]        # cancelled while it waited: dropped before any work
    for key, alone in (("img", alone_img), ("txt", alone_txt)):
        assert isinstance(got[key][-1], Finish)
        assert [p.token for p in got[key][:-1]] == [p.token for p in alone[:-1]]
    assert dec.take_cache("img") is None


def test_cancel_stops_a_vision_prefill(loaded):
    import threading

    from mlxlite.engine import runner

    message = {"role": "user", "content": "hi", "images": (png(1),)}
    rendered = PromptSpec("tiny-vl", messages=(message,)).render(loaded, runner, 2048, 6)
    cancel = threading.Event()
    cancel.set()
    out = list(runner.generate(loaded, rendered.tokens, GREEDY, cancel, vision=rendered.vision))
    assert len(out) == 1 and out[0].reason == "cancel"


def test_a_text_model_refuses_images(store, tiny_safetensors_model):
    from mlxlite.engine import runner

    loaded = runner.load(store, store.resolve(tiny_safetensors_model))
    spec = PromptSpec("tiny-st", messages=({"role": "user", "content": "hi", "images": (png(1),)},))
    with pytest.raises(BadRequest, match="does not support images"):
        spec.render(loaded, runner, 256, 4)


def test_without_mlx_vlm_the_text_still_runs_and_images_say_how_to_install(store, tiny_vision_model, monkeypatch):
    """The core never needs mlx-vlm: without it, a vision model's text runs on mlx-lm and an
    image is a one-line 400 naming the extra."""
    from mlxlite.engine import runner

    monkeypatch.setitem(sys.modules, "mlx_vlm", None)       # `import mlx_vlm` now fails
    loaded = runner.load(store, store.resolve(tiny_vision_model))
    assert loaded.info["vision"] == "missing"
    rendered = PromptSpec("tiny-vl", messages=({"role": "user", "content": "hi"},)).render(loaded, runner, 2048, 4)
    assert list(runner.generate(loaded, rendered.tokens, GREEDY))[-1].eval_tokens == 6
    spec = PromptSpec("tiny-vl", messages=({"role": "user", "content": "hi", "images": (png(1),)},))
    with pytest.raises(BadRequest) as err:
        spec.render(loaded, runner, 2048, 4)
    assert str(err.value) == "model 'tiny-vl:latest' needs mlx-vlm for images: pip install 'mlxlite[vision]'"
