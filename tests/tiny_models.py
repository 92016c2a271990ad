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
GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


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
def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
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


def permute_qk_inverse(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_qwen2_files(tmp_path_factory) -> dict[str, Path]:
    return make_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_gguf_path(tiny_files) -> Path:
    return tiny_files["gguf"]


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
