"""The MLX runner on tiny generated models (every code path) and, marked e2e, on the
real default model (correctness against an independent dequantization, and "Paris")."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from mlxlite import options as options_mod
from mlxlite.errors import BadRequest, IntegrityError, Unsupported
from mlxlite.store import (
    MEDIA_MESSAGES,
    MEDIA_OLLAMA_TEMPLATE,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    TITLE,
    Layer,
    build_manifest,
)

GREEDY = {"temperature": 0}


def opts(**kw) -> options_mod.Options:
    return options_mod.parse(kw)


@pytest.fixture(scope="module")
def loaded_pair(tmp_path_factory, tiny_gguf_path, tiny_safetensors_dir):
    """(gguf Loaded, safetensors Loaded) from a module-private store, loaded once."""
    from mlxlite.engine import runner
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    store = Store(tmp_path_factory.mktemp("runner_store") / "models")
    import_path(store, tiny_gguf_path, "tiny-gguf")
    import_path(store, tiny_safetensors_dir, "tiny-st")
    pair = (runner.load(store, store.resolve("tiny-gguf")), runner.load(store, store.resolve("tiny-st")))
    yield pair
    for loaded in pair:
        runner.unload(loaded)


@pytest.fixture(scope="module")
def tiny(loaded_pair):
    return loaded_pair[0]


def run(loaded, prompt, cancel=None, **kw):
    from mlxlite.engine import runner

    truncate = kw.pop("truncate", False)
    constraint = kw.pop("constraint", None)
    top = kw.pop("top_logprobs", 0)
    ids = runner.tokenize(loaded, prompt) if isinstance(prompt, str) else prompt
    items = list(runner.generate(loaded, ids, opts(**kw), cancel, truncate=truncate, constraint=constraint,
                                 top_logprobs=top))
    return items[:-1], items[-1]


def text_of(pieces, finish) -> str:
    return "".join(p.text for p in pieces) + finish.text_tail


# ---- loading ---------------------------------------------------------------------------------
def test_gguf_load_matches_safetensors_reference_logits(loaded_pair):
    """Same network in both formats: the GGUF path (names, Q/K un-permute, Q8_0/Q4_1/Q4_0,
    tied embeddings) must give the logits of the dequantized safetensors reference."""
    import mlx.core as mx

    from mlxlite.engine import runner

    g, s = loaded_pair
    ids = runner.tokenize(g, "Hello world! café 😀 <|im_start|>user 123")
    assert ids == runner.tokenize(s, "Hello world! café 😀 <|im_start|>user 123")
    a = g.model(mx.array(ids)[None])
    b = s.model(mx.array(ids)[None])
    # Both float32 from identical values: only summation order may differ.
    assert mx.abs(a - b).max().item() < 1e-4
    assert g.info["weights"] == "float32" and g.info["format"] == "gguf"
    assert g.eos_token_ids == s.eos_token_ids == frozenset({2})


def test_quantized_gguf_path_keeps_packed_weights_with_float32_activations(store, tiny_gguf_model, loaded_pair,
                                                                             monkeypatch):
    """Linear scales stay float16 (a float32 input still gives float32 out, as fast); the
    embedding's are float32 because its output dtype is theirs, and float16 activations are
    what is slow on MLX's CPU backend."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlxlite.engine import runner

    monkeypatch.setenv("MLXLITE_FLOAT32_ON_CPU", "0")
    q = runner.load(store, store.resolve(tiny_gguf_model))
    try:
        assert q.info["weights"] == "quantized"
        layer = q.model.model.layers[0]
        assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
        assert layer.self_attn.v_proj.bits == 8 and q.model.model.embed_tokens.bits == 8
        assert layer.self_attn.q_proj.scales.dtype == mx.float16
        assert q.model.model.embed_tokens.scales.dtype == mx.float32
        ids = runner.tokenize(q, "The quick brown fox")
        ref = loaded_pair[1].model(mx.array(ids)[None])
        out = q.model(mx.array(ids)[None])
        assert out.dtype == mx.float32 and q.model.model.embed_tokens(mx.array(ids)).dtype == mx.float32
        assert mx.abs(out - ref).max().item() < 1e-3
    finally:
        runner.unload(q)


