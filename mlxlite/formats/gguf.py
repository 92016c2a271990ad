"""GGUF files without mlx: header parsing, tensor-name mapping, model args, tokenizer.

Contract:
  - `read_gguf(path)` / `read_metadata(path)` parse the header with the standard library
    only (mmap + struct): magic, version (2 or 3), metadata key/values, tensor table.
    A truncated, implausible or non-GGUF file is a `BadRequest` naming the file.
  - `check_supported(header)` raises `Unsupported` naming the architecture or the tensor
    type (and one tensor of it) that the runner cannot load; `LOADS` says how the engine
    loads each type (repacked, re-quantized, dequantized, float) and `load_plan(header)`
    counts a file's tensors that way, without loading anything.
  - `model_config(header)` turns metadata into an mlx-lm `config.json`-style dict
    (`cannot_load(header)` says why it would refuse, or None);
    `map_name(name, architecture)` maps a GGUF tensor name to mlx-lm's. Both dispatch
    through the family's `Arch` in `formats/archs/` (keyed by `general.architecture`;
    `family(header)` is the one a file runs on, where metadata picks a variant).
  - `vision_of(header)` is the family's `archs.Vision` when the file carries its vision tower
    inline (Ollama's gemma3 and qwen25vl; `takes_images(header)`), else None; `vision_config(header, text)`
    is mlx-vlm's config for it over the text model's `model_config`.
  - `build_tokenizer(meta)` (from `formats/vocab.py`, which owns it) builds a
    `tokenizers.Tokenizer` plus its specials from `tokenizer.ggml.*` metadata.
Never imports mlx (importers and `show` use it); `tokenizers` is imported lazily.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxlite.errors import BadRequest, Unsupported
from mlxlite.formats import archs
from mlxlite.formats.vocab import PRE_SPLITS as PRE_SPLITS  # the tokenizer lives in `vocab`;
from mlxlite.formats.vocab import TOKENIZER_MODELS  # its names stay importable from here
from mlxlite.formats.vocab import TokenizerSpec as TokenizerSpec
from mlxlite.formats.vocab import build_tokenizer as build_tokenizer
from mlxlite.formats.vocab import bytes_to_unicode as bytes_to_unicode

MAGIC = b"GGUF"

# ggml tensor types (ggml.h); the ones the engine loads are listed in LOADS.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# (elements per block, bytes per block) of the types whose size we can check.
BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
          10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
          16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
          22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
          29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17)}
# How engine/quants.py puts each type on MLX, as (how, MLX bits), so `show` can say it without
# loading: "repacked" exactly (affine group 32; MXFP4 onto MLX's mxfp4 mode), "requantized"
# at group 32 (16-wide sub-blocks have no exact 32-group form), "dequantized" to float (no
# MLX form), "float" as stored. The IQ1/IQ2/IQ3 types (lattice codebooks) are not loaded.
LOADS = {0: ("float", 0), 1: ("float", 0), 28: ("float", 0), 30: ("float", 0), 24: ("float", 0),
         25: ("float", 0), 26: ("float", 0), 27: ("float", 0),
         2: ("repacked", 4), 3: ("repacked", 4), 6: ("repacked", 5), 7: ("repacked", 5), 8: ("repacked", 8),
         12: ("repacked", 4), 13: ("repacked", 5), 34: ("repacked", 2), 35: ("repacked", 2), 39: ("repacked", 4),
         14: ("requantized", 8), 11: ("requantized", 4), 10: ("requantized", 4),
         20: ("dequantized", 0), 23: ("dequantized", 0)}
SUPPORTED_TYPES = set(LOADS)

# llama_ftype (general.file_type) -> the name Ollama and llama.cpp show.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 28  # no sane header has more entries than this
_MAX_NESTING = 8  # arrays of arrays: real files use one level; each level is a Python frame
_MAX_ALIGN = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as GGUF states it (innermost first)
    type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type, f"type {self.type}")


@dataclass(frozen=True)
class Header:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(default_factory=tuple)
    data_offset: int = 0  # where tensor data starts (tensor offsets are relative to it)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture") or "")


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise BadRequest(f"{self.path}: truncated GGUF file (header ends at byte {len(self.buf)})")

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self) -> int:
        n = self.unpack("<Q")
        if n > _MAX_COUNT:
            raise BadRequest(f"{self.path}: implausible GGUF header (count {n})")
        return n

    def string(self) -> str:
        n = self.count()
        self._need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= _MAX_NESTING:
                raise BadRequest(f"{self.path}: implausible GGUF header (arrays nested over {_MAX_NESTING} deep)")
            item = self.unpack("<I")
            n = self.count()
            if item in _SCALAR:
                fmt = _SCALAR[item]
                size = struct.calcsize(fmt)
                self._need(size * n)
                values = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos))
                self.pos += size * n
                return values
            return [self.value(item, depth + 1) for _ in range(n)]
        raise BadRequest(f"{self.path}: bad GGUF metadata value type {kind}")


def read_gguf(path: str | Path) -> Header:
    """Parse a GGUF header: metadata and tensor table (no tensor data is read)."""
    name = str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if head != MAGIC:
                raise BadRequest(f"{name}: not a GGUF file (bad magic {head!r})")
            try:
                buf: mmap.mmap | bytes = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (ValueError, OSError):  # empty or unmappable: read it instead
                fh.seek(0)
                buf = fh.read()
    except OSError as exc:
        raise BadRequest(f"{name}: cannot read GGUF file: {exc.strerror or exc}") from None
    try:
        r = _Reader(buf, name)
        r.pos = 4
        version = r.unpack("<I")
        if version not in (2, 3):
            raise BadRequest(f"{name}: unsupported GGUF version {version} (2 and 3 are)")
        n_tensors, n_kv = r.count(), r.count()
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.unpack("<I"))
        tensors = []
        for _ in range(n_tensors):
            tname = r.string()
            ndim = r.unpack("<I")
            if ndim > 8:
                raise BadRequest(f"{name}: implausible GGUF tensor {tname!r} ({ndim} dims)")
            shape = tuple(r.unpack("<Q") for _ in range(ndim))
            tensors.append(TensorInfo(tname, shape, r.unpack("<I"), r.unpack("<Q")))
        align = meta.get("general.alignment", 32)
        # llama.cpp asserts a power of two; anything else would misplace every tensor.
        if type(align) is not int or not 0 < align <= _MAX_ALIGN or align & (align - 1):
            raise BadRequest(f"{name}: implausible GGUF alignment {align!r} (a power of two is expected)")
        data_start = (r.pos + align - 1) // align * align
        end = data_start
        for t in tensors:
            if t.type in BLOCKS:
                per, size = BLOCKS[t.type]
                count = 1
                for d in t.shape:
                    count *= d
                end = max(end, data_start + t.offset + -(-count // per) * size)
        if tensors and end > len(buf):
            # reading the tensors would run past the end of the file: refuse it here with a clear message.
            raise BadRequest(f"{name}: truncated GGUF file (tensor data needs {end} bytes, file has {len(buf)})")
        return Header(name, version, meta, tuple(tensors), data_start)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata key/values of a GGUF file (validated header)."""
    return read_gguf(path).metadata


