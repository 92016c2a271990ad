"""nomic-bert (nomic-embed-text v1/v1.5) onto `engine/encoder.py`'s encoder.

The BERT encoder (see `bert`) with rotary positions instead of `position_embd` (NEOX
style, base `nomic-bert.rope.freq_base`, 1000 in Nomic's files), a fused `attn_qkv`
(rows q, k, v), a SwiGLU FFN (`ffn_up` is Nomic's fc11, `ffn_gate` its fc12:
down(up(x) * silu(gate(x)))) and no biases in attention or FFN (its GGUF has none; the
LayerNorms keep theirs). Post-norm like BERT. Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import Arch, Meta
from mlxlite.formats.archs.bert import ENCODER_BLOCK, ENCODER_TOP, encoder_config


def config(meta: Meta) -> dict[str, Any]:
    return {**encoder_config(meta), "ffn": "swiglu", "rope_theta": float(meta.get("rope.freq_base", 1000.0)),
            "max_position_embeddings": int(meta.get("context_length", 2048))}


ARCH = Arch(names=("nomic-bert",), model_type="nomic_bert", config=config, block=ENCODER_BLOCK, top=ENCODER_TOP,
            encoder=True)
