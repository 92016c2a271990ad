"""`create --quantize` on the store's side: the quantization types, and the new base a
quantized copy of a model makes (its weights and config replaced, everything else shared).

Owns `TYPES` (MLX's `q4`, `q8` affine at group 64, `mxfp4` at 32, `nvfp4` at 16, as
`mlx_lm.convert` names its modes and defaults), `parse_type` (Ollama's names such as
`q4_K_M` and `q8_0` map onto the MLX type of the same bits; anything else is a 400 naming
the types), and `quantized_base`: it hands the base's files to a `Quantizer` (the engine's
`quantize.quantize_model`, passed in by the CLI and the server, since this wing never imports
mlx), stores what it wrote, and returns an unsaved `ModelEntry` whose manifest `plan` builds
on like any base. Never imports mlx, and never writes a manifest.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from mlxlite import store as st
from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats import archs, gguf
from mlxlite.store import Layer, Manifest, ModelEntry, Store, build_manifest
from mlxlite.store.importers import dir_config

# name -> (mlx mode, bits, group size)
TYPES: dict[str, tuple[str, int, int]] = {
    "q4": ("affine", 4, 64),
    "q8": ("affine", 8, 64),
    "mxfp4": ("mxfp4", 4, 32),
    "nvfp4": ("nvfp4", 4, 16),
}
# Ollama's names (`ollama create -q q4_K_M`), onto the MLX type with the same bits per weight.
ALIASES = {"q4_0": "q4", "q4_1": "q4", "q4_k_s": "q4", "q4_k_m": "q4", "q8_0": "q8"}

Say = Callable[[str], None]
# (the base model as a directory of files, the type, an empty directory to write into, say)
Quantizer = Callable[[Path, str, Path, Say], None]


def parse_type(text: object) -> str:
    """The MLX quantization type named by `text` (case-insensitive; Ollama's names too)."""
    if not isinstance(text, str):
        raise BadRequest(f"invalid quantization type: expected a string, got {type(text).__name__}")
    key = text.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TYPES:
        raise BadRequest(f"unknown quantization type {text!r}: use one of {', '.join(TYPES)} "
                         f"(Ollama's {', '.join(sorted(ALIASES))} map onto q4 and q8)")
    return key


FLOAT_GGML = ("F32", "F16", "BF16")
FLOAT_SAFETENSORS = ("F32", "F16", "BF16")


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        head = fh.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        if not 2 <= length <= 100 << 20:
            raise BadRequest(f"{path.name}: not a safetensors file")
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            raise BadRequest(f"{path.name}: not a safetensors file (bad header)") from None
    return header if isinstance(header, dict) else {}


def check_source(source: Path) -> str:
    """What `source` holds ("F16 GGUF", "float32 safetensors", ...), a model directory or
    a .gguf file, if `quantize` can take it; else a 400 saying why (already quantized, an
    embedding model, ...). Reads headers only, so a create fails before its first status
    line. Other sources (an HF cache, an Ollama store) are checked once imported."""
    if source.is_file() and source.name.lower().endswith(".gguf"):
        ggufs = [source]
    elif source.is_dir() and ((source / "config.json").is_file() or any(source.glob("*.gguf"))):
        ggufs = sorted(p for p in source.iterdir() if p.name.lower().endswith(".gguf"))
    else:
        return "model"
    if source.is_file() or not (source / "config.json").is_file():
        header = gguf.read_gguf(ggufs[0])
        gguf.check_supported(header)
        if archs.get(header.architecture).encoder:
            raise BadRequest(f"{header.architecture} is an embedding model; quantize takes text-generation models")
        packed = sorted({t.type_name for t in header.tensors if t.type_name not in FLOAT_GGML})
        if packed:
            raise BadRequest(f"the model is already quantized (GGUF {', '.join(packed)}); quantize needs an "
                             "F16, BF16 or F32 source")
        if any(t.name == "rope_freqs.weight" for t in header.tensors):
            raise Unsupported("this GGUF keeps llama3's RoPE scaling as a rope_freqs tensor, which an mlx-lm "
                              "config.json cannot express; quantize its safetensors original instead")
        kinds = sorted({t.type_name for t in header.tensors if len(t.shape) > 1})
        return f"{'/'.join(kinds)} GGUF"
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BadRequest(f"the model's config.json cannot be read: {exc}") from None
    quant = config.get("quantization") or config.get("quantization_config") if isinstance(config, dict) else None
    if quant:
        how = (quant.get("mode") or quant.get("quant_method") or "affine") if isinstance(quant, dict) else quant
        bits = f"{quant.get('bits')}-bit " if isinstance(quant, dict) and quant.get("bits") else ""
        raise BadRequest(f"the model is already quantized ({bits}{how}); quantize needs a float16, "
                         "bfloat16 or float32 source")
    files = sorted(source.glob("model*.safetensors"))
    if not files:
        raise BadRequest("the model has no model*.safetensors weights to quantize")
    dtypes: set[str] = set()
    for path in files:
        for key, info in _safetensors_header(path).items():
            if key != "__metadata__" and isinstance(info, dict):
                if key.endswith(".scales"):
                    raise BadRequest(f"the model is already quantized ({key} in {path.name}); quantize needs "
                                     "a float16, bfloat16 or float32 source")
                dtypes.add(str(info.get("dtype")))
    if not dtypes & set(FLOAT_SAFETENSORS):
        raise BadRequest(f"the model's weights are {', '.join(sorted(dtypes))}; quantize needs float16, "
                         "bfloat16 or float32 ones")
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return "/".join(names[d] for d in sorted(dtypes & set(FLOAT_SAFETENSORS))) + " safetensors"


def _weights_or_config(layer: Layer) -> bool:
    """The layers a quantized copy replaces: weights, their index, the model's config.json."""
    title = (layer.title or "").lower()
    return (layer.media_type == st.MEDIA_GGUF or title.endswith((".safetensors", ".gguf"))
            or title in ("config.json", "model.safetensors.index.json"))


def quantized_base(store: Store, base: ModelEntry, qtype: str, quantizer: Quantizer, say: Say) -> ModelEntry:
    """`base` with its weights quantized to `qtype` (see module doc); blobs are stored, the
    manifest is not: `create` writes it after planning the spec's layers over this one."""
    mode, bits, group = TYPES[qtype]
    view = store.view(base)
    what = check_source(view)
    work = store.root / f"{st.TMP_PREFIX}quantize-{os.getpid()}-{secrets.token_hex(6)}"
    work.mkdir(parents=True)
    try:
        say(f"quantizing {what} model {base.name.display} to {qtype} ({mode}, {bits} bits, group {group})")
        quantizer(view, qtype, work, say)
        written = {p.relative_to(work).as_posix(): p for p in sorted(work.rglob("*")) if p.is_file()}
        if "config.json" not in written or not any(t.endswith(".safetensors") for t in written):
            raise BadRequest("quantizing wrote no config.json and safetensors weights")
        kept = [layer for layer in base.manifest.layers
                if not _weights_or_config(layer) and (layer.title or "") not in written]
        files = {t: view / t for t, layer in base.manifest.files().items()
                 if layer in kept and layer.title}
        files.update(written)
        config = dir_config(files)
        old = store.read_config(base)
        if old.get("requires"):
            config["requires"] = old["requires"]
        new = []
        for title, path in written.items():
            with open(path, "rb") as fh:
                digest = store.put_stream(fh)
            layer = Layer(st.MEDIA_FILE, digest, path.stat().st_size, {st.TITLE: title})
            say(f"creating new layer {digest}")
            new.append(layer)
        config_layer = store.put_json(config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raw = build_manifest(config_layer, [*new, *kept])
    return ModelEntry(base.name, Manifest.parse(raw), base.modified)
