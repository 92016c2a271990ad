"""Tiny random models of every GGUF family we run, written the way llama.cpp writes them.

`make_family(name, qtype, root)` builds a tiny transformers model of the family (random
weights, norms and biases included, seeded), converts it to GGUF as llama.cpp's
`convert_hf_to_gguf.py` would, and returns a `Built`:
  - tensor names come from the `gguf` package's own `TensorNameMap` (llama.cpp's table,
    not ours), metadata keys from `GGUFWriter`'s typed `add_*` methods;
  - the value quirks of llama.cpp's converter are applied here, independently of the
    loader: Q/K rows permuted (llama, granite), norms stored as 1 + w (gemma), experts
    stacked per layer (`ffn_{gate,up,down}_exps`), llama3 RoPE scaling as `rope_freqs`;
  - 2-D and 3-D weights are written in `qtype` (F32, Q4_0, Q4_1, Q8_0, by `gguf.quants`);
    norms, biases and the MoE router stay F32, as llama.cpp keeps them;
  - `reference` is the same transformers model holding exactly the values the GGUF holds
    (dequantized by `gguf.quants` and un-transformed), for families transformers cannot
    read from GGUF itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.tiny_models import build_tokenizer, gguf_tokenizer_metadata, random_blocks

HIDDEN, INTER, HEADS, KV, HEAD_DIM, LAYERS, CTX = 64, 128, 4, 2, 16, 2, 256


@dataclass
class Family:
    arch: str                       # general.architecture
    hf: dict[str, Any]              # transformers config
    permute_qk: bool = False        # llama.cpp's LlamaModel.permute on Q/K rows
    norm_shift: float = 0.0         # llama.cpp writes norm weights + this (gemma)
    transformers_gguf: bool = True  # transformers' GGUF reader knows this family
    meta: dict[str, Any] = field(default_factory=dict)  # extra GGUFWriter add_* calls
    llama3_rope: bool = False


def _base(model_type: str, **kw) -> dict[str, Any]:
    cfg = dict(model_type=model_type, hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=INTER,
               num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM, max_position_embeddings=CTX,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    cfg.update(kw)
    return cfg


def _longrope_factors(n: int = 24) -> tuple[list[float], list[float]]:
    """Phi-3-like LongRoPE factors for 24 rotary frequencies (head 64 at 0.75): long ones
    growing to ~40x, short ones near 1 (seeded, so every build writes the same)."""
    rng = np.random.default_rng(7)
    long = np.sort(rng.uniform(1.0, 40.0, n)).astype(np.float32)
    short = rng.uniform(1.0, 1.3, n).astype(np.float32)
    return [float(x) for x in long], [float(x) for x in short]


LONGROPE = _longrope_factors()

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", _base("llama", attention_bias=False), permute_qk=True),
    "llama3": Family("llama", _base("llama", rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}), permute_qk=True, llama3_rope=True),
    "qwen2": Family("qwen2", _base("qwen2", rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": Family("qwen3", _base("qwen3", rope_theta=1e6, head_dim=32)),
    "qwen3moe": Family("qwen3moe", _base("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[])),
    "gemma2": Family("gemma2", _base("gemma2", head_dim=32, query_pre_attn_scalar=32, sliding_window=4096,
                                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                     hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
                     norm_shift=1.0),
    "gemma3": Family("gemma3", _base("gemma3_text", num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                                     sliding_window=4, rope_theta=1e6, rope_local_base_freq=10000.0,
                                     hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                     final_logit_softcapping=None, attn_logit_softcapping=None),
                     norm_shift=1.0),
    "phi3": Family("phi3", _base("phi3", partial_rotary_factor=0.5, pad_token_id=0)),
    "granite": Family("granite", _base("granite", embedding_multiplier=12.0, residual_multiplier=0.22,
                                       attention_multiplier=0.0078125, logits_scaling=8.0),
                      permute_qk=True, transformers_gguf=False),
    "olmo2": Family("olmo2", _base("olmo2", rope_theta=500000.0), transformers_gguf=False),
    "gpt-oss": Family("gpt-oss", _base("gpt_oss", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                       sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
                      transformers_gguf=False),
    "deepseek2": Family("deepseek2", _base("deepseek_v2", num_attention_heads=4, num_key_value_heads=4,
                                           moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                           num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32,
                                           q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                                           topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.5,
                                           rms_norm_eps=1e-6, head_dim=16),
                        transformers_gguf=False),
    "deepseek2-qlora": Family("deepseek2", _base("deepseek_v2", num_attention_heads=4, num_key_value_heads=4,
                                                 moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=2,
                                                 num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=64,
                                                 q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                                 v_head_dim=32, topk_method="greedy", n_group=1, topk_group=1,
                                                 rms_norm_eps=1e-6, head_dim=16),
                              transformers_gguf=False),
    # Phi-4-mini shaped (Phi-3-128k's LongRoPE, 0.75 partial rotary, GQA, tied embeddings), 256
    # wide so Q4_K blocks fit. original_max_position_embeddings 8 < the test prompt, so the long
    # factors are the ones used.
    "phi3-longrope": Family("phi3", _base("phi3", hidden_size=256, intermediate_size=256, head_dim=64,
                                          partial_rotary_factor=0.75, pad_token_id=0, tie_word_embeddings=True,
                                          original_max_position_embeddings=8, rope_scaling={
                                              "rope_type": "longrope", "long_factor": LONGROPE[0],
                                              "short_factor": LONGROPE[1]})),
    # DeepSeek-V3 / R1 shaped: sigmoid routing with score biases, group-limited, normalised top-k,
    # a low-rank query; 256 wide so Q4_K blocks fit where llama.cpp would put them.
    "deepseek3": Family("deepseek2", _base("deepseek_v3", hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                           moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
                                           num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                                           kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                           v_head_dim=64, routed_scaling_factor=2.5, norm_topk_prob=True,
                                           rms_norm_eps=1e-6),
                        transformers_gguf=False),
    "starcoder2": Family("starcoder2", _base("starcoder2", norm_epsilon=1e-5, rope_theta=100000.0, use_bias=True,
                                             tie_word_embeddings=True)),
}
QTYPES = ("F32", "Q4_0", "Q4_1", "Q8_0")
# K-quants need rows of 256: the families built that wide are written in Q4_K too, where a
# narrower tensor falls back as llama.cpp's quantizer does (Q4_K -> Q5_0).
KQUANT_FAMILIES = ("phi3-longrope", "deepseek3")
KQUANT_FALLBACK = {"Q4_K": "Q5_0"}


@dataclass
class Built:
    path: Path                  # the GGUF file
    reference: Any              # transformers model holding the GGUF's values (float32)
    config: Any                 # its transformers config


def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: Any) -> np.ndarray:
    """llama.cpp's `rope_freqs` for rope_type llama3 (LlamaModel.generate_extra_tensors)."""
    rs = cfg.rope_parameters
    base, dim = rs["rope_theta"], cfg.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], \
        rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _randomize(model, seed: int) -> None:
    """Random weights everywhere, norms and biases included (an all-ones norm hides offset bugs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.add_(0.2 * noise)  # keeps the family's own base (1 for most, 0 for gemma)
            elif name.endswith("bias") or "sinks" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (0.5 if "embed" in name else 0.15))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's router bias: a buffer, zero at init
                b.copy_(0.5 * torch.randn(b.shape, generator=gen))


def _expert_tensors(hf_name: str, w: np.ndarray, in_out: bool):
    """transformers 5 keeps experts fused per layer; llama.cpp writes gate, up and down stacked
    as [experts, out, in]. Returns ([(gguf name, array)], inverse(*stored) -> HF array), or
    None for any other tensor. `in_out`: the checkpoint stores experts [experts, in, out] with
    gate/up interleaved (gpt-oss); otherwise [experts, out, in], gate before up (qwen3moe)."""
    blk = f"blk.{hf_name.split('.')[2]}." if hf_name.startswith("model.layers.") else ""
    if hf_name.endswith(".mlp.experts.gate_up_proj_bias"):
        return ([(blk + "ffn_gate_exps.bias", w[:, ::2]), (blk + "ffn_up_exps.bias", w[:, 1::2])],
                lambda g, u: np.stack([g, u], axis=-1).reshape(w.shape))
    if hf_name.endswith(".mlp.experts.down_proj_bias"):
        return [(blk + "ffn_down_exps.bias", w)], lambda d: d
    if hf_name.endswith(".mlp.experts.gate_up_proj") and in_out:
        t = w.transpose(0, 2, 1)
        return ([(blk + "ffn_gate_exps.weight", t[:, ::2]), (blk + "ffn_up_exps.weight", t[:, 1::2])],
                lambda g, u: np.stack([g, u], axis=2).reshape(t.shape).transpose(0, 2, 1))
    if hf_name.endswith(".mlp.experts.gate_up_proj"):
        half = w.shape[1] // 2
        return ([(blk + "ffn_gate_exps.weight", w[:, :half]), (blk + "ffn_up_exps.weight", w[:, half:])],
                lambda g, u: np.concatenate([g, u], axis=1))
    if hf_name.endswith(".mlp.experts.down_proj") and in_out:
        return [(blk + "ffn_down_exps.weight", w.transpose(0, 2, 1))], lambda d: d.transpose(0, 2, 1)
    if hf_name.endswith(".mlp.experts.down_proj"):
        return [(blk + "ffn_down_exps.weight", w)], lambda d: d
    if hf_name.endswith(".self_attn.sinks"):  # llama.cpp appends .weight to the bare parameter
        return [(blk + "attn_sinks.weight", w)], lambda x: x
    return None


def _mla_split(hf_name: str, w: np.ndarray, cfg: Any):
    """llama.cpp's DeepseekV2Model: kv_b_proj -> k_b (transposed per head) and v_b."""
    if not hf_name.endswith("self_attn.kv_b_proj.weight"):
        return None
    heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    kv = w.reshape(heads, nope + v, w.shape[-1])
    blk = f"blk.{hf_name.split('.')[2]}."
    return ([(blk + "attn_k_b.weight", np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1))),
             (blk + "attn_v_b.weight", np.ascontiguousarray(kv[:, nope:]))],
            lambda k_b, v_b: np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(w.shape))


