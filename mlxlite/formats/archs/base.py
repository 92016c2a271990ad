"""What one GGUF architecture is to the runner: metadata -> mlx-lm config, tensor names ->
mlx-lm names, and the per-tensor transforms llama.cpp's converter applied that the engine
must undo.

Owns `Arch` (one per family module), `Meta` (typed reads of `<arch>.*` metadata keys, and the
tensors' names and shapes), `Vision` (a vision tower some files carry inline: its names and
config on mlx-vlm's model of the family; `Piece`: a tensor the converter cut out of one
mlx-vlm parameter; `tower_name`: the name map a tower's family fills in) and the config keys
every decoder shares. Pure data and small functions: never imports mlx,
never reads files, never touches tensor values (the engine applies what an `Arch` declares).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlxlite.errors import BadRequest, Unsupported

# Names every decoder family shares; a family adds its own parts (or renames these) in `block`.
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"(?:blk\.(\d+)\.)?([a-z0-9_]+)(?:\.(weight|bias|scales|biases))?\Z")


class Meta:
    """Reads `<arch>.<key>` metadata with the types mlx-lm's config wants; `shape(tensor)` is a
    tensor's shape in numpy order (outermost first) where the caller gave them."""

    def __init__(self, metadata: Mapping[str, Any], arch: str, tensor_names: frozenset[str], path: str = "",
                 shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.metadata, self.arch, self.tensors, self.path = metadata, arch, tensor_names, path
        self.shapes = shapes or {}

    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(f"{self.arch}.{key}")
        return default if value is None else value

    def need(self, key: str, kind: type = int) -> Any:
        value = self.metadata.get(f"{self.arch}.{key}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            where = f"{self.path}: " if self.path else ""
            raise BadRequest(f"{where}GGUF metadata lacks {self.arch}.{key}") from None

    def has(self, tensor: str) -> bool:
        return tensor in self.tensors

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        return self.shapes.get(tensor)


@dataclass(frozen=True)
class Arch:
    """One family: how its GGUF files become an mlx-lm model (see module doc)."""

    names: tuple[str, ...]                      # `general.architecture` values it reads
    model_type: str                             # mlx-lm's module under mlx_lm.models
    config: Callable[[Meta], dict[str, Any]]    # the family's own keys, over `common_config`
    block: Mapping[str, str] = field(default_factory=lambda: BLOCK)
    top: Mapping[str, str] = field(default_factory=lambda: TOP)
    permute_qk: bool = False    # llama.cpp permuted Q/K rows for interleaved RoPE: un-permute them
    norm_offset: float = 0.0    # llama.cpp stored norm weights as w + offset (gemma): subtract it
    rope_freqs: bool = False    # a `rope_freqs.weight` tensor (llama3 scaling) scales RoPE's periods
    bare: frozenset[str] = frozenset()  # parts whose mlx-lm parameter has no suffix (gpt-oss sinks, V3's router bias)
    mla_kv_b: bool = False      # llama.cpp split MLA's kv_b_proj into k_b (transposed) + v_b: join them
    skip: tuple[str, ...] = ()  # tensor name prefixes the text model never reads (a vision tower)
    encoder: bool = False       # an embedding encoder (bert family): built by engine/encoder.py, never generates
    # tensors holding RoPE settings, not weights (phi3's LongRoPE factors): the engine reads each
    # into config["rope_scaling"][key] before it builds the model
    rope_factors: Mapping[str, str] = field(default_factory=dict)
    # a family whose files split across mlx-lm classes by metadata (deepseek2: V2's softmax
    # routing, V3's sigmoid): picks the variant `Arch` that one file runs on
    variant: Callable[[Meta], Arch] | None = None
    vision: Vision | None = None    # the vision tower a file may carry inline (Ollama's gemma3, qwen25vl)

    def reads(self, name: str) -> bool:
        return not name.startswith(self.skip)

    def map_name(self, name: str) -> str:
        """GGUF tensor name -> mlx-lm parameter name (exact part match, suffix kept)."""
        m = _NAME.match(name)
        if m:
            block, part, suffix = m.groups()
            if part in self.bare and block is not None and suffix in (None, "weight", "bias"):
                return f"model.layers.{block}.{self.block[part]}"
            if suffix and block is None and part in self.top:
                return f"{self.top[part]}.{suffix}"
            if suffix and block is not None and part in self.block:
                return f"model.layers.{block}.{self.block[part]}.{suffix}"
        raise Unsupported(f"GGUF tensor {name!r} has no mlx-lm equivalent in the {self.names[0]} family")

    def pick(self, meta: Meta) -> Arch:
        """The `Arch` this file runs on: the family's own, or the variant its metadata picks."""
        return self.variant(meta) if self.variant else self

    def make_config(self, meta: Meta) -> dict[str, Any]:
        cfg = common_config(meta)
        cfg.update(self.config(meta))
        cfg["model_type"] = self.model_type
        return cfg


@dataclass(frozen=True)
class Piece:
    """One of `count` GGUF tensors a converter cut out of one mlx-vlm parameter (Ollama's
    qwen25vl splits the fused `qkv` into attn_q/k/v and the Conv3d patch embedding into its two
    temporal halves): the engine joins them in `index` order along `axis`, each given a new
    axis there first when `stack` (the converter dropped it)."""

    index: int
    count: int
    axis: int = 0
    stack: bool = False


@dataclass(frozen=True)
class Vision:
    """A vision tower and projector carried in the model's own GGUF (Ollama's converter writes
    them into the one file; llama.cpp's go to a separate mmproj file, which this does not read):
    how they run on mlx-vlm's model of the family, the text model's names under `text`."""

    model_type: str                             # mlx-vlm's module under mlx_vlm.models
    prefixes: tuple[str, ...]                   # GGUF names of the tower and projector start so
    map_name: Callable[[str], str]              # tower/projector GGUF name -> mlx-vlm parameter name
    # (meta, the text model's mlx-lm config) -> mlx-vlm's config.json dict, plus "processor":
    # how images become pixels and tokens (size, mean/std, the image tokens, tokens per image)
    config: Callable[[Meta, dict[str, Any]], dict[str, Any]]
    text: str = "language_model."               # the text model's names sit under this prefix
    dense: frozenset[str] = frozenset()         # mlx-vlm names read as floats however stored (convs, bare parameters)
    conv: frozenset[str] = frozenset()          # torch's conv layout [out, in, kH, kW] -> MLX's [out, kH, kW, in]
    norm_offset: frozenset[str] = frozenset()   # tower/projector GGUF names stored as w + the family's offset
    piece: Callable[[str], Piece | None] = lambda name: None    # a tower GGUF name that is part of a parameter

    def present(self, meta: Meta) -> bool:
        """Whether this file carries the tower (Ollama asks `<arch>.vision.block_count`, and the
        tensors must be there)."""
        return bool(meta.get("vision.block_count")) and any(t.startswith(self.prefixes) for t in meta.tensors)


def tower_name(name: str, pattern: re.Pattern[str], layers: str, layer: Mapping[str, str],
               top: Mapping[str, str], family: str) -> str:
    """A tower GGUF name -> mlx-vlm's parameter name: `pattern`'s groups are (block, part,
    top-level name, suffix); a block's part becomes `layers` + block + `layer[part]`, a
    top-level name `top[name]`, the suffix kept. Anything else is refused naming `family`."""
    m = pattern.match(name)
    if m:
        block, part, top_name, suffix = m.groups()
        if block is not None and part in layer:
            return f"{layers}{block}.{layer[part]}.{suffix}"
        if top_name in top:
            return f"{top[top_name]}.{suffix}"
    raise Unsupported(f"GGUF tensor {name!r} has no mlx-vlm equivalent in {family}'s vision tower")


def common_config(meta: Meta) -> dict[str, Any]:
    """The keys every decoder family shares (llama.cpp's standard hyperparameter names)."""
    heads = meta.need("attention.head_count")
    hidden = meta.need("embedding_length")
    kv = meta.get("attention.head_count_kv", heads)
    if isinstance(kv, list):  # per-layer counts: only uniform ones map onto mlx-lm's classes
        if len(set(kv)) != 1:
            raise Unsupported(f"GGUF {meta.arch} with per-layer KV head counts is not supported")
        kv = kv[0]
    tokens = meta.metadata.get("tokenizer.ggml.tokens") or []
    head_dim = meta.get("attention.key_length")
    cfg: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": meta.need("block_count"),
        # all-expert files may omit the dense width; a dense family cannot
        "intermediate_size": (int(meta.get("feed_forward_length") or 0) if meta.get("expert_count")
                              else meta.need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": int(head_dim) if head_dim else hidden // heads,
        "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("context_length", 4096)),
        "vocab_size": int(meta.get("vocab_size") or len(tokens)),
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": not meta.has("output.weight"),
    }
    scaling = rope_scaling(meta)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def rope_scaling(meta: Meta) -> dict[str, Any] | None:
    """`<arch>.rope.scaling.*` -> mlx-lm's rope_scaling (linear and yarn; others refused)."""
    kind = meta.get("rope.scaling.type")
    factor = meta.get("rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and not factor):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    if kind == "yarn":
        out: dict[str, Any] = {"type": "yarn", "factor": float(factor or 1.0)}
        original = meta.get("rope.scaling.original_context_length")
        if original:
            out["original_max_position_embeddings"] = int(original)
        for key in ("beta_fast", "beta_slow"):
            if meta.get(f"rope.scaling.yarn_{key}") is not None:
                out[key] = float(meta.get(f"rope.scaling.yarn_{key}"))
        return out
    raise Unsupported(f"GGUF RoPE scaling {kind!r} ({meta.arch}) is not supported")
