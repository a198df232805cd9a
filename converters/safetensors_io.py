"""Lazy safetensors reading (memory-mapped, bf16 included) and streaming writing.

A tiny format reader of our own: the safetensors package's numpy frontend cannot return bf16, and a
header check here turns truncated files into a plain error before any tensor is touched.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from edgeinfer.errors import EdgeInferError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 on read
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise ValueError("its header runs past the end of the file")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise EdgeInferError(f"{self.path} is not a valid safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._base = 8 + n
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self._base + end > size:
            raise EdgeInferError(
                f"{self.path} is truncated: its header describes {self._base + end} bytes but the file has {size}"
            )
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dt = info["dtype"]
        if dt not in _DTYPES:
            raise EdgeInferError(f"{self.path}: tensor {name} has dtype {dt}, which edgeinfer does not read")
        a, b = info["data_offsets"]
        raw = self._mm[self._base + a : self._base + b].view(_DTYPES[dt]).reshape(info["shape"])
        if dt == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw


def write_safetensors(path: Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> int:
    """Writes tensors (already in memory) to ``path``, streaming each one; returns the byte count."""
    items = list(tensors)
    header: dict = {}
    offset = 0
    for name, arr in items:
        dt = _NAMES.get(np.dtype(arr.dtype))
        if dt is None:
            raise ValueError(f"cannot store dtype {arr.dtype} for {name}")
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).data)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset
