"""OpenAI gpt-oss onto mlx-lm's `gpt_oss`.

Attention with biases and per-head sinks (`attn_sinks`, a bare parameter in mlx-lm),
sliding-window layers alternating with global ones (even layers slide, the window from
`attention.sliding_window`), YaRN RoPE from `rope.scaling.*`; per layer a biased router
(`ffn_gate_inp`) and experts stored stacked with biases (`ffn_{gate,up,down}_exps`), which
is the layout of mlx-lm's SwitchGLU (`mlp.experts.*`): llama.cpp already de-interleaved the
checkpoint's fused gate/up. The norm before the experts is `post_attention_norm`.
Real files keep their experts in MXFP4, which the tensor reader must support to load them.
Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import BLOCK, Arch, Meta

GPT_OSS_BLOCK = {
    **BLOCK, "post_attention_norm": "post_attention_layernorm", "attn_sinks": "self_attn.sinks",
    "ffn_gate_inp": "mlp.router", "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj",
}


def config(meta: Meta) -> dict[str, Any]:
    layers = meta.need("block_count")
    return {
        "num_local_experts": meta.need("expert_count"),
        "num_experts_per_tok": meta.need("expert_used_count"),
        "intermediate_size": meta.need("expert_feed_forward_length"),
        "sliding_window": int(meta.get("attention.sliding_window", 128)),
        # llama.cpp's swa pattern 2: even layers slide, odd layers attend globally
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "rope_theta": float(meta.get("rope.freq_base", 150000.0)),
    }


ARCH = Arch(names=("gpt-oss",), model_type="gpt_oss", config=config, block=GPT_OSS_BLOCK,
            bare=frozenset({"attn_sinks"}))
