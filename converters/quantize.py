"""Affine group quantization in MLX's layout (see docs/PACKAGE.md), in numpy.

w[o, j] = scales[o, j // g] * q[o, j] + biases[o, j // g], q packed little-endian into uint32 words.
The same bits feed MLX's quantized_matmul and, repacked, ONNX Runtime's MatMulNBits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUPS = (32, 64, 128)


@dataclass
class QuantizedTensor:
    weight: np.ndarray  # uint32 [out, in * bits / 32]
    scales: np.ndarray  # float16 | float32 [out, in / group_size]
    biases: np.ndarray  # same dtype and shape as scales
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        q = unpack_bits(self.weight, self.bits).astype(np.float32)
        out, n = q.shape
        q = q.reshape(out, n // self.group_size, self.group_size)
        w = q * self.scales.astype(np.float32)[..., None] + self.biases.astype(np.float32)[..., None]
        return w.reshape(out, n).astype(dtype)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned integers q [rows, n] (each < 2**bits) into uint32 words, value i of a row
    occupying bits [i*bits, (i+1)*bits) of the row's little-endian bit stream."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    rows, n = q.shape
    if (n * bits) % 32:
        raise ValueError(f"a row of {n} values at {bits} bits does not fill whole uint32 words")
    if bits == 8:
        return q.view(np.uint32).reshape(rows, n // 4)
    if bits == 4:
        pairs = q.reshape(rows, n // 2, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).view(np.uint32).reshape(rows, n // 8)
    stream = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits]
    packed = np.packbits(stream.reshape(rows, n * bits), axis=-1, bitorder="little")
    return packed.view(np.uint32).reshape(rows, n * bits // 32)


def unpack_bits(w: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_bits: uint32 [rows, words] -> uint8 [rows, words * 32 / bits]."""
    w = np.ascontiguousarray(w, dtype=np.uint32)
    rows = w.shape[0]
    b = w.view(np.uint8).reshape(rows, -1)
    if bits == 8:
        return b.copy()
    if bits == 4:
        return np.stack([b & 0xF, b >> 4], axis=-1).reshape(rows, -1)
    stream = np.unpackbits(b, axis=-1, bitorder="little")
    n = stream.shape[1] // bits
    vals = stream.reshape(rows, n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (vals.astype(np.uint16) * weights).sum(-1).astype(np.uint8)


def _checked(w, bits: int, group_size: int) -> np.ndarray:
    """w [out, in] as float32, once bits, the group size and the input size are known to fit."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group size must be one of {SUPPORTED_GROUPS}")
    w = np.asarray(w, dtype=np.float32)
    if w.shape[1] % group_size:
        raise ValueError(f"input dimension {w.shape[1]} is not a multiple of the group size {group_size}")
    return w


def quantize(w: np.ndarray, bits: int, group_size: int, scale_dtype=np.float16) -> QuantizedTensor:
    """Round-to-nearest min/max affine quantization of w [out, in] along the input dimension.

    Follows MLX's scheme: scale = (max - min) / (2**bits - 1), with the bias pinned to the group's
    extreme of larger magnitude so that it is exact, then q = round((w - bias) / scale).
    """
    w = _checked(w, bits, group_size)
    out, n = w.shape
    g = w.reshape(out, n // group_size, group_size)
    wmax = g.max(-1)
    wmin = g.min(-1)
    levels = (1 << bits) - 1
    scale = (wmax - wmin) / levels
    scale = np.where(scale == 0, 1e-8, scale)
    # Keep whichever end has the larger magnitude exactly representable (MLX does the same).
    use_min = np.abs(wmin) > np.abs(wmax)
    edge = np.where(use_min, wmin, wmax)
    q_edge = np.where(use_min, 0.0, float(levels))
    # Round the scale to the storage dtype first, so that q is computed against what is stored.
    scale = scale.astype(scale_dtype).astype(np.float32)
    scale = np.where(scale == 0, np.float32(np.finfo(np.float16).tiny), scale)
    bias = (edge - q_edge * scale).astype(scale_dtype).astype(np.float32)
    q = np.clip(np.rint((g - bias[..., None]) / scale[..., None]), 0, levels).astype(np.uint8)
    return QuantizedTensor(
        weight=pack_bits(q.reshape(out, n), bits),
        scales=scale.astype(scale_dtype),
        biases=bias.astype(scale_dtype),
        bits=bits,
        group_size=group_size,
    )


def quantize_symmetric(w: np.ndarray, bits: int, group_size: int) -> QuantizedTensor:
    """Round-to-nearest symmetric quantization: w = scale * (q - 2**(bits-1)), scale = max|w| / (2**(bits-1) - 1)
    per group in float16 (rounded up where rounding down would clip the group's largest value), so the
    stored bias is -2**(bits-1) * scale, exactly, and a decoder needs no biases (the native step keeps
    none: half a bit a weight at groups of 32)."""
    w = _checked(w, bits, group_size)
    out, n = w.shape
    g = w.reshape(out, n // group_size, group_size)
    zero, top = 1 << (bits - 1), (1 << (bits - 1)) - 1
    amax = np.abs(g).max(-1).astype(np.float32)
    scale = (amax / top).astype(np.float16)
    low = scale.astype(np.float32) * top < amax
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    scale[scale == 0] = np.finfo(np.float16).smallest_subnormal  # an all-zero group
    s32 = scale.astype(np.float32)
    q = np.clip(np.rint(g / s32[..., None]) + zero, 0, 2 * zero - 1).astype(np.uint8)
    return QuantizedTensor(
        weight=pack_bits(q.reshape(out, n), bits),
        scales=scale,
        biases=(s32 * -zero).astype(np.float16),
        bits=bits,
        group_size=group_size,
    )


def quantize_search(w: np.ndarray, bits: int, group_size: int, scale_dtype=np.float16, steps: int = 20) -> QuantizedTensor:
    """Affine group quantization that searches each group's scale and bias for the smallest weighted squared
    error, as llama.cpp's make_qkx2_quants does for its K-quants: ``steps + 1`` candidate grids stretched
    around the group's min..max, each refitted by least squares to the levels it assigns, the weight of a
    value being ``rms(group) + |value|``. For re-quantizing already quantized sources, where round-to-nearest
    on min..max adds a second rounding on top of the first (measured on Qwen2.5-Coder 0.5B in
    docs/BENCHMARKS.md)."""
    w = _checked(w, bits, group_size)
    out, n = w.shape
    g = np.ascontiguousarray(w.reshape(-1, group_size))
    scale, bias = _search_kernel()(g, (1 << bits) - 1, steps)
    levels = (1 << bits) - 1
    scale = scale.astype(scale_dtype).astype(np.float32)
    scale = np.where(scale <= 0, np.float32(np.finfo(np.float16).tiny), scale)
    bias = bias.astype(scale_dtype).astype(np.float32)
    q = np.clip(np.rint((g - bias[:, None]) / scale[:, None]), 0, levels).astype(np.uint8)
    return QuantizedTensor(
        weight=pack_bits(q.reshape(out, n), bits),
        scales=scale.reshape(out, -1).astype(scale_dtype),
        biases=bias.reshape(out, -1).astype(scale_dtype),
        bits=bits,
        group_size=group_size,
    )


_SEARCH = []


def _search_kernel():
    """The per-group search of quantize_search, compiled by numba on first use (a few seconds; not cached: its closure would pin a module path)."""
    if _SEARCH:
        return _SEARCH[0]
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def search(g, levels, steps):
        rows, size = g.shape
        scales = np.empty(rows, np.float32)
        biases = np.empty(rows, np.float32)
        for r in prange(rows):
            x = g[r]
            lo, hi, ss = x[0], x[0], np.float32(0)
            for i in range(size):
                lo = min(lo, x[i])
                hi = max(hi, x[i])
                ss += x[i] * x[i]
            if hi - lo < 1e-12:
                scales[r], biases[r] = 1e-8, lo
                continue
            av = np.sqrt(ss / size)
            best_s, best_b = (hi - lo) / levels, lo
            best = np.float32(0)
            for i in range(size):
                q = min(max(np.rint((x[i] - lo) / best_s), 0), levels)
                d = best_s * q + lo - x[i]
                best += (av + abs(x[i])) * d * d
            for step in range(steps + 1):
                iscale = (levels - 1.0 + 0.1 * step) / (hi - lo)
                sw = sl = sl2 = sx = slx = 0.0
                for i in range(size):
                    q = min(max(np.rint(iscale * (x[i] - lo)), 0), levels)
                    wt = av + abs(x[i])
                    sw += wt
                    sl += wt * q
                    sl2 += wt * q * q
                    sx += wt * x[i]
                    slx += wt * q * x[i]
                det = sw * sl2 - sl * sl
                if det <= 0:
                    continue
                s = (sw * slx - sx * sl) / det
                b = (sl2 * sx - sl * slx) / det
                if s <= 0:
                    continue
                err = 0.0
                for i in range(size):
                    q = min(max(np.rint((x[i] - b) / s), 0), levels)
                    d = s * q + b - x[i]
                    err += (av + abs(x[i])) * d * d
                if err < best:
                    best, best_s, best_b = err, s, b
            scales[r], biases[r] = best_s, best_b
        return scales, biases

    _SEARCH.append(search)
    return search
