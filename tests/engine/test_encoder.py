"""The BERT-family encoder (engine/encoder.py) on tiny random bert and nomic-bert GGUFs
written here: embeddings equal a `transformers` BertModel forward of the same weights
(bert) and a small numpy forward written from the architecture (nomic-bert), for mean and
cls pooling; WordPiece ids equal `BertTokenizerFast`'s; end to end through /api/embed and
/v1/embeddings with the real ollama and openai clients; generating with one is a 400.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import write_gguf

torch = pytest.importorskip("torch")

WORDS = ("The quick brown fox jumps over the lazy dog. Embeddings turn sentences into vectors; "
         "similar meanings land close together. Tokenizers split unaffordable words into pieces, "
         "and résumé, naïve café, Zürich, São Paulo keep their accents until normalized. "
         "Numbers 1999 2024 3.14 and e-mail addresses like someone@example.com too! ")
TRAIN = [WORDS * 3, WORDS.lower() * 2, "Hello, World! HELLO world... it's (quite) [odd] {really}?"] * 4
HARD = ["Hello, World! Ünïcödé résumé — naïve café; unaffordableness xylophonic QQQ zzz 42,000.5 "
        "don't [UNK] 東京 e-mail@x.org \t new\nline", "", "  ", "THE Quick bRoWn fox!!"]
HIDDEN, HEADS, FFN, LAYERS, CTX = 32, 4, 48, 2, 64


def wordpiece(tmp: Path, cased: bool) -> tuple[list[str], Path]:
    """A WordPiece vocabulary trained here; returns its tokens (by id) and vocab.txt."""
    from tokenizers import BertWordPieceTokenizer

    bert = BertWordPieceTokenizer(lowercase=not cased, strip_accents=not cased)
    bert.train_from_iterator(TRAIN, vocab_size=400, show_progress=False)
    words = [t for t, _ in sorted(bert.get_vocab().items(), key=lambda kv: kv[1])]
    path = tmp / f"vocab-{'cased' if cased else 'uncased'}.txt"
    path.write_text("\n".join(words) + "\n")
    return words, path


def tokenizer_meta(words: list[str]) -> dict:
    """As llama.cpp's BertModel.set_vocab writes it (phantom-space spelling)."""
    def phantom(t: str) -> str:
        if t.startswith("[") and t.endswith("]"):
            return t
        return t[2:] if t.startswith("##") else "\u2581" + t

    ids = {t: i for i, t in enumerate(words)}
    return {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": [phantom(t) for t in words],
            "tokenizer.ggml.token_type": [3 if t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") else 2 if t == "[UNK]"
                                          else 1 for t in words],
            "tokenizer.ggml.cls_token_id": ids["[CLS]"], "tokenizer.ggml.seperator_token_id": ids["[SEP]"],
            "tokenizer.ggml.unknown_token_id": ids["[UNK]"], "tokenizer.ggml.padding_token_id": ids["[PAD]"],
            "tokenizer.ggml.token_type_count": 2}


def arch_meta(arch: str, pooling: int, vocab: int) -> dict:
    meta = {"general.architecture": arch, f"{arch}.block_count": LAYERS, f"{arch}.context_length": CTX,
            f"{arch}.embedding_length": HIDDEN, f"{arch}.feed_forward_length": FFN,
            f"{arch}.attention.head_count": HEADS, f"{arch}.attention.layer_norm_epsilon": 1e-12,
            f"{arch}.attention.causal": False, f"{arch}.pooling_type": pooling, f"{arch}.vocab_size": vocab}
    if arch == "nomic-bert":
        meta[f"{arch}.rope.freq_base"] = 1000.0
    return meta


def f32(name: str, arr: np.ndarray) -> tuple[str, tuple[int, ...], str, bytes]:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return name, arr.shape, "F32", arr.tobytes()


# ---- bert: transformers' BertModel with the same tensors -----------------------------------
# HF BertModel parameter -> llama.cpp's GGUF name (gguf-py's tensor_mapping for bert)
HF_TO_GGUF = {
    "embeddings.word_embeddings": "token_embd", "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd", "embeddings.LayerNorm": "token_embd_norm",
    "attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output", "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm",
}


