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
    """Per-layer key/value buffers [1, kv_heads, capacity, head_dim], grown in steps of ``step`` up to a
    per-layer limit, and used as a ring once a layer is at its limit (position p lives in slot
    p % capacity):

    - sliding-window layers (Gemma 3, Mistral) never need more than their window: their limit is the
      window plus ``slack`` (the slack lets a chat roll back a few tokens without recomputing);
    - full-attention layers stop at ``max_tokens`` (the memory plan's context). There the cache refuses
      to grow (``overflow="refuse"``: a clear error) or turns into a ring too (``"rotate"``: the model
      then attends to the last ``max_tokens`` tokens).

    ``slot_pos[g][j]`` is the position held in slot j of the layers of group g (0: full attention,
    1: sliding window), -1 when empty or stale; attention masks are built from it. ``offset`` is the
    number of positions seen. Rolling back (chat interruptions) lowers ``offset`` and invalidates the
    slots past it; when a ring no longer holds what the shorter context needs, ``trim_to`` says so by
    keeping nothing.
    """

    def __init__(self, spec: ArchSpec, dtype, step: int = 256, max_tokens: int | None = None,
                 overflow: str = "refuse", slack: int = 64):
        if overflow not in ("refuse", "rotate"):
            raise EdgeInferError(f"KV overflow policy {overflow!r} is not one of: refuse, rotate")
        self.spec = spec
        self.dtype = dtype
        self.step = step
        self.max_tokens = int(max_tokens or spec.max_position_embeddings)
        self.overflow = overflow
        self.offset = 0
        win = spec.sliding_window
        self.group_of = layer_groups(spec)
        self.limit = [self.max_tokens, min(self.max_tokens, win + slack) if win else self.max_tokens]
        self.ring = [overflow == "rotate", True]
        self.window = [None, win]
        self.slot_pos = [np.full(0, -1, np.int64), np.full(0, -1, np.int64)]
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []

    @property
    def rotating(self) -> bool:
        """True when the context may grow past ``max_tokens`` (the oldest tokens are forgotten)."""
        return self.overflow == "rotate"

    @property
    def capacity(self) -> int:
        return len(self.slot_pos[self.group_of[0]]) if self.group_of else 0

    def layers_of(self, g: int) -> list[int]:
        return [i for i, x in enumerate(self.group_of) if x == g]

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def reserve(self, n: int) -> None:
        """Makes room for ``n`` more positions (growing the buffers, at most to their limits)."""
        need = self.offset + n
        if self.overflow == "refuse" and need > self.max_tokens:
            raise EdgeInferError(
                f"the context would grow to {need} tokens, past the {self.max_tokens} of this model's memory plan "
                f"(ask for more with --context or --memory-budget, or let the cache rotate with --kv-overflow rotate)"
            )
        s = self.spec
        if not self.keys:
            self.keys = [None] * s.num_layers
            self.values = [None] * s.num_layers
        for g in (0, 1):
            layers = self.layers_of(g)
            cap = len(self.slot_pos[g])
            if not layers or need <= cap or cap >= self.limit[g]:
                continue
            new_cap = min(((need + self.step - 1) // self.step) * self.step, self.limit[g])
            shape = (1, s.num_kv_heads, new_cap - cap, s.head_dim)
            for i in layers:  # one layer at a time: the old and new buffers coexist for one layer only
                if self.keys[i] is None:
                    self.keys[i], self.values[i] = mx.zeros(shape, self.dtype), mx.zeros(shape, self.dtype)
                else:
                    self.keys[i] = mx.concatenate([self.keys[i], mx.zeros(shape, self.dtype)], axis=2)
                    self.values[i] = mx.concatenate([self.values[i], mx.zeros(shape, self.dtype)], axis=2)
                mx.eval(self.keys[i], self.values[i])
            self.slot_pos[g] = np.concatenate([self.slot_pos[g], np.full(new_cap - cap, -1, np.int64)])

    def effective_window(self, g: int) -> int | None:
        """How far back a query of group g looks: the sliding window, the ring's size once a rotating
        full-attention cache is at its limit, or None (everything)."""
        if g == 1:
            return self.window[1]
        if self.ring[0] and len(self.slot_pos[0]) >= self.limit[0]:
            return self.limit[0]
        return None

    def plan_write(self, n: int) -> list[dict]:
        """For a chunk of ``n`` tokens at ``offset`` (after ``reserve``): per group, the slot positions before
        and after the write, where the write starts, and whether writing the chunk into the buffer before
        attending is safe (the slots it overwrites hold nothing a query of the chunk needs; otherwise the
        chunk attends over the old buffer and its own keys concatenated)."""
        out = []
        for g in (0, 1):
            before = self.slot_pos[g]
            cap = len(before)
            if cap == 0:
                out.append(None)
                continue
            after = before.copy()
            m = min(n, cap)
            pos = np.arange(self.offset + n - m, self.offset + n)
            after[pos % cap] = pos
            start = self.offset % cap
            win = self.effective_window(g)
            over = before[start : start + n] if start + n <= cap else None
            if over is None:
                simple = False
            elif win is None:
                simple = not (over >= 0).any()
            else:
                simple = not (over > self.offset - win).any()
            out.append(dict(before=before, after=after, start=start, simple=simple, window=win, cap=cap))
        return out

    def commit(self, n: int, writes: list[dict]) -> None:
        for g, w in enumerate(writes):
            if w is not None:
                self.slot_pos[g] = w["after"]
        self.offset += n

    def trim_to(self, n: int) -> int:
        """Rolls back to the first ``n`` positions and returns how many are kept: ``n``, or 0 when a ring
        has already overwritten positions the shorter context needs (the caller recomputes them)."""
        n = max(0, min(int(n), self.offset))
        if n == self.offset:
            return n
        for g in (0, 1):
            sp = self.slot_pos[g]
            if not len(sp) or not self.layers_of(g):
                continue
            win = self.window[1] if g == 1 else (len(sp) if self.ring[0] else None)
            lo = 0 if win is None else max(0, n - win + 1)
            if np.count_nonzero((sp >= lo) & (sp < n)) != n - lo:
                n = 0
                break
        for sp in self.slot_pos:
            sp[sp >= n] = -1
        self.offset = n
        return n

    def reset(self) -> None:
        self.trim_to(0)


def layer_groups(spec: ArchSpec) -> list[int]:
    """Per layer, its KV-cache group: 0 full attention, 1 sliding window (a ring of about the window)."""
    return [1 if (t == "sliding" and spec.sliding_window) else 0 for t in spec.layer_types]


def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def default_device_dtype(spec: ArchSpec):
    if mx.default_device() == mx.cpu:
        return mx.float32
    return mx.bfloat16 if spec.arch == "gemma3" else mx.float16


class MLXModel:
    """The decoder. ``forward(tokens, cache)`` runs a chunk and returns its logits (float32).

    Options, normally chosen by the memory planner (``edgeinfer.memory``):
    ``dequantize``: expand affine-quantized weights to ``dtype`` at load (fast float matmuls on MLX's CPU
    backend, 4-8x the bytes) or keep them quantized; ``max_context``: the KV cache's bound in tokens;
    ``kv_dtype``: the KV cache's precision (default: the compute dtype); ``kv_overflow``: at the bound,
    "refuse" (an error) or "rotate" (keep the last ``max_context`` tokens); ``resident_layers``: keep the
    first k decoder layers in memory and read the others from the package file at every step
    (``stream_io``: "direct" reads with O_DIRECT, never through the page cache; "cached" plain reads).
    """

    backend = "mlx"

    def __init__(self, pkg: Package, dtype=None, dequantize: bool | None = None, max_context: int | None = None,
                 kv_dtype=None, kv_overflow: str = "refuse", resident_layers: int | None = None,
                 stream_io: str = "direct"):
        self.spec = spec = pkg.spec
        self.dtype = dtype or default_device_dtype(spec)
        self.kv_dtype = _as_dtype(kv_dtype) or self.dtype
        # MLX's quantized kernels are slow on its CPU backend; float weights with OpenBLAS are not.
        if dequantize is None:
            dequantize = mx.default_device() == mx.cpu
        self.dequantized = dequantize
        self.max_context = int(max_context or spec.max_position_embeddings)
        if kv_overflow not in ("refuse", "rotate"):
            raise EdgeInferError(f"--kv-overflow must be refuse or rotate, not {kv_overflow!r}")
        self.kv_overflow = kv_overflow
        n = spec.num_layers
        self.resident_layers = n if resident_layers is None else max(0, min(int(resident_layers), n))
        try:
            w = mx.load(str(pkg.weights_path))
        except Exception as e:  # MLX raises RuntimeError/ValueError with its own wording
            raise EdgeInferError(f"cannot read {pkg.weights_path}: {e}") from None
        missing = [m for m in ("embed.weight", "norm.weight") if m not in w]
        if missing:
            raise EdgeInferError(f"{pkg.weights_path} lacks the tensors {', '.join(missing)}")
        self._quant = pkg.quantization

        # Load one part at a time and drop its source arrays once converted, so that the peak during
        # loading is the resident weights plus one part's source, not twice the model.
        def take(prefix: str, make):
            part = {k: w.pop(k) for k in [k for k in w if k.startswith(prefix)]}
            out = make(part)
            mx.eval(_arrays_of(out))
            del part
            return out

        self.embed = take("embed.", lambda p: self._lin(p, "embed", dequantize))
        self.lm_head = self.embed if spec.tie_embeddings else take("lm_head.", lambda p: self._lin(p, "lm_head", dequantize))
        self.norm = take("norm.", lambda p: p["norm.weight"].astype(self.dtype))
        self.layers: list[Layer | None] = []
        for i in range(n):
            if i < self.resident_layers:
                self.layers.append(take(f"layers.{i}.", lambda p, i=i: self._make_layer(i, p, dequantize)))
            else:
                for k in [k for k in w if k.startswith(f"layers.{i}.")]:
                    del w[k]  # never read: this layer is streamed
                self.layers.append(None)
        del w
        mx.clear_cache()
        self.streamer = LayerStreamer(pkg, range(self.resident_layers, n), direct=stream_io == "direct") if self.resident_layers < n else None
        self._mscale = yarn_mscale(spec)
        self._group_of = layer_groups(spec)
        self._decode = mx.compile(self._decode_step)

    def _lin(self, weights: dict, name: str, dequantize: bool) -> "Linear":
        per_tensor = self._quant.get("tensors", {})
        q = per_tensor.get(name, self._quant)
        return Linear(weights, name, (q.get("bits"), q.get("group_size")), dequantize, self.dtype)

    def _make_layer(self, i: int, w: dict, dequantize: bool) -> Layer:
        spec = self.spec
        p = f"layers.{i}"

        def norm(name):
            t = w.get(name)
            return None if t is None else t.astype(self.dtype)

        base, scale, freqs = rope_freqs(spec, i)
        return Layer(
            attn_norm=norm(f"{p}.attn_norm.weight"),
            q=self._lin(w, f"{p}.attn.q_proj", dequantize),
            k=self._lin(w, f"{p}.attn.k_proj", dequantize),
            v=self._lin(w, f"{p}.attn.v_proj", dequantize),
            o=self._lin(w, f"{p}.attn.o_proj", dequantize),
            mlp_norm=norm(f"{p}.mlp_norm.weight"),
            gate=self._lin(w, f"{p}.mlp.gate_proj", dequantize),
            up=self._lin(w, f"{p}.mlp.up_proj", dequantize),
            down=self._lin(w, f"{p}.mlp.down_proj", dequantize),
            q_norm=norm(f"{p}.attn.q_norm.weight"),
            k_norm=norm(f"{p}.attn.k_norm.weight"),
            post_attn_norm=norm(f"{p}.post_attn_norm.weight"),
            post_mlp_norm=norm(f"{p}.post_mlp_norm.weight"),
            sliding=spec.layer_types[i] == "sliding",
            rope_base=base,
            rope_scale=scale,
            rope_freqs=freqs,
        )

    def _all_arrays(self) -> list[mx.array]:
        out = self.embed.arrays() + ([] if self.lm_head is self.embed else self.lm_head.arrays()) + [self.norm]
        for ly in self.layers:
            if ly is not None:
                out += _arrays_of(ly)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the resident weights."""
        return sum(a.nbytes for a in self._all_arrays())

    @property
    def bytes_read(self) -> int:
        """Bytes read from the package file for streamed layers so far."""
        return self.streamer.bytes_read if self.streamer else 0

    def new_cache(self, max_tokens: int | None = None, overflow: str | None = None) -> KVCache:
        return KVCache(self.spec, self.kv_dtype, max_tokens=max_tokens or self.max_context,
                       overflow=overflow or self.kv_overflow)

    # -- the decoder ------------------------------------------------------------------------------
    def _embed(self, tokens: mx.array) -> mx.array:
        x = self.embed.rows(tokens).astype(self.dtype)
        if self.spec.embed_scale != 1.0:
            x = x * mx.array(self.spec.embed_scale, dtype=self.dtype)
        return x

    def _head(self, x: mx.array) -> mx.array:
        s = self.spec
        x = mx.fast.rms_norm(x, self.norm, s.rms_norm_eps)
        logits = self.lm_head(x).astype(mx.float32)
        if s.final_logit_softcap:
            c = s.final_logit_softcap
            logits = mx.tanh(logits / c) * c
        return logits

    def _block(self, ly: Layer, x: mx.array, pos, kc: mx.array, vc: mx.array, attend):
        """One decoder layer; ``attend(q, k, v, kc, vc) -> (o, kc, vc)`` writes the cache and attends."""
        s = self.spec
        L = x.shape[1]
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
        o, kc, vc = attend(q, k.astype(self.kv_dtype), v.astype(self.kv_dtype), kc, vc)
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
        return x + m, kc, vc

    def _sdpa(self, q, kc, vc, mask):
        s = self.spec
        if kc.dtype != self.dtype:  # a lower-precision KV cache: attend in the compute dtype
            kc, vc = kc.astype(self.dtype), vc.astype(self.dtype)
        if s.attn_logit_softcap:
            return _softcapped_attention(q, kc, vc, s.attn_scale, mask, s.attn_logit_softcap, s.num_heads // s.num_kv_heads)
        return mx.fast.scaled_dot_product_attention(q, kc, vc, scale=s.attn_scale, mask=mask)

    def _decode_step(self, tokens: mx.array, pos: mx.array, keys: list, values: list, kpos: list, windows: mx.array):
        """One token, compiled: pure function of its inputs; returns (logits, keys, values). ``pos`` is a
        scalar int32 array, ``kpos[g]`` the positions held by group g's slots after this write and
        ``windows[g]`` how far back group g looks, so the same graph serves every position."""
        x = self._embed(tokens)
        masks = [((kpos[g] >= 0) & (kpos[g] > pos - windows[g])).reshape(1, -1) for g in (0, 1)]
        new_k, new_v = [], []
        for i, ly in enumerate(self.layers):
            g = self._group_of[i]

            def attend(q, k, v, kc, vc, g=g):
                slot = (pos % kc.shape[2]).reshape(1)
                kc = mx.slice_update(kc, k, slot, axes=(2,))
                vc = mx.slice_update(vc, v, slot, axes=(2,))
                return self._sdpa(q, kc, vc, masks[g]), kc, vc

            x, kc, vc = self._block(ly, x, pos, keys[i], values[i], attend)
            new_k.append(kc)
            new_v.append(vc)
        return self._head(x), new_k, new_v

    def _chunk_attend(self, off: int, L: int, w: dict):
        """Attention for a chunk of L tokens at position ``off`` against one group's cache (see
        ``KVCache.plan_write``)."""
        qpos = mx.arange(off, off + L, dtype=mx.int32)[:, None]
        win = w["window"]

        def mask_for(kp):
            kp = kp[None, :]
            m = (kp >= 0) & (kp <= qpos)
            return m if win is None else m & (kp > qpos - win)

        if w["simple"]:
            start = mx.array([w["start"]], dtype=mx.int32)
            mask = mask_for(mx.array(w["after"].astype(np.int32)))

            def attend(q, k, v, kc, vc):
                kc = mx.slice_update(kc, k, start, axes=(2,))
                vc = mx.slice_update(vc, v, start, axes=(2,))
                return self._sdpa(q, kc, vc, mask), kc, vc

            return attend
        kp_all = np.concatenate([w["before"], np.arange(off, off + L)]).astype(np.int32)
        mask = mask_for(mx.array(kp_all))
        m = min(L, w["cap"])
        slots = mx.array((np.arange(off + L - m, off + L) % w["cap"]).astype(np.int32))

        def attend(q, k, v, kc, vc):
            o = self._sdpa(q, mx.concatenate([kc, k], axis=2), mx.concatenate([vc, v], axis=2), mask)
            kc[:, :, slots, :] = k[:, :, L - m :, :]
            vc[:, :, slots, :] = v[:, :, L - m :, :]
            return o, kc, vc

        return attend

    def forward(self, tokens, cache: KVCache, lazy: bool = False, last_only: bool = False) -> mx.array:
        """Runs ``tokens`` (a list of ids or a [1, L] array) after the cached context and returns the
        logits [1, L, vocab] ([1, 1, vocab] with ``last_only``). Advances the cache. One token takes the
        compiled path when every layer is resident."""
        if not isinstance(tokens, mx.array):
            tokens = mx.array(np.asarray(tokens, dtype=np.int32).reshape(1, -1))
        L = tokens.shape[1]
        cache.reserve(L)
        writes = cache.plan_write(L)
        off = cache.offset
        if L == 1 and self.streamer is None:
            kpos = [mx.array(w["after"].astype(np.int32)) if w else mx.zeros((1,), mx.int32) for w in writes]
            windows = mx.array([w["window"] if w and w["window"] else 1 << 30 for w in writes], dtype=mx.int32)
            logits, cache.keys, cache.values = self._decode(
                tokens, mx.array(off, dtype=mx.int32), cache.keys, cache.values, kpos, windows
            )
        else:
            attends = [self._chunk_attend(off, L, w) if w else None for w in writes]
            x = self._embed(tokens)
            keys, values = list(cache.keys), list(cache.values)
            for i in range(self.spec.num_layers):
                ly = self.layers[i]
                streamed = ly is None
                if streamed:
                    ly = self.streamer.layer(i, self)
                x, keys[i], values[i] = self._block(ly, x, off, keys[i], values[i], attends[cache.group_of[i]])
                if streamed:  # bounded memory: one streamed layer's weights at a time
                    mx.eval(x, keys[i], values[i])
                    del ly
            if last_only:
                x = x[:, -1:, :]
            logits = self._head(x)
            cache.keys, cache.values = keys, values
        cache.commit(L, writes)
        if not lazy:
            mx.eval(logits, cache.keys, cache.values)
        return logits


def _as_dtype(d):
    if d is None or isinstance(d, mx.Dtype):
        return d
    names = {"float32": mx.float32, "fp32": mx.float32, "float16": mx.float16, "fp16": mx.float16, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16}
    if d not in names:
        raise EdgeInferError(f"unknown dtype {d!r}; one of: {', '.join(names)}")
    return names[d]


def _arrays_of(obj) -> list[mx.array]:
    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, Linear):
        return obj.arrays()
    out = []
    for v in vars(obj).values():
        if isinstance(v, Linear):
            out += v.arrays()
        elif isinstance(v, mx.array):
            out.append(v)
    return out


_NP_DTYPES = {"U32": np.uint32, "F16": np.float16, "F32": np.float32, "BF16": np.uint16, "I32": np.int32, "U8": np.uint8}


class LayerStreamer:
    """Reads streamed layers' weights from the package file at every step: ``pread`` into one reusable,
    page-aligned buffer (with O_DIRECT, so every read goes to the disk, not the page cache), the next
    layer's read running in a thread while the current layer computes. ``bytes_read`` counts the bytes
    requested from the file (including O_DIRECT's alignment)."""

    ALIGN = 4096

    def __init__(self, pkg: Package, layers, direct: bool = True):
        import mmap
        import os
        from concurrent.futures import ThreadPoolExecutor

        from ..memory import safetensors_index

        self.path = str(pkg.weights_path)
        index = safetensors_index(pkg.weights_path)
        self.order = list(layers)
        self.spans: dict[int, tuple[int, int, list]] = {}
        for i in self.order:
            ts = [(name, t) for name, t in index.items() if name.startswith(f"layers.{i}.")]
            lo = min(t["start"] for _, t in ts) // self.ALIGN * self.ALIGN
            hi = -(-max(t["end"] for _, t in ts) // self.ALIGN) * self.ALIGN
            self.spans[i] = (lo, hi, ts)
        size = max(hi - lo for lo, hi, _ in self.spans.values())
        self.buf = mmap.mmap(-1, size)
        self.direct = False
        self.fd = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                self.fd = None
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        self.drop_cache = direct and not self.direct
        self.bytes_read = 0
        self.pool = ThreadPoolExecutor(1)
        self.pending: tuple[int, object] | None = None

    def _read(self, i: int) -> int:
        import os

        lo, hi, _ = self.spans[i]
        view = memoryview(self.buf)
        done = 0
        while done < hi - lo:
            try:
                got = os.preadv(self.fd, [view[done : hi - lo]], lo + done)
            except OSError as e:
                if self.direct and done == 0 and e.errno == 22:  # EINVAL: this file system refuses O_DIRECT
                    os.close(self.fd)
                    self.fd, self.direct, self.drop_cache = os.open(self.path, os.O_RDONLY), False, True
                    continue
                raise EdgeInferError(f"cannot read {self.path}: {e}") from None
            if got == 0:
                break
            done += got
        if self.drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        self.bytes_read += done
        return i

    def layer(self, i: int, model: "MLXModel") -> Layer:
        if self.pending is None or self.pending[0] != i:
            if self.pending is not None:
                self.pending[1].result()
            self.pending = (i, self.pool.submit(self._read, i))
        self.pending[1].result()
        lo, _, ts = self.spans[i]
        arrays = {}
        for name, t in ts:
            a = np.frombuffer(self.buf, dtype=_NP_DTYPES[t["dtype"]], count=int(np.prod(t["shape"])), offset=t["start"] - lo)
            arr = mx.array(a.reshape(t["shape"]))  # a copy: the buffer is free again after this
            arrays[name] = arr.view(mx.bfloat16) if t["dtype"] == "BF16" else arr
        nxt = self.order[(self.order.index(i) + 1) % len(self.order)]
        self.pending = (nxt, self.pool.submit(self._read, nxt))
        return model._make_layer(i, arrays, dequantize=False)


def _softcapped_attention(q, k, v, scale, mask, cap, groups):
    if groups > 1:
        k = mx.repeat(k, groups, axis=1)
        v = mx.repeat(v, groups, axis=1)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)
    scores = mx.tanh(scores / cap) * cap
    scores = mx.where(mask, scores, mx.array(-1e30, scores.dtype))
    return mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype) @ v
