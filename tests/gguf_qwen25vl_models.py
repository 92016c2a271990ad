"""A tiny random qwen25vl GGUF written as Ollama's converter writes the library's qwen2.5vl
files (text, vision tower and merger in one file), and the same network as mlx-vlm's own model.

`make_qwen25vl_gguf(root, qtype, seed)` builds mlx-vlm's qwen2_5_vl `Model` (2 text layers of
width 64 with 4 heads of 16, mrope sections [2, 3, 3]; a 3-block tower of width 32 whose
block 1 attends fully and blocks 0 and 2 within windows of 56 pixels, i.e. 2x2 merged patches,
so an image of more than one window tells a wrong window or full-attention setting apart)
with random weights, then writes it the way convert_qwen25vl.go does, independently of our
loader's map:
  - names: mlx-vlm's names back to the Hugging Face checkpoint's (`visual.`, `model.`,
    `lm_head`), then the converter's replacement list applied as Go's `strings.NewReplacer`
    applies it (`visual.blocks.0.attn.proj.weight` -> `v.blk.0.attn_out.weight`);
  - the converter's cuts: the fused `attn.qkv` weight and bias split in three along the rows
    (`attn_q`, `attn_k`, `attn_v`), the Conv3d patch embedding in torch's layout
    [out, in, 2, 14, 14] split along the temporal axis and squeezed (`patch_embd_0`, `_1`);
  - metadata: qwen2's keys renamed `qwen25vl.*` with `rope.mrope_section`, and the `vision.*`
    keys it writes (no MLP width: the loader reads it from a shape), the tokenizer's (the
    tests' BPE with Qwen's specials and vision tokens) and a jinja template placing
    `{"type": "image"}` parts as Qwen2.5-VL's does;
  - types: F32 with a tied output (no output.weight, as Qwen2.5-VL-3B), or Q8_0 with an
    output of its own (as the 7B) for every 2-D weight whose rows split into 32-blocks, except
    the tower's first attn_v, Q4_0 (a K-quant mix gives attn_v a type of its own): block 0's
    q/k/v in two types, the other blocks' in one. The reference then holds the dequantized
    values.
`VisionGGUF.reference` is the mlx-vlm model holding exactly what the file holds;
`reference_pixels` preprocesses an image as Ollama's runner does (process_image.go), written
here from its loops with Pillow's bilinear resize. Fixtures: `qwen25vl_files` (F32 and Q8_0,
once per session), `qwen25vl_model` (the F32 file with a ChatML Go template layer, as a pull
of Ollama's qwen2.5vl stores it). Without mlx-vlm these fixtures skip.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_models
from tests.gguf_vision_models import (
    VisionGGUF,
    bpe_metadata,
    f32_and_q8_0,
    gguf_metadata,
    go_replace,
    import_with_template,
    mlx_vlm_model,
)
from tests.tiny_models import quantize_rows, write_gguf
from tests.vision_models import TEMPLATE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"]
TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096}
MROPE = [2, 3, 3]       # of a head's 8 rotary frequencies: t, h, w
VISION = {"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
          "in_channels": 3}
# Ollama's ChatML-style Go template (its qwen2.5vl template layer writes the same turns).
GO_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
# convert_qwen2.go's Replacements() and then convert_qwen25vl.go's, in their order.
REPLACEMENTS = [
    ("lm_head", "output"), ("model.embed_tokens", "token_embd"), ("model.layers", "blk"),
    ("input_layernorm", "attn_norm"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.q_proj", "attn_q"), ("self_attn.o_proj", "attn_output"), ("mlp.down_proj", "ffn_down"),
    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("post_attention_layernorm", "ffn_norm"),
    ("model.norm", "output_norm"),
    ("visual", "v"), ("blocks", "blk"), ("attn.proj", "attn_out"), ("norm1", "ln1"), ("norm2", "ln2"),
]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def build_tokenizer():
    return tiny_models.build_tokenizer(SPECIALS)


def tokenizer_metadata(tok) -> dict:
    return bpe_metadata(tok, SPECIALS, "qwen2", TEMPLATE,
                        {"eos": "<|im_end|>", "padding": "<|endoftext|>", "bos": "<|endoftext|>"}, add_bos_token=False)


def reference_config(vocab: int, ids: dict[str, int], tied: bool) -> dict:
    """mlx-vlm's qwen2_5_vl config for what the file states (text keys at the top, as
    Qwen2.5-VL's config.json has them)."""
    text = {"model_type": "qwen2_5_vl", **TEXT, "vocab_size": vocab, "tie_word_embeddings": tied,
            "rope_scaling": {"type": "mrope", "mrope_section": MROPE}}
    return {**text, "text_config": dict(text), "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"], "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"], "vision_token_id": ids["<|vision_pad|>"],
            "vision_config": {"model_type": "qwen2_5_vl", **VISION, "out_hidden_size": TEXT["hidden_size"]}}