def gguf_name(hf: str) -> str | None:
    module, suffix = hf.rsplit(".", 1)
    if module.startswith("encoder.layer."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{HF_TO_GGUF[rest]}.{suffix}"
    return f"{HF_TO_GGUF[module]}.{suffix}" if module in HF_TO_GGUF else None  # the pooler is dropped


def bert_model(vocab: int, seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=FFN, max_position_embeddings=CTX, type_vocab_size=2, layer_norm_eps=1e-12,
                     hidden_act="gelu", attn_implementation="eager")
    model = BertModel(cfg).eval()
    with torch.no_grad():  # weights far from init, so every tensor matters to the output
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "LayerNorm.weight" in name else 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bert")
    words, vocab_txt = wordpiece(tmp, cased=False)
    model = bert_model(len(words), seed=0)
    tensors = [f32(gguf_name(k), v.numpy()) for k, v in model.state_dict().items() if gguf_name(k)]
    paths = {}
    for pooling, kind in ((1, "mean"), (2, "cls")):
        paths[kind] = tmp / f"bert-{kind}.gguf"
        write_gguf(paths[kind], {**arch_meta("bert", pooling, len(words)), **tokenizer_meta(words)}, tensors)
    return {"paths": paths, "model": model, "vocab_txt": vocab_txt, "words": words}


def hf_tokenizer(vocab_txt: Path, cased: bool):
    from transformers import BertTokenizerFast

    words = vocab_txt.read_text().splitlines()
    try:  # transformers 5 takes the vocabulary itself; 4.x its file
        return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=not cased)
    except TypeError:
        return BertTokenizerFast(vocab_file=str(vocab_txt), do_lower_case=not cased)


def pool(hidden: np.ndarray, kind: str) -> np.ndarray:
    vec = hidden[0] if kind == "cls" else hidden.mean(axis=0)
    return vec / np.linalg.norm(vec)


def load(store, path: Path, name: str):
    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    import_path(store, path, name)
    return runner.load(store, store.resolve(name))


TEXTS = ["Hello, World! The quick brown fox.", "résumé", "unaffordableness of zürich café " * 4, "x"]


@pytest.mark.parametrize("kind", ["mean", "cls"])
def test_bert_embeddings_equal_transformers_bert_model(store, bert_files, kind):
    from mlxlite.engine import runner

    loaded = load(store, bert_files["paths"][kind], f"bert-{kind}")
    assert loaded.info["capabilities"] == ["embedding"] and loaded.info["architecture"] == "bert"
    hf = hf_tokenizer(bert_files["vocab_txt"], cased=False)
    ours = np.array(runner.embed(loaded, TEXTS))   # one batch, padded and masked
    alone = np.array([runner.embed(loaded, [t])[0] for t in TEXTS])
    for text, vec, single in zip(TEXTS, ours, alone, strict=True):
        ids = hf(text)["input_ids"]
        with torch.no_grad():
            hidden = bert_files["model"](torch.tensor([ids])).last_hidden_state[0].numpy()
        ref = pool(hidden, kind)
        np.testing.assert_allclose(vec, ref, atol=2e-5)
        np.testing.assert_allclose(single, ref, atol=2e-5)
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
    assert not np.allclose(ours[0], ours[1], atol=1e-2)


@pytest.mark.parametrize("cased", [False, True])
def test_wordpiece_ids_equal_bert_tokenizer_fast(tmp_path, cased):
    from mlxlite.formats import vocab

    words, vocab_txt = wordpiece(tmp_path, cased)
    spec = vocab.build_tokenizer({"general.architecture": "bert", **tokenizer_meta(words)})
    hf = hf_tokenizer(vocab_txt, cased)
    for text in HARD:
        assert spec.tokenizer.encode(text).ids == hf(text)["input_ids"], (cased, text)
    capital = spec.tokenizer.encode("Hello").tokens[1]
    assert capital == ("Hello" if cased and "Hello" in words else capital.lower())
    assert spec.tokenizer.encode("zzz qqq").tokens.count("[UNK]") >= 1 or "zzz" in " ".join(words)


