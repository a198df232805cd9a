"""What a CPU decode step needs beside its linears, read once from a package: the norm weights, the rope
frequencies per layer, the sliding windows and the embedding rows. Shared by the native decode step
(``edgeinfer.native``) and the R-Sparse engine (``edgeinfer.sparse.engine``)."""

from __future__ import annotations

import numpy as np

from .errors import EdgeInferError
from .package import Package
from .safetensors_map import map_safetensors, unpack
from .spec import rope_inv_freq, yarn_mscale

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TENSOR_NAMES = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def module_names(pkg: Package) -> list[str]:
    """Package tensor prefixes of the linears in decode order: layer-major, PROJECTIONS order, then the head."""
    names = [f"layers.{i}.{TENSOR_NAMES[p]}" for i in range(pkg.spec.num_layers) for p in PROJECTIONS]
    return names + ["embed" if pkg.spec.tie_embeddings else "lm_head"]


def check_arch(spec, what: str = "the CPU decode step") -> None:
    """Both steps compute what the ONNX graph computes; refuse what they do not do rather than guess."""
    if spec.arch not in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
        raise EdgeInferError(f"{what} does not know the {spec.arch} architecture")
    if getattr(spec, "num_experts", 0):
        raise EdgeInferError(f"{what} has no Mixture-of-Experts blocks; use --backend mlx")
    if spec.head_dim % 2:
        raise EdgeInferError(f"{what} needs an even head_dim, not {spec.head_dim}")


class DecodeTables:
    def __init__(self, pkg: Package, weights: dict[str, np.ndarray] | None = None):
        s = self.spec = pkg.spec
        w = weights if weights is not None else map_safetensors(pkg.weights_path)
        L, H = s.num_layers, s.hidden_size

        def vec(name, size, default=None):
            if name in w:
                return np.asarray(w[name], np.float32)
            if default is None:
                raise EdgeInferError(f"the package's weights lack the tensor {name}")
            return np.full(size, default, np.float32)

        self.norms = np.zeros((L + 1, 4, H), np.float32)
        self.qk_norms = np.ones((L, 2, s.head_dim), np.float32)
        for i in range(L):
            p = f"layers.{i}"
            self.norms[i, 0] = vec(f"{p}.attn_norm.weight", H)
            self.norms[i, 1] = vec(f"{p}.mlp_norm.weight", H)
            if s.sandwich_norm:
                self.norms[i, 2] = vec(f"{p}.post_attn_norm.weight", H)
                self.norms[i, 3] = vec(f"{p}.post_mlp_norm.weight", H)
            if s.qk_norm:
                self.qk_norms[i, 0] = vec(f"{p}.attn.q_norm.weight", s.head_dim)
                self.qk_norms[i, 1] = vec(f"{p}.attn.k_norm.weight", s.head_dim)
        self.norms[L, 0] = vec("norm.weight", H)
        self.inv_freq = np.ascontiguousarray(np.stack([rope_inv_freq(s, i) for i in range(L)]).astype(np.float64))
        self.mscale = float(yarn_mscale(s))
        self.windows = np.array([s.sliding_window if (t == "sliding" and s.sliding_window) else 0 for t in s.layer_types],
                                np.int64)
        self._embed_w = w["embed.weight"]
        self._embed_q = "embed.scales" in w
        if self._embed_q:
            quant = pkg.quantization
            self._embed_bits = int(quant.get("tensors", {}).get("embed", quant).get("bits", quant.get("bits")))
            self._embed_s, self._embed_b = w["embed.scales"], w["embed.biases"]

    def embed(self, token: int) -> np.ndarray:
        """The token's embedding row, dequantized and scaled as the model does (float32, contiguous)."""
        s = self.spec
        if self._embed_q:
            q = unpack(self._embed_w[token: token + 1], self._embed_bits)[0].astype(np.float32)
            g = q.size // self._embed_s.shape[1]
            sc = np.asarray(self._embed_s[token], np.float32)
            bi = np.asarray(self._embed_b[token], np.float32)
            x = (q.reshape(-1, g) * sc[:, None] + bi[:, None]).reshape(-1)
        else:
            x = np.asarray(self._embed_w[token], np.float32).copy()
        if s.embed_scale != 1.0:
            x = x * np.float32(s.embed_scale)
        return np.ascontiguousarray(x, np.float32)