@pytest.fixture(scope="module")
def quantized_st_dir(tiny_safetensors_dir, tmp_path_factory) -> Path:
    """The tiny safetensors model quantized by mlx (4 bits, group 32), as mlx-community ships them."""
    import shutil

    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx.utils import tree_flatten

    out = tmp_path_factory.mktemp("tiny_q4")
    model, _ = mlx_lm.load(str(tiny_safetensors_dir))
    nn.quantize(model, group_size=32, bits=4)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    cfg = json.loads((tiny_safetensors_dir / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_safetensors_dir / name, out / name)
    return out


@pytest.mark.parametrize("float32", ["1", "0"])
def test_quantized_safetensors_model_on_cpu(store, quantized_st_dir, monkeypatch, float32):
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    monkeypatch.setenv("MLXLITE_FLOAT32_ON_CPU", float32)
    import_path(store, quantized_st_dir, "tiny-q4")
    loaded = runner.load(store, store.resolve("tiny-q4"))
    try:
        assert loaded.info["weights"] == ("float32" if float32 == "1" else "quantized")
        # float16 never reaches MLX's CPU kernels: weights float32 or packed, scales float32
        assert {v.dtype for _, v in tree_flatten(loaded.model.parameters())} <= {mx.float32, mx.uint32}
        ref, _ = mlx_lm.load(str(quantized_st_dir))
        ids = runner.tokenize(loaded, "Hello world")
        assert mx.abs(loaded.model(mx.array(ids)[None]) - ref(mx.array(ids)[None])).max().item() < 1e-3
    finally:
        runner.unload(loaded)


def test_qwen2_gguf_matches_its_safetensors_reference(store, tiny_qwen2_files):
    import mlx.core as mx
    import mlx_lm

    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    import_path(store, tiny_qwen2_files["gguf"], "tiny-qwen2")
    loaded = runner.load(store, store.resolve("tiny-qwen2"))
    try:
        assert loaded.info["architecture"] == "qwen2"
        ref, _ = mlx_lm.load(str(tiny_qwen2_files["safetensors"]))
        ids = runner.tokenize(loaded, "What is the capital of France? 12345")
        assert mx.abs(loaded.model(mx.array(ids)[None]) - ref(mx.array(ids)[None])).max().item() < 1e-4
    finally:
        runner.unload(loaded)


def test_corrupted_blob_refuses_to_load(store, tiny_gguf_model):
    from mlxlite.engine import runner

    entry = store.resolve(tiny_gguf_model)
    layer = next(iter(entry.manifest.files().values()))
    path = store.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.unlink()  # the blob may be a hardlink to the fixture file: replace, don't edit
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        runner.load(store, entry)


def test_unsupported_gguf_architecture_is_named(store, tiny_gguf_bad_arch):
    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    import_path(store, tiny_gguf_bad_arch, "mamba-thing")
    with pytest.raises(Unsupported, match="'mamba'"):
        runner.load(store, store.resolve("mamba-thing"))


def test_modelfile_layers_set_defaults_system_messages_and_template(store, tiny_gguf_model):
    from mlxlite.engine import runner

    entry = store.resolve(tiny_gguf_model)

    def layer(media: str, data: bytes) -> Layer:
        return Layer(media, store.put_bytes(data), len(data))

    extra = [
        layer(MEDIA_PARAMS, json.dumps({"temperature": 0.2, "stop": ["<|im_end|>"], "num_ctx": 128}).encode()),
        layer(MEDIA_SYSTEM, b"You are terse."),
        layer(MEDIA_MESSAGES, json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]).encode()),
        layer(MEDIA_TEMPLATE, b"{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>"),
    ]
    raw = build_manifest(entry.manifest.config, [*entry.manifest.layers, *extra])
    store.write_manifest("tiny-custom", raw)
    loaded = runner.load(store, store.resolve("tiny-custom"))
    try:
        assert loaded.defaults.temperature == 0.2 and loaded.defaults.stop == ("<|im_end|>",)
        assert loaded.defaults.num_ctx == 128
        assert loaded.system == "You are terse."
        assert [m["content"] for m in loaded.messages] == ["hi", "yo"]
        assert loaded.template.render([{"role": "user", "content": "x"}]) == "[user] x\n>"
    finally:
        runner.unload(loaded)