# ---- nomic-bert: a numpy forward written from the architecture -----------------------------
def nomic_weights(vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    w = {"token_embd.weight": r(vocab, HIDDEN), "token_types.weight": r(2, HIDDEN),
         "token_embd_norm.weight": 1 + r(HIDDEN, scale=0.2), "token_embd_norm.bias": r(HIDDEN)}
    for i in range(LAYERS):
        w.update({f"blk.{i}.attn_qkv.weight": r(3 * HIDDEN, HIDDEN), f"blk.{i}.attn_output.weight": r(HIDDEN, HIDDEN),
                  f"blk.{i}.attn_output_norm.weight": 1 + r(HIDDEN, scale=0.2),
                  f"blk.{i}.attn_output_norm.bias": r(HIDDEN),
                  f"blk.{i}.ffn_up.weight": r(FFN, HIDDEN), f"blk.{i}.ffn_gate.weight": r(FFN, HIDDEN),
                  f"blk.{i}.ffn_down.weight": r(HIDDEN, FFN),
                  f"blk.{i}.layer_output_norm.weight": 1 + r(HIDDEN, scale=0.2),
                  f"blk.{i}.layer_output_norm.bias": r(HIDDEN)})
    return w


def nomic_reference(w: dict[str, np.ndarray], ids: list[int], base: float = 1000.0) -> np.ndarray:
    """Nomic's forward (post-norm, rotary NEOX, SwiGLU fc11 * silu(fc12), no biases), float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def rotate(x):  # [heads, n, d]: rotate halves, as Nomic's non-interleaved rotary
        d = x.shape[-1]
        angles = np.arange(x.shape[1])[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
        cos, sin = np.cos(angles), np.sin(angles)
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    n, hd = len(ids), HIDDEN // HEADS
    x = norm(w["token_embd.weight"][ids] + w["token_types.weight"][0], "token_embd_norm")
    for i in range(LAYERS):
        q, k, v = np.split(x @ w[f"blk.{i}.attn_qkv.weight"].T, 3, axis=-1)
        q, k, v = (t.reshape(n, HEADS, hd).transpose(1, 0, 2) for t in (q, k, v))
        q, k = rotate(q), rotate(k)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(n, HIDDEN) @ w[f"blk.{i}.attn_output.weight"].T
        h = norm(x + attn, f"blk.{i}.attn_output_norm")
        up, gate = h @ w[f"blk.{i}.ffn_up.weight"].T, h @ w[f"blk.{i}.ffn_gate.weight"].T
        ffn = (up * gate / (1 + np.exp(-gate))) @ w[f"blk.{i}.ffn_down.weight"].T
        x = norm(h + ffn, f"blk.{i}.layer_output_norm")
    return x


@pytest.fixture(scope="module")
def nomic_files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("nomic")
    words, vocab_txt = wordpiece(tmp, cased=False)
    weights = nomic_weights(len(words), seed=1)
    tensors = [f32(k, v) for k, v in weights.items()]
    paths = {}
    for pooling, kind in ((1, "mean"), (2, "cls")):
        paths[kind] = tmp / f"nomic-{kind}.gguf"
        write_gguf(paths[kind], {**arch_meta("nomic-bert", pooling, len(words)), **tokenizer_meta(words)}, tensors)
    return {"paths": paths, "weights": weights, "vocab_txt": vocab_txt}


@pytest.mark.parametrize("kind", ["mean", "cls"])
def test_nomic_bert_embeddings_equal_a_numpy_reference(store, nomic_files, kind):
    from mlxlite.engine import runner

    loaded = load(store, nomic_files["paths"][kind], f"nomic-{kind}")
    assert loaded.info["capabilities"] == ["embedding"]
    hf = hf_tokenizer(nomic_files["vocab_txt"], cased=False)
    ours = np.array(runner.embed(loaded, TEXTS))
    for text, vec in zip(TEXTS, ours, strict=True):
        ref = pool(nomic_reference(nomic_files["weights"], hf(text)["input_ids"]), kind)
        np.testing.assert_allclose(vec, ref, atol=2e-5)
    # positions matter (rotary): the same tokens in another order embed differently
    a, b = runner.embed(loaded, ["quick brown fox", "fox brown quick"])
    assert not np.allclose(a, b, atol=1e-3)


# ---- end to end: real server, real clients --------------------------------------------------
def test_embed_routes_with_real_clients_and_generate_is_400(store, bert_files, nomic_files):
    import ollama
    import openai

    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path
    from tests.fake_engine import RunningServer

    import_path(store, bert_files["paths"]["cls"], "tiny-bert")
    import_path(store, nomic_files["paths"]["mean"], "tiny-nomic")
    batch = ["Hello, World!", "naïve café", "x"]
    with RunningServer(None, store) as srv:
        client = ollama.Client(host=srv.url)
        oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        for name in ("tiny-bert", "tiny-nomic"):
            expected = runner.embed(runner.load(store, store.resolve(name)), batch)
            got = client.embed(name, batch).embeddings
            np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-6)
            assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in got)
            single = client.embed(name, "naïve café").embeddings
            np.testing.assert_allclose(single[0], expected[1], atol=1e-6)
            data = oa.embeddings.create(model=name, input=batch).data
            np.testing.assert_allclose(np.array([d.embedding for d in data]), np.array(expected), atol=1e-6)
            assert client.show(name).capabilities == ["embedding"]
        with pytest.raises(ollama.ResponseError) as err:
            client.generate("tiny-bert", "hello")
        assert err.value.status_code == 400 and "is an embedding model and does not generate" in err.value.error
        with pytest.raises(openai.BadRequestError) as err2:
            oa.chat.completions.create(model="tiny-nomic", messages=[{"role": "user", "content": "hi"}])
        assert "does not generate" in str(err2.value)


# ---- the name map and metadata -------------------------------------------------------------
def test_llama_cpp_encoder_tensor_names_map_onto_the_encoder():
    from mlxlite.errors import Unsupported
    from mlxlite.formats import gguf

    expected = {
        "token_embd.weight": "model.word_embeddings.weight", "token_types.weight": "model.token_type_embeddings.weight",
        "position_embd.weight": "model.position_embeddings.weight",
        "token_embd_norm.bias": "model.embeddings_norm.bias",
        "blk.3.attn_q.bias": "model.layers.3.attention.query.bias",
        "blk.3.attn_k.weight": "model.layers.3.attention.key.weight",
        "blk.3.attn_v.weight": "model.layers.3.attention.value.weight",
        "blk.0.attn_qkv.weight": "model.layers.0.attention.qkv.weight",
        "blk.1.attn_output.weight": "model.layers.1.attention.out.weight",
        "blk.1.attn_output_norm.weight": "model.layers.1.attention_norm.weight",
        "blk.2.ffn_up.weight": "model.layers.2.mlp.up.weight", "blk.2.ffn_gate.weight": "model.layers.2.mlp.gate.weight",
        "blk.2.ffn_down.bias": "model.layers.2.mlp.down.bias",
        "blk.11.layer_output_norm.weight": "model.layers.11.output_norm.weight",
    }
    for arch in ("bert", "nomic-bert"):
        for name, ours in expected.items():
            assert gguf.map_name(name, arch) == ours, (arch, name)
        with pytest.raises(Unsupported, match="cls.output"):  # a reranker's head is not an embedder's
            gguf.map_name("cls.output.weight", arch)


def test_pooling_and_sizes_come_from_metadata_and_rank_is_refused():
    from mlxlite.errors import Unsupported
    from mlxlite.formats import gguf

    def header(arch: str, pooling: int) -> gguf.Header:
        meta = {**arch_meta(arch, pooling, 10), "tokenizer.ggml.model": "bert"}
        return gguf.Header("x.gguf", 3, meta, ())

    assert [gguf.model_config(header("bert", p))["pooling"] for p in (0, 1, 2, 3)] == ["mean", "mean", "cls", "last"]
    cfg = gguf.model_config(header("nomic-bert", 1))
    assert (cfg["ffn"], cfg["rope_theta"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]) \
        == ("swiglu", 1000.0, HIDDEN, HEADS, 1e-12)
    assert gguf.model_config(header("bert", 1))["rope_theta"] is None
    with pytest.raises(Unsupported, match="pooling type 4"):
        gguf.model_config(header("bert", 4))


def test_quantized_encoder_weights_are_dequantized_at_load(store, tmp_path):
    """Q8_0 and Q4_0 matrices (Hugging Face's quantized embedders) become float32 exactly as
    ggml dequantizes them."""
    from mlxlite.engine import runner
    from tests.tiny_models import quantize_rows

    words, vocab_txt = wordpiece(tmp_path, cased=False)
    weights = nomic_weights(len(words), seed=2)
    tensors = []
    for i, (name, w) in enumerate(weights.items()):
        if w.ndim == 2 and w.shape[1] % 32 == 0 and name != "token_types.weight":
            data, weights[name] = quantize_rows(w, ("Q8_0", "Q4_0")[i % 2])
            tensors.append((name, w.shape, ("Q8_0", "Q4_0")[i % 2], data))
        else:
            tensors.append(f32(name, w))
    path = tmp_path / "nomic-q.gguf"
    write_gguf(path, {**arch_meta("nomic-bert", 1, len(words)), **tokenizer_meta(words)}, tensors)
    loaded = load(store, path, "nomic-q")
    hf = hf_tokenizer(vocab_txt, cased=False)
    for text, vec in zip(TEXTS, runner.embed(loaded, TEXTS), strict=True):
        ref = pool(nomic_reference(weights, hf(text)["input_ids"]), "mean")
        np.testing.assert_allclose(vec, ref, atol=5e-5)
