"""`create --quantize`: a float model (safetensors directory or stored model, or a float GGUF)
quantized into MLX's q4, q8, mxfp4 and nvfp4, stored as safetensors + config.json that our
loader and mlx-lm's own `load` read; logits stay near the float model's, files shrink by the
bits per weight, a quantized source or an unknown type is a clear error."""

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxlite import store as st
from mlxlite.engine import model as engine_model
from mlxlite.engine.quantize import _info_lines_to, quantize_model
from mlxlite.errors import BadRequest
from mlxlite.modelfile import CreateSpec, create
from mlxlite.modelfile.quantize import TYPES, parse_type

IDS = [5, 17, 42, 99, 130, 7, 256, 64, 3, 200, 11, 150]
# Relative RMS error per quantized matrix against its float original (dequantized as MLX
# does): a Gaussian row's 4-bit affine step over group 64 gives ~0.09, 8 bits ~16x less;
# e2m1 codes give ~0.115 with mxfp4's power-of-two scales, ~0.095 with nvfp4's e4m3 ones.
WEIGHT_TOLERANCE = {"q8": 0.008, "q4": 0.1, "mxfp4": 0.13, "nvfp4": 0.11}
# Relative RMS error of the logits against the float model's: this random 2-layer network
# amplifies its weights' error ~5-6x (measured: q8 0.036, q4 0.48, mxfp4 0.56, nvfp4 0.56).
TOLERANCE = {"q8": 0.06, "q4": 0.6, "mxfp4": 0.7, "nvfp4": 0.7}
# Bits per weight of a quantized matrix: the codes plus the group's scale (and bias for affine),
# the scales in the source's float32 for affine, one byte for the fp4 formats.
BPW = {"q4": 4 + 2 * 32 / 64, "q8": 8 + 2 * 32 / 64, "mxfp4": 4 + 8 / 32, "nvfp4": 4 + 8 / 16}


def _logits(store, name: str) -> np.ndarray:
    loaded = engine_model.load(store, store.resolve(name))
    out = loaded.model(mx.array([IDS]))
    return np.array(out[0].astype(mx.float32))


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _weights_bytes(store, name: str) -> int:
    entry = store.resolve(name)
    return sum(layer.size for title, layer in entry.manifest.files().items()
               if title.endswith((".safetensors", ".gguf")))


def _quantized(store, base: str, name: str, qtype: str) -> list[str]:
    lines: list[str] = []
    create(store, name, CreateSpec(from_=base, quantize=qtype), say=lines.append, quantizer=quantize_model)
    return lines


