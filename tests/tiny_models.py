"""Tiny random llama models for runner tests, generated once per session.

- `tiny_tokenizer`: a byte-level BPE tokenizer trained with `tokenizers` on a few lines
  (~330 tokens, specials `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`).
- `tiny_safetensors_dir`: an mlx-lm model directory (config.json, model.safetensors,
  tokenizer.json, tokenizer_config.json with a chatml template). Its weights are the
  *dequantized* GGUF weights, so both formats describe exactly the same network.
- `tiny_gguf_path`: the same model as GGUF, written by a small writer below with real
  Q8_0 (embedding), Q4_1 (attention), Q4_0 (MLP) blocks, F32 norms, one F16 tensor,
  llama.cpp's Q/K row permutation, no `output.weight` (tied embeddings), and the
  tokenizer as `tokenizer.ggml.*` metadata (gpt2-style vocabulary).
- `tiny_gguf_bad_arch`: a GGUF whose architecture is "mamba" (unsupported).
- `tiny_qwen2_files`: {"gguf", "safetensors"}: a tiny qwen2 GGUF (q/k/v biases, no Q/K
  permutation) and the same network as an mlx-lm directory.
- `tiny_float_gguf`: the same llama as an F16 GGUF (F32 norms), for `create --quantize`.
- `tiny_kquant_gguf`: a tiny llama GGUF of random K-quant (and Q5_x, MXFP4, IQ4, BF16) blocks,
  hidden size 256, written by `make_kquant_model` with `random_blocks`.
- `tiny_gguf_model` / `tiny_safetensors_model`: the files imported into the test's store.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

CONFIG = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 256, "tie_word_embeddings": True, "head_dim": 16,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello world! Bonjour le monde, café crème, naïve façade. Grüße aus München.",
    "def main():\n\treturn 42\n\nclass Foo:\n    pass\n",
    "What is the capital of France? Paris is the capital of France.",
    "emoji 😀🎉 and symbols € £ ¥ © ® — “quotes” ‘single’",
] * 4


# ---- GGUF writing (the subset of the format our runner reads) ----------------------------
GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
        "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ4_NL": 20, "IQ4_XS": 23, "BF16": 30, "TQ1_0": 34,
        "TQ2_0": 35, "MXFP4": 39}
# Where each type without a quantizer in `gguf` keeps its float16 super-scale(s) d (and dmin),
# and the largest |value| per unit of d (dmin is set to center the values around zero).
_D_FIELDS = {"Q2_K": ((80, 82), 45.0), "Q3_K": ((108,), 128.0), "Q4_K": ((0, 2), 945.0),
             "Q5_K": ((0, 2), 1953.0), "Q6_K": ((208,), 4064.0), "IQ4_NL": ((0,), 127.0),
             "IQ4_XS": ((0,), 4064.0)}
_DMIN_PER_D = {"Q2_K": 1.5, "Q4_K": 7.5, "Q5_K": 15.5}  # mean sc*q over mean m


def random_blocks(kind: str, rows: int, cols: int, rng, amplitude: float = 0.1) -> bytes:
    """Valid GGUF blocks of `kind` for a [rows, cols] matrix whose values stay near +-amplitude:
    `gguf`'s own quantizer where it has one, else random bytes with sane float16 scales."""
    import gguf as gguf_py

    qtype = gguf_py.GGMLQuantizationType[kind]
    per, size = gguf_py.GGML_QUANT_SIZES[qtype]
    if kind not in _D_FIELDS:
        w = (rng.standard_normal((rows, cols)) * amplitude / 3).astype(np.float32)
        return gguf_py.quants.quantize(w, qtype).tobytes()
    blocks = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    fields, reach = _D_FIELDS[kind]
    d = (amplitude / reach * rng.uniform(0.5, 1.5, (blocks.shape[0], 1))).astype(np.float32)
    blocks[:, fields[0]:fields[0] + 2] = d.astype(np.float16).view(np.uint8)
    if len(fields) > 1:
        blocks[:, fields[1]:fields[1] + 2] = (d * _DMIN_PER_D[kind]).astype(np.float16).view(np.uint8)
    return blocks.tobytes()


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_rows(w: np.ndarray, kind: str) -> tuple[bytes, np.ndarray]:
    """(GGUF block bytes, the dequantized float32 matrix) for a [rows, cols] matrix."""
    rows, cols = w.shape
    b = w.reshape(rows, cols // 32, 32).astype(np.float32)
    if kind == "Q8_0":
        d = _f16(np.abs(b).max(-1) / 127.0)
        inv = np.where(d == 0, 0, 1.0 / d.astype(np.float32))
        q = np.clip(np.round(b * inv[..., None]), -127, 127).astype(np.int8)
        deq = q.astype(np.float32) * d.astype(np.float32)[..., None]
        blocks = np.empty((rows, cols // 32), dtype=[("d", "<f2"), ("q", "i1", 32)])
        blocks["d"], blocks["q"] = d, q
    elif kind == "Q4_0":
        idx = np.abs(b).argmax(-1)
        mx_ = np.take_along_axis(b, idx[..., None], -1)[..., 0]
        d = _f16(mx_ / -8.0)
        inv = np.where(d == 0, 0, 1.0 / d.astype(np.float32))
        q = np.clip((b * inv[..., None] + 8.5).astype(np.int8), 0, 15).astype(np.uint8)
        deq = (q.astype(np.float32) - 8) * d.astype(np.float32)[..., None]
        blocks = np.empty((rows, cols // 32), dtype=[("d", "<f2"), ("q", "u1", 16)])
        blocks["d"], blocks["q"] = d, q[..., :16] | (q[..., 16:] << 4)
    elif kind == "Q4_1":
        lo, hi = b.min(-1), b.max(-1)
        d = _f16((hi - lo) / 15.0)
        m = _f16(lo)
        inv = np.where(d == 0, 0, 1.0 / d.astype(np.float32))
        q = np.clip(np.round((b - m.astype(np.float32)[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
        deq = q.astype(np.float32) * d.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]
        blocks = np.empty((rows, cols // 32), dtype=[("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)])
        blocks["d"], blocks["m"], blocks["q"] = d, m, q[..., :16] | (q[..., 16:] << 4)
    else:
        raise ValueError(kind)
    return blocks.tobytes(), deq.reshape(rows, cols)


def _kv_bytes(key: str, value) -> bytes:
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    def typed(v) -> tuple[int, bytes]:
        if isinstance(v, bool):
            return 7, struct.pack("<?", v)
        if isinstance(v, int):
            return 4, struct.pack("<I", v)
        if isinstance(v, float):
            return 6, struct.pack("<f", v)
        if isinstance(v, str):
            return 8, s(v)
        if isinstance(v, list):
            kinds = [typed(x) for x in v]
            item = kinds[0][0] if kinds else 8
            if item == 4 and any(x < 0 for x in v):
                item, kinds = 5, [(5, struct.pack("<i", x)) for x in v]
            return 9, struct.pack("<IQ", item, len(v)) + b"".join(k[1] for k in kinds)
        raise TypeError(type(v))

    kind, payload = typed(value)
    return s(key) + struct.pack("<I", kind) + payload


def write_gguf(path: Path, metadata: dict, tensors: list[tuple[str, tuple[int, ...], str, bytes]]) -> None:
    """tensors: (name, numpy-order shape, GGML type name, data bytes)."""
    align = 32
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_kv_bytes(k, v) for k, v in metadata.items())
    offset, infos, blobs = 0, [], []
    for name, shape, kind, data in tensors:
        raw = name.encode()
        dims = tuple(reversed(shape))  # GGUF lists the innermost dimension first
        infos.append(struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", GGML[kind], offset))
        pad = (-len(data)) % align
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head += b"".join(infos)
    head += b"\0" * ((-len(head)) % align)
    path.write_bytes(head + b"".join(blobs))


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert-time permutation (our loader must undo it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- building ------------------------------------------------------------------------------
def build_tokenizer(specials: list[str] | None = None):
    """The tests' byte-level BPE trained on CORPUS, with `specials` (default SPECIALS) first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials or SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _tensors(vocab: int, seed: int = 0) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF tensor name -> (float32 weights in HF layout, GGML type)."""
    rng = np.random.default_rng(seed)
    c = CONFIG
    h, inter = c["hidden_size"], c["intermediate_size"]
    q_out = c["num_attention_heads"] * c["head_dim"]
    kv_out = c["num_key_value_heads"] * c["head_dim"]

    def mat(rows, cols, scale=0.08):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    out = {"token_embd.weight": (mat(vocab, h, 0.1), "Q8_0"),
           "output_norm.weight": ((1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "F32")}
    for i in range(c["num_hidden_layers"]):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": ((1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "F32"),
            p + "ffn_norm.weight": ((1 + 0.1 * rng.standard_normal(h)).astype(np.float16).astype(np.float32), "F16"),
            p + "attn_q.weight": (mat(q_out, h, 0.3), "Q4_1"),
            p + "attn_k.weight": (mat(kv_out, h, 0.3), "Q4_1"),
            p + "attn_v.weight": (mat(kv_out, h), "Q8_0"),
            p + "attn_output.weight": (mat(h, q_out), "Q4_1"),
            p + "ffn_gate.weight": (mat(inter, h), "Q4_0"),
            p + "ffn_up.weight": (mat(inter, h), "Q4_0"),
            p + "ffn_down.weight": (mat(h, inter), "Q4_0"),
        })
    return out


def gguf_tokenizer_metadata(tok) -> dict:
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.padding_token_id": vocab["<|endoftext|>"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


def make_models(root: Path) -> dict[str, Path]:
    import mlx.core as mx

    from mlxlite.formats.gguf import map_name

    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    c = CONFIG
    tensors, hf_weights = [], {}
    for name, (w, kind) in _tensors(vocab).items():
        stored = w
        if ".attn_q." in name:
            stored = permute_qk(w, c["num_attention_heads"])
        elif ".attn_k." in name:
            stored = permute_qk(w, c["num_key_value_heads"])
        if kind.startswith("Q"):
            data, deq_stored = quantize_rows(stored, kind)
            # The reference model gets exactly the values the GGUF holds, un-permuted back.
            deq = deq_stored
            if ".attn_q." in name:
                deq = permute_qk_inverse(deq_stored, c["num_attention_heads"])
            elif ".attn_k." in name:
                deq = permute_qk_inverse(deq_stored, c["num_key_value_heads"])
        elif kind == "F16":
            data, deq = stored.astype(np.float16).tobytes(), stored
        else:
            data, deq = stored.astype(np.float32).tobytes(), stored
        tensors.append((name, stored.shape, kind, data))
        hf_weights[map_name(name)] = deq.astype(np.float32)

    meta = {
        "general.architecture": "llama", "general.name": "tiny-llama", "general.file_type": 3,
        "general.alignment": 32, "general.parameter_count": sum(w.size for w in hf_weights.values()),
        "llama.context_length": c["max_position_embeddings"], "llama.embedding_length": c["hidden_size"],
        "llama.block_count": c["num_hidden_layers"], "llama.feed_forward_length": c["intermediate_size"],
        "llama.attention.head_count": c["num_attention_heads"],
        "llama.attention.head_count_kv": c["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": c["rms_norm_eps"], "llama.rope.freq_base": c["rope_theta"],
        "llama.rope.dimension_count": c["head_dim"], "llama.vocab_size": vocab,
        **gguf_tokenizer_metadata(tok),
    }
    root.mkdir(parents=True, exist_ok=True)
    gguf_path = root / "tiny-llama.Q4_1.gguf"
    write_gguf(gguf_path, meta, tensors)
    bad = root / "tiny-mamba.gguf"
    write_gguf(bad, {**meta, "general.architecture": "mamba"}, tensors[:2])

    st = root / "tiny-llama-st"
    st.mkdir(exist_ok=True)
    mx.save_safetensors(str(st / "model.safetensors"), {k: mx.array(v) for k, v in hf_weights.items()})
    (st / "config.json").write_text(json.dumps({**c, "vocab_size": vocab, "eos_token_id": tok.token_to_id("<|im_end|>")}))
    tok.save(str(st / "tokenizer.json"))
    (st / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c["max_position_embeddings"],
    }))
    return {"gguf": gguf_path, "bad": bad, "safetensors": st}


def make_float_gguf(root: Path, kind: str = "F16") -> Path:
    """The tiny llama of `make_models` as a float GGUF: every matrix in `kind` (F16 or F32),
    norms F32, Q/K rows permuted as llama.cpp writes them; what `create --quantize` takes."""
    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    c = CONFIG
    tensors = []
    for name, (w, _) in _tensors(vocab).items():
        if ".attn_q." in name:
            w = permute_qk(w, c["num_attention_heads"])
        elif ".attn_k." in name:
            w = permute_qk(w, c["num_key_value_heads"])
        t = kind if w.ndim > 1 else "F32"
        data = w.astype(np.float16 if t == "F16" else np.float32).tobytes()
        tensors.append((name, w.shape, t, data))
    meta = {
        "general.architecture": "llama", "general.name": "tiny-llama", "general.file_type": 1 if kind == "F16" else 0,
        "general.alignment": 32, "llama.context_length": c["max_position_embeddings"],
        "llama.embedding_length": c["hidden_size"], "llama.block_count": c["num_hidden_layers"],
        "llama.feed_forward_length": c["intermediate_size"], "llama.attention.head_count": c["num_attention_heads"],
        "llama.attention.head_count_kv": c["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": c["rms_norm_eps"], "llama.rope.freq_base": c["rope_theta"],
        "llama.rope.dimension_count": c["head_dim"], "llama.vocab_size": vocab,
        **gguf_tokenizer_metadata(tok),
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"tiny-llama.{kind}.gguf"
    write_gguf(path, meta, tensors)
    return path


def make_qwen2(root: Path) -> dict[str, Path]:
    """A tiny qwen2 GGUF (q/k/v biases, no Q/K permutation) and its safetensors reference."""
    import mlx.core as mx

    from mlxlite.formats.gguf import map_name

    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    c = CONFIG
    rng = np.random.default_rng(1)
    tensors, ref = [], {}
    for name, (w, kind) in _tensors(vocab, seed=1).items():
        if kind.startswith("Q"):
            data, deq = quantize_rows(w, kind)
        elif kind == "F16":
            data, deq = w.astype(np.float16).tobytes(), w
        else:
            data, deq = w.tobytes(), w
        tensors.append((name, w.shape, kind, data))
        ref[map_name(name)] = deq.astype(np.float32)
        if name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")):
            bias = (rng.standard_normal(w.shape[0]) * 0.1).astype(np.float32)
            bname = name.replace(".weight", ".bias")
            tensors.append((bname, bias.shape, "F32", bias.tobytes()))
            ref[map_name(bname)] = bias
    meta = {
        "general.architecture": "qwen2", "general.name": "tiny-qwen2", "general.file_type": 3,
        "qwen2.context_length": c["max_position_embeddings"], "qwen2.embedding_length": c["hidden_size"],
        "qwen2.block_count": c["num_hidden_layers"], "qwen2.feed_forward_length": c["intermediate_size"],
        "qwen2.attention.head_count": c["num_attention_heads"],
        "qwen2.attention.head_count_kv": c["num_key_value_heads"],
        "qwen2.attention.layer_norm_rms_epsilon": c["rms_norm_eps"], "qwen2.rope.freq_base": 1000000.0,
        **gguf_tokenizer_metadata(tok),
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny-qwen2.gguf"
    write_gguf(path, meta, tensors)
    st = root / "tiny-qwen2-st"
    st.mkdir(exist_ok=True)
    mx.save_safetensors(str(st / "model.safetensors"), {k: mx.array(v) for k, v in ref.items()})
    cfg = {k: v for k, v in c.items() if k != "head_dim"}
    (st / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2", "rope_theta": 1000000.0,
                                                "vocab_size": vocab}))
    tok.save(str(st / "tokenizer.json"))
    return {"gguf": path, "safetensors": st}


KCONFIG = {**CONFIG, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "tie_word_embeddings": False}
# One model, every loading path: repacked K-quants and legacy types, re-quantized K-quants,
# MXFP4, dequantized IQ4, float F32/F16/BF16 norms, an untied Q6_K output like Q4_K_M's.
KQUANT_TYPES = {
    "token_embd.weight": "Q4_K", "output.weight": "Q6_K", "output_norm.weight": "F32",
    "blk.0.attn_norm.weight": "F32", "blk.0.ffn_norm.weight": "F16",
    "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q5_K", "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q4_K", "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q5_K",
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.1.attn_norm.weight": "F32", "blk.1.ffn_norm.weight": "BF16",
    "blk.1.attn_q.weight": "Q3_K", "blk.1.attn_k.weight": "Q2_K", "blk.1.attn_v.weight": "Q5_0",
    "blk.1.attn_output.weight": "IQ4_NL", "blk.1.ffn_gate.weight": "MXFP4", "blk.1.ffn_up.weight": "IQ4_XS",
    "blk.1.ffn_down.weight": "Q5_1",
}


def make_kquant_model(root: Path, types: dict[str, str] | None = None) -> Path:
    """A tiny llama GGUF (hidden 256: K-quant rows) whose tensors are random blocks of `types`
    (default KQUANT_TYPES), Q/K stored in llama.cpp's permuted layout as any converter writes them."""
    import gguf as gguf_py

    types = types or KQUANT_TYPES
    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    c = KCONFIG
    h, inter = c["hidden_size"], c["intermediate_size"]
    q_out, kv_out = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"token_embd": (vocab, h), "output": (vocab, h), "attn_q": (q_out, h), "attn_k": (kv_out, h),
              "attn_v": (kv_out, h), "attn_output": (h, q_out), "ffn_gate": (inter, h), "ffn_up": (inter, h),
              "ffn_down": (h, inter)}
    rng = np.random.default_rng(7)
    tensors = []
    for name, kind in types.items():
        part = name.split(".")[-2]
        if part.endswith("norm"):
            w = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
            data = gguf_py.quants.quantize(w, gguf_py.GGMLQuantizationType[kind]).tobytes() if kind == "BF16" \
                else w.astype(np.float16 if kind == "F16" else np.float32).tobytes()
            tensors.append((name, (h,), kind, data))
        else:
            rows, cols = shapes[part]
            amplitude = 0.05 if part in ("token_embd", "output") else 0.3
            tensors.append((name, (rows, cols), kind, random_blocks(kind, rows, cols, rng, amplitude)))
    meta = {
        "general.architecture": "llama", "general.name": "tiny-kquants", "general.file_type": 15,
        "general.alignment": 32,
        "llama.context_length": c["max_position_embeddings"], "llama.embedding_length": h,
        "llama.block_count": c["num_hidden_layers"], "llama.feed_forward_length": inter,
        "llama.attention.head_count": c["num_attention_heads"],
        "llama.attention.head_count_kv": c["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": c["rms_norm_eps"], "llama.rope.freq_base": c["rope_theta"],
        "llama.rope.dimension_count": c["head_dim"], "llama.vocab_size": vocab,
        **gguf_tokenizer_metadata(tok),
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny-kquants.gguf"
    write_gguf(path, meta, tensors)
    return path


def write_q4_k_m(path: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int) -> int:
    """A Q4_K_M-shaped GGUF (llama.cpp's choice of types: Q6_K for output, and for attn_v and
    ffn_down in the layers its `use_more_bits` picks; Q4_K elsewhere). Each quantized tensor
    starts with random blocks (one pattern per type) and the rest is a hole, read back as
    zero blocks: a multi-GB file costs a few MB of disk and no time to write. Returns its size."""

    def more_bits(i):
        return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2

    hd = hidden // heads
    shapes = [("token_embd.weight", (vocab, hidden), "Q4_K"), ("output_norm.weight", (hidden,), "F32"),
              ("output.weight", (vocab, hidden), "Q6_K")]
    for i in range(layers):
        p = f"blk.{i}."
        shapes += [(p + "attn_norm.weight", (hidden,), "F32"), (p + "ffn_norm.weight", (hidden,), "F32"),
                   (p + "attn_q.weight", (heads * hd, hidden), "Q4_K"),
                   (p + "attn_k.weight", (kv_heads * hd, hidden), "Q4_K"),
                   (p + "attn_v.weight", (kv_heads * hd, hidden), "Q6_K" if more_bits(i) else "Q4_K"),
                   (p + "attn_output.weight", (hidden, heads * hd), "Q4_K"),
                   (p + "ffn_gate.weight", (inter, hidden), "Q4_K"), (p + "ffn_up.weight", (inter, hidden), "Q4_K"),
                   (p + "ffn_down.weight", (hidden, inter), "Q6_K" if more_bits(i) else "Q4_K")]
    tok = build_tokenizer()  # a tiny vocabulary: only the tensors need the real shape
    meta = {"general.architecture": "llama", "general.file_type": 15, "general.alignment": 32,
            "llama.context_length": 4096, "llama.embedding_length": hidden, "llama.block_count": layers,
            "llama.feed_forward_length": inter, "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv_heads, "llama.rope.freq_base": 500000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": vocab,
            **gguf_tokenizer_metadata(tok)}
    rng = np.random.default_rng(0)
    sizes = {"Q4_K": (256, 144), "Q6_K": (256, 210), "F32": (1, 4)}
    pattern = {k: random_blocks(k, 64, 4096, rng, 0.05) for k in ("Q4_K", "Q6_K")}
    head = b"GGUF" + struct.pack("<IQQ", 3, len(shapes), len(meta)) + b"".join(_kv_bytes(k, v) for k, v in meta.items())
    offset, infos, places = 0, [], []
    for name, shape, kind in shapes:
        raw = name.encode()
        dims = tuple(reversed(shape))
        infos.append(struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", GGML[kind], offset))
        per, size = sizes[kind]
        nbytes = int(np.prod(shape)) // per * size
        places.append((offset, nbytes, kind))
        offset += nbytes + (-nbytes) % 32
    head += b"".join(infos)
    head += b"\0" * ((-len(head)) % 32)
    with open(path, "wb") as fh:
        fh.write(head)
        for off, nbytes, kind in places:
            fh.seek(len(head) + off)
            if kind == "F32":
                fh.write(np.ones(nbytes // 4, np.float32).tobytes())
            else:
                fh.write(pattern[kind][:nbytes])
        fh.truncate(len(head) + offset)
    return path.stat().st_size


def permute_qk_inverse(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_qwen2_files(tmp_path_factory) -> dict[str, Path]:
    return make_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_float_gguf(tmp_path_factory) -> Path:
    return make_float_gguf(tmp_path_factory.mktemp("tiny_float_gguf"))


@pytest.fixture(scope="session")
def tiny_kquant_gguf(tmp_path_factory) -> Path:
    return make_kquant_model(tmp_path_factory.mktemp("tiny_kquants"))


@pytest.fixture(scope="session")
def tiny_gguf_path(tiny_files) -> Path:
    return tiny_files["gguf"]


@pytest.fixture(scope="module")
def tiny_gguf_loaded(tmp_path_factory, tiny_gguf_path):
    """The tiny GGUF imported into a store of its own and loaded by the real runner (one per module)."""
    from mlxlite.engine import runner
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    store = Store(tmp_path_factory.mktemp("tiny_loaded") / "models")
    import_path(store, tiny_gguf_path, "tiny-gguf")
    loaded = runner.load(store, store.resolve("tiny-gguf"))
    yield loaded
    runner.unload(loaded)


@pytest.fixture(scope="session")
def tiny_gguf_bad_arch(tiny_files) -> Path:
    return tiny_files["bad"]


@pytest.fixture(scope="session")
def tiny_safetensors_dir(tiny_files) -> Path:
    return tiny_files["safetensors"]


@pytest.fixture
def tiny_gguf_model(store, tiny_gguf_path) -> str:
    """The tiny GGUF imported into this test's store; returns its name."""
    from mlxlite.store.importers import import_path

    import_path(store, tiny_gguf_path, "tiny-gguf")
    return "tiny-gguf"


@pytest.fixture
def tiny_safetensors_model(store, tiny_safetensors_dir) -> str:
    from mlxlite.store.importers import import_path

    import_path(store, tiny_safetensors_dir, "tiny-st")
    return "tiny-st"
