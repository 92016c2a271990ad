"""Gemma 3 (text) onto mlx-lm's `gemma3_text`.

Gemma 2's layout and norm offset (llama.cpp stored every norm, Q/K norms included, as 1 + w)
plus per-head Q/K norms; five sliding-window layers (`attention.sliding_window`, local RoPE
base 10000) to one global layer (`rope.freq_base`, linear `rope.scaling` only there), the
pattern llama.cpp hard-codes; queries scaled by 1/sqrt(head_dim), except the 27B (62 layers)
by 1/sqrt(hidden/heads); no soft-capping. Vision tensors (`v.*`, `mm.*`: llama.cpp puts
them in a separate mmproj file, Ollama's files carry them inline) are not read. Ollama's
converter names the two RoPE bases `rope.global.freq_base` and `rope.local.freq_base`, and for
the multimodal checkpoints writes no RoPE scaling: Ollama's runner puts back the linear factor
8 of the 4B, 12B and 27B (34, 48, 62 layers) when their window is shorter than their context,
and so does `config`. Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import Arch, Meta
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


ARCH = Arch(names=("gemma3",), model_type="gemma3_text", config=config, block={**GEMMA_BLOCK, **QK_NORM},
            norm_offset=1.0, skip=("v.", "mm."))
