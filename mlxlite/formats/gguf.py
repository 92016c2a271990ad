"""GGUF files without mlx: header parsing, tensor-name mapping, model args, tokenizer.

Contract:
  - `read_gguf(path)` / `read_metadata(path)` parse the header with the standard library
    only (mmap + struct): magic, version (2 or 3), metadata key/values, tensor table.
    A truncated, implausible or non-GGUF file is a `BadRequest` naming the file.
  - `check_supported(header)` raises `Unsupported` naming the architecture or the tensor
    type (and one tensor of it) that the runner cannot load; `LOADS` says how the engine
    loads each type (repacked, re-quantized, dequantized, float) and `load_plan(header)`
    counts a file's tensors that way, without loading anything.
  - `model_config(header)` turns metadata into an mlx-lm `config.json`-style dict;
    `map_name(name)` maps a GGUF tensor name to mlx-lm's (llama / qwen2 layout).
  - `build_tokenizer(meta)` builds a `tokenizers.Tokenizer` (byte-level BPE for `gpt2`
    vocabularies, SPM-style BPE with byte fallback for `llama` ones) plus its specials.
Never imports mlx (importers and `show` use it); `tokenizers` is imported lazily.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxlite.errors import BadRequest, Unsupported

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

# GGUF architecture -> mlx-lm model_type. mistral/smollm files use llama's layout.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "smollm": "llama", "qwen2": "qwen2"}
# llama.cpp's converter permutes Q/K rows for these (interleaved RoPE); qwen2 is NEOX-style.
PERMUTED_QK = {"llama", "mistral", "smollm"}

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 28  # no sane header has more entries than this


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

    def value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item = self.unpack("<I")
            n = self.count()
            if item in _SCALAR:
                fmt = _SCALAR[item]
                size = struct.calcsize(fmt)
                self._need(size * n)
                values = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos))
                self.pos += size * n
                return values
            return [self.value(item) for _ in range(n)]
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
        align = int(meta.get("general.alignment") or 32)
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


def check_supported(header: Header) -> str:
    """The mlx-lm model_type for this file, or `Unsupported` naming what is not."""
    arch = header.architecture
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise Unsupported(f"GGUF architecture {arch or '(none)'!r} is not supported (supported: {supported})")
    for t in header.tensors:
        if t.type not in SUPPORTED_TYPES:
            supported = ", ".join(GGML_TYPES[k] for k in sorted(LOADS))
            raise Unsupported(f"GGUF tensor type {t.type_name} (tensor {t.name!r}) is not supported; "
                              f"supported: {supported}")
        if t.name == "rope_freqs.weight":
            raise Unsupported("GGUF with rope_freqs (llama3-style RoPE scaling) is not supported")
    tok = header.metadata.get("tokenizer.ggml.model")
    if tok not in ("gpt2", "llama"):
        raise Unsupported(f"GGUF tokenizer type {tok!r} is not supported (gpt2 and llama are)")
    return ARCHITECTURES[arch]


# ---- tensor names --------------------------------------------------------------------
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|bias|scales|biases)\Z")


def map_name(name: str) -> str:
    """GGUF tensor name -> mlx-lm parameter name (exact match per part, suffix kept)."""
    m = _NAME.match(name)
    if m:
        block, part, suffix = m.groups()
        if block is None and part in _TOP:
            return f"{_TOP[part]}.{suffix}"
        if block is not None and part in _BLOCK:
            return f"model.layers.{block}.{_BLOCK[part]}.{suffix}"
    raise Unsupported(f"GGUF tensor {name!r} has no mlx-lm equivalent")


def model_config(header: Header) -> dict[str, Any]:
    """An mlx-lm config.json dict from GGUF metadata (llama and qwen2 layouts)."""
    model_type = check_supported(header)
    meta, arch = header.metadata, header.architecture

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    try:
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        cfg: dict[str, Any] = {
            "model_type": model_type,
            "hidden_size": hidden,
            "num_hidden_layers": int(get("block_count")),
            "intermediate_size": int(get("feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get("rope.freq_base", 10000.0 if model_type == "llama" else 1e6)),
            "max_position_embeddings": int(get("context_length", 4096)),
            "vocab_size": int(get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])),
        }
    except (TypeError, ValueError):
        raise BadRequest(f"{header.path}: GGUF metadata lacks the {arch} model dimensions") from None
    names = {t.name for t in header.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    if model_type == "llama":
        head_dim = get("attention.key_length")
        cfg["head_dim"] = int(head_dim) if head_dim else hidden // heads
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    kind = get("rope.scaling.type")
    if kind in ("linear",) and get("rope.scaling.factor"):
        cfg["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif kind not in (None, "none"):
        raise Unsupported(f"GGUF RoPE scaling {kind!r} is not supported")
    return cfg


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


# ---- tokenizer -------------------------------------------------------------------------
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex (llama.cpp's table, as transformers mirrors it).
PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
    "gpt-4o": _GPT4O_SPLIT, "llama4": _GPT4O_SPLIT,
}
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # tokenizer.ggml.token_type values


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@dataclass(frozen=True)
class TokenizerSpec:
    tokenizer: Any              # tokenizers.Tokenizer
    kind: str                   # "bpe" (byte-level) or "spm"
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    eos_token_ids: frozenset[int]
    add_bos: bool
    chat_template: str | None
    special_ids: frozenset[int]


def _merges_from_vocab(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SPM vocabularies without merges: every split into two in-vocab pieces, best score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=False):
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def build_tokenizer(meta: dict[str, Any]) -> TokenizerSpec:
    """A `tokenizers.Tokenizer` equivalent to the GGUF's vocabulary (see module doc)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise BadRequest("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    def tok_at(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = (tok_at(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    if kind == "gpt2":
        alphabet = set(bytes_to_unicode().values())
        spell = bytes_to_unicode()
        # Tokens outside the byte alphabet are respelled (transformers does the same).
        vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode())): i
                 for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        pre = meta.get("tokenizer.ggml.pre")
        if pre == "smollm":  # llama.cpp and SmolLM's tokenizer.json: each digit alone, then gpt2's regex
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        elif pre in PRE_SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:  # gpt2's own regex
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        control = [t for t, ty in zip(tokens, types, strict=False) if ty == CONTROL and set(t) <= alphabet]
        out_kind = "bpe"
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        merges_raw = meta.get("tokenizer.ggml.merges")
        if merges_raw:
            merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        else:
            merges = _merges_from_vocab(tokens, list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                   unk_token=unk, ignore_merges=False))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        control = [t for t, ty in zip(tokens, types, strict=False) if ty == CONTROL]
        out_kind = "spm"
    else:
        raise Unsupported(f"GGUF tokenizer type {kind!r} is not supported (gpt2 and llama are)")
    if control:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))])
    eos_ids = {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                      "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)}
    special = {i for i, ty in enumerate(types) if ty == CONTROL}
    return TokenizerSpec(tok, out_kind, bos, eos, unk, pad, frozenset(eos_ids), add_bos,
                         meta.get("tokenizer.chat_template"), frozenset(special))