def file_type_name(file_type: Any) -> str:
    if file_type is None:
        return ""
    try:
        return FILE_TYPES.get(int(file_type), f"file type {int(file_type)}")
    except (TypeError, ValueError):
        return str(file_type)


def family(header: Header) -> archs.Arch:
    """The `Arch` this file runs on: its architecture's, or the variant its metadata picks
    (a deepseek2 file with sigmoid routing is DeepSeek-V3's)."""
    return archs.get(header.architecture).pick(_meta(header))


def _meta(header: Header) -> archs.Meta:
    return archs.Meta(header.metadata, header.architecture, frozenset(t.name for t in header.tensors), header.path,
                      shapes={t.name: tuple(reversed(t.shape)) for t in header.tensors})


def check_supported(header: Header) -> str:
    """The mlx-lm model_type for this file, or `Unsupported` naming what is not."""
    arch = family(header)
    for t in header.tensors:
        if t.type not in SUPPORTED_TYPES:
            supported = ", ".join(GGML_TYPES[k] for k in sorted(LOADS))
            raise Unsupported(f"GGUF tensor type {t.type_name} (tensor {t.name!r}) is not supported; "
                              f"supported: {supported}")
        if t.name == "rope_freqs.weight" and not arch.rope_freqs:
            raise Unsupported(f"GGUF {header.architecture} with rope_freqs (llama3-style RoPE scaling) "
                              "is not supported")
    tok = header.metadata.get("tokenizer.ggml.model")
    if tok not in TOKENIZER_MODELS:
        raise Unsupported(f"GGUF tokenizer type {tok!r} is not supported ({', '.join(TOKENIZER_MODELS)} are)")
    return arch.model_type


def map_name(name: str, architecture: str = "llama") -> str:
    """GGUF tensor name -> mlx-lm parameter name for this architecture's family."""
    return archs.get(architecture).map_name(name)


def model_config(header: Header) -> dict[str, Any]:
    """An mlx-lm config.json dict from GGUF metadata, through the family's `Arch`."""
    check_supported(header)
    try:
        return family(header).make_config(_meta(header))
    # The families read metadata with int()/float(): a string, a list, NaN/inf or zero heads
    # in a hostile file is metadata no model can be built from, whichever family reads it.
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, IndexError, KeyError):
        raise BadRequest(f"{header.path}: GGUF metadata holds {header.architecture} model dimensions "
                         "of the wrong type or range") from None


def vision_of(header: Header) -> archs.Vision | None:
    """The inline vision tower's map when this file carries one, else None."""
    try:
        vision = family(header).vision
    except Unsupported:
        return None
    return vision if vision is not None and vision.present(_meta(header)) else None


def takes_images(header: Header) -> bool:
    return vision_of(header) is not None


def vision_config(header: Header, text: dict[str, Any]) -> dict[str, Any]:
    """mlx-vlm's config.json dict (and "processor") for the file's vision tower, over `text`
    (`model_config`'s dict); `Unsupported` when the file carries none."""
    vision = vision_of(header)
    if vision is None:
        raise Unsupported(f"{header.path}: GGUF {header.architecture} file carries no vision tower")
    try:
        return vision.config(_meta(header), text)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, IndexError, KeyError):
        raise BadRequest(f"{header.path}: GGUF metadata holds {header.architecture} vision dimensions "
                         "of the wrong type or range") from None


def cannot_load(header: Header) -> str | None:
    """Why nothing can load this file (what `model_config` refuses: an architecture with no
    map, a tensor type or tokenizer the runner lacks, dimensions of the wrong type), or None."""
    try:
        model_config(header)
    except (Unsupported, BadRequest) as exc:
        return str(exc)
    return None


def load_plan(header: Header) -> dict[str, dict[str, int]]:
    """{how: {type name: tensor count}} as the engine will load this file (see LOADS)."""
    plan: dict[str, dict[str, int]] = {}
    for t in header.tensors:
        how = LOADS.get(t.type, ("unsupported", 0))[0]
        counts = plan.setdefault(how, {})
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return plan


def parameter_count(header: Header) -> int:
    total = 0
    for t in header.tensors:
        n = 1
        for d in t.shape:
            n *= d
        total += n
    return total
