"""Qwen3 (dense) onto mlx-lm's `qwen3`: per-head RMSNorm on Q and K (`attn_q_norm`,
`attn_k_norm`), head_dim from `attention.key_length`, NEOX RoPE (no permutation).
Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import BLOCK, Arch, Meta

QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def config(meta: Meta) -> dict[str, Any]:
    return {"rope_theta": float(meta.get("rope.freq_base", 1e6))}


ARCH = Arch(names=("qwen3",), model_type="qwen3", config=config, block={**BLOCK, **QK_NORM})
