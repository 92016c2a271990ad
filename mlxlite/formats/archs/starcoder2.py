"""StarCoder2 onto mlx-lm's `starcoder2`: LayerNorm with biases (`attention.layer_norm_epsilon`),
biased projections, a plain GELU MLP (`ffn_up` -> `c_fc`, `ffn_down` -> `c_proj`), NEOX RoPE
(no permutation). Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import BLOCK, Arch, Meta

SC2_BLOCK = {**{k: v for k, v in BLOCK.items() if k not in ("ffn_gate", "ffn_up", "ffn_down")},
             "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


def config(meta: Meta) -> dict[str, Any]:
    return {"norm_epsilon": float(meta.get("attention.layer_norm_epsilon", 1e-5)),
            "rope_theta": float(meta.get("rope.freq_base", 1e5))}


ARCH = Arch(names=("starcoder2",), model_type="starcoder2", config=config, block=SC2_BLOCK)
