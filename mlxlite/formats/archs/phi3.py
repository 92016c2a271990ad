"""Phi-3 / Phi-3.5 / Phi-4-mini onto mlx-lm's `phi3`: fused `attn_qkv` (-> `qkv_proj`) and
fused gate+up in `ffn_up` (-> `gate_up_proj`, gate first), partial rotary dims from
`rope.dimension_count`, NEOX RoPE (no permutation). mlx-lm's phi3 applies no sliding window.

LongRoPE (the 128k variants, Phi-4-mini): llama.cpp writes the checkpoint's factors as
tensors, `rope_factors_long.weight` / `rope_factors_short.weight` (one per rotary
frequency), the pretraining context as `rope.scaling.original_context_length` and the
attention factor as `rope.scaling.attn_factor`. They become mlx-lm's `rope_scaling`
(type longrope: `long_factor`, `short_factor`) and `original_max_position_embeddings`, so
its SuScaledRoPE applies; the engine reads the factor values from the file (`rope_factors`).
mlx-lm derives the attention factor from the two context lengths, as llama.cpp's converter
did when it wrote the key: a file whose attn_factor says otherwise is refused. SuScaledRoPE
rotates by the long factors at every length (as mlx-lm runs the safetensors model), where
llama.cpp takes the short ones for a context within the original one. Never imports mlx.
"""

from __future__ import annotations

import math
from typing import Any

from mlxlite.errors import Unsupported
from mlxlite.formats.archs.base import BLOCK, Arch, Meta

PHI3_BLOCK = {**BLOCK, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
LONG, SHORT = "rope_factors_long.weight", "rope_factors_short.weight"


def config(meta: Meta) -> dict[str, Any]:
    head_dim = meta.need("embedding_length") // meta.need("attention.head_count")
    rot = int(meta.get("rope.dimension_count", head_dim))
    cfg: dict[str, Any] = {"partial_rotary_factor": rot / head_dim}
    if meta.has(LONG) or meta.has(SHORT):
        cfg.update(_longrope(meta))
    elif meta.get("rope.scaling.type") not in (None, "none"):
        # mlx-lm's phi3 reads a rope_scaling only with LongRoPE's factors (else ValueError at build)
        raise Unsupported(f"GGUF phi3 with {meta.get('rope.scaling.type')!r} RoPE scaling is not supported "
                          "(LongRoPE, as factor tensors, is)")
    return cfg


def _longrope(meta: Meta) -> dict[str, Any]:
    if not meta.has(LONG):
        raise Unsupported(f"GGUF phi3 with {SHORT} but no {LONG} is not supported")
    original = meta.need("rope.scaling.original_context_length")
    context = int(meta.get("context_length", 4096))
    if original <= 0 or context <= 0:
        raise ValueError("context lengths must be positive")  # model_config: a BadRequest
    ratio = context / original
    # mlx-lm's SuScaledRoPE (and transformers' longrope) derive it so; llama.cpp's converter wrote the same
    derived = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1.0
    stated = meta.get("rope.scaling.attn_factor")
    if stated is not None and not math.isclose(float(stated), derived, rel_tol=1e-4):
        raise Unsupported(f"GGUF phi3 LongRoPE attn_factor {float(stated):g} is not the {derived:g} that mlx-lm "
                          f"derives from context {context} over {original}")
    # the factor lists are filled in by the engine from the tensors (Arch.rope_factors)
    return {"rope_scaling": {"type": "longrope"}, "original_max_position_embeddings": original,
            "max_position_embeddings": context}


ARCH = Arch(names=("phi3",), model_type="phi3", config=config, block=PHI3_BLOCK,
            rope_factors={LONG: "long_factor", SHORT: "short_factor"})
