"""GGUF -> an mlx-lm model and tokenizer, on MLX. Used by `model.load`.

Contract: `load_gguf(path, dequantize)` returns `(model, tokenizer, spec, header, config)`,
the tokenizer a `GGUFTokenizer` over `tokenizers` (no transformers; `mlx_lm_tokenizer`
makes mlx-lm's wrapper of it, to run mlx-lm itself on the model). Arrays come from
`mx.load`: Q4_0/Q4_1/Q8_0 arrive packed (affine, group size 32), bits inferred per module
from the shapes (files mix types: the default model's embedding is Q8_0, the rest Q4_1). llama-family Q/K rows are un-permuted back to the
Hugging Face layout (llama.cpp permuted them for GGML's interleaved RoPE), so mlx-lm's
default RoPE applies. With `dequantize` (CPU, fits the budget) quantized weights become
float32 at load; otherwise they stay quantized and, on CPU, scales are float32 anyway
(float16 quantized matmul on CPU is ~45x slower).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats import gguf


def _unpermute(w: mx.array, heads: int) -> mx.array:
    """Inverse of llama.cpp's `permute` (rows only, so it works on packed weights too)."""
    rows = w.shape[0]
    if rows % heads or (rows // heads) % 2:
        raise Unsupported(f"GGUF Q/K tensor with {rows} rows does not split into {heads} heads")
    d = rows // heads
    rest = w.shape[1:]
    return w.reshape(heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def float32_bytes(weights: dict[str, mx.array]) -> int:
    """Bytes the weights take once every quantized matrix is float32."""
    total = 0
    for name, w in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix and f"{prefix}.scales" in weights:
            total += w.shape[0] * weights[f"{prefix}.scales"].shape[-1] * 32 * 4
        else:
            total += w.size * 4
    return total


def quantized_bits(weights: dict[str, mx.array]) -> dict[str, int]:
    """{module path: bits} for every packed module (group size is 32 for GGUF)."""
    out = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            prefix = name[: -len(".scales")]
            out[prefix] = weights[f"{prefix}.weight"].shape[-1] // scales.shape[-1]
    return out


def read_weights(path: Path, header: gguf.Header, config: dict) -> dict[str, mx.array]:
    try:
        raw = mx.load(str(path), format="gguf")  # blobs have no extension
    except (RuntimeError, ValueError) as exc:
        raise BadRequest(f"cannot load GGUF tensors from {path.name}: {exc}") from None
    weights = {gguf.map_name(name): arr for name, arr in raw.items()}
    if header.architecture in gguf.PERMUTED_QK:
        for i in range(config["num_hidden_layers"]):
            for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
                for suffix in ("weight", "scales", "biases", "bias"):
                    key = f"model.layers.{i}.self_attn.{proj}.{suffix}"
                    if key in weights:
                        weights[key] = _unpermute(weights[key], heads)
    return weights


def build_model(config: dict, weights: dict[str, mx.array], *, dequantize: bool, on_cpu: bool) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    bits = quantized_bits(weights)
    if dequantize:
        for prefix, b in bits.items():
            scales = weights.pop(f"{prefix}.scales").astype(mx.float32)
            biases = weights.pop(f"{prefix}.biases").astype(mx.float32)
            weights[f"{prefix}.weight"] = mx.dequantize(weights[f"{prefix}.weight"], scales, biases,
                                                        group_size=32, bits=b)
    elif bits:
        nn.quantize(model, class_predicate=lambda p, m: (
            {"group_size": 32, "bits": bits[p]} if p in bits else False))
    if on_cpu:  # float16 anything on MLX's CPU backend is far slower than float32
        weights = {k: (v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v)
                   for k, v in weights.items()}
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise Unsupported(f"GGUF tensors do not fit the {config['model_type']} model: {exc}") from None
    mx.eval(model.parameters())
    return model


class GGUFTokenizer:
    """What the engine asks of a tokenizer (`encode`, `decode`, `eos_token_ids`, the
    `tokenizers` backend for the byte table), straight over the `tokenizers.Tokenizer` built
    from the GGUF metadata. transformers' PreTrainedTokenizerFast wrapped it before and added
    nothing used here but its import (seconds, torch included where installed)."""

    def __init__(self, spec: gguf.TokenizerSpec) -> None:
        from tokenizers import AddedToken

        tok = spec.tokenizer
        named = [t for t in (spec.bos_token, spec.eos_token, spec.unk_token, spec.pad_token) if t]
        # As PreTrainedTokenizerFast did: the named tokens match whole in text, whatever their type.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(named)])
        self.backend_tokenizer = tok
        self.bos_token, self.eos_token = spec.bos_token, spec.eos_token
        self.eos_token_ids = sorted(spec.eos_token_ids)
        self.kind = spec.kind

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=False)


def mlx_lm_tokenizer(tokenizer: GGUFTokenizer) -> Any:
    """mlx-lm's TokenizerWrapper over the same tokenizer, for running mlx-lm itself on a GGUF
    model (benchmarks and reference tests compare against it). Imports transformers."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token=tokenizer.bos_token,
                                 eos_token=tokenizer.eos_token)
    detok = BPEStreamingDetokenizer if tokenizer.kind == "bpe" else SPMStreamingDetokenizer
    return TokenizerWrapper(hf, detok, eos_token_ids=list(tokenizer.eos_token_ids))


def load_gguf(path: Path, *, on_cpu: bool, float32: bool, budget: int) -> tuple[Any, Any, gguf.TokenizerSpec, gguf.Header, dict]:
    """See module doc; `float32` asks for dequantization, granted when it fits `budget`."""
    header = gguf.read_gguf(path)
    config = gguf.model_config(header)  # Unsupported names the architecture / type
    spec = gguf.build_tokenizer(header.metadata)
    weights = read_weights(path, header, config)
    dequantize = float32 and float32_bytes(weights) <= budget
    model = build_model(config, weights, dequantize=dequantize, on_cpu=on_cpu)
    config["_dequantized"] = dequantize
    return model, GGUFTokenizer(spec), spec, header, config
