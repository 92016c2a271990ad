"""Every GGUF family we run, end to end: a tiny random model of the family is written as
llama.cpp writes it (tests/arch_models.py), imported into the store, loaded by the runner,
and its logits compared with transformers' forward pass of the same weights.

The reference is independent of our loader: where transformers' own GGUF reader knows the
family (llama, qwen2/3, qwen3moe, gemma2/3, phi3, starcoder2) the reference model holds the
tensors *that reader* takes from the file (its names, Q/K un-permute, norm offsets, `gguf`'s
dequantization); for granite, olmo2, gpt-oss and deepseek2 (whose llama.cpp layouts transformers'
reader does not know) it holds the values the converter wrote, un-transformed. Phi-3 LongRoPE
(factors as tensors) is checked against transformers' Phi3 with the same rope_scaling on a
prompt longer than its original context, so the long factors rotate; DeepSeek-V3 (a deepseek2
file with sigmoid routing) against transformers' DeepseekV3. Those two are 256 wide and are
written in Q4_K too (narrower tensors fall back to Q5_0, as llama.cpp's quantizer does).
Both sides compute in float32 from identical values, so only summation order differs:
measured <= 3e-5 on logits up to ~30, against 1e-3 allowed here. A wrong name, permutation,
norm offset, scale or soft-cap moves logits by whole units.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.arch_models import (
    FAMILIES,
    KQUANT_FAMILIES,
    QTYPES,
    make_family,
    torch_logits,
    transformers_reference,
)

pytest.importorskip("torch", reason="the reference is transformers' forward pass")
pytest.importorskip("gguf", reason="the tiny files are written by the gguf package")

# A prompt longer than gemma3's tiny sliding window (4), so the window is exercised.
IDS = [5, 17, 100, 3, 42, 7, 250, 1, 9, 60, 61, 62, 300, 11]
TOLERANCE = {
    # mlx-lm's starcoder2 uses exact GELU where transformers and llama.cpp use its tanh
    # approximation: measured 3.4e-3 on logits ~14. Still far below a mapping error.
    "starcoder2": 2e-2,
}
CASES = [(name, q) for name in FAMILIES for q in QTYPES] + [(name, "Q4_K") for name in KQUANT_FAMILIES]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict = {}

    def get(name: str, qtype: str):
        if (name, qtype) not in cache:
            cache[name, qtype] = make_family(name, qtype, tmp_path_factory.mktemp(f"{name}-{qtype}"))
        return cache[name, qtype]

    return get


def _reference_logits(name: str, b) -> np.ndarray:
    held = torch_logits(b.reference, IDS)
    if not FAMILIES[name].transformers_gguf:
        return held
    theirs = torch_logits(transformers_reference(b), IDS)
    # transformers' reader and our test converter agree on what the file holds.
    assert np.abs(theirs - held).max() < 1e-5
    return theirs


@pytest.mark.parametrize(("name", "qtype"), CASES)
def test_gguf_family_logits_match_transformers(store, built, name, qtype, monkeypatch):
    import mlx.core as mx

    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    b = built(name, qtype)
    ref = _reference_logits(name, b)
    import_path(store, b.path, f"tiny-{name}")
    loaded = runner.load(store, store.resolve(f"tiny-{name}"))
    try:
        assert loaded.info["architecture"] == FAMILIES[name].arch
        ours = np.array(loaded.model(mx.array(IDS)[None])[0])
        assert np.abs(ours - ref).max() < TOLERANCE.get(name, 1e-3)
        assert (ours.argmax(-1) == ref.argmax(-1)).all()
    finally:
        runner.unload(loaded)


@pytest.mark.parametrize(("name", "qtype"), [("llama", "Q4_0"), ("qwen3moe", "Q4_0"), ("gemma3", "Q4_0"),
                                           ("gpt-oss", "Q4_0"), ("deepseek3", "Q4_0"), ("deepseek3", "Q4_K"),
                                           ("phi3-longrope", "Q4_K")])
def test_quantized_families_stay_packed_on_the_quantized_path(store, built, name, qtype, monkeypatch):
    """With float32 off, Q4_0/Q4_K weights (experts included) stay packed and still match.
    (The Q4_K files' super-scales are powers of two, so float16 scales hold them exactly.)"""
    import mlx.core as mx
    import mlx.nn as nn

    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    monkeypatch.setenv("MLXLITE_FLOAT32_ON_CPU", "0")
    b = built(name, qtype)
    import_path(store, b.path, f"tiny-{name}-q")
    loaded = runner.load(store, store.resolve(f"tiny-{name}-q"))
    try:
        assert loaded.info["weights"] == "quantized"
        layer = loaded.model.model.layers[-1]
        assert isinstance(layer.self_attn.o_proj, nn.QuantizedLinear) and layer.self_attn.o_proj.bits == 4
        experts = {"qwen3moe": lambda: layer.mlp.switch_mlp.gate_proj, "gpt-oss": lambda: layer.mlp.experts.down_proj,
                   "deepseek3": lambda: layer.mlp.switch_mlp.up_proj}
        if name in experts:
            assert type(experts[name]()).__name__ == "QuantizedSwitchLinear" and experts[name]().bits == 4
        if name == "deepseek3":  # llama.cpp's k_b/v_b are mlx-lm's absorbed MLA weights: packed as they came
            assert type(layer.self_attn.embed_q).__name__ == "QuantizedMultiLinear"
            assert layer.self_attn.unembed_out.bits == (5 if qtype == "Q4_K" else 4)  # 64 wide: Q5_0
            assert loaded.info["tensors"][qtype]["how"] == "repacked"
        ours = np.array(loaded.model(mx.array(IDS)[None])[0])
        # quantized_matmul sums in another order than a float32 matmul: measured ~1e-5.
        assert np.abs(ours - torch_logits(b.reference, IDS)).max() < 1e-3
    finally:
        runner.unload(loaded)


@pytest.mark.parametrize("name", ["deepseek3", "phi3-longrope"])
def test_decoding_token_by_token_matches_the_reference(store, built, name, monkeypatch):
    """Decode runs other code than a prompt: DeepSeek-V3's one-token step attends through the
    absorbed MLA weights (packed embed_q/unembed_out, llama.cpp's k_b/v_b), and phi3's
    LongRoPE rotates at the cache's offset, here across the original context (8). Each
    step's logits equal the reference's at that position."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    monkeypatch.setenv("MLXLITE_FLOAT32_ON_CPU", "0")
    b = built(name, "Q4_K")
    ref = torch_logits(b.reference, IDS)
    import_path(store, b.path, f"tiny-{name}-d")
    loaded = runner.load(store, store.resolve(f"tiny-{name}-d"))
    try:
        cache = make_prompt_cache(loaded.model)
        prompt = np.array(loaded.model(mx.array(IDS[:5])[None], cache=cache)[0])
        assert np.abs(prompt - ref[:5]).max() < 1e-3
        for i in range(5, len(IDS)):
            step = np.array(loaded.model(mx.array([[IDS[i]]]), cache=cache)[0, -1])
            assert np.abs(step - ref[i]).max() < 1e-3, i
    finally:
        runner.unload(loaded)


def test_deepseek3_batches_and_reuses_its_latent_cache(store, built, monkeypatch):
    """V3's cache holds the MLA latent and the rotary keys (not per-head keys and values,
    and of two widths): batched members still decode what they decode alone, one joining
    mid-flight, and a kept cache serves a longer prompt."""
    from mlxlite import options
    from mlxlite.engine import runner
    from mlxlite.store.importers import import_path

    monkeypatch.setenv("MLXLITE_FLOAT32_ON_CPU", "0")
    import_path(store, built("deepseek3", "Q4_K").path, "tiny-deepseek3-b")
    loaded = runner.load(store, store.resolve("tiny-deepseek3-b"))
    greedy = options.parse({"temperature": 0, "num_predict": 8})

    def drive(dec, got: dict, steps: int = 10_000) -> dict:
        while len(dec) and steps:
            steps -= 1
            for key, item in dec.step(lambda k: False):
                got.setdefault(key, []).append(item)
        return {k: [p.token for p in items[:-1]] for k, items in got.items()}

    try:
        prompts = [IDS, IDS[3:11], [42, 7, 250, 1], IDS[::-1]]
        want = [[p.token for p in list(runner.generate(loaded, ids, greedy))[:-1]] for ids in prompts]
        dec = runner.decoder(loaded, 4, keep_caches=True)
        got: dict = {}
        for k in range(3):
            dec.add(k, prompts[k], greedy)
        drive(dec, got, steps=3)
        dec.add(3, prompts[3], greedy)   # joins the running batch
        assert drive(dec, got) == dict(enumerate(want))
        tokens, cache = dec.take_cache(0)
        follow = tokens + [5, 17, 100]
        alone = [p.token for p in list(runner.generate(loaded, follow, greedy))[:-1]]
        dec.add("b", follow, greedy, prompt_cache=runner.cache_prefix(cache, len(tokens)), cached_tokens=len(tokens))
        assert drive(dec, {})["b"] == alone
    finally:
        runner.unload(loaded)


def test_deepseek3_files_from_before_the_mla_split_load_too(store, built, tmp_path):
    """llama.cpp wrote kv_b_proj whole (`attn_kv_b`) until it split it for its MLA kernels;
    on deepseek_v3 that loads as `kv_b_proj`, which mlx-lm's sanitize splits itself."""
    import mlx.core as mx

    from mlxlite.engine import runner
    from mlxlite.formats import gguf
    from mlxlite.store.importers import import_path

    b = make_family("deepseek3", "F32", tmp_path, mla_split=False)
    names = {t.name for t in gguf.read_gguf(b.path).tensors}
    assert "blk.1.attn_kv_b.weight" in names and "blk.1.attn_k_b.weight" not in names
    import_path(store, b.path, "tiny-deepseek3-kvb")
    loaded = runner.load(store, store.resolve("tiny-deepseek3-kvb"))
    try:
        ours = np.array(loaded.model(mx.array(IDS)[None])[0])
        assert np.abs(ours - torch_logits(b.reference, IDS)).max() < 1e-3
    finally:
        runner.unload(loaded)


