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
    """``auto``: MLX on Apple Silicon (Metal); elsewhere ONNX Runtime when the package has a graph and the
    native decode step can run it (then every answer is the exact model's: float-activation prefill and
    the native step), else MLX with a notice. The ONNX graph alone decodes either with int8 activations
    (fast, but near-ties turn the other way, first tokens included) or in float (slow), so auto does not
    pick it."""
    if requested in BACKENDS:
        return requested
    if requested != "auto":
        raise EdgeInferError(f"unknown backend {requested!r}; choose auto, {', '.join(BACKENDS)}")
    if is_apple_silicon():
        return "mlx"
    if not (package.path / "model.onnx").exists():
        if notice:
            notice(f"{package.path} has no ONNX graph, so it runs on MLX's CPU backend (slower here); "
                   f"add one with: edgeinfer convert {package.path} --backend onnx")
        return "mlx"
    from .onnx_backend import native_unavailable

    why = native_unavailable(package)
    if why is None:
        return "onnx"
    if notice:
        notice(f"{why}, so the ONNX graph would decode with int8 activations (not the exact model's answers) "
               f"or slowly in float; running on MLX (--backend onnx runs the graph anyway)")
    return "mlx"


def open_backend(package, name: str, threads: int | None = None, notice=None, **opts):
    if name == "onnx":
        from .onnx_backend import ONNXModel

        return ONNXModel(package, threads=threads, **opts)
    if threads is not None and notice:
        notice("MLX has no thread-count control; --threads is ignored on the MLX backend")
    from .mlx_backend import MLXModel

    return MLXModel(package, **opts)
