"""Ollama's qwen2.5vl GGUFs (`general.architecture` qwen25vl: the text model, vision tower and
merger in one file) run: a tiny random one written as Ollama's converter writes them
(`tests/gguf_qwen25vl_models.py`) loads from the store onto mlx-vlm's qwen2_5_vl classes, the
pieces the converter cut (q/k/v, the patch embedding's temporal halves) joined back, and its
logits for a prompt with an image equal mlx-vlm's own forward pass on the same weights (built
from mlx-vlm's classes directly, fed pixels preprocessed as Ollama's runner does, written
independently with Pillow, and ids tokenized independently with `tokenizers`). The image is
112x84: 6x8 patches, 3x4 merged tokens in four attention windows of the tower, so a wrong
window, full-attention block, patch order or multimodal position moves the logits by whole
units. Text alone runs on mlx-lm's qwen2 (no mlx-vlm), where multimodal RoPE with equal t, h,
w positions must be Qwen2's RoPE."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mlxlite.errors import Unsupported
from mlxlite.options import Options
from tests.gguf_qwen25vl_models import image_tokens, reference_logits, reference_pixels
from tests.vision_models import QUESTION, first_top, last_logits, load_model, png, render

GREEDY = Options(temperature=0, num_predict=4)
SIZE = (112, 84)    # width, height


def _expected(built, content: str) -> list[int]:
    text = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    return built.tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(("qtype", "float32"), [("F32", True), ("Q8_0", True), ("Q8_0", False)])
def test_logits_with_an_image_equal_mlx_vlms_on_the_same_weights(store, qwen25vl_files, qtype, float32, monkeypatch):
    import mlx.nn as nn

    from mlxlite.engine import vision

    built = qwen25vl_files[qtype]
    loaded = load_model(store, built.path, f"q25-{qtype}", monkeypatch, float32)
    assert isinstance(loaded.model, vision.VisionLM)
    assert loaded.info["vision"] is True and loaded.info["architecture"] == "qwen25vl"
    packed = {name for name, m in loaded.model.named_modules()
              if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    # Q8_0 stays packed when float32 is off: 2 x 7 text linears, the embedding and the output;
    # per tower block attn.proj and the MLP's three, and qkv where its pieces share a type (blocks
    # 1 and 2; block 0's attn_v is Q4_0, so its qkv is joined as floats); the merger's two.
    assert len(packed) == (0 if float32 or qtype == "F32" else 2 * 7 + 2 + 3 * 4 + 2 + 2)
    if packed:
        assert "vlm.vision_tower.blocks.1.attn.qkv" in packed and "vlm.vision_tower.blocks.0.attn.qkv" not in packed
    assert loaded.info["weights"] == ("quantized" if packed else "float32")

    rendered = render(loaded, [png(1, SIZE)])
    pixels, grid = reference_pixels(png(1, SIZE))
    assert grid == (1, 6, 8)
    # The file's jinja template places the image part; the processor expands `<|image_pad|>`.
    expected = _expected(built, image_tokens(built, grid) + QUESTION)
    assert rendered.tokens == expected
    assert np.array(rendered.vision.extra["image_grid_thw"]).tolist() == [list(grid)]
    assert np.abs(np.array(rendered.vision.pixel_values) - pixels).max() < 1e-5

    ref = reference_logits(built, expected, (pixels, grid))
    ours = last_logits(loaded, rendered)
    assert np.abs(ours - ref[-1]).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert ours.argmax() == ref[-1].argmax()
    other = reference_logits(built, expected, reference_pixels(png(2, SIZE)))
    assert np.abs(other[-1] - ref[-1]).max() > 0.1     # the image matters to the reference too


def _text_reference(built, ids):
    """mlx-vlm's language model with every token's t, h and w position equal (3-D positions:
    its multimodal RoPE sections, not its text-only shortcut)."""
    import mlx.core as mx

    positions = mx.broadcast_to(mx.arange(len(ids))[None, None], (3, 1, len(ids)))
    out = built.reference.language_model(mx.array(ids)[None], position_ids=positions)
    return np.array(out.logits[0, -1].astype(mx.float32))


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_text_alone_runs_on_mlx_lms_qwen2_where_multimodal_rope_is_qwen2s_rope(store, qwen25vl_files, qtype,
                                                                             monkeypatch):
    """Without mlx-vlm the file's text model loads on mlx-lm's qwen2 (the tower unread): its
    logits equal mlx-vlm's language model run with multimodal positions."""
    import mlx.core as mx

    from mlxlite.engine import model as model_mod
    from mlxlite.engine import vision

    built = qwen25vl_files[qtype]
    ids = _expected(built, QUESTION)
    ref = _text_reference(built, ids)
    with_vlm = load_model(store, built.path, f"vl-{qtype}")
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)       # `import mlx_vlm` now fails
    loaded = load_model(store, built.path, f"text-{qtype}")
    assert not isinstance(loaded.model, vision.VisionLM) and loaded.info["vision"] == "missing"
    assert type(loaded.model).__module__ == "mlx_lm.models.qwen2"
    rendered = render(loaded, [])
    assert rendered.tokens == ids
    cache = model_mod.new_cache(loaded)
    ours = np.array(loaded.model(mx.array(ids)[None], cache=cache)[0, -1].astype(mx.float32))
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    # and the VisionLM (mlx-vlm's text path) gives the same for text alone
    assert np.abs(last_logits(with_vlm, render(with_vlm, [])) - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_two_images_give_different_logits_and_the_same_image_the_same(store, qwen25vl_files):
    loaded = load_model(store, qwen25vl_files["F32"].path, "q25")
    assert first_top(loaded, [png(1)]) == first_top(loaded, [png(1)])
    assert first_top(loaded, [png(1)]) != first_top(loaded, [png(2)])
    assert first_top(loaded, [png(1)]) != first_top(loaded, [])     # text only runs on the same model
    assert first_top(loaded, [png(1), png(2)]) != first_top(loaded, [png(2), png(1)])   # two images, in their order


def test_the_ollama_template_layer_gets_the_image_where_ollama_tags_it(store, qwen25vl_model, qwen25vl_files):
    """A Go template layer: each image goes into the message's text where Ollama puts its
    `[img-N]` tag, as the three tokens Ollama's runner places there."""
    from mlxlite.engine import runner

    built = qwen25vl_files["F32"]
    loaded = runner.load(store, store.resolve(qwen25vl_model))
    assert loaded.info["template"] == "ollama" and loaded.info["vision"] is True
    small = image_tokens(built, (1, 4, 4))      # 64x64 -> 56x56: 4x4 patches, 2x2 merged
    assert render(loaded, [png(1)]).tokens == _expected(built, small + QUESTION)
    assert render(loaded, [png(1), png(2)], "Compare [img] with [img].").tokens == \
        _expected(built, f"Compare {small} with {small}.")
    rendered = render(loaded, [png(1)])
    out = list(runner.generate(loaded, rendered.tokens, GREEDY, vision=rendered.vision))
    assert out[-1].eval_tokens == 4


def test_a_file_missing_a_piece_of_a_cut_parameter_is_refused_by_name(qwen25vl_files):
    from dataclasses import replace

    from mlxlite.engine import vision_gguf
    from mlxlite.formats import gguf

    built = qwen25vl_files["F32"]
    header = gguf.read_gguf(built.path)
    header = replace(header, tensors=tuple(t for t in header.tensors if t.name != "v.blk.2.attn_k.weight"))
    with pytest.raises(Unsupported, match=r"vision_tower.blocks.2.attn.qkv.weight is cut into 3 GGUF tensors "
                                          r"and only 2 of them are in the file"):
        vision_gguf.load(built.path, header, on_cpu=True, float32=True, budget=1 << 40)