def test_an_ollama_go_template_layer_is_run_as_go_runs_it(store, tiny_gguf_model):
    from mlxlite.engine import runner
    from mlxlite.server.prompt import PromptSpec

    entry = store.resolve(tiny_gguf_model)
    go = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "{{- if .Tools }}<|im_start|>tools\n{{ range .Tools }}{{ .Function.Name }} {{ end }}<|im_end|>\n{{ end -}}"
          "<|im_start|>assistant\n")
    layer = Layer(MEDIA_OLLAMA_TEMPLATE, store.put_bytes(go.encode()), len(go.encode()))
    store.write_manifest("tiny-go", build_manifest(entry.manifest.config, [*entry.manifest.layers, layer]))
    loaded = runner.load(store, store.resolve("tiny-go"))
    try:
        assert loaded.info["template"] == "ollama" and loaded.template.supports_tools
        chat = ({"role": "user", "content": "hi"}, {"role": "user", "content": "there"})
        text = loaded.template.render(list(chat), tools=[{"type": "function", "function": {"name": "f"}}])
        assert text == "<|im_start|>user\nhi\n\nthere<|im_end|>\n<|im_start|>tools\nf <|im_end|>\n<|im_start|>assistant\n"
        spec = PromptSpec("tiny-go", messages=chat, tools=({"type": "function", "function": {"name": "f"}},))
        assert spec.to_tokens(loaded, runner) == runner.tokenize(loaded, text, add_special=True)
    finally:
        runner.unload(loaded)

def test_model_without_weights_is_a_clear_error(store):
    from mlxlite.engine import runner

    data = b"{}"
    note = Layer("application/vnd.mlxlite.file.v1", store.put_bytes(data), len(data), {TITLE: "notes.json"})
    raw = build_manifest(store.put_json({"format": "safetensors"}), [note])
    store.write_manifest("empty-model", raw)
    with pytest.raises(BadRequest, match="neither a GGUF"):
        runner.load(store, store.resolve("empty-model"))


# ---- generation ------------------------------------------------------------------------------
def test_greedy_tokens_match_mlx_lm_stream_generate(tiny):
    import mlx_lm

    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, "The capital of France")
    pieces, finish = run(tiny, ids, num_predict=12, **GREEDY)
    from mlxlite.engine.gguf import mlx_lm_tokenizer

    theirs = [r.token for r in mlx_lm.stream_generate(tiny.model, mlx_lm_tokenizer(tiny.tokenizer), ids,
                                                      max_tokens=12)]
    assert [p.token for p in pieces] == theirs[: len(pieces)]
    assert finish.reason == "length" and finish.eval_tokens == 12 == len(pieces)
    assert all(p.logprob <= 0 for p in pieces)


def test_num_predict_limits_tokens(tiny):
    pieces, finish = run(tiny, "Hello", num_predict=5, temperature=1.0, seed=3)
    assert (len(pieces), finish.reason, finish.eval_tokens) == (5, "length", 5)
    pieces, finish = run(tiny, "Hello", num_predict=0)
    assert pieces == [] and finish.reason == "length"


