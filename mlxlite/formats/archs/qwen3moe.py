"""Qwen3-MoE onto mlx-lm's `qwen3_moe`: Qwen3 attention, and per layer a router
(`ffn_gate_inp`) with experts stored stacked (`ffn_{gate,up,down}_exps`, [experts, out, in]),
which is exactly the layout of mlx-lm's SwitchGLU (`mlp.switch_mlp.*`). llama.cpp always
renormalises the top-k routing weights for this family (norm_topk_prob). Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import BLOCK, Arch, Meta
from mlxlite.formats.archs.qwen3 import QK_NORM

EXPERTS = {
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj", "ffn_down_exps": "mlp.switch_mlp.down_proj",
}


def config(meta: Meta) -> dict[str, Any]:
    moe = meta.need("expert_feed_forward_length")
    return {
        "rope_theta": float(meta.get("rope.freq_base", 1e6)),
        "num_experts": meta.need("expert_count"),
        "num_experts_per_tok": meta.need("expert_used_count"),
        "moe_intermediate_size": moe,
        "intermediate_size": int(meta.get("feed_forward_length") or moe),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


ARCH = Arch(names=("qwen3moe",), model_type="qwen3_moe", config=config, block={**BLOCK, **QK_NORM, **EXPERTS})
