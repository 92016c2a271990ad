"""GGUF -> an mlx-lm model and tokenizer, on MLX. Used by `model.load`.

Contract: `load_gguf(path, dequantize)` returns `(model, tokenizer, spec, header, config)`,
the tokenizer a `GGUFTokenizer` over `tokenizers` (no transformers; `mlx_lm_tokenizer`
makes mlx-lm's wrapper of it, to run mlx-lm itself on the model). Arrays come from
`quants.read_tensor`, tensor by tensor: quantized types stay packed (MLX affine, group size 32: K-quants repacked or re-quantized, see that module), bits
inferred per module from the shapes (files mix types: the default model's embedding is
Q8_0, the rest Q4_1); `config["_tensors"]` says how each type was loaded. Names and
llama.cpp's conversion quirks come from the family's `Arch` (`formats/archs/`), applied here
by `read_weights` (and `to_mlx_names` for tensors already in memory) and `build_model`: Q/K
rows un-permuted back to the Hugging Face layout (llama.cpp permuted them for GGML's
interleaved RoPE) so mlx-lm's default RoPE applies; norm offsets subtracted (gemma);
DeepSeek-V2's split k_b/v_b joined back into kv_b_proj; tensors the text model never reads
skipped; a `rope_freqs` tensor turned into the layers' RoPE (llama3 scaling); LongRoPE
factor tensors (phi3) read into the config's `rope_scaling`. The family's `Arch` is the one
the file's metadata picks (`gguf.family`: a deepseek2 file with sigmoid routing is V3's). Encoder
families (bert, nomic-bert) are built by `encoder.build_encoder` instead, in float. With
`dequantize` (CPU, fits the budget) quantized weights become float32 at load (the decision
is made from the header, before reading); otherwise they stay quantized with float16
scales, on CPU too (float16 *activations* are what is ~45x slower there), except the
embedding's, whose dtype its output takes.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlite.engine import quants
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


def quantized_bits(weights: dict[str, mx.array]) -> dict[str, int]:
    """{module path: bits} for every packed module (group size is 32 for GGUF)."""
    out = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            prefix = name[: -len(".scales")]
            out[prefix] = weights[f"{prefix}.weight"].shape[-1] // scales.shape[-1]
    return out


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The layer index of an mlx-lm weight name ("model.layers.3.mlp..." -> 3), None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def read_weights(path: Path, header: gguf.Header, config: dict, *, dequantize: bool = False, on_cpu: bool = False,
                 report: dict | None = None, layers: tuple[int, int] | None = None,
                 outside: bool = True) -> dict[str, mx.array]:
    """Every tensor the family reads, through `quants.read_tensor` one at a time, under mlx-lm's
    names; `report` gets {GGUF name: Tensor with its arrays dropped} (how each was loaded,
    the error of re-quantizing). Tensors the family reads as RoPE settings (`Arch.rope_factors`)
    go into `config["rope_scaling"]` instead, before `build_model` makes the model from it.
    `layers` (lo, hi): only the layers in that range are read (a pipeline rank's share);
    tensors outside the layers (embedding, norm, output) are too unless `outside` is False."""
    arch = gguf.family(header)
    weights: dict[str, mx.array] = {}
    for info in header.tensors:
        if not arch.reads(info.name):
            continue
        factor = arch.rope_factors.get(info.name)  # RoPE settings, not weights: they go into the config
        name = info.name if factor else _mlx_name(arch, info.name)
        index = None if factor or layers is None else layer_of(name)
        if index is None and layers is not None and not outside:
            continue
        if index is not None and not layers[0] <= index < layers[1]:
            continue    # another rank's layer: never read, never in this process's memory
        prefix = name.rpartition(".")[0]
        # An embedding's scales set its output dtype, and float16 activations are slow on CPU.
        scale_dtype = mx.float32 if on_cpu and prefix == "model.embed_tokens" else mx.float16
        try:
            t = quants.read_tensor(path, info, header.data_offset, dequantize=dequantize or bool(factor),
                                   float_dtype=mx.float32 if on_cpu or factor else mx.float16, scale_dtype=scale_dtype)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"cannot load GGUF tensor {info.name!r} from {path.name}: {exc}") from None
        if factor:
            _put_rope_factors(config, factor, t.weight)
            continue
        arrays = t.arrays(prefix) if t.scales is not None else {name: t.weight}
        heads = _qk_heads(arch, config, prefix)
        if heads:
            arrays = {k: _unpermute(v, heads) for k, v in arrays.items()}
            mx.eval(arrays)  # now, so the permuted copy is freed tensor by tensor
        weights.update(arrays)
        if report is not None:
            t.weight = t.scales = t.biases = None
            report[info.name] = t
    _undo_quirks(weights, arch, config)
    return weights


ROPE_FREQS = "rope_freqs.weight"  # kept under its GGUF name: `build_model` turns it into RoPE


def _put_rope_factors(config: dict, key: str, factors: mx.array) -> None:
    """A factor tensor (phi3's LongRoPE) into config["rope_scaling"][key], one per rotary frequency."""
    dims = int((config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
               * config.get("partial_rotary_factor", 1.0))
    if factors.size != dims // 2:
        raise Unsupported(f"GGUF RoPE factors ({key}) have {factors.size} values for {dims} rotary dims")
    config.setdefault("rope_scaling", {})[key] = factors.astype(mx.float32).reshape(-1).tolist()


def _mlx_name(arch: archs.Arch, name: str) -> str:
    return name if name == ROPE_FREQS else arch.map_name(name)


def _qk_heads(arch: archs.Arch, config: dict, prefix: str) -> int | None:
    """The head count to un-permute a q/k projection's rows by, or None for other tensors."""
    if not arch.permute_qk or ".self_attn." not in prefix:
        return None
    return {"q_proj": config["num_attention_heads"],
            "k_proj": config["num_key_value_heads"]}.get(prefix.rpartition(".")[2])


def to_mlx_names(raw: dict[str, mx.array], header: gguf.Header, config: dict) -> dict[str, mx.array]:
    """GGUF tensors already in memory -> mlx-lm names, undoing what the family's `Arch` says
    llama.cpp did (`read_weights` does the same tensor by tensor from the file)."""
    arch = gguf.family(header)
    weights = {}
    for name, arr in raw.items():
        if name in arch.rope_factors:
            _put_rope_factors(config, arch.rope_factors[name], arr)
        elif arch.reads(name):
            key = _mlx_name(arch, name)
            heads = _qk_heads(arch, config, key.rpartition(".")[0])
            weights[key] = _unpermute(arr, heads) if heads else arr
    _undo_quirks(weights, arch, config)
    return weights


def _undo_quirks(weights: dict[str, mx.array], arch: archs.Arch, config: dict) -> None:
    if arch.norm_offset:  # norms are F32/F16 vectors in every GGUF, never packed
        for key in [k for k in weights if k.endswith("norm.weight")]:
            weights[key] = weights[key].astype(mx.float32) - arch.norm_offset
    if arch.mla_kv_b:
        _join_kv_b(weights, config)


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
        if isinstance(layer, Absent):
            continue
        layer.self_attn.rope = FactorRoPE(dims, float(config["rope_theta"]), factors)


def dequantize_all(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Every packed module's weight as float32, in place (its scales and biases dropped)."""
    for prefix, b in quantized_bits(weights).items():
        scales = weights.pop(f"{prefix}.scales").astype(mx.float32)
        biases = weights.pop(f"{prefix}.biases").astype(mx.float32)
        weights[f"{prefix}.weight"] = mx.dequantize(weights[f"{prefix}.weight"], scales, biases,
                                                    group_size=32, bits=b)
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


class Absent(nn.Module):
    """A layer another rank of a pipeline holds: no parameters, never called (`distributed.shard`
    keeps only this rank's range of the layer list, which keeps its length and indices)."""


def _model_class(config: dict) -> tuple[Any, Any]:
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return module.Model, module.ModelArgs


def skeleton(config: dict) -> nn.Module:
    """The model with the constructor's random weights, which are lazy: no memory until evaluated,
    and never evaluated once replaced."""
    model_cls, args_cls = _model_class(config)
    return model_cls(args_cls.from_dict(config))


def layer_owner(model: nn.Module) -> nn.Module | None:
    """The module whose `layers` child is the model's list of layers (an mlx-lm `Model`'s `layers`
    is often a property over its inner model's), or None."""
    for owner in (getattr(model, "model", None), model):
        if isinstance(owner, nn.Module) and "layers" in owner and isinstance(owner["layers"], list):
            return owner
    return None


@contextmanager
def only_layers(model: nn.Module, layers: list) -> Iterator[None]:
    """The model seen with `layers` as its whole list of layers for the time of the block (to load
    or shard the parts outside the layers, or one layer at a time)."""
    owner = layer_owner(model)
    if owner is None:
        raise Unsupported(f"{type(model).__module__} keeps no list of layers to load one at a time")
    whole = owner.layers
    owner.layers = layers
    try:
        yield
    finally:
        owner.layers = whole


def probe(config: dict, header: gguf.Header, dequantize: bool) -> nn.Module:
    """The skeleton shaped as the loaded model will be: the modules the file keeps packed are
    quantized (groups of 32, as `quants` packs them), so a split tried on it fails where the
    loaded model's would (a packed width whose groups don't divide among the ranks)."""
    model = skeleton(config)
    if not dequantize:
        arch = gguf.family(header)
        packed = {_mlx_name(arch, t.name).rpartition(".")[0] for t in header.tensors
                  if arch.reads(t.name) and t.name not in arch.rope_factors and quants.stays_packed(t.type_name)}
        nn.quantize(model, class_predicate=lambda p, m: (
            {"group_size": quants.GROUP, "bits": 8} if p in packed and hasattr(m, "to_quantized") else False))
    return model


@dataclass
class Share:
    """What one rank of a group reads of a GGUF, decided before any weight is (`distributed.layer_pick`)."""
    layers: tuple[int, int] | None = None               # a pipeline stage: only these layers are read
    split: Callable[[nn.Module], None] | None = None    # tensor parallel: shards the model's layers (all it shards)

    @property
    def mode(self) -> str:
        return "tensor" if self.split is not None else "pipeline"


def _fit(model: nn.Module, module: nn.Module, prefix: str, weights: dict[str, mx.array], config: dict, *,
         dequantize: bool, on_cpu: bool) -> dict[str, mx.array]:
    """`weights` (full names, all under `prefix`) made ready for `module.load_weights`: mlx-lm's
    `sanitize`, packed modules quantized in `module` or dequantized, floats made float32 on CPU, a
    tied output dropped; returned under names relative to `module`."""
    if hasattr(model, "sanitize"):  # as mlx-lm's own loader: drops a tied lm_head, marks gemma3's tie
        weights = model.sanitize(weights)
    bits = quantized_bits(weights)
    if dequantize:
        dequantize_all(weights)
    elif bits:
        nn.quantize(module, class_predicate=lambda p, m: (
            {"group_size": 32, "bits": bits[prefix + p],
             "mode": "mxfp4" if weights[f"{prefix}{p}.scales"].dtype == mx.uint8 else "affine"}
            if prefix + p in bits else False))
    if on_cpu:  # float16 activations on MLX's CPU backend are far slower; float16 scales are not
        weights = {k: (v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16)
                       and not k.endswith((".scales", ".biases")) else v) for k, v in weights.items()}
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    return {k[len(prefix):]: v for k, v in weights.items()}


def load_into(model: nn.Module, module: nn.Module, prefix: str, weights: dict[str, mx.array], config: dict, *,
              dequantize: bool, on_cpu: bool) -> None:
    """`weights` (full names under `prefix`) made ready by `_fit` and loaded into `module` (the
    model itself, or one of its layers), strictly: a missing, extra or misshapen tensor is an error."""
    ready = _fit(model, module, prefix, weights, config, dequantize=dequantize, on_cpu=on_cpu)
    try:
        module.load_weights(list(ready.items()), strict=True)
    except ValueError as exc:
        raise Unsupported(f"GGUF tensors do not fit the {config['model_type']} model: {exc}") from None


def build_model(config: dict, weights: dict[str, mx.array], *, dequantize: bool, on_cpu: bool,
                layers: tuple[int, int] | None = None) -> nn.Module:
    """The model with `weights` loaded; with `layers` (lo, hi) the layers outside that range
    are `Absent` (their weights were never read: `read_weights(layers=...)`)."""
    model = skeleton(config)
    if layers is not None:
        owner = layer_owner(model)   # not `model.layers`: mlx-lm's pipeline models hand out a copy
        stack = owner.layers if owner is not None else []
        for i in range(len(stack)):
            if not layers[0] <= i < layers[1]:
                stack[i] = Absent()
    rope_freqs = weights.pop(ROPE_FREQS, None)
    load_into(model, model, "", weights, config, dequantize=dequantize, on_cpu=on_cpu)
    if rope_freqs is not None:
        _apply_rope_freqs(model, config, rope_freqs)
    mx.eval(model.parameters())
    return model


def build_split(path: Path, header: gguf.Header, config: dict, report: dict, *, dequantize: bool, on_cpu: bool,
                split: Callable[[nn.Module], None]) -> nn.Module:
    """The model read one layer at a time, each layer handed to `split` (a tensor-parallel rank's
    `shard`) as soon as it is loaded and only its slices kept: the rank holds its share plus one
    whole layer at most, never the whole model. The parts outside the layers are read whole."""
    model = skeleton(config)
    owner = layer_owner(model)
    stack = list(owner.layers) if owner is not None else []
    kw = {"dequantize": dequantize, "on_cpu": on_cpu}
    outer = read_weights(path, header, config, report=report, layers=(0, 0), **kw)
    rope_freqs = outer.pop(ROPE_FREQS, None)
    with only_layers(model, []):
        load_into(model, model, "", outer, config, **kw)
    del outer
    for i, layer in enumerate(stack):
        weights = read_weights(path, header, config, report=report, layers=(i, i + 1), outside=False, **kw)
        match = next((m for m in map(_LAYER.search, weights) if m), None)
        prefix = match.string[:match.end()] if match else f"model.layers.{i}."
        load_into(model, layer, prefix, weights, config, **kw)
        del weights
        with only_layers(model, [layer]):
            split(model)
        mx.eval(layer.parameters())     # the slices now, so the whole tensors are freed layer by layer
    if rope_freqs is not None:
        _apply_rope_freqs(model, config, rope_freqs)
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
    from mlx_lm.tokenizer_utils import (
        BPEStreamingDetokenizer,
        NaiveStreamingDetokenizer,
        SPMStreamingDetokenizer,
        TokenizerWrapper,
    )
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token=tokenizer.bos_token,
                                 eos_token=tokenizer.eos_token)
    detok = {"bpe": BPEStreamingDetokenizer, "spm": SPMStreamingDetokenizer}.get(tokenizer.kind, NaiveStreamingDetokenizer)
    return TokenizerWrapper(hf, detok, eos_token_ids=list(tokenizer.eos_token_ids))


def load_gguf(path: Path, *, on_cpu: bool, float32: bool, budget: int,
              pick: Callable[[nn.Module], Share | None] | None = None, header: gguf.Header | None = None,
              ) -> tuple[Any, Any, gguf.TokenizerSpec, gguf.Header, dict]:
    """See module doc; `float32` asks for dequantization, granted when it fits `budget`;
    `header`: the file's, when the caller read it already.
    `pick(model)` (a rank's, `distributed.layer_pick`) looks at the model before any weight is
    read and says what this rank reads: a pipeline stage's layers, or every layer split as it is
    read; `config["_share"]` says which ("pipeline", "tensor": the model comes back split), or None."""
    header = header or gguf.read_gguf(path)
    config = gguf.model_config(header)  # Unsupported names the architecture / type
    spec = gguf.build_tokenizer(header.metadata)
    arch = gguf.family(header)
    # Encoders (bert family: small) run in float32; the rest stay packed unless float32 fits.
    dequantize = arch.encoder or (float32 and quants.float32_bytes(header) <= budget)
    share = pick(probe(config, header, dequantize)) if pick is not None and not arch.encoder else None
    report: dict = {}
    if share is not None and share.split is not None:
        model = build_split(path, header, config, report, dequantize=dequantize, on_cpu=on_cpu, split=share.split)
    else:
        layers = share.layers if share is not None else None
        weights = read_weights(path, header, config, dequantize=dequantize, on_cpu=on_cpu or arch.encoder,
                               report=report, layers=layers)
        if arch.encoder:
            model = build_encoder(config, weights)  # read as floats: dequantize is on
        else:
            model = build_model(config, weights, dequantize=dequantize, on_cpu=on_cpu, layers=layers)
    config["_share"] = share.mode if share is not None else None
    config["_dequantized"] = dequantize
    config["_tensors"] = load_report(report)
    return model, GGUFTokenizer(spec), spec, header, config
