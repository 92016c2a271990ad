"""Gemma 2 onto mlx-lm's `gemma2`.

Quirks: llama.cpp stored every norm weight as 1 + w (its RMSNorm multiplies by the weight;
mlx-lm's gemma adds the 1 itself), so 1 is subtracted back; four norms per block
(`attn_norm`, `post_attention_norm`, `ffn_norm` before the MLP, `post_ffw_norm`); attention
and final logits soft-capped (`attn_logit_softcapping`, `final_logit_softcapping`); queries
scaled by 1/sqrt(head_dim), except the 27B (46 layers) by 1/sqrt(hidden/heads), as llama.cpp
does; NEOX RoPE (no permutation); tied embeddings. mlx-lm's gemma2 attends globally on every
layer, so the 4096-token sliding window of alternate layers is not applied. Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import BLOCK, Arch, Meta

GEMMA_BLOCK = {
    **BLOCK, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def query_scalar(meta: Meta, head_dim: int, big_layers: int) -> float:
    """llama.cpp's rule: the largest model scales queries by hidden/heads, the rest by head_dim."""
    if meta.need("block_count") == big_layers:
        return meta.need("embedding_length") / meta.need("attention.head_count")
    return float(head_dim)


def config(meta: Meta) -> dict[str, Any]:
    heads = meta.need("attention.head_count")
    head_dim = int(meta.get("attention.key_length") or meta.need("embedding_length") // heads)
    return {
        "attn_logit_softcapping": float(meta.get("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(meta.get("final_logit_softcapping", 30.0)),
        "query_pre_attn_scalar": query_scalar(meta, head_dim, 46),
    }


ARCH = Arch(names=("gemma2",), model_type="gemma2", config=config, block=GEMMA_BLOCK, norm_offset=1.0)
