"""A tiny random vision-language model for the vision tests, generated once per session.

- `tiny_vision_dir`: a Qwen2-VL model directory made with mlx-vlm's own model classes and a
  small config (2 text layers of width 64, a 2-block vision tower of width 32, ~175K
  parameters): config.json with `vision_config`, model.safetensors, the tiny byte-level BPE
  tokenizer of `tiny_models` plus Qwen2-VL's vision tokens, a chat template that places
  `{"type": "image"}` parts as Qwen2-VL's does, and a preprocessor_config.json that keeps
  images small (at most 112x112 pixels: 16 image tokens each).
- `tiny_vision_model`: that directory imported into the test's store; returns its name.
- `png(seed)`, `png_b64(seed)`, `data_url(seed)`: small PNG images, different per seed;
  `send_png(handler, data)` answers an HTTP test server's request with one.
- For the engine tests of every vision family (`tests/engine/test_vision_*.py`): `load_model`
  (import a file or directory, load it with the engine), `render` (one user message with
  images), `last_logits` (the engine's chunked vision prefill, then one step) and `first_top`
  (the first generated token's top logprobs).
- For the daemon tests of every vision family (`tests/server/test_vision_*.py`): `serving`
  (a `srv` fixture: a real daemon over a model fixture's store), `SERVER_GREEDY`, `post_json`,
  `capabilities` (`/api/tags`'s) and `vision_under_ollamas_config` (a model's GGUF re-stored under Ollama's config blob
  still says `vision`).
mlx-vlm is the optional extra `mlxlite[vision]` (in the `test` extra too): without it these
fixtures skip, saying so.
"""

from __future__ import annotations

import base64
import json
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

QUESTION = "What is this?"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def send_png(handler, data: bytes) -> None:
    """Answer a `BaseHTTPRequestHandler`'s request with `data` as a PNG."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def need_mlx_vlm() -> None:
    pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed (pip install 'mlxlite[vision]'; "
                                          "the test extra has it)")


def make_vision_model(root: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, vision_depth: int = 2, vision_width: int = 32,
                      vision_heads: int = 2, mlp_ratio: int = 2, max_pixels: int = 112 * 112,
                      seed: int = 0, scale: float = 6.0) -> Path:
    """A random Qwen2-VL directory at `root` (mlx-vlm's classes; see the module doc); the
    defaults are the tests' toy, the bench passes Qwen2-VL-2B's shape."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_vlm.models.qwen2_vl import Model, ModelConfig
    from mlx_vlm.models.qwen2_vl.config import TextConfig, VisionConfig
    from tokenizers import AddedToken

    from tests.tiny_models import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    ids = {t: tok.token_to_id(t) for t in VISION_TOKENS}
    head_dim = hidden // heads
    third = head_dim // 2 // 3
    cfg = {
        "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": intermediate,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True), "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
        "rope_scaling": {"type": "mrope", "mrope_section": [head_dim // 2 - 2 * third, third, third]},
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": tok.token_to_id("<|endoftext|>"), "eos_token_id": tok.token_to_id("<|im_end|>"),
        "vision_config": {"model_type": "qwen2_vl", "depth": vision_depth, "embed_dim": vision_width,
                          "hidden_size": hidden, "num_heads": vision_heads, "mlp_ratio": mlp_ratio, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "in_chans": 3},
    }
    config = ModelConfig.from_dict(json.loads(json.dumps(cfg)))
    config.text_config = TextConfig.from_dict(config.text_config)
    config.vision_config = VisionConfig.from_dict(config.vision_config)
    mx.random.seed(seed)
    model = Model(config)
    # Larger random weights than nn's defaults, so what the model reads (the image too)
    # moves its greedy output, not only its logits.
    if scale != 1:
        model.update(tree_map(lambda w: w * scale if w.ndim == 2 else w, model.parameters()))
    root.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(root / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (root / "config.json").write_text(json.dumps(cfg))
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}))
    (root / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "min_pixels": 56 * 56, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_rescale": True,
        "do_normalize": True, "do_convert_rgb": True}))
    return root


# ---- the engine tests' steps (the engine's imports wait for the call: they load mlx) ----------
def load_model(store, path: Path, name: str, monkeypatch=None, float32: bool = True):
    """`path` imported into the store as `name` and loaded by the engine; `float32=False` (with
    `monkeypatch`) keeps quantized weights packed on the CPU."""
    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    if monkeypatch is not None and not float32:
        monkeypatch.setenv("MLXLITE_FLOAT32_ON_CPU", "0")
    import_path(store, path, name)
    return runner.load(store, store.resolve(name))


