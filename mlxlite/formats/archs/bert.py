"""BERT encoders (all-minilm, mxbai-embed-large, bge, ...) onto `engine/encoder.py`'s encoder.

Not an mlx-lm family: an `encoder` Arch, built by the engine's own BERT encoder and used
for embeddings only. llama.cpp's converter names: `token_embd`, `token_types`,
`position_embd` (absolute positions), `token_embd_norm` (the embedding LayerNorm); per
block `attn_q`/`attn_k`/`attn_v` (or a fused `attn_qkv`), `attn_output`, `attn_output_norm`
(post-attention LayerNorm), `ffn_up`/`ffn_down` (GELU FFN), `layer_output_norm`. The HF
pooler is dropped by the converter; `<arch>.pooling_type` says how to pool (llama.cpp's
enum: 1 mean, 2 cls, 3 last; 0 or absent means mean, as Ollama embeds). Rank pooling
(rerankers) is refused. Shared with `nomic_bert`. Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.errors import Unsupported
from mlxlite.formats.archs.base import Arch, Meta

ENCODER_TOP = {
    "token_embd": "model.word_embeddings", "token_types": "model.token_type_embeddings",
    "position_embd": "model.position_embeddings", "token_embd_norm": "model.embeddings_norm",
}
ENCODER_BLOCK = {
    "attn_q": "attention.query", "attn_k": "attention.key", "attn_v": "attention.value",
    "attn_qkv": "attention.qkv", "attn_output": "attention.out", "attn_output_norm": "attention_norm",
    "ffn_up": "mlp.up", "ffn_gate": "mlp.gate", "ffn_down": "mlp.down", "layer_output_norm": "output_norm",
}
POOLING = {0: "mean", 1: "mean", 2: "cls", 3: "last"}  # llama.cpp's LLAMA_POOLING_TYPE_*


def pooling(meta: Meta) -> str:
    kind = int(meta.get("pooling_type", 0))
    if kind not in POOLING:
        raise Unsupported(f"GGUF {meta.arch} pooling type {kind} (rank: a reranker) is not supported; "
                          "mean, cls and last are")
    return POOLING[kind]


def encoder_config(meta: Meta) -> dict[str, Any]:
    """The keys `engine/encoder.py` reads beyond `common_config`'s sizes."""
    return {
        "layer_norm_eps": float(meta.get("attention.layer_norm_epsilon", 1e-12)),
        "pooling": pooling(meta),
        "ffn": "gelu",
        "rope_theta": None,
    }


ARCH = Arch(names=("bert",), model_type="bert", config=encoder_config, block=ENCODER_BLOCK, top=ENCODER_TOP,
            encoder=True)
