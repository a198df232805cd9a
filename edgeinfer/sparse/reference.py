"""The sparse decode step written plainly in numpy, from the package's own weights (dequantized, original
layout) and the plan: the oracle the fast engine (``kernels.decode_step``) is tested against, and the
way the speed benchmark calibrates thresholds when a package has no plan of a level yet.

It shares nothing with the engine but the definitions: the sparse linear

    score_j = |x_j| * c_j,  S = {j : score_j > t},  y = W[:, S] x_S + B (A x_notS)

and the decoder of ``converters/onnx_export.py`` (one token, keys and values in the ONNX backend's
buffers [layers, 1, kv_heads, capacity, head_dim]).
"""

from __future__ import annotations

import numpy as np

from ..package import Package
from ..spec import rope_inv_freq, yarn_mscale
from ..decode_tables import TENSOR_NAMES as _NAMES
from ..safetensors_map import map_safetensors, unpack as _unpack
from .plan import PROJECTIONS



def dequantize(w: dict, pkg: Package, name: str) -> np.ndarray:
    """The package's W [m, n] of tensor prefix ``name`` in float64 (w = scale * q + bias per group)."""
    if f"{name}.scales" not in w:
        return np.asarray(w[f"{name}.weight"], np.float64)
    quant = pkg.quantization
    qp = quant.get("tensors", {}).get(name, quant)
    bits, g = int(qp.get("bits", quant.get("bits"))), int(qp.get("group_size", quant.get("group_size")))
    q = _unpack(w[f"{name}.weight"], bits).astype(np.float64)
    m, n = q.shape
    s = np.asarray(w[f"{name}.scales"], np.float64)[:, :, None]
    b = np.asarray(w[f"{name}.biases"], np.float64)[:, :, None]
    return (q.reshape(m, n // g, g) * s + b).reshape(m, n)


def sparse_linear(x: np.ndarray, W: np.ndarray, t: float, c=None, a=None, b=None) -> tuple[np.ndarray, int]:
    """The formula itself; returns (y, number of active channels)."""
    score = np.abs(x) * (1.0 if c is None else np.asarray(c, np.float64))
    keep = score > t
    y = W[:, keep] @ x[keep]
    if a is not None:
        y = y + np.asarray(b, np.float64) @ (np.asarray(a, np.float64) @ np.where(keep, 0.0, x))
    return y, int(keep.sum())


class ReferenceDecoder:
    """``step(token, pos, kblock, vblock, plan)`` -> logits [vocab] (float64); ``plan`` None keeps every
    channel. ``inputs`` collects each module's input vectors when set to a dict (for calibration)."""

    def __init__(self, pkg: Package):
        self.pkg, self.spec = pkg, pkg.spec
        w = map_safetensors(pkg.weights_path)
        s = self.spec
        self.W = {(i, p): dequantize(w, pkg, f"layers.{i}.{_NAMES[p]}") for i in range(s.num_layers) for p in PROJECTIONS}
        self.bias = {(i, p): np.asarray(w[f"layers.{i}.{_NAMES[p]}.bias"], np.float64)
                     for i in range(s.num_layers) for p in PROJECTIONS if f"layers.{i}.{_NAMES[p]}.bias" in w}
        self.embed = dequantize(w, pkg, "embed")
        self.head = self.embed if s.tie_embeddings else dequantize(w, pkg, "lm_head")
        self.vec = {k: np.asarray(v, np.float64) for k, v in w.items() if k.endswith("norm.weight")}
        self.inputs: dict | None = None
        self.active = [0, 0]

    def _norm(self, x, name):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.spec.rms_norm_eps) * self.vec[name]

    def _lin(self, x, i, p, plan):
        if self.inputs is not None:
            self.inputs.setdefault((i, p), []).append(x.copy())
        if plan is None:
            y, k = self.W[i, p] @ x, x.size
        else:
            mp = plan.module(i, p)
            y, k = sparse_linear(x, self.W[i, p], mp.t, mp.c, mp.a, mp.b)
        self.active[0] += k
        self.active[1] += x.size
        return y + self.bias[i, p] if (i, p) in self.bias else y

    def record_inputs(self, ids: list[int]) -> dict:
        """Decodes ``ids`` densely from an empty cache and returns each module's input vectors,
        ``{(layer, proj): [x, ...]}`` (what magnitude thresholds are calibrated on)."""
        s = self.spec
        kb = np.zeros((s.num_layers, 1, s.num_kv_heads, len(ids), s.head_dim), np.float32)
        vb = kb.copy()
        self.inputs = {}
        for pos, t in enumerate(ids):
            self.step(t, pos, kb, vb)
        inputs, self.inputs = self.inputs, None
        return inputs

    def step(self, token: int, pos: int, kblock: np.ndarray, vblock: np.ndarray, plan=None) -> np.ndarray:
        s = self.spec
        nh, nkv, D = s.num_heads, s.num_kv_heads, s.head_dim
        x = self.embed[token] * s.embed_scale
        for i in range(s.num_layers):
            p = f"layers.{i}"
            h = self._norm(x, f"{p}.attn_norm.weight")
            q = self._lin(h, i, "q", plan).reshape(nh, D)
            k = self._lin(h, i, "k", plan).reshape(nkv, D)
            v = self._lin(h, i, "v", plan).reshape(nkv, D)
            if s.qk_norm:
                q, k = self._norm(q, f"{p}.attn.q_norm.weight"), self._norm(k, f"{p}.attn.k_norm.weight")
            ang = pos * rope_inv_freq(s, i)
            cos, sin = np.cos(ang) * yarn_mscale(s), np.sin(ang) * yarn_mscale(s)
            half = D // 2

            def rope(t):
                a, b = t[:, :half], t[:, half:]
                return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

            q, k = rope(q), rope(k)
            kblock[i, 0, :, pos] = k
            vblock[i, 0, :, pos] = v
            start = 0
            if s.layer_types[i] == "sliding" and s.sliding_window:
                start = max(0, pos - s.sliding_window + 1)
            keys = kblock[i, 0, :, start: pos + 1].astype(np.float64)
            vals = vblock[i, 0, :, start: pos + 1].astype(np.float64)
            kv = np.repeat(np.arange(nkv), nh // nkv)
            scores = np.einsum("hd,hsd->hs", q, keys[kv]) * s.attn_scale
            if s.attn_logit_softcap:
                scores = np.tanh(scores / s.attn_logit_softcap) * s.attn_logit_softcap
            e = np.exp(scores - scores.max(-1, keepdims=True))
            att = np.einsum("hs,hsd->hd", e / e.sum(-1, keepdims=True), vals[kv]).reshape(-1)
            o = self._lin(att, i, "o", plan)
            if s.sandwich_norm:
                o = self._norm(o, f"{p}.post_attn_norm.weight")
            x = x + o
            h = self._norm(x, f"{p}.mlp_norm.weight")
            g = self._lin(h, i, "gate", plan)
            if s.mlp_act == "silu":
                g = g / (1 + np.exp(-g))
            else:
                g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
            m = self._lin(g * self._lin(h, i, "up", plan), i, "down", plan)
            if s.sandwich_norm:
                m = self._norm(m, f"{p}.post_mlp_norm.weight")
            x = x + m
        logits = self.head @ self._norm(x, "norm.weight")
        if s.final_logit_softcap:
            logits = np.tanh(logits / s.final_logit_softcap) * s.final_logit_softcap
        return logits