@pytest.mark.parametrize("qtype", list(TYPES))
def test_quantized_safetensors_logits_stay_near_the_float_models(store, tiny_safetensors_model, qtype):
    want = _logits(store, tiny_safetensors_model)
    lines = _quantized(store, tiny_safetensors_model, f"tiny-{qtype}", qtype)
    assert lines[0].startswith(f"quantizing float32 safetensors model {tiny_safetensors_model}:latest to {qtype}")
    assert lines[-2:] == ["writing manifest", "success"]
    got = _logits(store, f"tiny-{qtype}")
    err = _rel_err(got, want)
    assert 0 < err < TOLERANCE[qtype], err
    mode, bits, group = TYPES[qtype]
    view = store.view(store.resolve(f"tiny-{qtype}"))
    cfg = json.loads((view / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"] == {"group_size": group, "bits": bits, "mode": mode}
    floats = mx.load(str(store.view(store.resolve(tiny_safetensors_model)) / "model.safetensors"))
    packed = mx.load(str(view / "model.safetensors"))
    matrices = [k for k, v in floats.items() if v.ndim == 2]
    assert len(matrices) == 15  # the tied embedding and 7 per layer: every one is quantized
    for key in matrices:
        prefix = key.removesuffix(".weight")
        back = mx.dequantize(packed[key], packed[f"{prefix}.scales"], packed.get(f"{prefix}.biases"),
                             group_size=group, bits=bits, mode=mode).astype(mx.float32)
        assert _rel_err(np.array(back), np.array(floats[key])) < WEIGHT_TOLERANCE[qtype], key
    # Every matrix is quantized (norms stay float32): the file shrinks by about the bits per weight.
    ratio = _weights_bytes(store, f"tiny-{qtype}") / _weights_bytes(store, tiny_safetensors_model)
    assert BPW[qtype] / 32 < ratio < BPW[qtype] / 32 * 1.15, ratio


def test_q8_is_closer_than_q4(store, tiny_safetensors_model):
    want = _logits(store, tiny_safetensors_model)
    _quantized(store, tiny_safetensors_model, "t8", "q8")
    _quantized(store, tiny_safetensors_model, "t4", "q4")
    assert _rel_err(_logits(store, "t8"), want) * 8 < _rel_err(_logits(store, "t4"), want)


def test_show_reports_the_quantization_and_the_rest_is_shared(store, tiny_safetensors_model, run_cli):
    _quantized(store, tiny_safetensors_model, "tiny-mx", "mxfp4")
    base, entry = store.resolve(tiny_safetensors_model), store.resolve("tiny-mx")
    assert store.read_config(entry)["quantization"] == "MXFP4 (group 32)"
    shared = {t: layer for t, layer in base.manifest.files().items() if t.startswith("tokenizer")}
    assert shared and all(entry.manifest.files()[t] == layer for t, layer in shared.items())
    code, out, _ = run_cli("show", "tiny-mx")
    assert code == 0 and "MXFP4 (group 32)" in out
    _quantized(store, tiny_safetensors_model, "tiny-q4", "q4")
    assert store.read_config(store.resolve("tiny-q4"))["quantization"] == "Q4 (group 64)"


def test_mlx_lm_loads_the_result(store, tiny_safetensors_model):
    from mlx_lm import load

    _quantized(store, tiny_safetensors_model, "tiny-nv", "nvfp4")
    model, tokenizer = load(str(store.view(store.resolve("tiny-nv"))))
    got = np.array(model(mx.array([IDS]))[0].astype(mx.float32))
    assert _rel_err(got, _logits(store, "tiny-nv")) < 1e-3
    assert tokenizer.encode("Hello world")


@pytest.mark.parametrize("qtype", ["q4", "q8"])
def test_a_float_gguf_becomes_an_mlx_model(store, tiny_float_gguf, qtype):
    from mlx_lm import load

    from mlxlite.store.importers import import_path

    import_path(store, tiny_float_gguf, "tiny-f16")
    want = _logits(store, "tiny-f16")
    lines = _quantized(store, "tiny-f16", "tiny-f16-q", qtype)
    assert lines[0].startswith(f"quantizing F16 GGUF model tiny-f16:latest to {qtype}")
    entry = store.resolve("tiny-f16-q")
    assert not entry.manifest.layers_of(st.MEDIA_GGUF)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(entry.manifest.files())
    assert _rel_err(_logits(store, "tiny-f16-q"), want) < TOLERANCE[qtype]
    model, tokenizer = load(str(store.view(entry)))
    assert _rel_err(np.array(model(mx.array([IDS]))[0].astype(mx.float32)), want) < TOLERANCE[qtype]
    # The tokenizer written from the GGUF's metadata encodes as the GGUF's own does.
    gguf_loaded = engine_model.load(store, store.resolve("tiny-f16"))
    text = "Hello world! <|im_start|>user café"
    assert tokenizer.encode(text, add_special_tokens=False) == engine_model.tokenize(gguf_loaded, text, False)
    ratio = _weights_bytes(store, "tiny-f16-q") / _weights_bytes(store, "tiny-f16")
    assert ratio < BPW[qtype] / 16


def test_a_quantized_source_is_a_clear_error_and_writes_nothing(store, tiny_safetensors_model, tiny_gguf_model):
    _quantized(store, tiny_safetensors_model, "tiny-q4", "q4")
    before = sorted(e.name.display for e in store.list())
    with pytest.raises(BadRequest, match=r"already quantized \(4-bit affine\)"):
        _quantized(store, "tiny-q4", "again", "q8")
    with pytest.raises(BadRequest, match=r"already quantized \(GGUF Q4_0, Q4_1, Q8_0\)"):
        _quantized(store, tiny_gguf_model, "again", "q4")
    assert sorted(e.name.display for e in store.list()) == before
    assert not [p for p in store.root.iterdir() if p.name.startswith(st.TMP_PREFIX)]


def test_types_and_ollamas_names():
    assert parse_type("Q4") == "q4" and parse_type("q4_K_M") == "q4" and parse_type("q8_0") == "q8"
    assert parse_type("MXFP4") == "mxfp4" and parse_type("nvfp4") == "nvfp4"
    for bad in ("q3", "fp8", "", 4):
        with pytest.raises(BadRequest, match="quantization type"):
            parse_type(bad)


def test_cli_create_quantizes_a_model_directory(store, tiny_safetensors_dir, tmp_path, run_cli):
    (tmp_path / "Modelfile").write_text(f"FROM {tiny_safetensors_dir}\nPARAMETER temperature 0\n")
    code, out, err = run_cli("create", "tiny-cli", "-f", str(tmp_path / "Modelfile"), "--quantize", "nvfp4")
    assert code == 0, err
    assert "to nvfp4 (nvfp4, 4 bits, group 16)" in out and out.rstrip().endswith("success")
    assert store.read_config(store.resolve("tiny-cli"))["quantization"] == "NVFP4 (group 16)"
    code, out, err = run_cli("create", "tiny-bad", "-f", str(tmp_path / "Modelfile"), "-q", "q5")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: unknown quantization type 'q5'")
    (tmp_path / "Modelfile").write_text("FROM tiny-cli\n")
    code, out, err = run_cli("create", "tiny-bad", "-f", str(tmp_path / "Modelfile"), "-q", "q4")
    assert code == 1 and "already quantized (4-bit nvfp4)" in err and "Traceback" not in err
    assert "tiny-bad" not in {e.name.model for e in store.list()}


def test_cli_create_q_prints_status_lines_not_mlx_lms_info(store, tiny_safetensors_dir, tmp_path, run_cli):
    (tmp_path / "Modelfile").write_text(f"FROM {tiny_safetensors_dir}\n")
    code, out, err = run_cli("create", "tiny-q4", "-f", str(tmp_path / "Modelfile"), "-q", "q4")
    assert code == 0, err
    assert "[INFO]" not in out + err
    # mlx-lm's bits-per-weight note is one of our status lines, before the weights are written.
    lines = out.splitlines()
    (note,) = [i for i, line in enumerate(lines) if re.fullmatch(r"quantized model with \d+\.\d+ bits per weight",
                                                                   line)]
    assert lines[note + 1].startswith("wrote model.safetensors") and lines[-1] == "success"


def test_other_prints_while_quantizing_still_reach_stdout(capsys):
    said: list[str] = []
    with _info_lines_to(said.append):
        print("[INFO] Quantized model with 4.500 bits per weight.")
        print("a real warning")
        print("no newline yet", end="")
    assert said == ["quantized model with 4.500 bits per weight"]
    assert capsys.readouterr().out == "a real warning\nno newline yet"


def test_a_failed_quantize_of_a_file_leaves_no_import_behind(store, tiny_gguf_path, tmp_path, run_cli):
    (tmp_path / "Modelfile").write_text(f"FROM {tiny_gguf_path}\n")
    code, _, err = run_cli("create", "tiny-q", "-f", str(tmp_path / "Modelfile"), "-q", "q4")
    assert code == 1 and "already quantized" in err
    assert store.list() == []


PEAK_SCRIPT = """
import sys
from pathlib import Path
import mlx.core as mx
from mlxlite.engine import quantize
quantize.quantize_model(Path(sys.argv[1]), "q4", Path(sys.argv[2]))
print(mx.get_peak_memory())
"""


def test_quantizing_holds_one_tensor_as_float_not_the_model(tmp_path):
    """A 285 MB float32 model (largest tensor 16 MB) quantizes in a fresh process whose MLX
    memory peaks far below the model: the source is loaded lazily, read tensor by tensor.
    (MLX's own peak, not RSS: the process's RSS also counts file pages and varies by run.)"""
    import os
    import subprocess
    import sys

    hidden, inter, layers = 1024, 4096, 4
    weights = {"model.embed_tokens.weight": mx.random.normal((4000, hidden)) * 0.02,
               "model.norm.weight": mx.ones((hidden,))}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            weights[p + name + ".weight"] = mx.random.normal(shape) * 0.02
        weights[p + "input_layernorm.weight"] = weights[p + "post_attention_layernorm.weight"] = mx.ones((hidden,))
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    del weights
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
        "num_attention_heads": 8, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "vocab_size": 4000,
        "tie_word_embeddings": True, "max_position_embeddings": 512}))
    size = (src / "model.safetensors").stat().st_size
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(src), str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, check=True)
    peak = int(done.stdout.split()[-1])
    written = (out / "model.safetensors").stat().st_size
    assert written < size / 5
    # measured: 61 MB (the 45 MB output and one float tensor in flight); 287 MB when the
    # source is loaded whole (mlx-lm's load_model with lazy=False)
    assert peak < size / 2, (peak, size)


def test_a_bfloat16_model_keeps_its_dtype_for_what_stays_float(store, tiny_safetensors_dir, tmp_path):
    import shutil

    from mlxlite.store.importers import import_path

    src = tmp_path / "bf16"
    shutil.copytree(tiny_safetensors_dir, src)
    weights = {k: v.astype(mx.bfloat16) for k, v in mx.load(str(src / "model.safetensors")).items()}
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    import_path(store, src, "tiny-bf16")
    lines = _quantized(store, "tiny-bf16", "tiny-bf16-q8", "q8")
    assert lines[0].startswith("quantizing bfloat16 safetensors model")
    packed = mx.load(str(store.view(store.resolve("tiny-bf16-q8")) / "model.safetensors"))
    assert packed["model.norm.weight"].dtype == mx.bfloat16 and packed["model.embed_tokens.scales"].dtype == mx.bfloat16
    # bfloat16 scales and biases (as mlx_lm.convert keeps them) round a group's bias to 8 bits of
    # mantissa, about half a q8 step here: measured 0.062 against the float32 source's 0.036.
    assert _rel_err(_logits(store, "tiny-bf16-q8"), _logits(store, "tiny-bf16")) < 0.1
