"""Gemma 3 onto mlx-lm's `gemma3_text`, and with its inline vision tower onto mlx-vlm's `gemma3`.

Text: Gemma 2's layout and norm offset (llama.cpp stored every norm, Q/K norms included, as
1 + w) plus per-head Q/K norms; five sliding-window layers (`attention.sliding_window`, local
RoPE base 10000) to one global layer (`rope.freq_base`, linear `rope.scaling` only there), the
pattern llama.cpp hard-codes; queries scaled by 1/sqrt(head_dim), except the 27B (62 layers)
by 1/sqrt(hidden/heads); no soft-capping. Ollama's converter names the two RoPE bases
`rope.global.freq_base` and `rope.local.freq_base`, and for the multimodal checkpoints writes
no RoPE scaling (nor `attention.layer_norm_rms_epsilon`): Ollama's runner puts back the linear
factor 8 of the 4B, 12B and 27B (34, 48, 62 layers) when their window is shorter than their
context, and so does `config`.

Vision (`VISION`): Ollama's files carry the SigLIP tower (`v.*`) and the projector (`mm.*`)
inline, named by convert_gemma3.go's replacements (`v.blk.N.attn_q`, `v.patch_embedding`,
`mm.mm_input_projection.weight`, ...) and described by `gemma3.vision.*` and
`gemma3.mm.tokens_per_image`. On mlx-vlm's gemma3 they are the HF names back; the projector's
RMS norm was stored as 1 + w like the text norms (the tower's LayerNorms were not); the patch
embedding is torch's conv layout; images are resized to `vision.image_size` square,
normalized with mean = std = 0.5 (Ollama's `ImageNetStandardMean/STD`), each one
`\\n\\n<start_of_image>` + tokens_per_image `<image_soft_token>` + `<end_of_image>\\n\\n`, as
transformers' Gemma3Processor and Ollama's runner expand it. The text model does not read
these tensors. Never imports mlx.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats.archs.base import Arch, Meta, Vision, tower_name
from mlxlite.formats.archs.gemma2 import GEMMA_BLOCK, query_scalar
from mlxlite.formats.archs.qwen3 import QK_NORM

# Ollama's runner: these sizes' checkpoints ran global layers at linear RoPE 8 (HF's
# rope_scaling), which its converter does not write for the multimodal ones.
_SCALED_SIZES = (34, 48, 62)


def config(meta: Meta) -> dict[str, Any]:
    heads = meta.need("attention.head_count")
    head_dim = int(meta.get("attention.key_length") or meta.need("embedding_length") // heads)
    pattern = meta.get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # newer files list it per layer: True = sliding
        pattern = pattern.index(False) + 1 if False in pattern else len(pattern) + 1
    window = int(meta.get("attention.sliding_window", 512))
    cfg: dict[str, Any] = {
        "rope_theta": float(meta.get("rope.global.freq_base", meta.get("rope.freq_base", 1e6))),
        "rope_local_base_freq": float(meta.get("rope.local.freq_base", meta.get("rope.freq_base_swa", 10000.0))),
        "sliding_window": window,
        "sliding_window_pattern": int(pattern),
        "query_pre_attn_scalar": query_scalar(meta, head_dim, 62),
    }
    if (meta.get("rope.scaling.type") is None and meta.need("block_count") in _SCALED_SIZES
            and window < int(meta.get("context_length", 0) or 0)):
        cfg["rope_scaling"] = {"type": "linear", "factor": 8.0}
    return cfg


# ---- the inline vision tower --------------------------------------------------------------
TOWER = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
_TOP = {"v.patch_embedding": TOWER + "embeddings.patch_embedding",
        "v.position_embedding": TOWER + "embeddings.position_embedding",
        "v.post_layernorm": TOWER + "post_layernorm",
        "mm.mm_soft_emb_norm": PROJECTOR + "mm_soft_emb_norm"}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.out_proj", "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VNAME = re.compile(r"(?:v\.blk\.(\d+)\.(.+)|(v\.[a-z_]+|mm\.[a-z_]+))\.(weight|bias)\Z")
PATCH = TOWER + "embeddings.patch_embedding.weight"
PROJECTION = PROJECTOR + "mm_input_projection_weight"   # a bare parameter, [vision width, text width]
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def vision_name(name: str) -> str:
    """A tower/projector GGUF name (Ollama's) -> mlx-vlm's gemma3 parameter name."""
    if name == "mm.mm_input_projection.weight":
        return PROJECTION
    return tower_name(name, _VNAME, TOWER + "encoder.layers.", _LAYER, _TOP, "gemma3")


def vision_config(meta: Meta, text: dict[str, Any]) -> dict[str, Any]:
    """mlx-vlm's gemma3 config.json from the metadata and the text model's mlx-lm config, and
    the processor's settings."""
    size, patch = meta.need("vision.image_size"), meta.need("vision.patch_size")
    per_image = int(meta.get("mm.tokens_per_image", 256))
    side = math.isqrt(per_image) if per_image > 0 else 0
    if not size or not patch or size % patch or not side or side * side != per_image or (size // patch) % side:
        raise BadRequest(f"{meta.path}: gemma3 vision metadata does not fit together (image_size {size}, "
                         f"patch_size {patch}, mm.tokens_per_image {per_image})")
    tokens = list(meta.metadata.get("tokenizer.ggml.tokens") or [])
    missing = [t for t in IMAGE_TOKENS.values() if t not in tokens]
    if missing:
        raise Unsupported(f"{meta.path}: the vocabulary lacks gemma3's image tokens ({', '.join(missing)})")
    text_config = {k: v for k, v in text.items() if k not in ("rope_theta", "tie_word_embeddings", "model_type")}
    text_config.update(model_type="gemma3_text", rope_global_base_freq=text["rope_theta"],
                       mm_tokens_per_image=per_image)
    return {
        "model_type": "gemma3",
        # the projector divides image features by sqrt(hidden_size) and the text model multiplies
        # every embedding by it: the text width, so the features go in as HF and Ollama put them
        "hidden_size": text["hidden_size"],
        "vocab_size": text["vocab_size"],
        "image_token_index": tokens.index(IMAGE_TOKENS["image_token"]),
        "pad_token_id": int(meta.metadata.get("tokenizer.ggml.padding_token_id", 0)),
        "text_config": text_config,
        "vision_config": {
            "model_type": "siglip_vision_model", "image_size": size, "patch_size": patch,
            "num_hidden_layers": meta.need("vision.block_count"),
            "hidden_size": meta.need("vision.embedding_length"),
            "intermediate_size": meta.need("vision.feed_forward_length"),
            "num_attention_heads": meta.need("vision.attention.head_count"),
            "num_channels": int(meta.get("vision.num_channels", 3)),
            "layer_norm_eps": float(meta.get("vision.attention.layer_norm_epsilon", 1e-6)),
        },
        "processor": {"image_size": size, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                      "resample": "bilinear", "image_seq_length": per_image, "tokens": dict(IMAGE_TOKENS),
                      "marker": IMAGE_TOKENS["boi_token"]},
    }


VISION = Vision(model_type="gemma3", prefixes=("v.", "mm."), map_name=vision_name, config=vision_config,
                dense=frozenset({PATCH, PROJECTION}), conv=frozenset({PATCH}),
                norm_offset=frozenset({"mm.mm_soft_emb_norm.weight"}))

ARCH = Arch(names=("gemma3",), model_type="gemma3_text", config=config, block={**GEMMA_BLOCK, **QK_NORM},
            norm_offset=1.0, skip=("v.", "mm."), vision=VISION)
