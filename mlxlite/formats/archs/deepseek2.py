"""DeepSeek-V2 / V2-Lite onto mlx-lm's `deepseek_v2`, and DeepSeek-V3 / R1 (Kimi-K2 and kin,
which llama.cpp also writes as `deepseek2`) onto mlx-lm's `deepseek_v3`: multi-head latent
attention + MoE. The file's `expert_gating_func` picks the class (`ARCH.variant`): 2
(sigmoid) is V3's routing, anything else V2's softmax (llama.cpp reads a missing key so).

Attention: queries straight (`attn_q`) or through a low-rank pair (`attn_q_a`, its norm,
`attn_q_b`); keys/values from `attn_kv_a_mqa`, its norm and the up-projection, which
llama.cpp now writes split for its MLA kernels as `attn_k_b` (transposed per head) and
`attn_v_b` (older files: one `attn_kv_b`). V2: the engine joins them back into
`kv_b_proj` (`mla_kv_b`). V3: mlx-lm's own absorbed form wants exactly that split,
`embed_q` [heads, kv_lora, nope] = k_b and `unembed_out` [heads, v, kv_lora] = v_b, so they
load as they are (packed ones stay packed); an older file's `attn_kv_b` goes to
`kv_b_proj`, which mlx-lm's sanitize splits. Head sizes come from
`attention.key_length_mla`/`value_length_mla` (older files: key_length, value_length), the
rotary part from `rope.dimension_count`, applied interleaved as the checkpoint does (no
permutation). MoE after `leading_dense_block_count` dense layers: stacked experts (mlx-lm's
SwitchGLU), shared experts, `expert_weights_scale`; YaRN with the checkpoint's mscale
recovered from `yarn_log_multiplier` (= 0.1 * mscale).
V2 routes by softmax, top-k greedy or group-limited; V3 by sigmoid scores plus a per-expert
bias (`exp_probs_b.bias` -> the router's `e_score_correction_bias`) picking the experts
(`expert_group_count`/`expert_group_used_count` limit them to the best groups), weighted
by the unbiased scores, normalised when `expert_weights_norm` says so. Never imports mlx.
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
V3_BLOCK = {**MLA_BLOCK, "attn_k_b": "self_attn.embed_q", "attn_v_b": "self_attn.unembed_out",
            "exp_probs_b": "mlp.gate.e_score_correction_bias"}
SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID (1 is softmax)


def _bias_tensors(meta: Meta) -> bool:
    return any(t.endswith("exp_probs_b.bias") for t in meta.tensors)


def _mla(meta: Meta) -> dict[str, Any]:
    """What V2 and V3 share: MLA sizes, experts, dense layers, YaRN."""
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
        "rope_scaling": scaling,
    }


def config(meta: Meta) -> dict[str, Any]:
    """DeepSeek-V2's softmax routing (mlx-lm's deepseek_v2)."""
    gating = meta.get("expert_gating_func")
    if gating not in (None, 0, 1):  # 0 (none) is softmax to llama.cpp, for V2 files from before the key
        raise Unsupported(f"GGUF deepseek2 with expert gating function {gating!r} is not supported "
                          "(1, softmax, and 2, sigmoid, are)")
    if _bias_tensors(meta):
        raise Unsupported("GGUF deepseek2 with expert score biases (exp_probs_b) but no sigmoid routing "
                          "(expert_gating_func 2) is not supported")
    if meta.get("expert_weights_norm"):
        raise Unsupported("GGUF deepseek2 with softmax routing and normalised top-k expert weights is not supported")
    groups = int(meta.get("expert_group_count", 1))
    return {
        **_mla(meta),
        "topk_method": "group_limited_greedy" if groups > 1 else "greedy",
        "n_group": groups, "topk_group": int(meta.get("expert_group_used_count", groups)),
    }


def config_v3(meta: Meta) -> dict[str, Any]:
    """DeepSeek-V3's sigmoid routing with score biases (mlx-lm's deepseek_v3)."""
    if not _bias_tensors(meta):
        raise Unsupported("GGUF deepseek2 with sigmoid routing but no expert score biases (exp_probs_b) "
                          "is not supported")
    cfg = _mla(meta)
    experts = cfg["n_routed_experts"]
    groups = int(meta.get("expert_group_count", 1))
    used = int(meta.get("expert_group_used_count", groups))
    # mlx-lm ranks a group by its best two scores, and keeps `used` of them
    if groups > 1 and (experts % groups or experts // groups < 2 or not 0 < used <= groups):
        raise Unsupported(f"GGUF deepseek2 with {experts} experts in {groups} groups ({used} used) is not supported")
    if not 0 < cfg["num_experts_per_tok"] <= experts:
        raise Unsupported(f"GGUF deepseek2 routing {cfg['num_experts_per_tok']} of {experts} experts is not supported")
    return {**cfg, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": groups, "topk_group": used,
            "norm_topk_prob": bool(meta.get("expert_weights_norm", False))}


V3 = Arch(names=("deepseek2",), model_type="deepseek_v3", config=config_v3, block=V3_BLOCK,
          bare=frozenset({"exp_probs_b"}))


def _variant(meta: Meta) -> Arch:
    return V3 if meta.get("expert_gating_func") == SIGMOID else ARCH


ARCH = Arch(names=("deepseek2",), model_type="deepseek_v2", config=config, block=MLA_BLOCK, mla_kv_b=True,
            variant=_variant)