def hf_name(name: str) -> str:
    """mlx-vlm's qwen2_5_vl name -> the Hugging Face checkpoint's (what the converter reads)."""
    for ours, theirs in (("vision_tower.", "visual."), ("language_model.model.", "model."),
                         ("language_model.lm_head", "lm_head")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ValueError(name)


def converter_tensors(name: str, w: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One mlx-vlm parameter (float32) -> the GGUF tensors convert_qwen25vl.go writes for it."""
    gname = go_replace(hf_name(name), REPLACEMENTS)
    if "patch_embed.proj" in gname:     # MLX's Conv3d [O, T, P, P, C] -> torch's [O, C, T, P, P]
        torch_layout = w.transpose(0, 4, 1, 2, 3)
        return [(gname.replace("patch_embed.proj", f"patch_embd_{t}"), torch_layout[:, :, t])
                for t in range(torch_layout.shape[2])]
    if "attn.qkv" in gname:
        return [(gname.replace("attn.qkv", f"attn_{part}"), piece)
                for part, piece in zip("qkv", np.split(w, 3, axis=0), strict=True)]
    return [(gname, w)]


def _metadata(tok, qtype: str) -> dict:
    t, v = TEXT, VISION
    return {
        **gguf_metadata("qwen25vl", qtype, t, {
            "rope.freq_base": t["rope_theta"], "attention.layer_norm_rms_epsilon": t["rms_norm_eps"],
            "rope.mrope_section": MROPE,
            "vision.block_count": v["depth"], "vision.embedding_length": v["hidden_size"],
            "vision.attention.head_count": v["num_heads"], "vision.num_channels": v["in_channels"],
            "vision.patch_size": v["patch_size"], "vision.spatial_merge_size": v["spatial_merge_size"],
            "vision.spatial_patch_size": v["patch_size"], "vision.window_size": v["window_size"],
            "vision.attention.layer_norm_epsilon": 1e-6, "vision.rope.freq_base": 1e4,
            "vision.fullatt_block_indexes": v["fullatt_block_indexes"],
            "vision.temporal_patch_size": v["temporal_patch_size"]}),
        **tokenizer_metadata(tok),
    }


def _quantized_type(gname: str, w: np.ndarray, qtype: str) -> str:
    if qtype != "Q8_0" or w.ndim != 2 or w.shape[-1] % 32 or not gname.endswith("weight"):
        return "F32"
    return "Q4_0" if gname.startswith("v.blk.0.attn_v.") else "Q8_0"


def make_qwen25vl_gguf(root: Path, qtype: str = "F32", seed: int = 0) -> VisionGGUF:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tied = qtype == "F32"
    model = mlx_vlm_model("qwen2_5_vl", reference_config(vocab, {t: tok.token_to_id(t) for t in SPECIALS}, tied))
    rng = np.random.default_rng(seed)
    held: dict[str, np.ndarray] = {}
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("bias") or "norm" in name or "ln_q" in name:
            w = (1.0 if name.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(p.shape)
        else:
            w = rng.standard_normal(p.shape) * (0.5 if "embed_tokens" in name else 0.2)
        held[name] = w.astype(np.float32)
    tensors, kinds = [], {}
    for name, w in held.items():
        pieces = []
        for gname, stored in converter_tensors(name, w):
            stored = np.ascontiguousarray(stored, dtype=np.float32)
            kind = _quantized_type(gname, stored, qtype)
            if kind == "F32":
                data, back = stored.tobytes(), stored
            else:
                data, back = quantize_rows(stored, kind)
            tensors.append((gname, stored.shape, kind, data))
            kinds[gname] = kind
            pieces.append(back)
        # the reference holds what the file holds (the patch halves stay F32: unchanged)
        if "attn.qkv" in name:
            held[name] = np.concatenate(pieces, axis=0)
        elif len(pieces) == 1:
            held[name] = pieces[0]
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"tiny-qwen25vl-{qtype}.gguf"
    write_gguf(path, _metadata(tok, qtype), tensors)
    model.load_weights([(k, mx.array(v)) for k, v in held.items()], strict=True)
    mx.eval(model.parameters())
    return VisionGGUF(path, model, tok, kinds)


# ---- Ollama's image preprocessing, from process_image.go ------------------------------------
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 2 << 20) -> tuple[int, int]:
    h, w = round(height / factor) * factor, round(width / factor) * factor     # Go's RoundToEven: Python's round
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def reference_pixels(image_bytes: bytes) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(patches [n, 3 * 2 * 14 * 14], grid (t, h, w)) as Ollama's runner preprocesses an image:
    RGB, a bilinear resize to the smart size, scaled to [0, 1], CLIP's mean/std, then the
    patches in merge-block order, each one's 14x14 per channel repeated for both frames."""
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as img:
        rgb = img.convert("RGB")
    height, width = smart_resize(rgb.height, rgb.width)
    x = np.asarray(rgb.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    chw = ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    p, m, frames = VISION["patch_size"], VISION["spatial_merge_size"], VISION["temporal_patch_size"]
    gh, gw = height // p, width // p
    patches = []
    for h in range(0, gh, m):
        for w in range(0, gw, m):
            for mh in range(m):
                for mw in range(m):
                    y, x0 = (h + mh) * p, (w + mw) * p
                    block = chw[:, y:y + p, x0:x0 + p]                       # [C, p, p]
                    patches.append(np.stack([block] * frames, axis=1).reshape(-1))   # [C, T, p, p]
    return np.stack(patches), (1, gh, gw)


def image_tokens(built: VisionGGUF, grid: tuple[int, int, int]) -> str:
    """What one image becomes in the prompt's text (Qwen2.5-VL's processor; Ollama's runner
    places the same tokens): one `<|image_pad|>` per merged patch between the vision markers."""
    m = VISION["spatial_merge_size"]
    return "<|vision_start|>" + "<|image_pad|>" * (grid[0] * grid[1] * grid[2] // (m * m)) + "<|vision_end|>"


def reference_logits(built: VisionGGUF, ids: list[int], image: tuple[np.ndarray, tuple] | None) -> np.ndarray:
    """mlx-vlm's own whole forward pass (no cache): the image's features merged, its
    multimodal positions computed by mlx-vlm from the grid."""
    import mlx.core as mx

    arr = mx.array(ids)[None]
    if image is None:
        logits = built.reference(arr)
    else:
        pixels, grid = image
        logits = built.reference(arr, mx.array(pixels), image_grid_thw=mx.array([grid]))
    return np.array(logits.logits[0].astype(mx.float32))


@pytest.fixture(scope="session")
def qwen25vl_files(tmp_path_factory) -> dict[str, VisionGGUF]:
    return f32_and_q8_0(tmp_path_factory, "qwen25vl", make_qwen25vl_gguf)


@pytest.fixture
def qwen25vl_model(store, qwen25vl_files) -> str:
    """The F32 file in the store with a Go template layer, as a pull of Ollama's qwen2.5vl
    stores it (the file's own jinja template is then not used)."""
    return import_with_template(store, qwen25vl_files["F32"].path, "tiny-qwen25vl", GO_TEMPLATE)
