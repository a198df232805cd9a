"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links the reference BLAS; its float matmuls run tens of times faster when a
BLAS with the standard symbols (OpenBLAS) is already loaded into the process with RTLD_GLOBAL.
Set EDGEINFER_BLAS to a library path to choose one, or to "none" to skip this.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


def preload() -> str | None:
    """Loads OpenBLAS globally if it is present and MLX is not yet imported; returns its path."""
    global loaded
    if loaded or sys.platform != "linux" or "mlx.core" in sys.modules:
        return loaded
    choice = os.environ.get("EDGEINFER_BLAS", "")
    if choice.lower() == "none":
        return None
    paths = [choice] if choice else [p.format(arch=platform.machine()) for p in _CANDIDATES]
    for path in paths:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            return path
    return None
