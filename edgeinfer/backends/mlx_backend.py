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
from ..moe import check_moe, no_budget
from ..spec import ArchSpec, rope_inv_freq, yarn_mscale
from .mlx_moe import MoEBlock
from ..sparse.plan import PROJECTIONS


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
        # R-Sparse (edgeinfer/sparse/plan.py): (t, c, A, B) or None; applied to one-token steps, or to every
        # position with ``sparse_all`` (perplexity, the calibration search: each token sparsified alone).
        self.sparse = None
        self.sparse_all = False
        # Calibration hook (converters/sparsify.py): called with every input x before the product.
        self.observe = None

    def set_sparse(self, mp, dtype) -> None:
        """Attaches one projection's plan (a ``ModulePlan``), or None for the dense product."""
        if mp is None:
            self.sparse = None
            return
        c = None if mp.c is None else mx.array(mp.c).astype(dtype)
        a = None if mp.a is None else mx.array(mp.a).astype(dtype)
        b = None if mp.b is None else mx.array(mp.b).astype(dtype)
        self.sparse = (mx.array(mp.t, dtype=mx.float32), c, a, b)

    def arrays(self) -> list[mx.array]:
        sparse = [t for t in (self.sparse or ())[1:] if t is not None]
        return [self.w] + ([self.bias] if self.bias is not None else []) + (list(self.quant[:2]) if self.quant else []) + sparse

    def _product(self, x: mx.array) -> mx.array:
        if self.quant is None:
            return x @ self.w.T
        s, b, g, bits = self.quant
        return mx.quantized_matmul(x, self.w, s, b, transpose=True, group_size=g, bits=bits).astype(x.dtype)

    def _sparse_product(self, x: mx.array) -> mx.array:
        """W[:, S] x_S + B (A x_notS) as masked products: portable MLX (Metal or CPU), the same arithmetic as
        the formula; the fast kernels that skip the unread columns are the ONNX backend's."""
        t, c, a, b = self.sparse
        score = mx.abs(x) if c is None else mx.abs(x) * c
        keep = mx.where(score.astype(mx.float32) > t, x, mx.zeros_like(x))
        y = self._product(keep)
        if a is not None:
            y = y + ((x - keep) @ a.T) @ b.T
        return y

    def __call__(self, x: mx.array) -> mx.array:
        if self.observe is not None:
            self.observe(x)
        if self.sparse is not None and (self.sparse_all or x.shape[-2] == 1):
            y = self._sparse_product(x)
        else:
            y = self._product(x)
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
    gate: Linear | None  # None in an MoE layer
    up: Linear | None
    down: Linear | None
    q_norm: mx.array | None = None
    k_norm: mx.array | None = None
    post_attn_norm: mx.array | None = None
    post_mlp_norm: mx.array | None = None
    sliding: bool = False
    rope_base: float | None = None
    rope_scale: float = 1.0
    rope_freqs: mx.array | None = None
    moe: MoEBlock | None = None


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

    def compact(self, start: int, picks) -> int:
        """Keeps the positions ``start + picks[j]`` (a tree's accepted path) at ``start + j`` and drops the
        rest after them; returns how many positions are kept, as ``trim_to`` does."""
        picks = np.asarray(picks, np.int64)
        moved = np.nonzero(picks != np.arange(len(picks)))[0]
        if len(moved):
            for g in (0, 1):
                cap = len(self.slot_pos[g])
                if not cap or not self.layers_of(g):
                    continue
                src = mx.array(((start + picks[moved]) % cap).astype(np.int32))
                dst = mx.array(((start + moved) % cap).astype(np.int32))
                for i in self.layers_of(g):
                    self.keys[i][:, :, dst, :] = self.keys[i][:, :, src, :]
                    self.values[i][:, :, dst, :] = self.values[i][:, :, src, :]
        return self.trim_to(start + len(picks))

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
    ``sparsity_plan``: an R-Sparse plan (``edgeinfer.sparse.plan.SparsePlan``) or None; ``sparsity_mode``:
    "decode" (one-token steps sparse, prefill dense) or "all" (every position, each token on its own).
    ``expert_cache``: MoE models, experts per layer kept resident (None: all), the others read from the
    package file when routed to; ``expert_policy``: which to evict, "lru" or "lfu" (expert_cache.py).
    """

    backend = "mlx"

    def __init__(self, pkg: Package, dtype=None, dequantize: bool | None = None, max_context: int | None = None,
                 kv_dtype=None, kv_overflow: str = "refuse", resident_layers: int | None = None,
                 stream_io: str = "direct", sparsity_plan=None, sparsity_mode: str = "decode",
                 moe_top_k: int | None = None, expert_cache: int | None = None, expert_policy: str = "lru"):
        self.spec = spec = pkg.spec
        check_moe(spec, None, moe_top_k)
        # "dial k": the experts each token takes, a static shape of the compiled graphs
        self.moe_top_k = int(moe_top_k or spec.num_experts_per_tok)
        self._moe_stats: list = []
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
        self._check_sparsity_mode(sparsity_mode)
        self.sparsity_plan, self.sparsity_mode = sparsity_plan, sparsity_mode
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
        # ``expert_cache``: experts per MoE layer kept resident (None: all); the others are read from the
        # package file when routed to (edgeinfer/backends/expert_cache.py). Resident layers only: a streamed
        # layer reads all of its weights anyway.
        self.expert_cache = None
        if expert_cache is not None and spec.num_experts:
            from .expert_cache import ExpertCache

            moe_layers = [i for i in range(self.resident_layers) if spec.is_moe_layer(i)]
            self.expert_cache = ExpertCache(pkg, spec, moe_layers, expert_cache, expert_policy, dequantize, self.dtype,
                                            self._qparams, self.moe_top_k)
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

    @property
    def moe_stats(self) -> list[dict]:
        """Per MoE layer of the last forward: distinct experts its tokens requested (their own top-k), distinct
        experts run after the budget, and the share of the requested routing mass kept. A one-token forward
        (the compiled decode step, never budgeted) requests and keeps its top-k."""
        s = self.spec
        layers = [i for i in range(s.num_layers) if s.is_moe_layer(i)]
        if not self._moe_stats:
            return [dict(layer=i, requested=self.moe_top_k, kept=self.moe_top_k, mass_kept=1.0) for i in layers]
        arr = np.array(mx.stack(self._moe_stats))
        return [dict(layer=i, requested=int(r), kept=int(k), mass_kept=float(m)) for i, (r, k, m) in zip(layers, arr)]

    def set_moe_top_k(self, k: int | None) -> None:
        """Changes the experts per token for every later forward (None: the model's own)."""
        check_moe(self.spec, None, k)
        self.moe_top_k = int(k or self.spec.num_experts_per_tok)
        self._decode = mx.compile(self._decode_step)  # k is a shape of the traced step

    def _lin(self, weights: dict, name: str, dequantize: bool) -> "Linear":
        per_tensor = self._quant.get("tensors", {})
        q = per_tensor.get(name, self._quant)
        return Linear(weights, name, (q.get("bits"), q.get("group_size")), dequantize, self.dtype)

    def _qparams(self, name: str) -> tuple:
        q = self._quant.get("tensors", {}).get(name, self._quant)
        return q.get("bits"), q.get("group_size")

    @property
    def expert_cache_stats(self) -> dict | None:
        """The expert cache's counters (hits, misses, bytes read, resident bytes...), None when all experts are resident."""
        return self.expert_cache.stats() if self.expert_cache is not None else None

    def _make_layer(self, i: int, w: dict, dequantize: bool) -> Layer:
        spec = self.spec
        p = f"layers.{i}"

        def norm(name):
            t = w.get(name)
            return None if t is None else t.astype(self.dtype)

        base, scale, freqs = rope_freqs(spec, i)
        moe = None
        if spec.is_moe_layer(i):
            ec = self.expert_cache if self.expert_cache is not None and i in self.expert_cache.policies else None
            moe = MoEBlock(w, p, spec, self._qparams, dequantize, self.dtype, lambda ws, n: self._lin(ws, n, dequantize),
                           cache=ec, layer=i)
        dense = None if moe else (lambda n: self._lin(w, f"{p}.mlp.{n}", dequantize))
        layer = Layer(
            attn_norm=norm(f"{p}.attn_norm.weight"),
            q=self._lin(w, f"{p}.attn.q_proj", dequantize),
            k=self._lin(w, f"{p}.attn.k_proj", dequantize),
            v=self._lin(w, f"{p}.attn.v_proj", dequantize),
            o=self._lin(w, f"{p}.attn.o_proj", dequantize),
            mlp_norm=norm(f"{p}.mlp_norm.weight"),
            gate=dense and dense("gate_proj"),
            up=dense and dense("up_proj"),
            down=dense and dense("down_proj"),
            q_norm=norm(f"{p}.attn.q_norm.weight"),
            k_norm=norm(f"{p}.attn.k_norm.weight"),
            post_attn_norm=norm(f"{p}.post_attn_norm.weight"),
            post_mlp_norm=norm(f"{p}.post_mlp_norm.weight"),
            sliding=spec.layer_types[i] == "sliding",
            rope_base=base,
            rope_scale=scale,
            rope_freqs=freqs,
            moe=moe,
        )
        self._attach_sparsity(i, layer)
        return layer

    @staticmethod
    def _check_sparsity_mode(mode: str) -> None:
        if mode not in ("decode", "all"):
            raise EdgeInferError(f"sparsity mode must be decode or all, not {mode!r}")

    def _attach_sparsity(self, i: int, layer: Layer) -> None:
        plan = self.sparsity_plan
        for p in PROJECTIONS:
            lin = getattr(layer, p)
            if lin is None:  # an MoE layer's experts
                continue
            lin.set_sparse(plan.module(i, p) if plan is not None else None, self.dtype)
            lin.sparse_all = self.sparsity_mode == "all"

    def set_sparsity(self, plan, mode: str | None = None) -> None:
        """Switches the R-Sparse plan (None: dense) and/or the mode without reloading the weights."""
        mode = mode or self.sparsity_mode
        self._check_sparsity_mode(mode)
        self.sparsity_plan, self.sparsity_mode = plan, mode
        for i, ly in enumerate(self.layers):
            if ly is not None:
                self._attach_sparsity(i, ly)
                mx.eval(_arrays_of(ly))
        # The compiled step captured the old plan's arrays as constants: trace it again.
        self._decode = mx.compile(self._decode_step)

    def _all_arrays(self) -> list[mx.array]:
        out = self.embed.arrays() + ([] if self.lm_head is self.embed else self.lm_head.arrays()) + [self.norm]
        for ly in self.layers:
            if ly is not None:
                out += _arrays_of(ly)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the resident weights."""
        return sum(a.nbytes for a in self._all_arrays()) + (self.expert_cache.resident_bytes if self.expert_cache else 0)

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

    def _block(self, ly: Layer, x: mx.array, pos, kc: mx.array, vc: mx.array, attend, moe_ctrl=None, moe_stats=None):
        """One decoder layer; ``attend(q, k, v, kc, vc) -> (o, kc, vc)`` writes the cache and attends.
        ``moe_ctrl``: an MoE layer's expert budget as an array (see edgeinfer/moe.py), None for none;
        ``moe_stats``: a list that gets an MoE layer's [requested, kept, mass kept]."""
        s = self.spec
        L = x.shape[1]
        h = mx.fast.rms_norm(x, ly.attn_norm, s.rms_norm_eps)
        q, k = ly.q(h), ly.k(h)
        if s.qk_norm_full:  # OLMoE normalizes the whole projection
            q = mx.fast.rms_norm(q, ly.q_norm, s.rms_norm_eps)
            k = mx.fast.rms_norm(k, ly.k_norm, s.rms_norm_eps)
        q = q.reshape(1, L, s.num_heads, s.head_dim)
        k = k.reshape(1, L, s.num_kv_heads, s.head_dim)
        v = ly.v(h).reshape(1, L, s.num_kv_heads, s.head_dim)
        if ly.q_norm is not None and not s.qk_norm_full:
            q = mx.fast.rms_norm(q, ly.q_norm, s.rms_norm_eps)
            k = mx.fast.rms_norm(k, ly.k_norm, s.rms_norm_eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = (_rope(t, s.head_dim, ly, pos) for t in (q, k))
        if self._mscale != 1.0:
            q, k = q * self._mscale, k * self._mscale
        o, kc, vc = attend(q, k.astype(self.kv_dtype), v.astype(self.kv_dtype), kc, vc)
        o = ly.o(o.transpose(0, 2, 1, 3).reshape(1, L, s.num_heads * s.head_dim))
        if ly.post_attn_norm is not None:
            o = mx.fast.rms_norm(o, ly.post_attn_norm, s.rms_norm_eps)
        x = x + o
        h = mx.fast.rms_norm(x, ly.mlp_norm, s.rms_norm_eps)
        if ly.moe is not None:
            ctrl = moe_ctrl if moe_ctrl is not None else mx.array(no_budget(s), dtype=mx.float32)
            m, st = ly.moe.compiled(self.moe_top_k)(h, ctrl)
            if moe_stats is not None:
                moe_stats.append(st)
        else:
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

    def _chunk_attend(self, off: int, L: int, w: dict, tree=None):
        """Attention for a chunk of L tokens at position ``off`` against one group's cache (see
        ``KVCache.plan_write``); ``tree``: (positions, visible) as ``forward`` takes them."""
        qpos = mx.arange(off, off + L, dtype=mx.int32)[:, None]
        win = w["window"]

        def mask_for(kp):
            if tree is not None:
                return mx.array(_tree_mask(np.asarray(kp), off + L, tree[0], tree[1], win))
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

    def forward(self, tokens, cache: KVCache, lazy: bool = False, last_only: bool = False,
                positions=None, visible=None, expert_budget=None) -> mx.array:
        """Runs ``tokens`` (a list of ids or a [1, L] array) after the cached context and returns the
        logits [1, L, vocab] ([1, 1, vocab] with ``last_only``). Advances the cache. One token takes the
        compiled path when every layer is resident.

        Tree attention (speculative decoding): ``positions`` [L] are the tokens' positions (siblings
        share one), ``visible`` [L, K] bool says which of the last K cached positions after this write
        (the speculated tokens, in the order written) each token sees; older positions are context.

        ``expert_budget``: an ``edgeinfer.moe.ExpertBudget`` capping the distinct experts of this forward per
        MoE layer (verification of a draft); statistics land in ``moe_stats``."""
        ctrl = None if expert_budget is None else mx.array(expert_budget.controls(self.spec, self.moe_top_k), dtype=mx.float32)
        stats = [] if self.spec.num_experts else None
        if not isinstance(tokens, mx.array):
            tokens = mx.array(np.asarray(tokens, dtype=np.int32).reshape(1, -1))
        L = tokens.shape[1]
        cache.reserve(L)
        writes = cache.plan_write(L)
        off = cache.offset
        tree = None if positions is None else (np.asarray(positions, np.int64), np.asarray(visible, bool))
        if L == 1 and self.streamer is None and tree is None and self.expert_cache is None:
            kpos = [mx.array(w["after"].astype(np.int32)) if w else mx.zeros((1,), mx.int32) for w in writes]
            windows = mx.array([w["window"] if w and w["window"] else 1 << 30 for w in writes], dtype=mx.int32)
            logits, cache.keys, cache.values = self._decode(
                tokens, mx.array(off, dtype=mx.int32), cache.keys, cache.values, kpos, windows
            )
        else:
            attends = [self._chunk_attend(off, L, w, tree) if w else None for w in writes]
            pos = off if tree is None else mx.array(tree[0].astype(np.int32))
            x = self._embed(tokens)
            keys, values = list(cache.keys), list(cache.values)
            for i in range(self.spec.num_layers):
                ly = self.layers[i]
                streamed = ly is None
                if streamed:
                    ly = self.streamer.layer(i, self)
                x, keys[i], values[i] = self._block(ly, x, pos, keys[i], values[i], attends[cache.group_of[i]],
                                                    moe_ctrl=ctrl, moe_stats=stats)
                if streamed:  # bounded memory: one streamed layer's weights at a time
                    mx.eval(x, keys[i], values[i])
                    del ly
            if last_only:
                x = x[:, -1:, :]
            logits = self._head(x)
            cache.keys, cache.values = keys, values
        cache.commit(L, writes)
        self._moe_stats = stats or []
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
        if isinstance(v, (Linear, MoEBlock)):
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


def _tree_mask(kp: np.ndarray, end: int, positions: np.ndarray, visible: np.ndarray, win: int | None) -> np.ndarray:
    """[L, keys] attention mask of a chunk whose queries sit at ``positions``: the last ``visible.shape[1]``
    positions before ``end`` (the speculated tokens, written in chunk order) are seen where ``visible``
    says; older keys as usual, the window counted from the query's own position."""
    base = end - visible.shape[1]
    q = np.asarray(positions)[:, None]
    old = (kp >= 0) & (kp < base)
    m = old[None, :] & ((kp[None, :] > q - win) if win is not None else True)
    spec = (kp >= base) & (kp < end)
    cols = np.clip(kp - base, 0, visible.shape[1] - 1)
    return m | (spec[None, :] & visible[:, cols])


def _rope(x: mx.array, dims: int, ly: Layer, pos) -> mx.array:
    """mx.fast.rope from position ``pos`` on; ``pos`` may also be a vector with one position per token
    (tree verification, where siblings share a position): mx.fast.rope takes one offset per batch
    entry, so the tokens go on the batch axis for the call."""
    if isinstance(pos, mx.array) and pos.ndim == 1:
        x = x.transpose(2, 1, 0, 3)
        return mx.fast.rope(x, dims, traditional=False, base=ly.rope_base, scale=ly.rope_scale, offset=pos,
                            freqs=ly.rope_freqs).transpose(2, 1, 0, 3)
    return mx.fast.rope(x, dims, traditional=False, base=ly.rope_base, scale=ly.rope_scale, offset=pos, freqs=ly.rope_freqs)


def _softcapped_attention(q, k, v, scale, mask, cap, groups):
    if groups > 1:
        k = mx.repeat(k, groups, axis=1)
        v = mx.repeat(v, groups, axis=1)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)
    scores = mx.tanh(scores / cap) * cap
    scores = mx.where(mask, scores, mx.array(-1e30, scores.dtype))
    return mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype) @ v
