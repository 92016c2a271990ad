"""GGUF -> an mlx-lm model and tokenizer, on MLX. Used by `model.load`.

Contract: `load_gguf(path, dequantize)` returns `(model, tokenizer_wrapper, spec, header,
config)`. Arrays come from `quants.read_tensor`, tensor by tensor: quantized types stay
packed (MLX affine, group size 32: K-quants repacked or re-quantized, see that module), bits
inferred per module from the shapes (files mix types: the default model's embedding is
Q8_0, the rest Q4_1); `config["_tensors"]` says how each type was loaded. llama-family Q/K rows are un-permuted back to the
Hugging Face layout (llama.cpp permuted them for GGML's interleaved RoPE), so mlx-lm's
default RoPE applies. With `dequantize` (CPU, fits the budget) quantized weights become
float32 at load (the decision is made from the header, before reading); otherwise they
stay quantized with float16 scales, on CPU too (float16 *activations* are what is ~45x
slower there), except the embedding's, whose dtype its output takes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlite.engine import quants
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


def quantized_bits(weights: dict[str, mx.array]) -> dict[str, int]:
    """{module path: bits} for every packed module (group size is 32 for GGUF)."""
    out = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            prefix = name[: -len(".scales")]
            out[prefix] = weights[f"{prefix}.weight"].shape[-1] // scales.shape[-1]
    return out


def read_weights(path: Path, header: gguf.Header, config: dict, *, dequantize: bool = False, on_cpu: bool = False,
                 report: dict | None = None) -> dict[str, mx.array]:
    """Every tensor through `quants.read_tensor`, one at a time; `report` gets {GGUF name: Tensor
    with its arrays dropped} (how each was loaded, the error of re-quantizing)."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    weights: dict[str, mx.array] = {}
    for info in header.tensors:
        name = gguf.map_name(info.name)
        prefix = name.rpartition(".")[0]
        # An embedding's scales set its output dtype, and float16 activations are slow on CPU.
        scale_dtype = mx.float32 if on_cpu and prefix == "model.embed_tokens" else mx.float16
        try:
            t = quants.read_tensor(path, info, header.data_offset, dequantize=dequantize,
                                   float_dtype=mx.float32 if on_cpu else mx.float16, scale_dtype=scale_dtype)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"cannot load GGUF tensor {info.name!r} from {path.name}: {exc}") from None
        arrays = t.arrays(prefix) if t.scales is not None else {name: t.weight}
        proj = prefix.rpartition(".")[2]
        if header.architecture in gguf.PERMUTED_QK and proj in heads and ".self_attn." in prefix:
            arrays = {k: _unpermute(v, heads[proj]) for k, v in arrays.items()}
            mx.eval(arrays)  # now, so the permuted copy is freed tensor by tensor
        weights.update(arrays)
        if report is not None:
            t.weight = t.scales = t.biases = None
            report[info.name] = t
    return weights


def load_report(report: dict) -> dict[str, dict]:
    """{GGML type: {how, tensors, bits[, max_abs_error[, mean_abs_error]]}} for the model's info."""
    out: dict[str, dict] = {}
    sums: dict[str, list[float]] = {}
    for t in report.values():
        entry = out.setdefault(t.source, {"how": t.how, "tensors": 0, "bits": t.bits})
        entry["tensors"] += 1
        if "max_abs" in t.error:
            entry["max_abs_error"] = max(entry.get("max_abs_error", 0.0), t.error["max_abs"])
        if "mean_abs" in t.error:
            acc = sums.setdefault(t.source, [0.0, 0.0])
            acc[0] += t.error["mean_abs"] * t.elements
            acc[1] += t.elements
    for source, (total, count) in sums.items():
        out[source]["mean_abs_error"] = total / max(1.0, count)
    return out


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
            {"group_size": 32, "bits": bits[p],
             "mode": "mxfp4" if weights[f"{p}.scales"].dtype == mx.uint8 else "affine"} if p in bits else False))
    if on_cpu:  # float16 activations on MLX's CPU backend are far slower; float16 scales are not
        weights = {k: (v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16)
                       and not k.endswith((".scales", ".biases")) else v) for k, v in weights.items()}
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise Unsupported(f"GGUF tensors do not fit the {config['model_type']} model: {exc}") from None
    mx.eval(model.parameters())
    return model


def build_tokenizer(spec: gguf.TokenizerSpec) -> Any:
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=spec.tokenizer, bos_token=spec.bos_token,
                                 eos_token=spec.eos_token, unk_token=spec.unk_token, pad_token=spec.pad_token,
                                 chat_template=spec.chat_template)
    detok = BPEStreamingDetokenizer if spec.kind == "bpe" else SPMStreamingDetokenizer
    return TokenizerWrapper(hf, detok, eos_token_ids=sorted(spec.eos_token_ids))


def load_gguf(path: Path, *, on_cpu: bool, float32: bool, budget: int) -> tuple[Any, Any, gguf.TokenizerSpec, gguf.Header, dict]:
    """See module doc; `float32` asks for dequantization, granted when it fits `budget`."""
    header = gguf.read_gguf(path)
    config = gguf.model_config(header)  # Unsupported names the architecture / type
    spec = gguf.build_tokenizer(header.metadata)
    dequantize = float32 and quants.float32_bytes(header) <= budget
    report: dict = {}
    weights = read_weights(path, header, config, dequantize=dequantize, on_cpu=on_cpu, report=report)
    model = build_model(config, weights, dequantize=dequantize, on_cpu=on_cpu)
    config["_dequantized"] = dequantize
    config["_tensors"] = load_report(report)
    return model, build_tokenizer(spec), spec, header, config