def render(loaded, images, text: str = QUESTION, name: str = "tiny", system: str | None = None):
    """One user message (`text` with `images`) rendered as the server renders a chat."""
    from mlxlite.engine import runner
    from mlxlite.server.prompt import PromptSpec

    message = {"role": "user", "content": text, **({"images": tuple(images)} if images else {})}
    return PromptSpec(name, messages=(message,), system=system).render(loaded, runner, 2048, 4)


def last_logits(loaded, rendered, step: int = 5) -> np.ndarray:
    """The engine's own path: the prompt prefilled in chunks of `step` (`vision.prefill`, across
    the image and gemma3's 16-token sliding window), then its last token stepped."""
    import mlx.core as mx

    from mlxlite.engine import model as model_mod
    from mlxlite.engine import vision

    cache = model_mod.new_cache(loaded)
    assert vision.prefill(loaded.model, rendered.tokens, rendered.vision, cache, step)
    logits = loaded.model(mx.array(rendered.tokens[-1:])[None], cache=cache)
    return np.array(logits[0, -1].astype(mx.float32))


def first_top(loaded, images) -> list:
    """The top 5 logprobs of the first token a greedy 4-token generation after `images` picks."""
    from mlxlite.engine import runner
    from mlxlite.options import Options

    rendered = render(loaded, images)
    out = list(runner.generate(loaded, rendered.tokens, Options(temperature=0, num_predict=4),
                               vision=rendered.vision, top_logprobs=5))
    assert out[-1].eval_tokens == 4
    return out[0].top


# ---- the daemon tests' steps ---------------------------------------------------------------
SERVER_GREEDY = {"temperature": 0, "num_predict": 6, "seed": 1}


def serving(model_fixture: str):
    """A `srv` fixture for a test module: a real daemon (the real engine) on 127.0.0.1:0 over
    the store once the fixture named `model_fixture` has put its model there."""
    from tests.fake_engine import RunningServer

    @pytest.fixture
    def srv(store, request):
        request.getfixturevalue(model_fixture)
        with RunningServer(None, store) as s:
            yield s

    return srv


def post_json(srv, path: str, body: dict) -> dict:
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)


def capabilities(srv) -> dict[str, list[str]]:
    """`/api/tags`: each model's capabilities by its full name."""
    with urllib.request.urlopen(srv.url + "/api/tags") as resp:
        return {m["name"]: m["capabilities"] for m in json.load(resp)["models"]}


def vision_under_ollamas_config(store, model: str, family: str, pulled: str) -> None:
    """`model`'s GGUF and template layers re-stored as `pulled` under Ollama's own config blob
    (no vision flag: what a pull from Ollama's registry stores): the GGUF's metadata still
    makes `show` say `vision`, as Ollama reads `<arch>.vision.block_count`."""
    from mlxlite import names
    from mlxlite.server import models
    from mlxlite.store import DOCKER_CONFIG, MEDIA_GGUF, MEDIA_OLLAMA_TEMPLATE, Layer, build_manifest

    entry = store.resolve(model)
    raw = json.dumps({"model_format": "gguf", "model_family": family, "model_families": [family],
                      "model_type": "4.3B", "file_type": "F32"}).encode()
    config = Layer(DOCKER_CONFIG, store.put_bytes(raw), len(raw))
    layers = [layer for layer in entry.manifest.layers if layer.media_type in (MEDIA_GGUF, MEDIA_OLLAMA_TEMPLATE)]
    store.write_manifest(names.parse(pulled), build_manifest(config, layers))
    entry = store.resolve(pulled)
    assert "vision" not in store.read_config(entry)
    assert models.takes_images(store, entry, store.read_config(entry))
    assert "vision" in models.show_model(store, entry)["capabilities"]


def png(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """An RGB PNG of random pixels (seed 0: one flat grey), written with the standard
    library (tests that need no vision model need no Pillow either)."""
    width, height = size
    if seed == 0:
        pixels = np.full((height, width, 3), 128, np.uint8)
    else:
        pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))   # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def png_b64(seed: int, size: tuple[int, int] = (64, 64)) -> str:
    return base64.b64encode(png(seed, size)).decode()


def data_url(seed: int, size: tuple[int, int] = (64, 64)) -> str:
    return "data:image/png;base64," + png_b64(seed, size)


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory) -> Path:
    need_mlx_vlm()
    return make_vision_model(tmp_path_factory.mktemp("vision") / "tiny-qwen2-vl")


@pytest.fixture
def tiny_vision_model(store, tiny_vision_dir) -> str:
    from mlxlite.store.importers import import_path

    import_path(store, tiny_vision_dir, "tiny-vl")
    return "tiny-vl"
