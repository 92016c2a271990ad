"""The GGUF header reader (`mlxlite/formats/gguf.py`) on mutated and hostile files.

A tiny valid GGUF (written by tests/tiny_models.py's `write_gguf`) is flipped, cut,
extended, and has its counts, string lengths, type codes and dimensions replaced by
hostile integers; metadata values of every GGUF type are put where the model config and
the alignment are read. Properties: `read_gguf` returns a Header or raises BadRequest
(Unsupported is one) and never allocates much more than the file holds; a Header it
returns goes through `check_supported`, `model_config`, `parameter_count` and the
importer's config the same way (a value or a typed error, never a crash)."""

import re
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlxlite.formats import archs, gguf
from mlxlite.store import importers
from tests.fuzz.common import examples, mutated, texts, typed_or_value
from tests.tiny_models import write_gguf

META = {
    "general.architecture": "llama", "general.alignment": 32, "general.file_type": 7, "general.name": "fuzz",
    "llama.context_length": 64, "llama.embedding_length": 8, "llama.block_count": 1,
    "llama.feed_forward_length": 16, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
    "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"],
    "tokenizer.ggml.token_type": [1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"],
    "tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.eos_token_id": 3, "tokenizer.ggml.add_bos_token": False,
}
TENSORS = [
    ("token_embd.weight", (4, 8), "F32", np.arange(32, dtype=np.float32).tobytes()),
    ("blk.0.attn_q.weight", (1, 32), "Q8_0", struct.pack("<e", 0.5) + bytes(range(32))),
    ("output_norm.weight", (8,), "F16", np.ones(8, dtype=np.float16).tobytes()),
]


def _valid() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.gguf"
        write_gguf(path, META, TENSORS)
        return path.read_bytes()


VALID = _valid()


