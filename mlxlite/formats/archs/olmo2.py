"""OLMo 2 onto mlx-lm's `olmo2`: norms after attention and MLP only (`post_attention_norm`,
`post_ffw_norm`; no pre-norms), RMSNorm over the whole Q and K projections
(`attn_q_norm`, `attn_k_norm`), NEOX RoPE (no permutation). Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import BLOCK, Arch, Meta
from mlxlite.formats.archs.qwen3 import QK_NORM

OLMO2_BLOCK = {
    **{k: v for k, v in BLOCK.items() if k not in ("attn_norm", "ffn_norm")}, **QK_NORM,
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}


def config(meta: Meta) -> dict[str, Any]:
    return {"attention_bias": meta.has("blk.0.attn_q.bias")}


ARCH = Arch(names=("olmo2",), model_type="olmo2", config=config, block=OLMO2_BLOCK)
