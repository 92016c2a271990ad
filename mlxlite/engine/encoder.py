"""A small BERT-family encoder on MLX: the embedding models mlx-lm has no class for.

Owns `Encoder` (bert and nomic-bert, from the config an encoder `Arch` in
`formats/archs/` makes) and `build_encoder(config, weights)`, which loads the GGUF
tensors, already under the encoder's names, into it. The forward pass: token embeddings
+ token type 0's row (+ absolute positions for bert), LayerNorm, then N post-norm layers
(bidirectional attention, biased or not as the file says, rotary positions for
nomic-bert; a GELU FFN for bert, SwiGLU for nomic-bert). `Encoder.pooled(batch)` pools
the last hidden states (mean over the real tokens, the [CLS] token, or the last one) and
L2-normalizes them: one unit vector per input. Weights are float32 (encoders are small).
Never tokenizes, never generates, never reads files.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlite.errors import Unsupported


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int, *, fused: bool, bias: bool, rope_theta: float | None) -> None:
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, dims // heads, fused
        if fused:
            self.qkv = nn.Linear(dims, 3 * dims, bias=bias)
        else:
            self.query = nn.Linear(dims, dims, bias=bias)
            self.key = nn.Linear(dims, dims, bias=bias)
            self.value = nn.Linear(dims, dims, bias=bias)
        self.out = nn.Linear(dims, dims, bias=bias)
        # NEOX-style rotation (rotate half), as Nomic's non-interleaved rotary and llama.cpp apply it
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=rope_theta) if rope_theta else None

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        b, n, d = x.shape
        if self.fused:
            q, k, v = mx.split(self.qkv(x), 3, axis=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = (t.reshape(b, n, self.heads, self.head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask)
        return self.out(o.transpose(0, 2, 1, 3).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, *, kind: str, bias: bool) -> None:
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(dims, hidden, bias=bias)
        if kind == "swiglu":
            self.gate = nn.Linear(dims, hidden, bias=bias)
        self.down = nn.Linear(hidden, dims, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        if self.kind == "swiglu":
            return self.down(self.up(x) * nn.silu(self.gate(x)))
        return self.down(nn.gelu(self.up(x)))  # BERT's exact (erf) GELU


class Layer(nn.Module):
    def __init__(self, cfg: dict[str, Any], *, fused: bool, bias: bool) -> None:
        super().__init__()
        dims, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.attention = Attention(dims, cfg["num_attention_heads"], fused=fused, bias=bias,
                                   rope_theta=cfg.get("rope_theta"))
        self.attention_norm = nn.LayerNorm(dims, eps=eps)
        self.mlp = MLP(dims, cfg["intermediate_size"], kind=cfg["ffn"], bias=bias)
        self.output_norm = nn.LayerNorm(dims, eps=eps)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        h = self.attention_norm(x + self.attention(x, mask))  # post-norm, as BERT
        return self.output_norm(h + self.mlp(h))


class Body(nn.Module):
    def __init__(self, cfg: dict[str, Any], *, fused: bool, bias: bool, types: bool, positions: bool) -> None:
        super().__init__()
        dims = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], dims)
        if types:
            self.token_type_embeddings = nn.Embedding(cfg.get("type_vocab_size", 2), dims)
        if positions:
            self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], dims)
        self.embeddings_norm = nn.LayerNorm(dims, eps=cfg["layer_norm_eps"])
        self.layers = [Layer(cfg, fused=fused, bias=bias) for _ in range(cfg["num_hidden_layers"])]

    def __call__(self, ids: mx.array, mask: mx.array | None = None) -> mx.array:
        x = self.word_embeddings(ids)
        if "token_type_embeddings" in self:  # every input is segment 0
            x = x + self.token_type_embeddings.weight[0]
        if "position_embeddings" in self:
            x = x + self.position_embeddings(mx.arange(ids.shape[1]))
        x = self.embeddings_norm(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Encoder(nn.Module):
    """The encoder (see module doc); `model` holds the parameters under the Arch's names."""

    def __init__(self, cfg: dict[str, Any], *, fused: bool, bias: bool, types: bool, positions: bool) -> None:
        super().__init__()
        self.pooling = cfg["pooling"]
        self.model = Body(cfg, fused=fused, bias=bias, types=types, positions=positions)

    def pooled(self, batch: list[list[int]]) -> mx.array:
        """[len(batch), hidden] unit vectors, one per token list (padded right, masked)."""
        lengths = [len(ids) for ids in batch]
        width = max(lengths)
        ids = mx.array([ids + [0] * (width - len(ids)) for ids in batch])
        real = mx.arange(width)[None, :] < mx.array(lengths)[:, None]           # [B, L]
        mask = real[:, None, None, :] if min(lengths) < width else None          # padded keys never attended
        hidden = self.model(ids, mask).astype(mx.float32)
        if self.pooling == "cls":
            vec = hidden[:, 0]
        elif self.pooling == "last":
            vec = hidden[mx.arange(len(batch)), mx.array(lengths) - 1]
        else:
            weights = real.astype(mx.float32)[..., None]
            vec = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
        return vec / mx.maximum(mx.linalg.norm(vec, axis=-1, keepdims=True), 1e-12)


def build_encoder(config: dict[str, Any], weights: dict[str, mx.array]) -> Encoder:
    """An `Encoder` holding `weights` (encoder names, dense), all float32."""
    has = weights.__contains__
    fused = has("model.layers.0.attention.qkv.weight")
    if config.get("ffn") == "gelu" and not has("model.position_embeddings.weight"):
        raise Unsupported(f"GGUF {config['model_type']} file has no position_embd tensor")
    cfg = dict(config)
    if has("model.token_type_embeddings.weight"):
        cfg["type_vocab_size"] = weights["model.token_type_embeddings.weight"].shape[0]
    if has("model.position_embeddings.weight"):
        cfg["max_position_embeddings"] = weights["model.position_embeddings.weight"].shape[0]
    model = Encoder(cfg, fused=fused, bias=has("model.layers.0.attention.out.bias"),
                    types=has("model.token_type_embeddings.weight"),
                    positions=has("model.position_embeddings.weight"))
    try:
        model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=True)
    except ValueError as exc:
        raise Unsupported(f"GGUF tensors do not fit the {config['model_type']} encoder: {exc}") from None
    mx.eval(model.parameters())
    return model