def _fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type code, dimension and offset in the header."""
    out: list[tuple[int, int]] = [(4, 4), (8, 8), (16, 8)]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string() -> None:
        nonlocal pos
        out.append((pos, 8))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    def value(kind: int) -> None:
        nonlocal pos
        if kind in sizes:
            pos += sizes[kind]
        elif kind == 8:
            string()
        else:
            out.extend([(pos, 4), (pos + 4, 8)])
            item, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                value(item)

    for _ in range(n_kv):
        string()
        out.append((pos, 4))
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        value(kind)
    for _ in range(n_tensors):
        string()
        out.append((pos, 4))
        (ndim,) = struct.unpack_from("<I", data, pos)
        pos += 4
        out.extend((pos + 8 * i, 8) for i in range(ndim))
        pos += 8 * ndim
        out.extend([(pos, 4), (pos + 4, 8)])
        pos += 12
    return out


FIELDS = _fields(VALID)


def _read(tmp: Path, data: bytes):
    path = tmp / "m.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        ok, header = typed_or_value(gguf.read_gguf, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A hostile count or length never turns into an allocation the file cannot back.
    assert peak < (16 << 20) + 64 * len(data), f"read_gguf allocated {peak} bytes for {len(data)}"
    if not ok:
        return None
    assert header.data_offset >= 24 and all(len(t.shape) <= 8 for t in header.tensors)
    gguf.parameter_count(header)
    gguf.file_type_name(header.metadata.get("general.file_type"))
    typed_or_value(gguf.check_supported, header)
    typed_or_value(gguf.model_config, header)
    importers.gguf_config(path)
    return header


def _u64_at(offset: int, value: int) -> bytes:
    return VALID[:offset] + struct.pack("<Q", value) + VALID[offset + 8:]


def test_the_seed_file_is_valid_and_the_field_map_is_right(tmp_path):
    header = _read(tmp_path, VALID)
    assert header is not None and header.metadata["general.name"] == "fuzz" and len(header.tensors) == 3
    assert gguf.model_config(header)["hidden_size"] == 8
    assert len(FIELDS) > 40


@settings(max_examples=examples(500))
@given(mutated(VALID, max_ops=4, fields=FIELDS))
@example(_u64_at(8, 2**64 - 1))     # n_tensors
@example(_u64_at(16, 2**28))        # n_kv
@example(_u64_at(24, 2**63))        # the first key's length
@example(VALID[:100])
@example(VALID + b"\0" * 7)
def test_mutated_gguf_reads_or_raises_bad_request(data):
    with tempfile.TemporaryDirectory() as tmp:
        _read(Path(tmp), data)


# ---- hostile metadata values --------------------------------------------------------------
def _kv(key: str, kind: int, payload: bytes) -> bytes:
    raw = key.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", kind) + payload


SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@st.composite
def typed_values(draw, depth: int = 0) -> tuple[int, bytes]:
    """(GGUF type code, payload) of a value of any type, arrays nested a little."""
    kind = draw(st.sampled_from(sorted(SCALARS) + [8, 8, 9] if depth < 2 else sorted(SCALARS) + [8]))
    if kind == 8:
        raw = draw(texts(12)).encode("utf-8", "surrogatepass")
        return 8, struct.pack("<Q", len(raw)) + raw
    if kind == 9:
        inner = draw(st.lists(typed_values(depth + 1), max_size=4))
        item = inner[0][0] if inner else draw(st.sampled_from(sorted(SCALARS) + [8]))
        inner = [v for v in inner if v[0] == item]
        return 9, struct.pack("<IQ", item, len(inner)) + b"".join(p for _, p in inner)
    fmt = SCALARS[kind]
    if fmt in ("<f", "<d"):
        value = draw(st.floats(width=32 if fmt == "<f" else 64))
    elif fmt == "<?":
        value = draw(st.booleans())
    else:
        bits = struct.calcsize(fmt) * 8
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if fmt[1].islower() else (0, (1 << bits) - 1)
        value = draw(st.sampled_from([lo, hi, 0, 1, 2, 3, 32]) | st.integers(lo, hi))
    return kind, struct.pack(fmt, value)


HOSTILE_KEYS = ["general.alignment", "general.architecture", "general.file_type", "llama.embedding_length",
                "llama.block_count", "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.attention.key_length", "llama.context_length",
                "llama.rope.freq_base", "llama.rope.scaling.type", "llama.rope.scaling.factor",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "tokenizer.ggml.model",
                "tokenizer.ggml.tokens"]


def _with_metadata(extra: list[tuple[str, int, bytes]]) -> bytes:
    """VALID with `extra` key/values appended after its own (a repeated key: the last wins)."""
    n_tensors, n_kv = struct.unpack_from("<QQ", VALID, 8)
    end = _meta_end()
    blob = b"".join(_kv(k, kind, payload) for k, kind, payload in extra)
    return VALID[:8] + struct.pack("<QQ", n_tensors, n_kv + len(extra)) + VALID[24:end] + blob + VALID[end:]


def _meta_end() -> int:
    pos = 24
    n_kv = struct.unpack_from("<Q", VALID, 16)[0]
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(kind: int) -> None:
        nonlocal pos
        if kind in sizes:
            pos += sizes[kind]
        elif kind == 8:
            pos += 8 + struct.unpack_from("<Q", VALID, pos)[0]
        else:
            item, n = struct.unpack_from("<IQ", VALID, pos)
            pos += 12
            for _ in range(n):
                skip(item)

    for _ in range(n_kv):
        pos += 8 + struct.unpack_from("<Q", VALID, pos)[0]
        kind = struct.unpack_from("<I", VALID, pos)[0]
        pos += 4
        skip(kind)
    return pos


NESTED_ARRAYS = struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)


@settings(max_examples=examples(300))
@given(st.lists(st.tuples(st.sampled_from(HOSTILE_KEYS) | texts(10), typed_values()).map(
    lambda kv: (kv[0], *kv[1])), min_size=1, max_size=4))
@example([("general.alignment", 8, struct.pack("<Q", 3) + b"abc")])
@example([("general.alignment", 6, struct.pack("<f", float("nan")))])
@example([("general.alignment", 6, struct.pack("<f", float("inf")))])
@example([("general.alignment", 5, struct.pack("<i", -8))])
@example([("general.alignment", 9, struct.pack("<IQ", 4, 1) + struct.pack("<I", 32))])
@example([("llama.attention.key_length", 8, struct.pack("<Q", 3) + b"abc")])
@example([("llama.rope.scaling.type", 8, struct.pack("<Q", 6) + b"linear"),
          ("llama.rope.scaling.factor", 8, struct.pack("<Q", 3) + b"abc")])
@example([("llama.attention.head_count", 4, struct.pack("<I", 0))])
def test_hostile_metadata_values_read_or_raise_bad_request(extra):
    data = _with_metadata(extra)
    with tempfile.TemporaryDirectory() as tmp:
        _read(Path(tmp), data)


def test_arrays_nested_thousands_deep_are_a_bad_request(tmp_path):
    # Explicit rather than an @example: hypothesis would print all 60 kB of it.
    assert _read(tmp_path, _with_metadata([("deep", 9, NESTED_ARRAYS)])) is None


file_texts = texts(6).map(lambda t: t.encode("utf-8", "replace").decode("utf-8", "replace"))


@settings(max_examples=examples(60))
@given(st.dictionaries(st.sampled_from(["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                        "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id",
                                        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                                        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.pre",
                                        "tokenizer.ggml.add_space_prefix"]),
                       st.one_of(st.sampled_from(["gpt2", "llama", "smollm", "qwen2", "bogus"]),
                                 st.integers(-3, 2**32), st.booleans(), file_texts,
                                 st.lists(st.one_of(file_texts, st.sampled_from(["a b", "a", "b", "ab", "<s>", "x y"]),
                                                    st.integers(-2, 8), st.floats(allow_nan=False)), max_size=6)),
                       max_size=6))
def test_tokenizer_metadata_builds_or_raises_bad_request(changes):
    """Metadata as read from a file (strings decoded with errors="replace": no surrogates)."""
    meta = {**META, **changes}
    typed_or_value(gguf.build_tokenizer, meta)


# ---- every family's config from hostile metadata ---------------------------------------------
def _family_keys() -> list[str]:
    """The `<arch>.*` keys the family modules read (scraped, so a new family is covered too)."""
    found: set[str] = set()
    for source in Path(archs.__file__).parent.glob("*.py"):
        found |= set(re.findall(r'meta\.(?:get|need)\("([^"]+)"', source.read_text()))
    return sorted(found)


def _family_tensors() -> list[str]:
    """The tensor names whose presence the family modules test (a config switch: LongRoPE
    factors, V3's score biases, an untied output), scraped like the keys."""
    found: set[str] = set()
    for source in Path(archs.__file__).parent.glob("*.py"):
        found |= set(re.findall(r'"((?:blk\.\d+\.)?[a-z0-9_]+\.(?:weight|bias))"', source.read_text()))
    return sorted(found)


FAMILY_KEYS = _family_keys()
FAMILY_TENSORS = _family_tensors()
metadata_values = st.recursive(
    st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, 2, 3, 4, 8, 64]), st.floats(width=32),
              st.booleans(), file_texts, st.sampled_from(["linear", "yarn", "none", "su", "softmax", "sigmoid"])),
    lambda inner: st.lists(inner, max_size=4), max_leaves=6)