def test_show_names_the_mlx_lm_class_each_file_runs_on(store, built, run_cli, tiny_gguf_bad_arch):
    """`show` says from the header which class loads a file: deepseek2 files split by their
    routing (V3's sigmoid onto deepseek_v3, V2's softmax onto deepseek_v2); a file nothing
    loads says why."""
    import json

    from mlxlite.store.importers import import_path

    for name, want in (("deepseek3", "mlx-lm deepseek_v3"), ("deepseek2", "mlx-lm deepseek_v2"),
                       ("phi3-longrope", "mlx-lm phi3")):
        import_path(store, built(name, "Q8_0").path, f"tiny-{name}-s")
        code, out, _ = run_cli("show", f"tiny-{name}-s", "--json")
        assert code == 0 and json.loads(out)["runs_on"] == want
    code, out, _ = run_cli("show", "tiny-deepseek3-s")
    assert code == 0 and "runs on mlx-lm deepseek_v3" in " ".join(out.split())
    import_path(store, tiny_gguf_bad_arch, "tiny-bad-arch")
    info = json.loads(run_cli("show", "tiny-bad-arch", "--json")[1])
    assert info["runs_on"].startswith("nothing: GGUF architecture") and "is not supported" in info["runs_on"]


def test_float32_budget_counts_every_expert_of_a_stacked_tensor(built):
    """The CPU float32 decision must see a MoE model's real size: a [experts, rows, cols]
    packed stack is experts * rows * cols floats, not experts * cols."""
    import mlx.core as mx

    from mlxlite.engine import quants
    from mlxlite.formats import gguf

    path = built("qwen3moe", "Q4_0").path
    raw = mx.load(str(path))
    packed = {k: v for k, v in raw.items() if k.startswith("blk.1.ffn_up_exps.")}
    stack = packed["blk.1.ffn_up_exps.weight"]
    dense = mx.dequantize(stack, packed["blk.1.ffn_up_exps.scales"], packed["blk.1.ffn_up_exps.biases"],
                          group_size=32, bits=4)
    header = gguf.read_gguf(path)
    (info,) = [t for t in header.tensors if t.name == "blk.1.ffn_up_exps.weight"]
    # The decision is made from the header now: the stack counts as every expert's floats.
    assert stack.ndim == 3 and 4 * dense.size == 4 * int(np.prod(info.shape))
    assert quants.float32_bytes(header) == sum(4 * int(np.prod(t.shape)) for t in header.tensors)


def test_gemma3_files_with_an_inline_vision_tower_load_as_text(built):
    """Ollama's gemma3 files carry the vision tower (`v.*`, `mm.*`) inline; the text model skips it."""
    import mlx.core as mx

    from mlxlite.engine import gguf as engine_gguf
    from mlxlite.formats import gguf

    b = built("gemma3", "F32")
    header = gguf.read_gguf(b.path)
    raw = mx.load(str(b.path))
    raw["v.blk.0.attn_k.weight"] = mx.zeros((8, 8))
    raw["mm.input_projection.weight"] = mx.zeros((8, 8))
    weights = engine_gguf.to_mlx_names(raw, header, gguf.model_config(header))
    assert "model.layers.0.self_attn.q_norm.weight" in weights
    assert not any(k.startswith(("v.", "mm.")) or ".v." in k for k in weights)