def test_num_predict_cutting_a_character_drops_it_not_a_trailing_u_fffd(tiny):
    """num_predict can stop between the bytes of one character (byte-level tokens): the
    text ends before that character, as a stream that held its bytes back shows it, in
    `generate` and in the batch decoder alike, never with a U+FFFD for it."""
    import codecs

    from mlxlite.engine import runner

    found = None
    for seed in range(40):      # sampled text over the byte alphabet: a lead byte comes soon
        kw = dict(num_predict=48, temperature=1.5, top_k=0, top_p=1.0, seed=seed)
        pieces, _ = run(tiny, "emoji 😀 café", **kw)
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        for k, p in enumerate(pieces, 1):
            dec.decode(tiny.table[p.token])
            if dec.getstate()[0]:       # bytes of an unfinished character are pending
                found = (seed, k, pieces[:k])
                break
        if found:
            break
    assert found, "no sampled text stopped inside a character"
    seed, k, cut = found
    data = b"".join(tiny.table[p.token] for p in cut)
    expected = codecs.getincrementaldecoder("utf-8")("replace").decode(data)   # the complete characters
    kw = dict(num_predict=k, temperature=1.5, top_k=0, top_p=1.0, seed=seed)
    pieces, finish = run(tiny, "emoji 😀 café", **kw)
    assert [p.token for p in pieces] == [p.token for p in cut] and finish.reason == "length"
    assert text_of(pieces, finish) == expected
    dec = runner.decoder(tiny, 4)
    dec.add("a", runner.tokenize(tiny, "emoji 😀 café"), opts(**kw))
    got: list = []
    while len(dec):
        got.extend(item for _, item in dec.step(lambda key: False))
    assert "".join(p.text for p in got[:-1]) + got[-1].text_tail == expected


def test_num_predict_unlimited_stops_at_the_context_end(tiny):
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, "Hello there")
    pieces, finish = run(tiny, ids, num_ctx=24, num_predict=-1, **GREEDY)
    assert finish.reason == "length"
    assert len(ids) + len(pieces) == 24


def test_prompt_longer_than_context_is_an_error_unless_truncating(tiny):
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, "The quick brown fox jumps over the lazy dog. " * 4)
    assert len(ids) > 16
    with pytest.raises(BadRequest, match=r"num_ctx=16"):
        run(tiny, ids, num_ctx=16)
    pieces, finish = run(tiny, ids, num_ctx=16, num_predict=4, truncate=True, **GREEDY)
    assert finish.prompt_tokens < 16 and len(pieces) == 4


