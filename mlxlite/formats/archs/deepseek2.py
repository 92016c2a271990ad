"""DeepSeek-V2 / V2-Lite onto mlx-lm's `deepseek_v2` (multi-head latent attention + MoE).

Attention: queries straight (`attn_q`) or through a low-rank pair (`attn_q_a`, its norm,
`attn_q_b`); keys/values from `attn_kv_a_mqa`, its norm and the up-projection, which
llama.cpp now writes split for its MLA kernels as `attn_k_b` (transposed per head) and
`attn_v_b` (older files: one `attn_kv_b`); the engine joins them back (`mla_kv_b`). Head
sizes come from `attention.key_length_mla`/`value_length_mla` (older files: key_length,
value_length), the rotary part from `rope.dimension_count`, applied interleaved as the
checkpoint does (no permutation). MoE after `leading_dense_block_count` dense layers:
softmax router, stacked experts (mlx-lm's SwitchGLU), shared experts, `expert_weights_scale`;
YaRN with the checkpoint's mscale recovered from `yarn_log_multiplier` (= 0.1 * mscale).
DeepSeek-V3/R1 files share the architecture name but route with sigmoid scores and a bias
(`exp_probs_b`): refused by name. Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.errors import Unsupported
from mlxlite.formats.archs.base import BLOCK, Arch, Meta

MLA_BLOCK = {
    **BLOCK,
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj", "attn_k_b": "self_attn.k_b_proj", "attn_v_b": "self_attn.v_b_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.switch_mlp.gate_proj", "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj",
}


def config(meta: Meta) -> dict[str, Any]:
    if meta.get("expert_gating_func", 1) != 1 or any("exp_probs_b" in t for t in meta.tensors):
        raise Unsupported("GGUF deepseek2 with sigmoid expert routing (DeepSeek-V3/R1 and kin) is not supported; "
                          "DeepSeek-V2 and V2-Lite are")
    if meta.get("expert_weights_norm"):
        raise Unsupported("GGUF deepseek2 with normalised top-k expert weights is not supported")
    heads = meta.need("attention.head_count")
    rope = meta.need("rope.dimension_count")
    if meta.get("attention.key_length_mla"):
        nope, v = meta.need("attention.key_length_mla") - rope, meta.need("attention.value_length_mla")
    else:
        nope, v = meta.need("attention.key_length") - rope, meta.need("attention.value_length")
    scaling: dict[str, Any] = {"factor": 1.0}  # mlx-lm's deepseek_v2 always builds its YaRN RoPE
    if meta.get("rope.scaling.type") == "yarn":
        mscale = float(meta.get("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
        scaling = {"type": "yarn", "factor": float(meta.need("rope.scaling.factor", float)),
                   "original_max_position_embeddings": int(meta.get("rope.scaling.original_context_length", 4096)),
                   "mscale": mscale, "mscale_all_dim": mscale}
    groups = int(meta.get("expert_group_count", 1))
    q_lora = meta.get("attention.q_lora_rank")
    return {
        "num_key_value_heads": heads,
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": meta.need("attention.kv_lora_rank"),
        "qk_rope_head_dim": rope, "qk_nope_head_dim": nope, "v_head_dim": v,
        "n_routed_experts": meta.need("expert_count"),
        "n_shared_experts": int(meta.get("expert_shared_count", 0)) or None,
        "num_experts_per_tok": meta.need("expert_used_count"),
        "moe_intermediate_size": meta.need("expert_feed_forward_length"),
        "routed_scaling_factor": float(meta.get("expert_weights_scale", 1.0)),
        "first_k_dense_replace": int(meta.get("leading_dense_block_count", 0)),
        "topk_method": "group_limited_greedy" if groups > 1 else "greedy",
        "n_group": groups, "topk_group": int(meta.get("expert_group_used_count", groups)),
        "rope_scaling": scaling,
    }


ARCH = Arch(names=("deepseek2",), model_type="deepseek_v2", config=config, block=MLA_BLOCK, mla_kv_b=True)