def _kquant_blocks(qtype: str, arr: np.ndarray, rng) -> np.ndarray:
    """Random valid `qtype` blocks shaped [*lead, bytes] for `arr`'s shape, values near its range.
    Super-scales d and dmin are powers of two, so d * sc (sc < 64) is exact in float16 and
    MLX's float16 scales on the packed path hold the file's values exactly (rounding them is
    tests/engine/test_quants.py's to bound, not this file's)."""
    import gguf

    per, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
    rows = int(np.prod(arr.shape[:-1]))
    raw = random_blocks(qtype, rows, arr.shape[-1], rng, amplitude=3 * float(arr.std()))
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, size).copy()
    for at in (0, 2):  # Q4_K/Q5_K: d, then dmin, as float16
        d = blocks[:, at:at + 2].view(np.float16).astype(np.float32)
        blocks[:, at:at + 2] = (2.0 ** np.round(np.log2(d))).astype(np.float16).view(np.uint8)
    return blocks.reshape(*arr.shape[:-1], -1)


def _gguf_name(name_map, hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    found = name_map.get_name(base)
    if found is None:
        raise KeyError(f"gguf's TensorNameMap has no name for {hf_name}")
    return f"{found}.{suffix}"


def _put_metadata(w, fam: Family, cfg: Any, vocab_meta: dict) -> None:
    import gguf

    c = cfg
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1 if fam.arch == "deepseek2" else c.num_key_value_heads)
    rope = c.rope_parameters
    theta = rope["full_attention"]["rope_theta"] if "full_attention" in rope else rope["rope_theta"]
    w.add_rope_freq_base(float(theta))
    if fam.arch == "starcoder2":
        w.add_layer_norm_eps(c.norm_epsilon)
    else:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if fam.arch == "deepseek2":  # llama.cpp's DeepseekV2Model: MLA as MQA with wide heads
        w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        w.add_value_length(c.kv_lora_rank)
        w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
        w.add_value_length_mla(c.v_head_dim)
        w.add_rope_dimension_count(c.qk_rope_head_dim)
        w.add_leading_dense_block_count(c.first_k_dense_replace)
        if c.q_lora_rank:
            w.add_q_lora_rank(c.q_lora_rank)
        w.add_kv_lora_rank(c.kv_lora_rank)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_shared_count(c.n_shared_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_weights_scale(c.routed_scaling_factor)
        w.add_expert_weights_norm(c.norm_topk_prob)
        if c.model_type == "deepseek_v3":  # llama.cpp's DeepseekV2Model on a V3 checkpoint
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
            w.add_expert_group_count(c.n_group)
            w.add_expert_group_used_count(c.topk_group)
        else:
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(int(head_dim * getattr(c, "partial_rotary_factor", 1.0)))
    if fam.arch == "phi3" and c.rope_parameters.get("rope_type") == "longrope":
        # llama.cpp's Phi3MiniModel: the pretraining context and the attention factor it implies
        orig = c.original_max_position_embeddings
        scale = c.max_position_embeddings / orig
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)
    if fam.arch == "qwen3moe":
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if fam.arch == "gpt-oss":
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.intermediate_size)
        w.add_sliding_window(c.sliding_window)
    if fam.arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    if fam.arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
    if fam.arch == "granite":
        w.add_attention_scale(c.attention_multiplier)
        w.add_embedding_scale(c.embedding_multiplier)
        w.add_residual_scale(c.residual_multiplier)
        w.add_logit_scale(c.logits_scaling)
    for key, value in vocab_meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)


