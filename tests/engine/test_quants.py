"""GGUF blocks -> MLX's quantized formats (engine/quants.py), against `gguf`'s reference
dequantization: exact repacks bit for bit, re-quantized K-quants within a stated bound, a
whole K-quant model against a numpy forward pass, `show`, and peak memory while loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf as gguf_py
import numpy as np
import pytest

from mlxlite.errors import Unsupported
from mlxlite.formats import gguf
from tests.tiny_models import KCONFIG, KQUANT_TYPES, random_blocks, write_q4_k_m

ROOT = Path(__file__).resolve().parents[2]
ROWS, COLS = 40, 512
EXACT = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "TQ1_0": 2, "TQ2_0": 2}
# Zeros may differ in sign only: gguf computes d*(q-8) (or d*x) where MLX computes scale*q +
# bias, so for a negative d gguf's zero is -0.0 and MLX's +0.0; MXFP4's code 8 is -0 in the
# MX spec (MLX) and +0 in gguf's table. Every other bit of every value agrees.
SIGNED_ZERO = {"Q4_0", "Q5_0", "Q8_0", "MXFP4"}


def _raw(kind: str, rng, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """Random valid blocks, with negative super-scales too (the format allows them)."""
    qtype = gguf_py.GGMLQuantizationType[kind]
    per, size = gguf_py.GGML_QUANT_SIZES[qtype]
    if kind == "MXFP4":  # every code, exponents across the range (255 is NaN in MX, not a weight)
        raw = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
        raw[:, 0] = rng.integers(100, 140, raw.shape[0])
        raw[:4, 0] = [0, 1, 2, 254]
        return raw.reshape(rows, -1)
    raw = np.frombuffer(random_blocks(kind, rows, cols, rng), np.uint8).reshape(rows * cols // per, size).copy()
    if kind in ("Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"):
        at = {"Q6_K": 208, "Q3_K": 108, "Q2_K": 80}.get(kind, 0)
        d = raw[:, at:at + 2].copy().view(np.float16)
        flip = rng.random(d.shape) < 0.3
        raw[:, at:at + 2] = np.where(flip, -d, d).view(np.uint8)
    return raw.reshape(rows, -1)


def _read(tmp_path, kind: str, raw: np.ndarray, cols: int = COLS, **kw):
    import mlx.core as mx

    from mlxlite.engine import quants

    path = tmp_path / f"{kind}.bin"
    pad = b"\0" * 96  # the tensor starts at data_offset + offset, neither page-aligned
    path.write_bytes(pad + raw.tobytes())
    info = gguf.TensorInfo("blk.0.ffn_up.weight", (cols, raw.shape[0]), gguf_py.GGMLQuantizationType[kind].value, 64)
    t = quants.read_tensor(path, info, 32, **kw)
    mx.eval(t.weight)
    return t


def _reference(kind: str, raw: np.ndarray) -> np.ndarray:
    return gguf_py.quants.dequantize(raw, gguf_py.GGMLQuantizationType[kind])


def _mlx_float32(t) -> np.ndarray:
    """What MLX computes with: its own dequantization, scales and biases as float32."""
    import mlx.core as mx

    if t.mode == "mxfp4":
        return np.array(mx.dequantize(t.weight, t.scales, None, group_size=32, bits=4, mode="mxfp4",
                                      dtype=mx.float32))
    return np.array(mx.dequantize(t.weight, t.scales.astype(mx.float32), t.biases.astype(mx.float32),
                                  group_size=32, bits=t.bits))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several chunks (and threads) per tensor, as a real model's large tensors get."""
    from mlxlite.engine import quants

    monkeypatch.setattr(quants, "CHUNK", 3 * COLS)
    monkeypatch.setattr(quants, "WORKERS", 2)


# ---- MLX's layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_writes_the_words_mx_quantize_writes(bits):
    """mx.quantize is the layout's definition: recover its q values, pack them, get its words."""
    import mlx.core as mx

    from mlxlite.engine.quants import pack

    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    deq = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=bits))
    s, b = np.array(scales).repeat(32, 1), np.array(biases).repeat(32, 1)
    q = np.rint((deq - b) / s).astype(np.uint8)
    assert q.max() == (1 << bits) - 1 and q.min() == 0
    assert np.array_equal(pack(q, bits), np.array(packed))


