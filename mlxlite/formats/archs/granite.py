"""IBM Granite (3.x dense) onto mlx-lm's `granite`: llama's layout (llama.cpp's converter
subclasses llama's, so Q/K rows are permuted and un-permuted here) with four scalars:
`embedding_scale`, `residual_scale`, `attention.scale` (the softmax scale itself) and
`logit_scale` (logits are divided by it). Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import Arch, Meta


def config(meta: Meta) -> dict[str, Any]:
    head_dim = meta.need("embedding_length") // meta.need("attention.head_count")
    return {
        "embedding_multiplier": float(meta.get("embedding_scale", 1.0)),
        "residual_multiplier": float(meta.get("residual_scale", 1.0)),
        "attention_multiplier": float(meta.get("attention.scale", head_dim ** -0.5)),
        "logits_scaling": float(meta.get("logit_scale", 1.0)),
        "attention_bias": meta.has("blk.0.attn_q.bias"),
        "mlp_bias": meta.has("blk.0.ffn_up.bias"),
    }


ARCH = Arch(names=("granite",), model_type="granite", config=config, permute_qk=True)
