"""GGUF tensor data -> MLX arrays, read as raw ggml blocks with numpy, one tensor at a time.

Owns decoding ggml's block formats and repacking them into MLX's quantized layouts (the
affine layout of `mx.quantize`: group 32, w = scale * q + bias, q packed LSB-first as one
bit stream into uint32 words, for every bits value):
  - repacked, exactly: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K (their sub-blocks are 32
    wide and affine), TQ1_0/TQ2_0 (ternary: 2 bits), MXFP4 onto MLX's `mxfp4` mode (the
    same e2m1 codes and e8m0 scales; only the nibble order differs).
  - requantized at group 32: Q6_K -> 8 bits, Q3_K -> 4 bits, Q2_K -> 4 bits (their
    sub-blocks are 16 wide: a 32-group whose two halves share scale and bias stays exact,
    the others get min/max affine steps); the error against the reference dequantization is
    measured as the tensor is read.
  - dequantized to float: IQ4_NL, IQ4_XS (a non-uniform 16-value table).
  - float: F32, F16, BF16, F64 and the integer types, as stored.
The exact affine decomposition is what `gguf`'s reference dequantization computes, bit for
bit in float32; at run time scales and biases are stored as `scale_dtype` (float16: MLX's
usual choice, and the one that keeps a Q4_K_M model near its file size), which rounds a
K-quant's scale d*sc to 11 bits; `Tensor.error` measures what that costs.

Memory: each chunk of rows is mapped from the file on its own (np.memmap, dropped after
use) and written straight into the tensor's final MLX buffers, so loading holds the MLX
arrays plus one chunk, never a float copy of the model nor a second copy of a tensor.
Never decides policy (float32 or quantized is the caller's call, from the budget) and
never parses the header (`mlxlite.formats.gguf` does).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxlite.errors import Unsupported
from mlxlite.formats import gguf

GROUP = 32
CHUNK = 1 << 20  # elements decoded per step: bounds the numpy temporaries to a few tens of MB
WORKERS = min(4, os.cpu_count() or 1)  # chunks decoded at once
# Target bits of the re-quantized types (formats.gguf.LOADS): Q6_K -> 8, Q3_K -> 4, Q2_K -> 4,
# chosen so re-quantizing adds little to the source's own rounding (tests/engine/test_quants.py).
REQUANT_BITS = {gguf.GGML_TYPES[t]: bits for t, (how, bits) in gguf.LOADS.items() if how == "requantized"}
DEQUANTIZED = {gguf.GGML_TYPES[t] for t, (how, _) in gguf.LOADS.items() if how == "dequantized"}
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)


@dataclass
class Tensor:
    """One tensor ready for MLX: `weight` (+ `scales`/`biases` when quantized)."""
    weight: mx.array | None
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0
    mode: str = ""          # "affine" or "mxfp4" when quantized
    how: str = "float"      # "float", "repacked", "requantized" or "dequantized"
    source: str = ""        # the GGML type name
    error: dict = field(default_factory=dict)  # {"max_abs"[, "mean_abs"]} vs the reference dequantization
    elements: int = 0

    def arrays(self, prefix: str) -> dict[str, mx.array]:
        out = {f"{prefix}.weight": self.weight}
        if self.scales is not None:
            out[f"{prefix}.scales"] = self.scales
        if self.biases is not None:
            out[f"{prefix}.biases"] = self.biases
        return out


# ---- MLX's packing --------------------------------------------------------------------------
def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values [..., n] (n*bits a multiple of 32) -> MLX's uint32 words [..., n*bits/32]:
    one little-endian bit stream, value i at bits [i*bits, (i+1)*bits)."""
    lead = q.shape[:-1]
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if bits == 8:
        return q.view(np.uint32)
    per = 8 // math.gcd(8, bits)  # values that fill whole bytes: 4 (2 bits), 8 (3), 2 (4), 8 (5), 4 (6)
    nbytes = per * bits // 8
    if bits in (2, 4, 5):  # shift each byte's value down into place inside one little-endian word
        word = {2: np.uint16, 4: np.uint32, 8: np.uint64}[per]
        x = q.reshape(-1, per).view(word)[:, 0]
        acc = x & word((1 << bits) - 1)
        for j in range(1, per):
            acc |= (x >> word((8 - bits) * j)) & word(((1 << bits) - 1) << (bits * j))
        out = acc.astype(np.uint8) if nbytes == 1 else acc.view(np.uint8).reshape(-1, per)[:, :nbytes]
    else:  # 3 and 6 bits: build each stream byte from the values that overlap it
        g = q.reshape(-1, per)
        out = np.empty((g.shape[0], nbytes), np.uint8)
        for k in range(nbytes):
            byte = None
            for j in range(per):
                lo = j * bits
                if lo + bits <= 8 * k or lo >= 8 * k + 8:
                    continue
                part = g[:, j] >> np.uint8(8 * k - lo) if lo < 8 * k else g[:, j] << np.uint8(lo - 8 * k)
                byte = part if byte is None else byte | part
            out[:, k] = byte
    return np.ascontiguousarray(out).reshape(*lead, -1).view(np.uint32)