# gguf's MXFP4 multiplies its way to inf for exponent 254 (so does MLX): not a failure
GGUF_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")


# ---- exact repacks ----------------------------------------------------------------------------------
@GGUF_OVERFLOW
@pytest.mark.parametrize("kind", [*EXACT, "MXFP4"])
def test_exact_types_dequantize_bit_for_bit_like_gguf(tmp_path, kind):
    import mlx.core as mx

    raw = _raw(kind, np.random.default_rng(1))
    t = _read(tmp_path, kind, raw, scale_dtype=mx.float32)
    assert (t.how, t.bits, t.mode) == ("repacked", 4 if kind == "MXFP4" else EXACT[kind],
                                       "mxfp4" if kind == "MXFP4" else "affine")
    assert t.weight.dtype == mx.uint32 and t.weight.shape == (ROWS, COLS * t.bits // 32)
    ours, ref = _mlx_float32(t), _reference(kind, raw)
    assert np.array_equal(ours, ref)  # as floats (-0.0 == 0.0)
    same_bits = ours.view(np.uint32) == ref.view(np.uint32)
    if kind in SIGNED_ZERO:
        assert np.all(same_bits | (ref == 0)) and not np.all(same_bits)  # the -0.0 case does occur
    else:
        assert np.all(same_bits)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K"])
def test_float16_scales_at_run_time_cost_a_measured_rounding(tmp_path, kind):
    """At run time K-quant scales d*sc (17 bits) are stored as float16, as MLX stores scales:
    each value moves by at most half a float16 step of its group's scale and bias, and the
    load reports the largest move."""
    import mlx.core as mx

    raw = _raw(kind, np.random.default_rng(2))
    t = _read(tmp_path, kind, raw)
    assert t.scales.dtype == mx.float16 and t.how == "repacked"
    ours, ref = _mlx_float32(t), _reference(kind, raw)
    err = np.abs(ours - ref)
    s = np.abs(np.array(t.scales.astype(mx.float32))).repeat(32, 1)
    b = np.abs(np.array(t.biases.astype(mx.float32))).repeat(32, 1)
    top = (1 << t.bits) - 1
    assert np.all(err <= 2.0 ** -11 * (top * s + b) + 2.0 ** -23 * np.abs(ref))
    assert 0 < err.max() <= t.error["max_abs"] <= err.max() * 1.01 + 1e-9
    assert t.error["max_abs"] < 1e-3 * np.abs(ref).max()


# ---- re-quantized K-quants ------------------------------------------------------------------------
# Mean error / mean source step on random blocks (measured 0.070, 0.141, 0.043): random
# sub-block scales are the worst case, real files' neighbouring scales are closer.
MEAN_BOUND = {"Q6_K": (8, 0.1), "Q3_K": (4, 0.2), "Q2_K": (4, 0.08)}


@pytest.mark.parametrize("kind", list(MEAN_BOUND))
def test_requantized_types_land_within_half_a_stored_step(tmp_path, kind):
    """16-wide sub-blocks have no exact 32-group form: a group whose halves share scale and
    bias keeps its values (up to float16 rounding of scale and bias), the others get min/max
    steps with the stored bias rounded down and scale rounded up, so nothing clips and every
    value is within half a stored step. The bound, per group g with stored S_g, B_g:
        |mlx - gguf| <= S_g / 2 + 2^-11 (top*|S_g| + |B_g|) + float32 rounding."""
    import mlx.core as mx

    from mlxlite.engine import quants

    bits, mean_bound = MEAN_BOUND[kind]
    raw = _raw(kind, np.random.default_rng(3))
    t = _read(tmp_path, kind, raw)
    assert (t.how, t.bits, t.scales.dtype) == ("requantized", bits, mx.float16)
    ours, ref = _mlx_float32(t), _reference(kind, raw)
    err = np.abs(ours - ref)
    S = np.abs(np.array(t.scales.astype(mx.float32))).repeat(32, 1)
    B = np.abs(np.array(t.biases.astype(mx.float32))).repeat(32, 1)
    slack = 2.0 ** -21 * np.maximum(np.abs(ref), B)
    assert np.all(err <= S / 2 + 2.0 ** -11 * (((1 << bits) - 1) * S + B) + slack)
    q, s, _ = quants.AFFINE[kind][0](raw.reshape(-1, raw.shape[1] // (COLS // 256)))
    source_step = np.abs(s).mean()
    assert err.mean() < mean_bound * source_step
    # ... and the load reports what it measured.
    assert t.error["max_abs"] == pytest.approx(err.max(), rel=1e-3)
    assert t.error["mean_abs"] == pytest.approx(err.mean(), rel=1e-3)


# ---- dequantized, float, unsupported --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["IQ4_NL", "IQ4_XS"])
def test_iq4_types_are_dequantized_to_the_reference_floats(tmp_path, kind):
    import mlx.core as mx

    raw = _raw(kind, np.random.default_rng(4))
    t = _read(tmp_path, kind, raw, float_dtype=mx.float32)
    assert t.how == "dequantized" and t.scales is None and t.weight.dtype == mx.float32
    ref = _reference(kind, raw)
    assert np.array_equal(np.array(t.weight).view(np.uint32), ref.view(np.uint32))
    half = _read(tmp_path, kind, raw, float_dtype=mx.float16)
    assert np.array_equal(np.array(half.weight), ref.astype(np.float16))


@GGUF_OVERFLOW
@pytest.mark.parametrize("kind", [*EXACT, "MXFP4", "Q6_K", "Q3_K", "Q2_K"])
def test_dequantize_mode_gives_the_reference_floats(tmp_path, kind):
    """The CPU float32 choice gets gguf's values, not the re-quantized ones."""
    import mlx.core as mx

    raw = _raw(kind, np.random.default_rng(5))
    t = _read(tmp_path, kind, raw, dequantize=True, float_dtype=mx.float32)
    assert t.how == "float" and t.scales is None
    assert np.array_equal(np.array(t.weight), _reference(kind, raw))


def test_float_types_are_read_as_stored(tmp_path):
    import mlx.core as mx

    w = np.random.default_rng(6).standard_normal((ROWS, 64)).astype(np.float32)
    for kind, data, f32 in (("F32", w, w), ("F16", w.astype(np.float16), w.astype(np.float16).astype(np.float32)),
                            ("BF16", gguf_py.quants.quantize(w, gguf_py.GGMLQuantizationType.BF16), None)):
        bf = gguf_py.quants.dequantize(data, gguf_py.GGMLQuantizationType.BF16) if kind == "BF16" else f32
        native = _read(tmp_path, kind, np.ascontiguousarray(data).view(np.uint8).reshape(ROWS, -1), cols=64)
        wide = _read(tmp_path, kind, np.ascontiguousarray(data).view(np.uint8).reshape(ROWS, -1), cols=64,
                     float_dtype=mx.float32)
        assert native.weight.dtype == {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}[kind]
        assert wide.weight.dtype == mx.float32 and native.how == wide.how == "float"
        assert np.array_equal(np.array(native.weight.astype(mx.float32)), bf)
        assert np.array_equal(np.array(wide.weight), bf)


def test_types_without_an_mlx_form_and_ragged_rows_are_named(tmp_path):
    rng = np.random.default_rng(8)
    with pytest.raises(Unsupported, match="IQ2_XXS"):
        _read(tmp_path, "IQ2_XXS", rng.integers(0, 256, (4, 66), dtype=np.uint8), cols=256)
    with pytest.raises(Unsupported, match="rows of 128 do not split into Q4_K blocks of 256"):
        _read(tmp_path, "Q4_K", rng.integers(0, 256, (4, 72), dtype=np.uint8), cols=128)


# ---- a whole model --------------------------------------------------------------------------------
def _numpy_forward(path: Path, ids: list[int], weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """A float64 llama forward pass over the GGUF's tensors as stored: gguf's dequantization
    (or `weights`), llama.cpp's permuted Q/K rows with GGML's interleaved RoPE, so nothing of
    our loader (names, un-permute, repack) is reused."""
    c = KCONFIG
    w = weights or {t.name: gguf_py.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
                    for t in gguf_py.GGUFReader(path).tensors}
    nh, nkv, hd, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    T = len(ids)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    angle = np.arange(T)[:, None] * c["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

    def rope(v):  # GGML mode 0: rotate adjacent pairs
        out = np.empty_like(v)
        a, b = v[..., 0::2], v[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    x = w["token_embd.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(c["num_hidden_layers"]):
        p = f"blk.{i}."
        y = rms(x, w[p + "attn_norm.weight"])
        q = rope((y @ w[p + "attn_q.weight"].T).reshape(T, nh, hd))
        k = np.repeat(rope((y @ w[p + "attn_k.weight"].T).reshape(T, nkv, hd)), nh // nkv, axis=1)
        v = np.repeat((y @ w[p + "attn_v.weight"].T).reshape(T, nkv, hd), nh // nkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(T, nh * hd)
        x = x + o @ w[p + "attn_output.weight"].T
        y = rms(x, w[p + "ffn_norm.weight"])
        g = y @ w[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (y @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return rms(x, w["output_norm.weight"]) @ w["output.weight"].T


IDS = [5, 17, 42, 99, 250, 3, 77, 140]
MLX_BITS = {"Q4_K": 4, "Q5_K": 5, "Q6_K": 8, "Q3_K": 4, "Q2_K": 4, "Q5_0": 5, "Q5_1": 5, "MXFP4": 4}


@pytest.fixture
def kquant_model(store, tiny_kquant_gguf) -> str:
    from mlxlite.store.importers import import_path

    import_path(store, tiny_kquant_gguf, "tiny-kquants")
    return "tiny-kquants"


def test_kquant_model_stays_quantized_and_matches_a_numpy_forward_pass(store, kquant_model, tiny_kquant_gguf,
                                                                        monkeypatch):
    """Quantized path (MLXLITE_FLOAT32_ON_CPU=0): every module is quantized as its GGML type
    says; MLX's logits equal a numpy forward pass over the weights MLX holds (its own
    dequantization, mapped back to GGUF names and layout) to float32 summation order; and
    those weights are gguf's within the bounds above, so the logits stay near gguf's."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlxlite.engine import runner
    from mlxlite.formats.gguf import map_name
    from tests.tiny_models import permute_qk

    monkeypatch.setenv("MLXLITE_FLOAT32_ON_CPU", "0")
    loaded = runner.load(store, store.resolve(kquant_model))
    try:
        model = loaded.model
        assert loaded.info["weights"] == "quantized"
        modules = dict(model.named_modules())
        for name, kind in KQUANT_TYPES.items():
            path = map_name(name).rpartition(".")[0]
            m = modules[path]
            if kind in MLX_BITS:
                assert isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)), name
                assert (m.bits, m.group_size, m.mode) == (MLX_BITS[kind], 32, "mxfp4" if kind == "MXFP4" else "affine")
            elif kind.startswith("IQ4"):
                assert type(m) is nn.Linear and m.weight.dtype == mx.float32, name
        assert modules["model.embed_tokens"].scales.dtype == mx.float32  # float32 activations on CPU
        assert modules["model.layers.0.mlp.up_proj"].scales.dtype == mx.float16
        tensors = loaded.info["tensors"]
        assert tensors["Q4_K"]["how"] == "repacked" and tensors["Q4_K"]["tensors"] == 4
        assert tensors["Q6_K"]["how"] == "requantized" and tensors["Q6_K"]["bits"] == 8
        assert 0 < tensors["Q6_K"]["mean_abs_error"] < tensors["Q6_K"]["max_abs_error"]
        assert tensors["IQ4_NL"]["how"] == tensors["IQ4_XS"]["how"] == "dequantized"
        assert tensors["MXFP4"] == {"how": "repacked", "tensors": 1, "bits": 4}

        logits = np.array(model(mx.array(IDS)[None])[0]).astype(np.float64)
        # MLX's own weights as float, back in GGUF's names and (permuted) layout.
        held = {}
        for name in KQUANT_TYPES:
            path = map_name(name).rpartition(".")[0]
            m = modules[path]
            if hasattr(m, "scales"):
                affine = m.mode == "affine"
                w = mx.dequantize(m.weight, m.scales.astype(mx.float32) if affine else m.scales,
                                  m.biases.astype(mx.float32) if affine else None, group_size=32, bits=m.bits,
                                  mode=m.mode, dtype=mx.float32)
            else:
                w = m.weight
            w = np.array(w.astype(mx.float32)).astype(np.float64)
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = KCONFIG["num_attention_heads"] if "attn_q" in name else KCONFIG["num_key_value_heads"]
                w = permute_qk(w, heads)
            held[name] = w
        mine = _numpy_forward(tiny_kquant_gguf, IDS, held)
        assert np.abs(logits - mine).max() < 1e-4 * np.abs(mine).max()
        # Against gguf's values: Q3_K/Q2_K go to 4 bits on purpose (on these random blocks,
        # the worst case, that moves their weights by 7% and 4% rms); taking MLX's values for
        # those two only, the rest (Q6_K at 8 bits, float16 K-quant scales) moves the logits
        # by about 1% of their range.
        gguf_w = {t.name: gguf_py.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
                  for t in gguf_py.GGUFReader(tiny_kquant_gguf).tensors}
        coarse = {k: held[k] for k, kind in KQUANT_TYPES.items() if kind in ("Q3_K", "Q2_K")}
        near = _numpy_forward(tiny_kquant_gguf, IDS, {**gguf_w, **coarse})
        assert np.abs(logits - near).max() < 0.03 * np.abs(near).max()
        ref = _numpy_forward(tiny_kquant_gguf, IDS, gguf_w)
        assert np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()
    finally:
        runner.unload(loaded)


def test_kquant_model_float32_path_matches_the_numpy_forward_pass(store, kquant_model, tiny_kquant_gguf):
    """The CPU float32 choice (fits the budget): gguf's exact values, float32 logits."""
    import mlx.core as mx

    from mlxlite.engine import runner

    loaded = runner.load(store, store.resolve(kquant_model))
    try:
        assert loaded.info["weights"] == "float32"
        assert all(v["how"] in ("float", "dequantized") for v in loaded.info["tensors"].values())
        logits = np.array(loaded.model(mx.array(IDS)[None])[0]).astype(np.float64)
        ref = _numpy_forward(tiny_kquant_gguf, IDS)
        assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()
    finally:
        runner.unload(loaded)


def test_show_says_which_tensors_are_requantized_and_dequantized(run_cli, kquant_model, tiny_gguf_model):
    code, out, _ = run_cli("show", kquant_model, "--json")
    info = json.loads(out)
    assert info["requantized_at_load"] == "5 tensors (Q2_K -> 4 bits, Q3_K -> 4 bits, Q6_K -> 8 bits)"
    assert info["dequantized_at_load"] == "2 tensors (IQ4_NL, IQ4_XS)"
    code, out, _ = run_cli("show", kquant_model)
    assert code == 0 and "dequantized at load 2 tensors (IQ4_NL, IQ4_XS)" in " ".join(out.split())
    info = json.loads(run_cli("show", tiny_gguf_model, "--json")[1])
    assert info["requantized_at_load"] == info["dequantized_at_load"] == "none"


# ---- peak memory -------------------------------------------------------------------------------------
PEAK_CHILD = r"""
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import mlx.core as mx
import mlx_lm.models.llama, mlx_lm.tokenizer_utils, transformers  # imported before the baseline
from mlxlite.engine import gguf as engine_gguf
from mlxlite.formats import gguf
path = Path(sys.argv[1])
header = gguf.read_gguf(path)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model, *_, cfg = engine_gguf.load_gguf(path, on_cpu=True, float32=False, budget=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from mlx.utils import tree_flatten
print(json.dumps({"before": before, "peak": peak, "held": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
                  "tensors": cfg["_tensors"]}))
"""


@pytest.mark.slow
def test_loading_a_q4_k_m_file_peaks_under_1_3_times_its_size(tmp_path):
    """Llama-3.2-3B's shape (3.6 GiB as float16: a float16 copy of the model would show).
    Peak RSS of a fresh process loading it on the quantized path stays under 1.3x the file
    over what the process held before (python, mlx, mlx-lm imported)."""
    path = tmp_path / "q4km.gguf"
    size = write_q4_k_m(path, layers=28, hidden=3072, inter=8192, heads=24, kv_heads=8, vocab=128256)
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(path), str(ROOT)], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "MLXLITE_OPENBLAS": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["before"]
    assert r["tensors"]["Q4_K"]["how"] == "repacked" and r["tensors"]["Q6_K"]["how"] == "requantized"
    assert r["held"] < 1.25 * size  # the quantized weights themselves
    assert grown < 1.3 * size, (grown / size, r)
