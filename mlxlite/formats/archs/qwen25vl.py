"""Ollama's qwen25vl (Qwen2.5-VL): the text onto mlx-lm's `qwen2`, and with the inline vision
tower onto mlx-vlm's `qwen2_5_vl`.

Text: Ollama's converter writes Qwen2's layout and keys under `qwen25vl.*` (`general.architecture`
qwen25vl), plus `rope.mrope_section`: multimodal RoPE gives each token a (t, h, w) position and
rotates the three sections of the rotary frequencies by one each. A text token's three are
equal, so for text alone it is Qwen2's RoPE (NEOX pairs, `rope.freq_base`), which is how a
file runs on mlx-lm's qwen2 (without mlx-vlm, or on a distributed rank). Image tokens take
h and w from their place in the image's grid; that needs mlx-vlm's language model.

Vision (`VISION`): the tower and the merger are inline as `v.*` (convert_qwen25vl.go: Hugging
Face's `visual.` is `v.`, `blocks` `blk`, `attn.proj` `attn_out`, `norm1`/`norm2` `ln1`/`ln2`,
`mlp.*_proj` `ffn_*`; the merger stays `v.merger.ln_q`, `v.merger.mlp.0`, `v.merger.mlp.2`).
It cut two parameters apart, which go back together here (`Piece`): the fused `attn.qkv` into
`attn_q`, `attn_k`, `attn_v` (rows, weights and biases), and the Conv3d patch embedding
[out, in, 2, p, p] into its temporal halves `patch_embd_0`/`_1` [out, in, p, p]. `vision.*`
gives the tower's depth, width, heads, patch, merge and window sizes and its full-attention
blocks; the MLP's width is not written and comes from `v.blk.0.ffn_gate`'s shape. Images are
resized with Ollama's runner's settings (both sides rounded to multiples of patch x merge,
between 56x56 and `vision.max_pixels`, default 2 Mi pixels; bilinear; CLIP's mean/std) by
transformers' Qwen2-VL image processor (the same smart resize; Pillow's resampling, not Go's),
and each one is `<|vision_start|>`, an `<|image_pad|>` per merged patch, `<|vision_end|>`
(Qwen2.5-VL's processor; Ollama's runner places the same three tokens).
mlx-vlm's tower fixes its RMS epsilon (1e-6) and RoPE base (10000), and its language model
derives the head size from width / heads and runs no RoPE scaling but mrope: files that say
otherwise are refused by name. The text model does not read the tower. Never imports mlx.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats.archs import qwen2
from mlxlite.formats.archs.base import Arch, Meta, Piece, Vision, tower_name

TOWER = "vision_tower."
_LAYER = {"attn_q": "attn.qkv", "attn_k": "attn.qkv", "attn_v": "attn.qkv", "attn_out": "attn.proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "ln1": "norm1", "ln2": "norm2"}
_TOP = {"v.patch_embd_0": TOWER + "patch_embed.proj", "v.patch_embd_1": TOWER + "patch_embed.proj",
        "v.merger.ln_q": TOWER + "merger.ln_q", "v.merger.mlp.0": TOWER + "merger.mlp.0",
        "v.merger.mlp.2": TOWER + "merger.mlp.2"}
_VNAME = re.compile(r"(?:v\.blk\.(\d+)\.([a-z0-9_]+)|(v\.[a-z0-9_.]+?))\.(weight|bias)\Z")
_PIECES = {"attn_q": Piece(0, 3), "attn_k": Piece(1, 3), "attn_v": Piece(2, 3),
           # MLX's Conv3d weight is [out, t, p, p, in]: each half (made [out, p, p, in]) at t
           "v.patch_embd_0": Piece(0, 2, axis=1, stack=True), "v.patch_embd_1": Piece(1, 2, axis=1, stack=True)}
PATCH = TOWER + "patch_embed.proj.weight"
# Qwen2.5-VL's vocabulary names them; Ollama's runner hard-codes their ids (151655, 151652, 151653).
IMAGE_TOKENS = {"image_token": "<|image_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
OTHER_TOKENS = {"video_token_id": "<|video_pad|>", "vision_token_id": "<|vision_pad|>"}    # unused by images
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def vision_name(name: str) -> str:
    """A tower/merger GGUF name (Ollama's) -> mlx-vlm's qwen2_5_vl parameter name (the three
    q/k/v pieces and the two patch halves name the one parameter they are part of)."""
    return tower_name(name, _VNAME, TOWER + "blocks.", _LAYER, _TOP, "qwen2.5-vl")


def vision_piece(name: str) -> Piece | None:
    m = _VNAME.match(name)
    return _PIECES.get(m.group(2) or m.group(3)) if m else None


def vision_config(meta: Meta, text: dict[str, Any]) -> dict[str, Any]:
    """mlx-vlm's qwen2_5_vl config.json from the metadata and the text model's mlx-lm config (its
    text keys at the top level, where mlx-vlm's qwen2_5_vl reads them), and the processor's
    settings."""
    where = f"{meta.path}: " if meta.path else ""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if text.get("head_dim", head_dim) != head_dim:
        raise Unsupported(f"{where}qwen25vl with head size {text['head_dim']} (not width / heads): mlx-vlm's "
                          "qwen2_5_vl derives it from width / heads")
    if text.get("rope_scaling"):
        raise Unsupported(f"{where}qwen25vl with RoPE scaling {text['rope_scaling'].get('type')!r}: mlx-vlm's "
                          "qwen2_5_vl runs multimodal RoPE only")
    sections = [int(s) for s in meta.need("rope.mrope_section", list)]
    while sections and sections[-1] == 0:   # llama.cpp pads the list to four with zeros
        sections.pop()
    if len(sections) != 3 or sum(sections) != head_dim // 2 or min(sections) < 0:
        raise BadRequest(f"{where}qwen25vl.rope.mrope_section {sections} does not split the {head_dim // 2} "
                         "rotary frequencies of a head into t, h and w")
    width, depth = meta.need("vision.embedding_length"), meta.need("vision.block_count")
    heads = int(meta.get("vision.attention.head_count", 16))
    patch, merge = int(meta.get("vision.patch_size", 14)), int(meta.get("vision.spatial_merge_size", 2))
    window, temporal = int(meta.get("vision.window_size", 112)), int(meta.get("vision.temporal_patch_size", 2))
    full = [int(i) for i in meta.get("vision.fullatt_block_indexes", [7, 15, 23, 31])]
    gate = meta.shape("v.blk.0.ffn_gate.weight")
    inter = int(meta.get("vision.feed_forward_length") or (gate[0] if gate else 0))
    max_pixels = int(meta.get("vision.max_pixels", 2 << 20))
    if (depth <= 0 or width <= 0 or heads <= 0 or width % heads or (width // heads) % 4 or patch <= 0
            or merge <= 0 or window < patch * merge or inter <= 0 or max_pixels < 56 * 56):
        raise BadRequest(f"{where}qwen25vl vision metadata does not fit together (block_count {depth}, "
                         f"embedding_length {width}, attention.head_count {heads}, patch_size {patch}, "
                         f"spatial_merge_size {merge}, window_size {window}, max_pixels {max_pixels}, "
                         f"MLP width {inter or 'unknown'})")
    if temporal != 2:
        raise Unsupported(f"{where}qwen25vl vision.temporal_patch_size {temporal}: the file holds the patch "
                          "embedding's two temporal halves (patch_embd_0, patch_embd_1)")
    eps = float(meta.get("vision.attention.layer_norm_epsilon", 1e-6))
    base = float(meta.get("vision.rope.freq_base", 1e4))
    if not (math.isclose(eps, 1e-6, rel_tol=1e-4) and math.isclose(base, 1e4, rel_tol=1e-4)):  # float32 in the file
        raise Unsupported(f"{where}qwen25vl vision RMS epsilon {eps:g} and RoPE base {base:g}: mlx-vlm's "
                          "qwen2_5_vl tower fixes 1e-06 and 10000")
    tokens = list(meta.metadata.get("tokenizer.ggml.tokens") or [])
    missing = [t for t in IMAGE_TOKENS.values() if t not in tokens]
    if missing:
        raise Unsupported(f"{where}the vocabulary lacks qwen2.5-vl's image tokens ({', '.join(missing)})")
    ids = {key: tokens.index(token) for key, token in IMAGE_TOKENS.items()}
    text_config = {k: v for k, v in text.items() if k not in ("head_dim", "model_type", "rope_scaling")}
    text_config.update(model_type="qwen2_5_vl", rope_scaling={"type": "mrope", "mrope_section": sections})
    return {
        **text_config, "text_config": dict(text_config),
        "image_token_id": ids["image_token"], "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        # -1: no token is one (mlx-vlm falls back to the video token where no image token is)
        **{key: tokens.index(token) if token in tokens else -1 for key, token in OTHER_TOKENS.items()},
        "vision_config": {
            "model_type": "qwen2_5_vl", "depth": depth, "hidden_size": width, "intermediate_size": inter,
            "out_hidden_size": text["hidden_size"], "num_heads": heads, "patch_size": patch,
            "spatial_patch_size": patch, "spatial_merge_size": merge, "temporal_patch_size": temporal,
            "window_size": window, "fullatt_block_indexes": full,
            "in_channels": int(meta.get("vision.num_channels") or 3),
        },
        "processor": {"min_pixels": 56 * 56, "max_pixels": max_pixels,
                      "patch_size": patch, "merge_size": merge, "temporal_patch_size": temporal,
                      "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": "bilinear",
                      "tokens": dict(IMAGE_TOKENS),
                      "marker": IMAGE_TOKENS["vision_start"] + IMAGE_TOKENS["image_token"] + IMAGE_TOKENS["vision_end"]},
    }


VISION = Vision(model_type="qwen2_5_vl", prefixes=("v.",), map_name=vision_name, config=vision_config,
                text="language_model.", dense=frozenset({PATCH}), conv=frozenset({PATCH}), piece=vision_piece)

ARCH = Arch(names=("qwen25vl",), model_type="qwen2", config=qwen2.config, skip=("v.",), vision=VISION)
