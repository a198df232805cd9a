"""edgeinfer: an on-device LLM runtime (MLX and ONNX Runtime backends)."""

__version__ = "0.1.0"

from . import _blas  # noqa: E402
from .errors import EdgeInferError  # noqa: E402

# Before anything imports MLX: its Linux CPU wheel is far faster with OpenBLAS loaded first.
_blas.preload()


def load(path, backend: str = "auto", **opts):
    """Loads an edgeinfer package: ``m = edgeinfer.load(PKG); m.generate("Hello")``."""
    from .model import load as _load

    return _load(path, backend=backend, **opts)


__all__ = ["EdgeInferError", "load", "__version__"]
