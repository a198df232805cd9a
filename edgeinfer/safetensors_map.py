"""Tensors of a safetensors file as memory-mapped numpy views, and MLX's packed values unpacked: what the
CPU decode steps read the package's weights with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import EdgeInferError


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory-mapped numpy view (no copy; bfloat16
    tensors, which numpy lacks, come as float32 copies)."""
    dtypes = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "I64": np.int64, "F16": np.float16,
              "F32": np.float32, "BF16": np.uint16}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    unknown = {info["dtype"] for name, info in header.items() if name != "__metadata__"} - set(dtypes)
    if unknown:
        raise EdgeInferError(f"{path} holds tensors of type {', '.join(sorted(unknown))}, which the sparse path does not read")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = mm[8 + n + a: 8 + n + b]
        a = raw.view(dtypes[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # numpy has no bfloat16: its bits are a float32's upper half
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a
    return out


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing (value k of a row at bits [k*bits, (k+1)*bits) of its little-endian stream) -> uint8 [rows, n]."""
    b = np.ascontiguousarray(words).view(np.uint8)
    if bits == 8:
        return b.copy()
    if bits == 4:
        return np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1)
    if b.shape[-1] % bits == 0:  # every 8 values fill `bits` whole bytes: one 64-bit word, 8 shifts
        g = b.reshape(b.shape[0], -1, bits).astype(np.uint64)
        word = np.bitwise_or.reduce(g << (8 * np.arange(bits, dtype=np.uint64)), axis=-1)
        vals = (word[..., None] >> (bits * np.arange(8, dtype=np.uint64))) & np.uint64((1 << bits) - 1)
        return vals.astype(np.uint8).reshape(b.shape[0], -1)
    stream = np.unpackbits(b, axis=-1, bitorder="little")
    vals = stream.reshape(b.shape[0], -1, bits)
    return (vals * (1 << np.arange(bits, dtype=np.uint16))).sum(-1).astype(np.uint8)


def drop_pages_of(arrays) -> None:
    """Lets the OS drop the pages behind each of ``arrays`` (views of ``map_safetensors``) from this
    process, as soon as they are copied: a loader that copies a file tensor by tensor then holds one
    tensor of it at a time, not the whole file (clean file pages; a later read faults them back in)."""
    import mmap

    page = mmap.PAGESIZE
    for a in arrays:
        top = a  # the whole file's np.memmap: the last array of the chain, whose base is the mmap itself
        while isinstance(getattr(top, "base", None), np.ndarray):
            top = top.base
        mm = getattr(top, "base", None)
        if not isinstance(mm, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            continue
        start = a.ctypes.data - top.ctypes.data
        lo, hi = start // page * page, min(-(-(start + a.nbytes) // page) * page, len(mm))
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def drop_resident_pages(arrays: dict[str, np.ndarray]) -> None:
    """Lets the OS drop the pages of the mapping behind ``arrays`` from this process (the file stays
    cached): for a reader that copied what it needs and keeps only a few rows of the mapping in use."""
    import mmap

    for a in arrays.values():
        while a is not None and not hasattr(a, "_mmap"):
            a = getattr(a, "base", None)
        mm = getattr(a, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)
            return