def test_same_seed_same_text_other_seed_other_text(tiny):
    a, _ = run(tiny, "Once upon a time", num_predict=24, temperature=1.5, top_k=0, top_p=1.0, seed=42)
    b, _ = run(tiny, "Once upon a time", num_predict=24, temperature=1.5, top_k=0, top_p=1.0, seed=42)
    c, _ = run(tiny, "Once upon a time", num_predict=24, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    assert [p.token for p in a] == [p.token for p in b]
    assert [p.token for p in a] != [p.token for p in c]


def test_stop_string_ends_exactly_before_the_string(tiny):
    kw = dict(num_predict=40, temperature=1.5, top_k=0, top_p=1.0, seed=11)
    pieces, finish = run(tiny, "Tell me", **kw)
    assert finish.stop_string == ""
    full = text_of(pieces, finish)
    stop = next(full[i:i + 3] for i in range(6, len(full) - 3) if full[i:i + 3].strip() and full.find(full[i:i + 3]) == i)
    pieces, finish = run(tiny, "Tell me", stop=["\x00never", stop], **kw)
    assert finish.reason == "stop" and finish.stop_string == stop
    assert text_of(pieces, finish) == full[: full.find(stop)]


def test_text_pieces_add_up_to_the_detokenized_tokens(loaded_pair):
    from mlxlite.engine import runner

    for loaded in loaded_pair:
        pieces, finish = run(loaded, "emoji 😀", num_predict=30, temperature=1.5, top_k=0, top_p=1.0, seed=5)
        # Special tokens never print (token_bytes is b"" for them); decode() would show them.
        plain = [p.token for p in pieces if runner.token_bytes(loaded)[p.token]]
        assert text_of(pieces, finish) == runner.detokenize(loaded, plain)


def test_cancel_takes_effect_within_one_token(tiny):
    from mlxlite.engine import runner

    cancel = threading.Event()
    gen = runner.generate(tiny, runner.tokenize(tiny, "Hello"), opts(num_predict=50, **GREEDY), cancel)
    first = next(gen)
    assert isinstance(first, runner.Piece)
    cancel.set()
    rest = list(gen)
    assert len(rest) == 1 and isinstance(rest[0], runner.Finish) and rest[0].reason == "cancel"
    assert rest[0].eval_tokens == 1
    pieces, finish = run(tiny, "Hello", cancel=cancel)  # already set: nothing is generated
    assert pieces == [] and finish.reason == "cancel"


def test_cancel_is_checked_between_prefill_chunks(tiny):
    from mlxlite.engine import runner

    class SetAfterFirstChunk(threading.Event):
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 1

    cache = runner.new_cache(tiny)
    ids = runner.tokenize(tiny, "The quick brown fox jumps over the lazy dog")
    assert not runner.prefill(tiny, ids, cache, step=3, cancel=SetAfterFirstChunk())
    assert cache[0].offset == 3  # one chunk ran, then the cancel stopped it
    pieces, finish = run(tiny, ids, cancel=SetAfterFirstChunk(), num_batch=3)
    assert pieces == [] and finish.reason == "cancel"


def test_constraint_hook_masks_tokens_and_ends_with_eos(tiny):
    from mlxlite.engine import runner

    allowed = runner.tokenize(tiny, "ab", add_special=False)

    class Only:
        def __init__(self):
            self.seen = []

        def allowed_mask(self):
            mask = np.zeros(len(runner.token_bytes(tiny)), dtype=bool)
            mask[allowed] = True
            return mask

        def advance(self, token):
            self.seen.append(token)

        def is_complete(self):
            return len(self.seen) >= 5

    c = Only()
    pieces, finish = run(tiny, "x", num_predict=50, temperature=1.0, seed=1, constraint=c)
    assert finish.reason == "stop" and len(pieces) == 5
    assert {p.token for p in pieces} <= set(allowed) and c.seen == [p.token for p in pieces]


def test_penalties_change_greedy_output(tiny):
    plain, _ = run(tiny, "Hello", num_predict=12, **GREEDY)
    penalized, _ = run(tiny, "Hello", num_predict=12, repeat_penalty=5.0, presence_penalty=2.0, **GREEDY)
    assert [p.token for p in plain] != [p.token for p in penalized]
    assert len({p.token for p in penalized}) > len({p.token for p in plain})


def test_prefix_cache_reuse_gives_the_same_tokens(tiny):
    from mlx_lm.models.cache import trim_prompt_cache

    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, "The quick brown fox jumps over the lazy dog")
    full, _ = run(tiny, ids, num_predict=8, **GREEDY)
    cache = runner.new_cache(tiny)
    assert runner.prefill(tiny, ids[:6], cache, step=4)
    items = list(runner.generate(tiny, ids, opts(num_predict=8, **GREEDY), prompt_cache=cache, cached_tokens=6))
    assert [p.token for p in items[:-1]] == [p.token for p in full]
    assert (items[-1].prompt_tokens, items[-1].prompt_eval_tokens) == (len(ids), len(ids) - 6)
    assert cache[0].offset >= len(ids) + 7
    trim_prompt_cache(cache, cache[0].offset - len(ids))  # back to the prompt: reusable again
    again = list(runner.generate(tiny, ids + [full[0].token], opts(num_predict=7, **GREEDY),
                                 prompt_cache=cache, cached_tokens=len(ids)))
    assert [p.token for p in again[:-1]] == [p.token for p in full[1:]]


def test_one_token_prompt_with_penalties(tiny):
    pieces, finish = run(tiny, [5], num_predict=4, repeat_penalty=1.3, frequency_penalty=0.5, **GREEDY)
    assert len(pieces) == 4 and finish.prompt_eval_tokens == 1


# ---- tokens, embeddings --------------------------------------------------------------------
def test_token_bytes_reassemble_the_text(loaded_pair):
    from mlxlite.engine import runner

    text = "Grüße 😀\tdef main():\n\treturn 42 € ©"
    for loaded in loaded_pair:
        table = runner.token_bytes(loaded)
        ids = runner.tokenize(loaded, text, add_special=False)
        assert b"".join(table[i] for i in ids) == text.encode()
        for eos in loaded.eos_token_ids:
            assert table[eos] == b""


def test_embeddings_are_normalized_and_deterministic(tiny):
    from mlxlite.engine import runner

    a, b, c = runner.embed(tiny, ["hello world", "hello world", "something else"])
    assert len(a) == 64
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert np.allclose(a, b) and not np.allclose(a, c)


def test_openblas_plan_respects_switch_and_ld_preload(monkeypatch):
    from mlxlite.engine import blas

    lib = blas.find_openblas()
    if lib is None:
        assert blas.plan({}) is None
        return
    assert blas.plan({"MLXLITE_OPENBLAS": "1"}) == lib
    assert blas.plan({"LD_PRELOAD": lib}) is None
    monkeypatch.setenv("MLXLITE_OPENBLAS", "0")
    assert blas.plan({"MLXLITE_OPENBLAS": "0"}) is None


def _sgemm_binding(tmp_path: Path, code: str, **extra_env: str) -> tuple[list[str], str]:
    """Run `code` in a fresh interpreter under LD_DEBUG=bindings: (what its stdout says,
    the library libmlx.so's `cblas_sgemm` was bound to)."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n" + code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXLITE_") and k != "LD_PRELOAD"}
    log = tmp_path / f"ld-{len(list(tmp_path.iterdir()))}"
    env.update(extra_env, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(log))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         check=True, timeout=300).stdout.split()
    lines = [line for p in tmp_path.glob(log.name + ".*") for line in p.read_text(errors="replace").splitlines()
             if "libmlx.so" in line and "`cblas_sgemm'" in line]
    assert len(lines) == 1, lines
    return out, lines[0].split(" to ", 1)[1].split()[0]


PROBE = ("from mlxlite.engine import blas\n{before}"
         "print(blas.preload() is not None, blas.preload() is not None)\n"
         "import mlx.core as mx\n"
         "a = mx.ones((64, 64))\nmx.eval(a @ a)\n"
         "print(blas.active())\n")


def test_openblas_preload_binds_mlx_matmuls_to_openblas_without_reexec(tmp_path):
    """Issue 14: no re-exec; OpenBLAS loaded with RTLD_GLOBAL before mlx takes libmlx's sgemm."""
    from mlxlite.engine import blas

    if blas.find_openblas() is None:
        pytest.skip("libopenblas0-pthread is not installed")
    out, lib = _sgemm_binding(tmp_path, PROBE.format(before=""))
    assert out == ["True", "False", "True"]  # loaded once; the second call does nothing
    assert "libopenblas" in lib
    out, lib = _sgemm_binding(tmp_path, PROBE.format(before=""), MLXLITE_OPENBLAS="0")
    assert out == ["False", "False", "False"] and "libopenblas" not in lib and "libblas" in lib
    # Once mlx is in, loading OpenBLAS could no longer change its bindings: preload says so.
    out, lib = _sgemm_binding(tmp_path, PROBE.format(before="import mlx.core\n"))
    assert out == ["False", "False", "False"] and "libopenblas" not in lib


