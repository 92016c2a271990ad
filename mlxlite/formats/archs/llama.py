"""The llama family (llama, mistral and smollm files use its layout) onto mlx-lm's `llama`.

llama.cpp permuted Q/K rows for GGML's interleaved RoPE (un-permuted here, so mlx-lm's
default RoPE applies); llama3-style RoPE scaling arrives as a `rope_freqs` tensor of
per-frequency period factors, applied as they are. Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import Arch, Meta


def config(meta: Meta) -> dict[str, Any]:
    return {
        "attention_bias": meta.has("blk.0.attn_q.bias"),
        "mlp_bias": meta.has("blk.0.ffn_up.bias"),
    }


ARCH = Arch(names=("llama", "mistral", "smollm"), model_type="llama", config=config,
            permute_qk=True, rope_freqs=True)
