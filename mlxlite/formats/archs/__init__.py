"""GGUF architectures onto mlx-lm's model classes: one module per family, one registry.

Each family module (`llama`, `qwen2`, `qwen25vl`, `qwen3`, `qwen3moe`, `gemma2`, `gemma3`, `phi3`,
`granite`, `olmo2`, `starcoder2`, `gpt_oss`, `deepseek2`; the encoders `bert` and `nomic_bert`) defines `ARCH`, an `Arch` saying which mlx-lm class the
family runs on, how its metadata becomes that class's config, how its tensor names map,
and which of llama.cpp's conversion quirks the engine must undo (Q/K row permutation, norm
offsets, `rope_freqs`, LongRoPE factor tensors, MLA's split kv_b); a family whose files may
carry a vision tower inline (gemma3 and qwen25vl, as Ollama writes them) says in `Arch.vision`
how it runs on mlx-vlm. `get(name)` looks one up
by `general.architecture`; where one name covers files of two mlx-lm classes (deepseek2: V2
and V3), the family's `Arch.pick(meta)` gives the one a file runs on. Adding a family
means adding one module and one line below. Pure: never imports mlx or reads files.
"""

from __future__ import annotations

from mlxlite.errors import Unsupported
from mlxlite.formats.archs import (
    bert,
    deepseek2,
    gemma2,
    gemma3,
    gpt_oss,
    granite,
    llama,
    nomic_bert,
    olmo2,
    phi3,
    qwen2,
    qwen3,
    qwen3moe,
    qwen25vl,
    starcoder2,
)
from mlxlite.formats.archs.base import Arch, Meta, Piece, Vision

FAMILIES = (llama, qwen2, qwen25vl, qwen3, qwen3moe, gemma2, gemma3, phi3, granite, olmo2, starcoder2, gpt_oss, deepseek2,
            bert, nomic_bert)
REGISTRY: dict[str, Arch] = {name: family.ARCH for family in FAMILIES for name in family.ARCH.names}


def get(name: str) -> Arch:
    """The `Arch` for a `general.architecture` value, or `Unsupported` listing those we run."""
    if name not in REGISTRY:
        raise Unsupported(f"GGUF architecture {name or '(none)'!r} is not supported "
                          f"(supported: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]




def is_encoder(name: str) -> bool:
    """True for an embedding-only family (bert, nomic-bert): it embeds and never generates."""
    arch = REGISTRY.get(name)
    return arch is not None and arch.encoder


__all__ = ["Arch", "Meta", "Piece", "REGISTRY", "Vision", "get", "is_encoder"]