def test_the_scraped_keys_and_tensors_reach_the_variants():
    """LongRoPE and DeepSeek-V3 switch on these: the fuzzing below must be able to draw them."""
    assert {"rope.scaling.original_context_length", "rope.scaling.attn_factor", "expert_gating_func",
            "expert_weights_norm", "expert_group_count", "expert_group_used_count"} <= set(FAMILY_KEYS)
    assert {"rope_factors_long.weight", "rope_factors_short.weight", "exp_probs_b.bias"} <= set(FAMILY_TENSORS)


@settings(max_examples=examples(300))
@given(st.sampled_from(sorted(archs.REGISTRY)),
       st.dictionaries(st.sampled_from(FAMILY_KEYS), metadata_values, max_size=5),
       st.lists(st.sampled_from(FAMILY_TENSORS), max_size=3, unique=True))
@example("llama", {"attention.head_count": 0}, [])
@example("llama", {"embedding_length": float("inf")}, [])
@example("llama", {"rope.scaling.type": "linear", "rope.scaling.factor": "abc"}, [])
@example("phi3", {"rope.scaling.original_context_length": 0}, ["rope_factors_long.weight"])
@example("phi3", {"rope.scaling.original_context_length": 1, "context_length": 2**64 - 1},
         ["rope_factors_long.weight"])
@example("phi3", {"rope.scaling.original_context_length": 8, "rope.scaling.attn_factor": "abc"},
         ["rope_factors_long.weight"])
@example("deepseek2", {"expert_gating_func": 2, "expert_group_count": 0}, ["exp_probs_b.bias"])
@example("deepseek2", {"expert_gating_func": 2, "expert_count": 3, "expert_group_count": 3}, ["exp_probs_b.bias"])
def test_every_family_config_is_built_or_refused_from_hostile_metadata(arch, changes, tensors):
    base = {k.replace("llama.", f"{arch}.", 1): v for k, v in META.items()}
    header = gguf.Header("fuzz.gguf", 3, {**base, "general.architecture": arch,
                                          **{f"{arch}.{k}": v for k, v in changes.items()}},
                         tuple(gguf.TensorInfo(t, (1,), 0, 0) for t in tensors))
    ok, config = typed_or_value(gguf.model_config, header)
    if ok:
        assert isinstance(config, dict) and config["model_type"] == gguf.family(header).model_type