# ---- the real default model (e2e) -----------------------------------------------------------
def _dequantize_reference(path: Path) -> tuple[dict, dict]:
    """An independent float32 reading of the GGUF: numpy over the raw ggml blocks."""
    from mlxlite.formats import gguf

    header = gguf.read_gguf(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    blocks = {
        2: [("d", "<f2"), ("q", "u1", 16)],
        3: [("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)],
        8: [("d", "<f2"), ("q", "i1", 32)],
    }
    out = {}
    for t in header.tensors:
        shape = tuple(reversed(t.shape))
        n = int(np.prod(shape))
        start = header.data_offset + t.offset
        if t.type == 0:
            w = np.frombuffer(raw, np.float32, n, start)
        elif t.type == 1:
            w = np.frombuffer(raw, np.float16, n, start).astype(np.float32)
        else:
            b = np.frombuffer(raw, np.dtype(blocks[t.type]), n // 32, start)
            d = b["d"].astype(np.float32)[:, None]
            if t.type == 8:
                w = b["q"].astype(np.float32) * d
            else:
                q = np.concatenate([b["q"] & 0xF, b["q"] >> 4], axis=1).astype(np.float32)
                w = (q - 8) * d if t.type == 2 else q * d + b["m"].astype(np.float32)[:, None]
        out[t.name] = w.reshape(shape)
    return header, out


@pytest.mark.e2e
def test_default_model_matches_an_independent_dequantization_and_answers_paris(default_gguf, store):
    import mlx.core as mx
    from mlx_lm.models import llama

    from mlxlite.engine import runner
    from mlxlite.formats import gguf
    from mlxlite.store.importers import import_path

    import_path(store, default_gguf, "smol")
    ours = runner.load(store, store.resolve("smol"))
    try:
        prompt = ours.template.render([{"role": "user", "content": "What is the capital of France?"}])
        pieces, finish = run(ours, prompt, num_predict=12, **GREEDY)
        assert "Paris" in text_of(pieces, finish)

        header, tensors = _dequantize_reference(default_gguf)
        cfg = gguf.model_config(header)
        weights = {}
        for name, w in tensors.items():
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg["num_attention_heads"] if "attn_q" in name else cfg["num_key_value_heads"]
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            weights[gguf.map_name(name)] = mx.array(w)
        ref = llama.Model(llama.ModelArgs.from_dict(cfg))
        ref.load_weights(list(weights.items()), strict=True)
        ids = runner.tokenize(ours, prompt)
        a = ours.model(mx.array(ids)[None])[0, -1]
        b = ref(mx.array(ids)[None])[0, -1]
        # Same float32 weight values on both sides (engine/quants.py's Q4_1/Q8_0 decoding vs numpy over the
        # raw blocks): measured 0.0 here, 2e-4 on the packed path (quantized_matmul sums in
        # another order). 1e-3 on logits up to ~40 allows summation order and nothing else:
        # one wrong nibble order, scale or un-permute moves logits by whole units.
        assert mx.abs(a - b).max().item() < 1e-3
        assert mx.argmax(a).item() == mx.argmax(b).item()
    finally:
        runner.unload(ours)


# ---- logprobs ----------------------------------------------------------------------------------
def reference_top(loaded, tokens, k):
    """The k most likely next tokens after `tokens` and their logprobs: numpy's log-softmax of
    the model's logits from one full forward pass (no KV cache)."""
    import mlx.core as mx

    from mlxlite.engine import runner

    logits = np.array(loaded.model(mx.array(tokens)[None])[0, -1].astype(mx.float32), dtype=np.float64)
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    ids = np.argsort(-logprobs, kind="stable")[:k]
    return [(runner.token_piece(loaded, int(i)), float(logprobs[i])) for i in ids]


def assert_top_matches(loaded, prompt_ids, pieces, k):
    seen = list(prompt_ids)
    for p in pieces:
        want = reference_top(loaded, seen, k)
        assert [b for b, _ in p.top] == [b for b, _ in want]
        assert max(abs(a - b) for (_, a), (_, b) in zip(p.top, want, strict=True)) < 1e-4
        assert p.top[0][0] == p.raw and abs(p.top[0][1] - p.logprob) < 1e-6   # greedy: the chosen is the top
        seen.append(p.token)


def test_top_logprobs_are_the_log_softmax_of_the_logits_at_each_step(tiny):
    from mlxlite.engine import runner

    ids = runner.tokenize(tiny, "The quick brown fox")
    pieces, _ = run(tiny, ids, top_logprobs=5, num_predict=6, **GREEDY)
    assert len(pieces) == 6 and all(len(p.top) == 5 for p in pieces)
    assert_top_matches(tiny, ids, pieces, 5)
    assert all(p.raw == runner.token_bytes(tiny)[p.token] for p in pieces)
    plain, _ = run(tiny, ids, num_predict=6, **GREEDY)      # not asked: none computed, same tokens
    assert [p.token for p in plain] == [p.token for p in pieces] and all(p.top == () for p in plain)


def test_top_logprobs_name_special_tokens_and_leave_out_masked_ones(tiny):
    from mlxlite.constrain import tokens as constrain
    from mlxlite.engine import runner

    eos = min(tiny.eos_token_ids)
    assert runner.token_piece(tiny, eos) == b"<|im_end|>"       # prints nothing, but has a name
    con = constrain.TokenConstraint({"enum": ["yes"]}, runner.token_bytes(tiny), tiny.eos_token_ids)
    pieces, _ = run(tiny, "Hello", top_logprobs=20, num_predict=8, constraint=con, **GREEDY)
    # Under the constraint few tokens are allowed: the masked ones (-inf) are not alternatives.
    assert pieces and all(1 <= len(p.top) < 20 for p in pieces)
    assert all(np.isfinite(v) for p in pieces for _, v in p.top)
# ---- load time and the device ------------------------------------------------------------
def test_a_gguf_model_loads_and_generates_without_importing_transformers(tiny_gguf_model, mlxlite_home):
    """transformers (and torch, where installed: seconds) came with every GGUF load through
    mlx-lm's package __init__ and transformers' tokenizer wrapper; a GGUF needs neither. The
    package still works for whoever asks it for something (here `mlx_lm.load`)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from mlxlite.engine import runner\n"
            "from mlxlite.options import Options\n"
            "from mlxlite.store import Store\n"
            "store = Store()\n"
            f"loaded = runner.load(store, store.resolve({tiny_gguf_model!r}))\n"
            "tokens = runner.tokenize(loaded, 'hello world')\n"
            "pieces = list(runner.generate(loaded, tokens, Options(num_predict=3)))\n"
            "print(len(pieces), 'transformers' in sys.modules, 'torch' in sys.modules)\n"
            "import mlx_lm\n"
            "print(callable(mlx_lm.load), 'transformers' in sys.modules)\n")
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "MLXLITE_HOME": str(mlxlite_home)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["4", "False", "False", "True", "True"], out.stdout


def test_on_a_gpu_the_memory_budget_is_the_devices_memory_not_host_ram(monkeypatch):
    from mlxlite import config
    from mlxlite.engine import model

    monkeypatch.delenv("MLXLITE_MEMORY_BUDGET_BYTES", raising=False)
    host = config.memory_budget()
    monkeypatch.setattr(model, "on_cpu", lambda: False)
    cuda = {"device_name": "NVIDIA H200", "total_memory": 140 << 30, "free_memory": 139 << 30}
    monkeypatch.setattr(model.mx, "device_info", lambda *a: cuda)
    assert model.memory_budget() == (140 << 30) * 9 // 10
    metal = {"architecture": "applegpu_g15s", "memory_size": 64 << 30, "max_recommended_working_set_size": 48 << 30}
    monkeypatch.setattr(model.mx, "device_info", lambda *a: metal)
    assert model.memory_budget() == (48 << 30) * 9 // 10     # what Metal lets the GPU wire, of unified memory
    monkeypatch.setenv("MLXLITE_MEMORY_BUDGET_BYTES", str(5 << 30))
    assert model.memory_budget() == 5 << 30                  # a set budget wins
    monkeypatch.delenv("MLXLITE_MEMORY_BUDGET_BYTES")
    monkeypatch.setattr(model, "on_cpu", lambda: True)
    assert model.memory_budget() == host                     # on the CPU: host RAM, as before
