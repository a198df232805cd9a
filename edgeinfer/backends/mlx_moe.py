"""The MLX backend's Mixture-of-Experts block: routing (with an expert budget as data), then the experts'
matmuls gathered per token (``mx.gather_qmm`` on quantized experts, the Metal path; ``mx.gather_mm`` on
dequantized ones, which the memory planner picks on MLX's CPU backend as it does for dense layers).

The budget arrives as an array ``ctrl = [experts kept, mass share, truncate]`` and everything derived from
it is computed inside the (compiled) function, so a compiled graph never bakes in one budget's mask.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import EdgeInferError


class MoEBlock:
    """One layer's router, stacked experts [E, out, in] and optional shared expert (Qwen2-MoE)."""

    def __init__(self, w: dict, prefix: str, spec, qparams, dequantize: bool, dtype, make_linear, cache=None, layer=None):
        p = f"{prefix}.moe"
        # ``cache``: an ExpertCache (edgeinfer/backends/expert_cache.py) that holds this layer's experts in
        # slots read on demand; then the stacked experts in ``w`` are never read (they stay on disk).
        self.cache, self.layer = cache, layer
        self.spec = spec
        self.dtype = dtype
        router = w.get(f"{p}.router.weight")
        if router is None:
            raise EdgeInferError(f"the package's weights lack the tensor {p}.router.weight")
        self.router = router.astype(mx.float32)  # routing in float32, as transformers does
        self.experts = {}
        for proj in ("gate_proj", "up_proj", "down_proj") if cache is None else ():
            name = f"{p}.experts.{proj}"
            wt = w.get(f"{name}.weight")
            if wt is None:
                raise EdgeInferError(f"the package's weights lack the tensor {name}.weight")
            if f"{name}.scales" in w:
                s, b = w[f"{name}.scales"], w[f"{name}.biases"]
                bits, group = qparams(name)
                if dequantize:
                    wt = mx.dequantize(wt, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits)
                    self.experts[proj] = (wt.astype(dtype).swapaxes(-1, -2), None)
                else:
                    sdt = s.dtype if dtype == mx.bfloat16 else dtype
                    self.experts[proj] = (wt, (s.astype(sdt), b.astype(sdt), group, bits))
            else:
                self.experts[proj] = (wt.astype(dtype).swapaxes(-1, -2), None)
        self._compiled: dict = {}
        self.shared = None
        if f"{p}.shared.gate_proj.weight" in w:
            self.shared = tuple(make_linear(w, f"{p}.shared.{n}") for n in ("gate_proj", "up_proj", "down_proj"))
            self.shared_gate = w[f"{p}.shared_gate.weight"].astype(dtype)

    def compiled(self, k: int):
        """The block for top-k ``k``, compiled once per k: the budget is an input, never a constant."""
        fn = self._compiled.get(k)
        if self.cache is not None:  # reading experts waits for the routing: not one compiled graph
            return lambda h, ctrl: self(h, ctrl, k)
        if fn is None:
            fn = self._compiled[k] = mx.compile(lambda h, ctrl: self(h, ctrl, k))
        return fn

    def arrays(self) -> list[mx.array]:
        out = [self.router]
        for wt, q in self.experts.values():
            out += [wt] + (list(q[:2]) if q else [])
        if self.shared:
            for lin in self.shared:
                out += lin.arrays()
            out.append(self.shared_gate)
        return out

    def _gather(self, x: mx.array, proj: str, idx: mx.array, experts=None) -> mx.array:
        wt, q = (experts or self.experts)[proj]
        if q is None:
            return mx.gather_mm(x, wt, rhs_indices=idx)
        s, b, g, bits = q
        return mx.gather_qmm(x, wt, s, b, rhs_indices=idx, transpose=True, group_size=g, bits=bits).astype(x.dtype)

    def _experts(self, x: mx.array, idx: mx.array, experts: dict | None = None) -> mx.array:
        """x [T, H], idx [T, k] -> each token's k expert outputs [T, k, H]: one row per token, broadcast
        against its k experts. (Sorting the (token, expert) pairs by expert, so that each expert's rows are
        contiguous, measured no better on MLX's CPU backend for 128-512 pairs.)"""
        xe = x[:, None, None, :]  # [T, 1, 1, H]
        g = self._gather(xe, "gate_proj", idx, experts)
        y = self._gather(g * mx.sigmoid(g) * self._gather(xe, "up_proj", idx, experts), "down_proj", idx, experts)  # [T, k, 1, H]
        return y.squeeze(-2)

    def route(self, x: mx.array, ctrl: mx.array, k: int):
        """x [T, H] -> expert ids [T, k], weights [T, k] (float32) and stats [requested, kept, mass kept]."""
        probs = mx.softmax(x.astype(mx.float32) @ self.router.T, axis=-1)  # [T, E]
        E = probs.shape[-1]
        mass = probs.sum(axis=0)
        order = mx.argsort(-mass)
        sorted_mass = mass[order]
        before = mx.cumsum(sorted_mass) - sorted_mass  # mass of the experts ranked above each
        by_mass = mx.maximum((before < ctrl[1] * mass.sum()).sum(), k)
        keep_n = mx.where(ctrl[1] > 0, by_mass, ctrl[0].astype(mx.int32))
        kept = mx.argsort(order) < keep_n  # [E]: rank below the budget
        # substitute: the top k among kept experts, original probabilities
        sel = mx.where(kept[None, :], probs, -1.0)
        idx_s = mx.argpartition(-sel, k - 1, axis=-1)[:, :k]
        w_s = mx.take_along_axis(probs, idx_s, axis=-1)
        # truncate: the original top k, dropped experts weighted 0 and pointed at a kept one, so that a
        # dropped expert's weights are never read
        idx0 = mx.argpartition(-probs, k - 1, axis=-1)[:, :k]
        w0 = mx.take_along_axis(probs, idx0, axis=-1)
        survive = kept[idx0]
        idx_t = mx.where(survive, idx0, order[0])
        w_t = mx.where(survive, w0, 0.0)
        trunc = ctrl[2] > 0
        idx = mx.where(trunc, idx_t, idx_s)
        w = mx.where(trunc, w_t, w_s)
        experts = mx.arange(E)
        requested = (idx0[..., None] == experts).any(axis=(0, 1)).sum()
        used = ((idx[..., None] == experts) & (w[..., None] > 0)).any(axis=(0, 1)).sum()
        stats = mx.stack([requested.astype(mx.float32), used.astype(mx.float32), w.sum() / w0.sum()])
        if self.spec.norm_topk_prob:
            w = w / mx.maximum(w.sum(axis=-1, keepdims=True), 1e-20)
        return idx, w, stats

    def __call__(self, h: mx.array, ctrl: mx.array, k: int):
        """h [1, L, H] -> (MoE output [1, L, H], stats)."""
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        idx, w, stats = self.route(x, ctrl, k)
        ys = self._experts(x, idx) if self.cache is None else self.cache.run(self, self.layer, x, idx)
        y = (ys * w[..., None].astype(x.dtype)).sum(axis=1)
        if self.shared:
            gate, up, down = self.shared
            a = gate(x)
            sh = down(a * mx.sigmoid(a) * up(x))
            y = y + mx.sigmoid(x @ self.shared_gate.T) * sh
        return y.reshape(shape), stats
