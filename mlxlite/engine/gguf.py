"""GGUF -> an mlx-lm model and tokenizer, on MLX. Used by `model.load`.

Contract: `load_gguf(path, dequantize)` returns `(model, tokenizer_wrapper, spec, header,
config)`. Arrays come from `mx.load`: Q4_0/Q4_1/Q8_0 arrive packed (affine, group size
32), bits inferred per module from the shapes (files mix types: the default model's
embedding is Q8_0, the rest Q4_1). Names and llama.cpp's conversion quirks come from the
family's `Arch` (`formats/archs/`), applied here by `to_mlx_names` and `build_model`: Q/K
rows un-permuted back to the Hugging Face layout (llama.cpp permuted them for GGML's
interleaved RoPE) so mlx-lm's default RoPE applies; norm offsets subtracted (gemma);
DeepSeek's split k_b/v_b joined back into kv_b_proj; tensors the text model never reads
skipped; a `rope_freqs` tensor turned into the layers' RoPE (llama3 scaling). Encoder
families (bert, nomic-bert) are built by `encoder.build_encoder` instead, dequantized. With
`dequantize` (CPU, fits the budget) quantized weights become float32 at load; otherwise
they stay quantized and, on CPU, scales are float32 anyway (float16 quantized matmul on
CPU is ~45x slower).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlite.engine.encoder import build_encoder
from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats import archs, gguf


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
        if prefix and f"{prefix}.scales" in weights:  # one scale per 32 values, experts' 3-D stacks included
            total += weights[f"{prefix}.scales"].size * 32 * 4
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
    return to_mlx_names(raw, header, config)


ROPE_FREQS = "rope_freqs.weight"  # kept under its GGUF name: `build_model` turns it into RoPE


def to_mlx_names(raw: dict[str, mx.array], header: gguf.Header, config: dict) -> dict[str, mx.array]:
    """GGUF tensors -> mlx-lm names, undoing what the family's `Arch` says llama.cpp did."""
    arch = archs.get(header.architecture)
    weights = {(name if name == ROPE_FREQS else arch.map_name(name)): arr for name, arr in raw.items()
               if arch.reads(name)}
    if arch.permute_qk:
        for i in range(config["num_hidden_layers"]):
            for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
                for suffix in ("weight", "scales", "biases", "bias"):
                    key = f"model.layers.{i}.self_attn.{proj}.{suffix}"
                    if key in weights:
                        weights[key] = _unpermute(weights[key], heads)
    if arch.norm_offset:  # norms are F32/F16 vectors in every GGUF, never packed
        for key in [k for k in weights if k.endswith("norm.weight")]:
            weights[key] = weights[key].astype(mx.float32) - arch.norm_offset
    if arch.mla_kv_b:
        _join_kv_b(weights, config)
    return weights


def _dense(weights: dict[str, mx.array], prefix: str) -> mx.array | None:
    """Pop one module's weight as float32, dequantizing it if it arrived packed."""
    w = weights.pop(f"{prefix}.weight", None)
    scales = weights.pop(f"{prefix}.scales", None)
    biases = weights.pop(f"{prefix}.biases", None)
    if w is None or scales is None:
        return None if w is None else w.astype(mx.float32)
    return mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32,
                         bits=w.shape[-1] // scales.shape[-1])


def _join_kv_b(weights: dict[str, mx.array], config: dict) -> None:
    """llama.cpp writes DeepSeek's kv_b_proj as k_b [heads, kv_lora, nope] (transposed per head)
    and v_b [heads, v, kv_lora] for its MLA kernels; mlx-lm wants [heads * (nope + v), kv_lora]."""
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}.self_attn"
        k_b, v_b = _dense(weights, f"{prefix}.k_b_proj"), _dense(weights, f"{prefix}.v_b_proj")
        if k_b is None or v_b is None or f"{prefix}.kv_b_proj.weight" in weights:
            continue
        kv = mx.concatenate([k_b.swapaxes(1, 2), v_b], axis=1)
        weights[f"{prefix}.kv_b_proj.weight"] = kv.reshape(-1, kv.shape[-1])


class FactorRoPE(nn.Module):
    """RoPE whose per-frequency periods are multiplied by GGUF `rope_freqs` factors, as
    llama.cpp applies them (llama3 scaling is stored this way, not as metadata)."""

    def __init__(self, dims: int, base: float, factors: mx.array) -> None:
        super().__init__()
        self.dims = dims
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        self._freqs = periods * factors.astype(mx.float32)  # underscore: not a parameter

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


def _apply_rope_freqs(model: nn.Module, config: dict, factors: mx.array) -> None:
    dims = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if factors.size != dims // 2:
        raise Unsupported(f"GGUF rope_freqs has {factors.size} factors for head size {dims}")
    for layer in model.layers:
        layer.self_attn.rope = FactorRoPE(dims, float(config["rope_theta"]), factors)


def dequantize_all(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Every packed module's weight as float32, in place (its scales and biases dropped)."""
    for prefix, b in quantized_bits(weights).items():
        scales = weights.pop(f"{prefix}.scales").astype(mx.float32)
        biases = weights.pop(f"{prefix}.biases").astype(mx.float32)
        weights[f"{prefix}.weight"] = mx.dequantize(weights[f"{prefix}.weight"], scales, biases,
                                                    group_size=32, bits=b)
    return weights


def build_model(config: dict, weights: dict[str, mx.array], *, dequantize: bool, on_cpu: bool) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    rope_freqs = weights.pop(ROPE_FREQS, None)
    if hasattr(model, "sanitize"):  # as mlx-lm's own loader: drops a tied lm_head, marks gemma3's tie
        weights = model.sanitize(weights)
    bits = quantized_bits(weights)
    if dequantize:
        dequantize_all(weights)
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
    if rope_freqs is not None:
        _apply_rope_freqs(model, config, rope_freqs)
    mx.eval(model.parameters())
    return model


def build_tokenizer(spec: gguf.TokenizerSpec) -> Any:
    from mlx_lm.tokenizer_utils import (
        BPEStreamingDetokenizer,
        NaiveStreamingDetokenizer,
        SPMStreamingDetokenizer,
        TokenizerWrapper,
    )
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=spec.tokenizer, bos_token=spec.bos_token,
                                 eos_token=spec.eos_token, unk_token=spec.unk_token, pad_token=spec.pad_token,
                                 chat_template=spec.chat_template)
    detok = {"bpe": BPEStreamingDetokenizer, "spm": SPMStreamingDetokenizer}.get(spec.kind, NaiveStreamingDetokenizer)
    return TokenizerWrapper(hf, detok, eos_token_ids=sorted(spec.eos_token_ids))


def load_gguf(path: Path, *, on_cpu: bool, float32: bool, budget: int) -> tuple[Any, Any, gguf.TokenizerSpec, gguf.Header, dict]:
    """See module doc; `float32` asks for dequantization, granted when it fits `budget`."""
    header = gguf.read_gguf(path)
    config = gguf.model_config(header)  # Unsupported names the architecture / type
    spec = gguf.build_tokenizer(header.metadata)
    weights = read_weights(path, header, config)
    if archs.get(header.architecture).encoder:  # bert family: our encoder, float32 (small models)
        model, dequantize = build_encoder(config, dequantize_all(weights)), True
    else:
        dequantize = float32 and float32_bytes(weights) <= budget
        model = build_model(config, weights, dequantize=dequantize, on_cpu=on_cpu)
    config["_dequantized"] = dequantize
    return model, build_tokenizer(spec), spec, header, config
