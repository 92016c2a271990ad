"""Phi-3 / Phi-3.5 / Phi-4 onto mlx-lm's `phi3`: fused `attn_qkv` (-> `qkv_proj`) and fused
gate+up in `ffn_up` (-> `gate_up_proj`, gate first), partial rotary dims from
`rope.dimension_count`, NEOX RoPE (no permutation). Files with LongRoPE factor tensors
(`rope_factors_long/short`, the 128k variants) are refused by name. mlx-lm's phi3 applies
no sliding window. Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.errors import Unsupported
from mlxlite.formats.archs.base import BLOCK, Arch, Meta

PHI3_BLOCK = {**BLOCK, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


def config(meta: Meta) -> dict[str, Any]:
    if meta.has("rope_factors_long.weight") or meta.has("rope_factors_short.weight"):
        raise Unsupported("GGUF phi3 with LongRoPE factors (rope_factors_long/short, 128k context) "
                          "is not supported")
    head_dim = meta.need("embedding_length") // meta.need("attention.head_count")
    rot = int(meta.get("rope.dimension_count", head_dim))
    return {"partial_rotary_factor": rot / head_dim}


ARCH = Arch(names=("phi3",), model_type="phi3", config=config, block=PHI3_BLOCK)