# ---- block decoders: raw blocks [nb, type_size] uint8 -> (q, scale, bias) or floats ----------
def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [nb, 1]."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """ggml's 4-bit layout: each run of `width` bytes holds elements 0..width-1 in its low
    nibbles and width..2*width-1 in its high ones. -> uint8 values in element order."""
    nb = qs.shape[0]
    r = qs.reshape(nb, -1, 1, width)
    return np.concatenate([r & np.uint8(15), r >> np.uint8(4)], axis=2).reshape(nb, -1)


def _bits_of(qh: np.ndarray, nbits: int) -> np.ndarray:
    """Bit i of each byte of qh [nb, L] -> [nb, nbits, L] uint8 (ggml's high-bit planes)."""
    return (qh[:, None, :] >> np.arange(nbits, dtype=np.uint8)[None, :, None]) & np.uint8(1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins per super-block."""
    nb = scales.shape[0]
    s = scales.reshape(nb, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18], 16), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:20], 16), _f16(b, 0), _f16(b, 2)


def _q5_0(b):
    d = _f16(b, 0)
    high = _bits_of(np.ascontiguousarray(b[:, 2:6]), 8).transpose(0, 2, 1).reshape(-1, 32)
    return _nibbles(b[:, 6:22], 16) | (high << np.uint8(4)), d, -16 * d


def _q5_1(b):
    high = _bits_of(np.ascontiguousarray(b[:, 4:8]), 8).transpose(0, 2, 1).reshape(-1, 32)
    return _nibbles(b[:, 8:24], 16) | (high << np.uint8(4)), _f16(b, 0), _f16(b, 2)


def _q8_0(b):
    d = _f16(b, 0)
    return b[:, 2:34] ^ np.uint8(0x80), d, -128 * d  # int8 x -> x + 128


def _q4_k(b):
    sc, mn = _k_scale_min(b[:, 4:16])
    return _nibbles(b[:, 16:144], 32), _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _q5_k(b):
    sc, mn = _k_scale_min(b[:, 4:16])
    high = _bits_of(b[:, 16:48], 8).reshape(-1, 256)
    return _nibbles(b[:, 48:176], 32) | (high << np.uint8(4)), _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit layout: each run of 32 bytes holds 4 planes of 32 elements (bits 0-1, 2-3, ...)."""
    nb = qs.shape[0]
    r = qs.reshape(nb, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (r & np.uint8(3)).reshape(nb, -1)


def _tq2_0(b):
    d = np.repeat(_f16(b, 64), 8, axis=1)  # one scale per 256: the same for each 32-group
    return _crumbs(b[:, :64]), d, -d


def _tq1_0(b):
    nb = b.shape[0]
    qs, qh, d = b[:, :48], b[:, 48:52], np.repeat(_f16(b, 52), 8, axis=1)
    pow3 = np.array([1, 3, 9, 27, 81], np.uint8).reshape(1, 1, 5, 1)
    q0 = (qs[:, :32].reshape(nb, -1, 1, 32) * pow3).reshape(nb, -1)  # uint8 wrap-around is the format
    q1 = (qs[:, 32:].reshape(nb, -1, 1, 16) * pow3).reshape(nb, -1)
    q2 = (qh.reshape(nb, -1, 1, 4) * pow3[:, :, :4]).reshape(nb, -1)
    q = np.concatenate([q0, q1, q2], axis=-1)
    return ((q.astype(np.uint16) * 3) >> 8).astype(np.uint8), d, -d


def _q6_k(b):
    """16-wide sub-blocks: (q 0..63, scale d*sc, bias -32*d*sc) per sub-block."""
    nb = b.shape[0]
    low = _nibbles(b[:, :128], 64)
    high = _crumbs(b[:, 128:192])
    s = _f16(b, 208) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return low | (high << np.uint8(4)), s.reshape(nb, 16), -32 * s.reshape(nb, 16)


def _q3_k(b):
    nb = b.shape[0]
    hmask, qs, raw = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = raw[:, :8].reshape(nb, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)
    high = raw[:, 8:].reshape(nb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
    sc = (low.reshape(nb, 16) & np.uint8(15)) | ((high.reshape(nb, 16) & np.uint8(3)) << np.uint8(4))
    s = _f16(b, 108) * (sc.astype(np.int8) - np.int8(32)).astype(np.float32)
    # q3 = low 2 bits - 4 unless the hmask bit is set: stored here as q3 + 4 in 0..7
    hbit = _bits_of(hmask, 8).reshape(nb, 256)
    return _crumbs(qs) | (hbit << np.uint8(2)), s, -4 * s


def _q2_k(b):
    sc = b[:, :16]
    s = _f16(b, 80) * (sc & np.uint8(15)).astype(np.float32)
    m = _f16(b, 82) * (sc >> np.uint8(4)).astype(np.float32)
    return _crumbs(b[:, 16:80]), s, -m


def _iq4_nl(b):
    return _f16(b, 0) * IQ4_VALUES[_nibbles(b[:, 2:18], 16)]


def _iq4_xs(b):
    nb = b.shape[0]
    high = np.ascontiguousarray(b[:, 2:4]).view(np.uint16)
    low = b[:, 4:8].reshape(nb, -1, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)
    high = high >> np.arange(0, 16, 2, dtype=np.uint16).reshape(1, 8)
    ls = (low.reshape(nb, 8) & np.uint8(15)) | ((high.astype(np.uint8) & np.uint8(3)) << np.uint8(4))
    dl = _f16(b, 0) * (ls.astype(np.int8) - np.int8(32)).astype(np.float32)
    vals = IQ4_VALUES[_nibbles(b[:, 8:136], 16)].reshape(nb, 8, 32)
    return (dl[..., None] * vals).reshape(nb, 256)


def _mxfp4(b):
    """(e2m1 codes in element order, e8m0 exponents) -- MLX's mxfp4 mode uses both as is."""
    return _nibbles(b[:, 1:17], 16), b[:, :1]


def _mxfp4_float(b):
    codes, e = _mxfp4(b)
    # ggml_e8m0_to_fp32_half: 2^(e-128), built from bits so e=0 and e=1 are exact subnormals
    e32 = e.astype(np.uint32)
    half = np.where(e32 < 2, np.uint32(0x00200000) << e32, (e32 - 1) << np.uint32(23)).view(np.float32)
    with np.errstate(over="ignore"):  # the largest exponents overflow to inf, in MLX too
        return half * E2M1_DOUBLED[codes]


# type name -> (decoder, sub-block width of its affine form, source bits)
AFFINE = {"Q4_0": (_q4_0, 32, 4), "Q4_1": (_q4_1, 32, 4), "Q5_0": (_q5_0, 32, 5), "Q5_1": (_q5_1, 32, 5),
          "Q8_0": (_q8_0, 32, 8), "Q4_K": (_q4_k, 32, 4), "Q5_K": (_q5_k, 32, 5), "TQ1_0": (_tq1_0, 32, 2),
          "TQ2_0": (_tq2_0, 32, 2), "Q6_K": (_q6_k, 16, 6), "Q3_K": (_q3_k, 16, 3), "Q2_K": (_q2_k, 16, 2)}
FLOATS = {"IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs, "MXFP4": _mxfp4_float}
PLAIN = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8,
         "I16": np.int16, "I32": np.int32, "I64": np.int64}


def reference(kind: str, blocks: np.ndarray) -> np.ndarray:
    """The reference dequantization of raw blocks [nb, type_size] as float32 [nb, block]
    (what `gguf.quants.dequantize` computes, bit for bit)."""
    if kind in AFFINE:
        q, s, b = AFFINE[kind][0](blocks)
        nb, width = q.shape[0], AFFINE[kind][1]
        x = q.reshape(nb, -1, width).astype(np.float32) * s[..., None] + b[..., None]
        return x.reshape(nb, -1)
    return FLOATS[kind](blocks)


def requantize(q: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int, scale_dtype: type = np.float16
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """16-wide affine sub-blocks (q [n, 32k] uint8, s/b [n, 2k]) -> `bits`-wide 32-groups:
    (q, scale, bias, (max, sum) of |error| per 16-wide half against q*s+b, the reference).

    A group whose halves share scale and bias keeps its q (exact but for storing scale and
    bias as scale_dtype). The others get min/max steps, the stored bias rounded down and the
    stored scale rounded up so no value clips: each lands within half a stored step.
    Per-element work runs on a [16, halves] transpose, so numpy's inner loops are long."""
    top = (1 << bits) - 1
    s, b = s.reshape(-1), b.reshape(-1)  # one per half (16 values)
    qt = np.ascontiguousarray(q.reshape(-1, 16).T)  # [16, halves]
    qmin, qmax = qt.min(0).astype(np.float32), qt.max(0).astype(np.float32)
    # x = q*s + b is monotonic in q, so each half's extremes come from its q extremes.
    lo, hi = np.minimum(qmin * s, qmax * s) + b, np.maximum(qmin * s, qmax * s) + b
    lo, hi = np.minimum(lo[0::2], lo[1::2]), np.maximum(hi[0::2], hi[1::2])
    bias = lo.astype(scale_dtype)
    bias = np.where(bias.astype(np.float32) > lo, np.nextafter(bias, scale_dtype(-np.inf)), bias)
    step = (hi - bias.astype(np.float32)) / top
    scale = step.astype(scale_dtype)
    scale = np.where(scale.astype(np.float32) < step, np.nextafter(scale, scale_dtype(np.inf)), scale)
    s2, b2 = s.reshape(-1, 2), b.reshape(-1, 2)
    same = (s2[:, 0] == s2[:, 1]) & (b2[:, 0] == b2[:, 1])
    scale = np.where(same, s2[:, 0].astype(scale_dtype), scale)
    bias = np.where(same, b2[:, 0].astype(scale_dtype), bias)
    # new q = round(t), t = (q*s + b - bias) / scale: an affine map of the old q per half
    sf, bf = np.repeat(scale.astype(np.float32), 2), np.repeat(bias.astype(np.float32), 2)
    inv = np.divide(1.0, sf, out=np.zeros_like(sf), where=sf != 0)  # a shared scale may be negative
    t = qt.astype(np.float32)
    t *= s * inv
    t += (b - bf) * inv
    qn = t + np.float32(0.5)
    np.floor(qn, out=qn)
    np.clip(qn, 0, top, out=qn)
    t -= qn
    np.abs(t, out=t)  # |stored - reference| in steps; per half, times |step|, in value units
    worst, total = t.max(0) * np.abs(sf), t.sum(0) * np.abs(sf)
    zero = sf == 0
    if zero.any():  # a zero stored step leaves every value of the half at the bias
        e = np.abs(qt[:, zero] * s[zero] + b[zero] - bf[zero])
        worst[zero], total[zero] = e.max(0), e.sum(0)
    out = np.empty(q.shape, np.uint8)
    out.reshape(-1, 16)[...] = qn.T
    return out, scale.reshape(q.shape[0], -1), bias.reshape(q.shape[0], -1), (worst, total)


# ---- reading one tensor ----------------------------------------------------------------------
def _np_dtype(dtype: mx.Dtype) -> type:
    return {mx.float16: np.float16, mx.float32: np.float32}[dtype]


def _buffer(shape: tuple[int, ...], dtype: mx.Dtype) -> tuple[mx.array, np.ndarray]:
    """A materialized MLX array and a writable numpy view of its memory (MLX documents that
    `np.array(a, copy=False)` shares it): chunks land in place, never in a second copy."""
    arr = mx.zeros(shape, dtype=dtype)
    mx.eval(arr)
    view = np.array(arr, copy=False)
    if not (view.flags.writeable and view.flags.c_contiguous):  # not a plain buffer: copy at the end
        view = np.zeros(shape, dtype=view.dtype)
    return arr, view


def _finish(arr: mx.array, view: np.ndarray) -> mx.array:
    return arr if np.shares_memory(np.array(arr, copy=False), view) else mx.array(view)


def _each_chunk(path: Path, start: int, rows: int, row_bytes: int, cols: int, work) -> list:
    """work(first row, raw bytes [n_rows, row_bytes]) over chunks of rows, each mapped from
    the file on its own (unmapped after, so its pages leave this process's RSS), on a few
    threads (numpy releases the GIL); returns the results in order."""
    step = max(1, CHUNK // max(1, cols))

    def one(r0: int):
        n = min(step, rows - r0)
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start + r0 * row_bytes, shape=(n * row_bytes,))
        try:
            return work(r0, mm.reshape(n, row_bytes))
        finally:
            del mm

    starts = range(0, rows, step)
    if len(starts) == 1 or WORKERS == 1:
        return [one(r0) for r0 in starts]
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(one, starts))


def read_tensor(path: Path, info: gguf.TensorInfo, data_offset: int, *, dequantize: bool = False,
                float_dtype: mx.Dtype = mx.float16, scale_dtype: mx.Dtype = mx.float16) -> Tensor:
    """One GGUF tensor as MLX arrays (see module doc). `dequantize` gives float_dtype floats
    for every quantized type (the reference values, when float_dtype is float32)."""
    kind = info.type_name
    shape = tuple(reversed(info.shape))  # numpy order: the innermost dimension last
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    start = data_offset + info.offset
    if kind in PLAIN:
        return _read_plain(path, kind, shape, rows, cols, start, float_dtype)
    if kind not in AFFINE and kind not in FLOATS:
        raise Unsupported(f"GGUF tensor type {kind} (tensor {info.name!r}) is not supported")
    per, size = gguf.BLOCKS[info.type]
    if cols % per:
        raise Unsupported(f"GGUF tensor {info.name!r}: rows of {cols} do not split into {kind} blocks of {per}")
    row_bytes = cols // per * size
    lead = shape[:-1]
    if dequantize or kind in DEQUANTIZED:
        arr, out = _buffer((rows, cols), float_dtype)

        def floats(r0, raw):
            out[r0:r0 + raw.shape[0]] = reference(kind, raw.reshape(-1, size)).reshape(raw.shape[0], cols)

        _each_chunk(path, start, rows, row_bytes, cols, floats)
        how = "dequantized" if kind in DEQUANTIZED else "float"
        return Tensor(_finish(arr, out).reshape(shape), how=how, source=kind)
    if kind == "MXFP4":
        w_arr, w = _buffer((rows, cols // 8), mx.uint32)
        e_arr, e = _buffer((rows, cols // GROUP), mx.uint8)

        def fp4(r0, raw):
            codes, ex = _mxfp4(raw.reshape(-1, size))
            w[r0:r0 + raw.shape[0]] = pack(codes.reshape(raw.shape[0], cols), 4)
            e[r0:r0 + raw.shape[0]] = ex.reshape(raw.shape[0], -1)

        _each_chunk(path, start, rows, row_bytes, cols, fp4)
        return Tensor(_finish(w_arr, w).reshape(*lead, -1), _finish(e_arr, e).reshape(*lead, -1), None, 4,
                      "mxfp4", "repacked", kind)
    decode, width, src_bits = AFFINE[kind]
    bits = REQUANT_BITS.get(kind, src_bits)
    sdt = _np_dtype(scale_dtype)
    w_arr, w = _buffer((rows, cols * bits // 32), mx.uint32)
    s_arr, s = _buffer((rows, cols // GROUP), scale_dtype)
    b_arr, b = _buffer((rows, cols // GROUP), scale_dtype)
    # A K-quant's scale d*sc needs 17 bits: measure what storing it as float16 costs.
    rounded = sdt is not np.float32 and kind in ("Q4_K", "Q5_K")

    def affine(r0, raw):
        n = raw.shape[0]
        q, sc, bi = decode(raw.reshape(-1, size))
        worst, total = 0.0, 0.0
        if width == GROUP:
            sc16, bi16 = sc.astype(sdt), bi.astype(sdt)
            if rounded:  # |q*ds + db| is linear in q: its worst is at q = 0 or 2^bits - 1 (groups reach both)
                ds, db = sc16.astype(np.float32) - sc, bi16.astype(np.float32) - bi
                worst = float(np.maximum(np.abs(db), np.abs(((1 << bits) - 1) * ds + db)).max())
        else:
            q, sc16, bi16, (half_max, half_sum) = requantize(q, sc, bi, bits, sdt)
            worst, total = float(half_max.max()), float(half_sum.sum(dtype=np.float64))
        w[r0:r0 + n] = pack(q.reshape(n, cols), bits)
        s[r0:r0 + n] = sc16.reshape(n, -1)
        b[r0:r0 + n] = bi16.reshape(n, -1)
        return worst, total

    results = _each_chunk(path, start, rows, row_bytes, cols, affine)
    error = {}
    if width != GROUP:
        error = {"max_abs": max(r[0] for r in results), "mean_abs": sum(r[1] for r in results) / (rows * cols)}
    elif rounded:
        error = {"max_abs": max(r[0] for r in results)}
    return Tensor(_finish(w_arr, w).reshape(*lead, -1), _finish(s_arr, s).reshape(*lead, -1),
                  _finish(b_arr, b).reshape(*lead, -1), bits, "affine", "requantized" if width != GROUP else "repacked",
                  kind, error, rows * cols)


def _read_plain(path, kind, shape, rows, cols, start, float_dtype) -> Tensor:
    src = np.dtype(PLAIN[kind])
    widen = kind == "F64" or (kind in ("F16", "BF16") and float_dtype == mx.float32)
    dtype = np.dtype(np.float32) if widen else src
    mx_dtype = {np.float32: mx.float32, np.float16: mx.float16, np.uint16: mx.uint16, np.int8: mx.int8,
                np.int16: mx.int16, np.int32: mx.int32, np.int64: mx.int64}[dtype.type]
    arr, out = _buffer((rows, cols), mx_dtype)

    def copy(r0, raw):
        vals = raw.view(src)
        if kind == "BF16" and widen:
            vals = (vals.astype(np.uint32) << np.uint32(16)).view(np.float32)
        out[r0:r0 + raw.shape[0]] = vals

    _each_chunk(path, start, rows, cols * src.itemsize, cols, copy)
    result = _finish(arr, out).reshape(shape)
    if kind == "BF16" and not widen:
        result = result.view(mx.bfloat16)
    return Tensor(result, how="float", source=kind)


def stays_packed(kind: str) -> bool:
    """Whether a tensor of this GGML type loads packed (MLX groups of `GROUP`) unless the whole
    model is dequantized."""
    return (kind in AFFINE or kind == "MXFP4") and kind not in DEQUANTIZED


def float32_bytes(header: gguf.Header) -> int:
    """Bytes the file's tensors take as float32 (the CPU budget decision, made before reading)."""
    return 4 * sum(math.prod(t.shape) for t in header.tensors)
