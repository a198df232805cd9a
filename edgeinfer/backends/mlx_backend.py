"""The MLX backend: one parameterized decoder for every ArchSpec.

Runs on Metal on a Mac and on MLX's CPU backend on Linux with the same code (only portable MLX API).
The KV cache is preallocated in steps; the decode step is ``mx.compile``d with the position passed as an
array, so growing the context does not retrace it (only growing the cache buffer does, once per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import EdgeInferError
from ..package import Package
from ..spec import ArchSpec, rope_inv_freq, yarn_mscale


def rope_freqs(spec: ArchSpec, layer: int) -> tuple[float | None, float, mx.array | None]:
    """Returns (base, scale, freqs) for mx.fast.rope: either a plain base with a position scale, or
    explicit per-dimension wavelengths for llama3 / yarn scaling."""
    scaling = spec.rope_scaling_for(layer)
    if not scaling or scaling["type"] == "linear":
        return spec.rope_base(layer), 1.0 / float(scaling.get("factor", 1.0)) if scaling else 1.0, None
    return None, 1.0, mx.array((1.0 / rope_inv_freq(spec, layer)).astype(np.float32))


class Linear:
    """y = x W^T (+ b), with W dense or affine-quantized (MLX layout)."""

    def __init__(self, weights: dict, name: str, qparams: tuple[int, int] | None, dequantize: bool, dtype):
        w = weights.get(f"{name}.weight")
        if w is None:
            raise EdgeInferError(f"the package's weights lack the tensor {name}.weight")
        self.bias = weights.get(f"{name}.bias")
        if self.bias is not None:
            self.bias = self.bias.astype(dtype)
        self.quant = None
        if f"{name}.scales" in weights:
            scales, biases = weights[f"{name}.scales"], weights[f"{name}.biases"]
            bits, group = qparams
            if dequantize:
                self.w = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group, bits=bits).astype(dtype)
            else:
                self.w = w
                # Scales stay fp16/fp32 as stored, never bf16 (too coarse for scales); with a bf16
                # model the kernel computes in the scales' precision and the result is cast back.
                sdt = scales.dtype if dtype == mx.bfloat16 else dtype
                self.quant = (scales.astype(sdt), biases.astype(sdt), group, bits)
        else:
            self.w = w.astype(dtype)

    def arrays(self) -> list[mx.array]:
        return [self.w] + ([self.bias] if self.bias is not None else []) + (list(self.quant[:2]) if self.quant else [])

    def __call__(self, x: mx.array) -> mx.array:
        if self.quant is None:
            y = x @ self.w.T
        else:
            s, b, g, bits = self.quant
            y = mx.quantized_matmul(x, self.w, s, b, transpose=True, group_size=g, bits=bits).astype(x.dtype)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: mx.array) -> mx.array:
        """Embedding lookup: rows of W for token ids."""
        if self.quant is None:
            return self.w[ids]
        s, b, g, bits = self.quant
        return mx.dequantize(self.w[ids], s[ids], b[ids], group_size=g, bits=bits)


@dataclass
class Layer:
    attn_norm: mx.array
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    mlp_norm: mx.array
    gate: Linear
    up: Linear
    down: Linear
    q_norm: mx.array | None = None
    k_norm: mx.array | None = None
    post_attn_norm: mx.array | None = None
    post_mlp_norm: mx.array | None = None
    sliding: bool = False
    rope_base: float | None = None
    rope_scale: float = 1.0
    rope_freqs: mx.array | None = None


class KVCache:
    """Per-layer key/value buffers [1, kv_heads, capacity, head_dim], grown in steps of ``step``.

    ``offset`` is the number of valid positions. Rolling back (chat interruptions, rejected draft
    tokens) is just lowering ``offset``: later writes overwrite the stale tail.
    """

    def __init__(self, spec: ArchSpec, dtype, step: int = 256, max_tokens: int | None = None):
        self.spec = spec
        self.dtype = dtype
        self.step = step
        self.max_tokens = max_tokens
        self.offset = 0
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, n: int) -> None:
        need = self.offset + n
        if self.max_tokens is not None and need > self.max_tokens:
            raise EdgeInferError(f"the context would grow to {need} tokens, past this model's limit of {self.max_tokens}")
        if need <= self.capacity:
            return
        new_cap = ((need + self.step - 1) // self.step) * self.step
        if self.max_tokens is not None:
            new_cap = min(new_cap, self.max_tokens)
        s = self.spec
        shape = (1, s.num_kv_heads, new_cap - self.capacity, s.head_dim)
        if not self.keys:
            self.keys = [mx.zeros(shape, self.dtype) for _ in range(s.num_layers)]
            self.values = [mx.zeros(shape, self.dtype) for _ in range(s.num_layers)]
        else:
            self.keys = [mx.concatenate([k, mx.zeros(shape, self.dtype)], axis=2) for k in self.keys]
            self.values = [mx.concatenate([v, mx.zeros(shape, self.dtype)], axis=2) for v in self.values]
        mx.eval(self.keys, self.values)

    def trim_to(self, n: int) -> None:
        self.offset = max(0, min(n, self.offset))

    def reset(self) -> None:
        self.offset = 0


def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def default_device_dtype(spec: ArchSpec):
    if mx.default_device() == mx.cpu:
        return mx.float32
    return mx.bfloat16 if spec.arch == "gemma3" else mx.float16


class MLXModel:
    """The decoder. ``forward(tokens, cache)`` runs a chunk and returns its logits (float32)."""

    backend = "mlx"

    def __init__(self, pkg: Package, dtype=None, dequantize: bool | None = None):
        self.spec = spec = pkg.spec
        self.dtype = dtype or default_device_dtype(spec)
        # MLX's quantized kernels are slow on its CPU backend; float weights with OpenBLAS are not.
        if dequantize is None:
            dequantize = mx.default_device() == mx.cpu
        self.dequantized = dequantize
        try:
            w = mx.load(str(pkg.weights_path))
        except Exception as e:  # MLX raises RuntimeError/ValueError with its own wording
            raise EdgeInferError(f"cannot read {pkg.weights_path}: {e}") from None
        missing = [n for n in ("embed.weight", "norm.weight") if n not in w]
        if missing:
            raise EdgeInferError(f"{pkg.weights_path} lacks the tensors {', '.join(missing)}")

        quant = pkg.quantization
        per_tensor = quant.get("tensors", {})

        def lin(name):
            q = per_tensor.get(name, quant)
            return Linear(w, name, (q.get("bits"), q.get("group_size")), dequantize, self.dtype)

        def norm(name):
            t = w.get(name)
            return None if t is None else t.astype(self.dtype)

        self.embed = lin("embed")
        self.lm_head = self.embed if spec.tie_embeddings else lin("lm_head")
        self.norm = norm("norm.weight")
        self.layers: list[Layer] = []
        for i in range(spec.num_layers):
            p = f"layers.{i}"
            base, scale, freqs = rope_freqs(spec, i)
            self.layers.append(
                Layer(
                    attn_norm=norm(f"{p}.attn_norm.weight"),
                    q=lin(f"{p}.attn.q_proj"),
                    k=lin(f"{p}.attn.k_proj"),
                    v=lin(f"{p}.attn.v_proj"),
                    o=lin(f"{p}.attn.o_proj"),
                    mlp_norm=norm(f"{p}.mlp_norm.weight"),
                    gate=lin(f"{p}.mlp.gate_proj"),
                    up=lin(f"{p}.mlp.up_proj"),
                    down=lin(f"{p}.mlp.down_proj"),
                    q_norm=norm(f"{p}.attn.q_norm.weight"),
                    k_norm=norm(f"{p}.attn.k_norm.weight"),
                    post_attn_norm=norm(f"{p}.post_attn_norm.weight"),
                    post_mlp_norm=norm(f"{p}.post_mlp_norm.weight"),
                    sliding=spec.layer_types[i] == "sliding",
                    rope_base=base,
                    rope_scale=scale,
                    rope_freqs=freqs,
                )
            )
        self._mscale = yarn_mscale(spec)
        mx.eval(self._all_arrays())
        self._decode = mx.compile(self._step)

    def _all_arrays(self) -> list[mx.array]:
        out = self.embed.arrays() + ([] if self.lm_head is self.embed else self.lm_head.arrays()) + [self.norm]
        for ly in self.layers:
            for v in vars(ly).values():
                if isinstance(v, Linear):
                    out += v.arrays()
                elif isinstance(v, mx.array):
                    out.append(v)
        return out

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        return KVCache(self.spec, self.dtype, max_tokens=max_tokens or self.spec.max_position_embeddings)

    # -- the decoder ------------------------------------------------------------------------------
    def _step(self, tokens: mx.array, pos: mx.array, keys: list, values: list, last_only: bool = False):
        """Pure function of its inputs: returns (logits, keys, values). ``pos`` is a scalar int32
        array, so the same compiled graph serves every position."""
        s = self.spec
        L = tokens.shape[1]
        x = self.embed.rows(tokens).astype(self.dtype)
        if s.embed_scale != 1.0:
            x = x * mx.array(s.embed_scale, dtype=self.dtype)
        cap = keys[0].shape[2]
        qpos = pos + mx.arange(L)[:, None]
        kpos = mx.arange(cap)[None, :]
        full_mask = kpos <= qpos
        sliding_mask = full_mask & (kpos > qpos - (s.sliding_window or 0))
        new_k, new_v = [], []
        for i, ly in enumerate(self.layers):
            h = mx.fast.rms_norm(x, ly.attn_norm, s.rms_norm_eps)
            q = ly.q(h).reshape(1, L, s.num_heads, s.head_dim)
            k = ly.k(h).reshape(1, L, s.num_kv_heads, s.head_dim)
            v = ly.v(h).reshape(1, L, s.num_kv_heads, s.head_dim)
            if ly.q_norm is not None:
                q = mx.fast.rms_norm(q, ly.q_norm, s.rms_norm_eps)
                k = mx.fast.rms_norm(k, ly.k_norm, s.rms_norm_eps)
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
            q = mx.fast.rope(q, s.head_dim, traditional=False, base=ly.rope_base, scale=ly.rope_scale, offset=pos, freqs=ly.rope_freqs)
            k = mx.fast.rope(k, s.head_dim, traditional=False, base=ly.rope_base, scale=ly.rope_scale, offset=pos, freqs=ly.rope_freqs)
            if self._mscale != 1.0:
                q, k = q * self._mscale, k * self._mscale
            kc = mx.slice_update(keys[i], k.astype(self.dtype), pos.reshape(1), axes=(2,))
            vc = mx.slice_update(values[i], v.astype(self.dtype), pos.reshape(1), axes=(2,))
            new_k.append(kc)
            new_v.append(vc)
            mask = sliding_mask if ly.sliding else full_mask
            if s.attn_logit_softcap:
                o = _softcapped_attention(q, kc, vc, s.attn_scale, mask, s.attn_logit_softcap, s.num_heads // s.num_kv_heads)
            else:
                o = mx.fast.scaled_dot_product_attention(q, kc, vc, scale=s.attn_scale, mask=mask)
            o = ly.o(o.transpose(0, 2, 1, 3).reshape(1, L, s.num_heads * s.head_dim))
            if ly.post_attn_norm is not None:
                o = mx.fast.rms_norm(o, ly.post_attn_norm, s.rms_norm_eps)
            x = x + o
            h = mx.fast.rms_norm(x, ly.mlp_norm, s.rms_norm_eps)
            g = ly.gate(h)
            g = g * mx.sigmoid(g) if s.mlp_act == "silu" else _gelu_tanh(g)
            m = ly.down(g * ly.up(h))
            if ly.post_mlp_norm is not None:
                m = mx.fast.rms_norm(m, ly.post_mlp_norm, s.rms_norm_eps)
            x = x + m
        if last_only:  # prefill needs only the next token's logits
            x = x[:, -1:, :]
        x = mx.fast.rms_norm(x, self.norm, s.rms_norm_eps)
        logits = self.lm_head(x).astype(mx.float32)
        if s.final_logit_softcap:
            c = s.final_logit_softcap
            logits = mx.tanh(logits / c) * c
        return logits, new_k, new_v

    def forward(self, tokens, cache: KVCache, lazy: bool = False, last_only: bool = False) -> mx.array:
        """Runs ``tokens`` (a list of ids or a [1, L] array) after the cached context and returns the
        logits [1, L, vocab]. Advances the cache. One token takes the compiled path."""
        if not isinstance(tokens, mx.array):
            tokens = mx.array(np.asarray(tokens, dtype=np.int32).reshape(1, -1))
        L = tokens.shape[1]
        cache.reserve(L)
        pos = mx.array(cache.offset, dtype=mx.int32)
        if L == 1:
            logits, cache.keys, cache.values = self._decode(tokens, pos, cache.keys, cache.values)
        else:
            logits, cache.keys, cache.values = self._step(tokens, pos, cache.keys, cache.values, last_only)
        cache.offset += L
        if not lazy:
            mx.eval(logits, cache.keys, cache.values)
        return logits


def _softcapped_attention(q, k, v, scale, mask, cap, groups):
    if groups > 1:
        k = mx.repeat(k, groups, axis=1)
        v = mx.repeat(v, groups, axis=1)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)
    scores = mx.tanh(scores / cap) * cap
    scores = mx.where(mask, scores, mx.array(-1e30, scores.dtype))
    return mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype) @ v
