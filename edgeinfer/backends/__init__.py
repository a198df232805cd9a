"""Backends: MLX (Apple GPU, or CPU) and ONNX Runtime (CPU everywhere, other execution providers).

Both take a package and offer ``new_cache()`` and ``forward(ids, cache, lazy=False, last_only=False)``;
the cache has ``offset``, ``max_tokens``, ``trim_to(n)`` and ``reset()``.
"""

from __future__ import annotations

import platform
import sys

from ..errors import EdgeInferError

BACKENDS = ("mlx", "onnx")


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def choose_backend(package, requested: str = "auto", notice=None) -> str:
    """``auto``: MLX on Apple Silicon (Metal), ONNX Runtime elsewhere when the package has a graph,
    else MLX with a notice."""
    if requested in BACKENDS:
        return requested
    if requested != "auto":
        raise EdgeInferError(f"unknown backend {requested!r}; choose auto, {', '.join(BACKENDS)}")
    if is_apple_silicon():
        return "mlx"
    if (package.path / "model.onnx").exists():
        level = package.manifest.get("onnx", {}).get("accuracy_level", 4)
        if level == 4:
            return "onnx"
        if notice:  # the exact graph computes in float: correct, but slower here than MLX
            notice(f"{package.path}'s ONNX graph is the exact (float) one, slower than MLX here; running on MLX "
                   f"(--backend onnx runs it anyway)")
        return "mlx"
    if notice:
        notice(f"{package.path} has no ONNX graph, so it runs on MLX's CPU backend (slower here); "
               f"add one with: edgeinfer convert {package.path} --backend onnx")
    return "mlx"


def open_backend(package, name: str, threads: int | None = None, notice=None, **opts):
    if name == "onnx":
        from .onnx_backend import ONNXModel

        return ONNXModel(package, threads=threads, **opts)
    if threads is not None and notice:
        notice("MLX has no thread-count control; --threads is ignored on the MLX backend")
    from .mlx_backend import MLXModel

    return MLXModel(package, **opts)