def make_family(name: str, qtype: str, root: Path, seed: int = 0, mla_split: bool = True) -> Built:
    """See the module doc; `mla_split=False` writes DeepSeek's kv_b_proj whole (`attn_kv_b`),
    as llama.cpp did before it split it into k_b and v_b."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = FAMILIES[name]
    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    hf_cfg = dict(fam.hf)
    model_type = hf_cfg.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, bos_token_id=None, eos_token_id=None, **hf_cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    _randomize(model, seed)

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == fam.arch)
    name_map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"tiny-{name}-{qtype}.gguf"
    writer = gguf.GGUFWriter(str(path), fam.arch)
    _put_metadata(writer, fam, cfg, {k: v for k, v in gguf_tokenizer_metadata(tok).items()
                                     if k != "tokenizer.ggml.add_bos_token"})

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()
             if "rotary_emb." not in k}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    held: dict[str, np.ndarray] = {}  # HF name -> the values the GGUF holds, in HF layout
    rng = np.random.default_rng(seed)
    for hf_name, w in state.items():
        expert = _expert_tensors(hf_name, w, fam.arch == "gpt-oss") or (_mla_split(hf_name, w, cfg) if mla_split
                                                                         else None)
        # llama.cpp's DeepseekV2Model renames V3's router bias before its name map
        gguf_hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
        pieces, inverse = expert if expert else ([(_gguf_name(name_map, gguf_hf_name), w)], lambda x: x)
        stored_parts = []
        for gname, arr in pieces:
            arr = np.ascontiguousarray(arr)
            heads = {".attn_q.": cfg.num_attention_heads, ".attn_k.": cfg.num_key_value_heads}
            perm = next((h for key, h in heads.items() if key in gname), None) if fam.permute_qk else None
            if perm:
                arr = _llama_permute(arr, perm)
            if fam.norm_shift and gname.endswith("norm.weight"):
                arr = arr + np.float32(fam.norm_shift)
            # llama.cpp quantizes only `*.weight` matrices, never the router
            keep_f32 = arr.ndim == 1 or not gname.endswith(".weight") or "ffn_gate_inp" in gname or "sinks" in gname \
                or qtype == "F32"
            if keep_f32:
                writer.add_tensor(gname, arr.astype(np.float32))
                back = arr.astype(np.float32)
            elif qtype in KQUANT_FALLBACK and arr.shape[-1] % 256 == 0:
                # gguf has no K-quant quantizer: valid random blocks near the tensor's own range
                data = _kquant_blocks(qtype, arr, rng)
                writer.add_tensor(gname, data, raw_dtype=q)
                back = gguf.quants.dequantize(data, q).reshape(arr.shape)
            else:
                kind = getattr(gguf.GGMLQuantizationType, KQUANT_FALLBACK.get(qtype, qtype))
                data = gguf.quants.quantize(arr, kind)
                writer.add_tensor(gname, data, raw_dtype=kind)
                back = gguf.quants.dequantize(data, kind).reshape(arr.shape)
            if perm:
                back = _llama_unpermute(back, perm)
            if fam.norm_shift and gname.endswith("norm.weight"):
                back = back - np.float32(fam.norm_shift)
            stored_parts.append(back)
        held[hf_name] = inverse(*stored_parts)
    if fam.llama3_rope:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    if fam.arch == "phi3" and cfg.rope_parameters.get("rope_type") == "longrope":
        writer.add_tensor("rope_factors_long.weight", np.array(cfg.rope_parameters["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(cfg.rope_parameters["short_factor"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with torch.no_grad():
        model.load_state_dict({k: torch.from_numpy(v) for k, v in held.items()}, strict=False)
    return Built(path, model, cfg)


def transformers_reference(built: Built):
    """The family's transformers model with the tensors transformers' own GGUF reader takes
    from the file (its names, Q/K un-permute, norm offsets, `gguf`'s dequantization), or
    None where that reader does not know the family."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(built.config, torch_dtype=torch.float32).eval()
    parsed = load_gguf_checkpoint(str(built.path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if getattr(built.config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing:
        raise AssertionError(f"transformers' GGUF reader left {sorted(missing)} unset")
    return model


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
