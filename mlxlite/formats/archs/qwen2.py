"""Qwen2 (and Qwen2.5) onto mlx-lm's `qwen2`: q/k/v biases, NEOX RoPE (no Q/K permutation),
rope_theta 1e6 when the file does not say. Never imports mlx.
"""

from __future__ import annotations

from typing import Any

from mlxlite.formats.archs.base import Arch, Meta


def config(meta: Meta) -> dict[str, Any]:
    return {"rope_theta": float(meta.get("rope.freq_base", 1e6))}


ARCH = Arch(names=("qwen2",), model_type="qwen2", config=config)
