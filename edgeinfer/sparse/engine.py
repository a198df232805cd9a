"""The sparse decode engine: the ONNX backend's decode steps under a sparsity plan, on the CPU.

Prefill stays the ORT graph (dense); one-token steps run ``kernels.decode_step`` on the SAME numpy KV
buffers the graph reads and writes, so prefill, decode and chat-turn reuse see one cache. The weights come
from the package's fast layout (``layout.py``), the norms and the embedding rows from ``model.safetensors``
(memory-mapped), the thresholds and low-rank factors from the plan (``plan.py``).
"""

from __future__ import annotations

import numpy as np

from ..decode_tables import DecodeTables, check_arch as _check_arch
from ..errors import EdgeInferError
from ..package import Package
from ..safetensors_map import map_safetensors
from . import kernels as K
from .layout import load_fast_layout, module_names


def check_arch(spec) -> None:
    _check_arch(spec, "the sparse decode path")


def keep_every_channel(spec):
    """A plan whose thresholds lie below every score (scores are >= 0): the engine's dense decode, used to
    check it against the graph and to measure it at sparsity 0."""
    from .plan import ModulePlan, SparsePlan, projection_shapes

    plan = SparsePlan(level=0.0, info={"method": "keep every channel"})
    for i in range(spec.num_layers):
        for p, (m, n) in projection_shapes(spec).items():
            plan.modules[f"layers.{i}.{p}"] = ModulePlan(f"layers.{i}.{p}", m, n, 0.0, 1.0, n, 0, -1.0)
    return plan


class SparseEngine:
    def __init__(self, pkg: Package, plan=None, threads: int | None = None):
        check_arch(pkg.spec)
        self.spec = s = pkg.spec
        lay = load_fast_layout(pkg)
        self.meta = np.ascontiguousarray(lay["meta"])
        self.wq = lay["wq"]
        self.s16, self.z16 = lay["s16"].view(np.uint16), lay["z16"].view(np.uint16)
        self.s32, self.z32 = lay["s32"], lay["z32"]
        self.lbias = lay["lbias"]
        self.nmod = len(module_names(pkg))
        self.head = self.nmod - 1
        w = map_safetensors(pkg.weights_path)
        L, H = s.num_layers, s.hidden_size
        t = self.tables = DecodeTables(pkg, w)
        self.norms, self.qk_norms, self.inv_freq, self.mscale, self.windows = t.norms, t.qk_norms, t.inv_freq, t.mscale, t.windows
        self.embed = t.embed
        self.cfg = np.array([L, s.num_heads, s.num_kv_heads, s.head_dim, H, s.intermediate_size, int(s.qk_norm),
                             int(s.sandwich_norm), int(s.mlp_act == "gelu_tanh"), self.head, 1], np.int64)
        self.fcfg = np.array([s.rms_norm_eps, s.attn_scale, s.attn_logit_softcap or 0.0, s.final_logit_softcap or 0.0],
                             np.float64)
        self.threads = threads
        self.counts = np.zeros(2, np.int64)  # active, total input channels of the seven projections
        self._alloc_scratch(1)
        self.set_plan(plan)

    # -- plan ------------------------------------------------------------------------------------------
    def set_plan(self, plan) -> None:
        """Thresholds, column norms and low-rank factors as flat arrays; ``None`` keeps every channel."""
        s = self.spec
        thr = np.full(self.nmod, -1.0, np.float32)  # scores are >= 0, so -1 keeps every channel
        pmeta = np.full((self.nmod, K.PMETA_COLS), -1, np.int64)
        pmeta[:, K.P_RANK] = 0
        cvals, a16, b16 = [np.zeros(1, np.float32)], [np.zeros(1, np.uint16)], [np.zeros(1, np.uint16)]
        nc = na = nb = 1
        rmax = 1
        if plan is not None:
            for i in range(s.num_layers):
                for pi, p in enumerate(K.PROJECTIONS):
                    mp = plan.module(i, p)
                    mi = i * 7 + pi
                    m, n = int(self.meta[mi, K.M_OUT]), int(self.meta[mi, K.N_IN])
                    if (mp.m, mp.n) != (m, n):
                        raise EdgeInferError(f"the sparsity plan's {mp.name} is {mp.m}x{mp.n}, the package's {m}x{n}")
                    thr[mi] = mp.t
                    if mp.c is not None:
                        pmeta[mi, K.P_OFF_C] = nc
                        cvals.append(np.asarray(mp.c, np.float32))
                        nc += n
                    r = 0 if mp.a is None else int(mp.a.shape[0])
                    pmeta[mi, K.P_RANK] = r
                    if r:
                        # A^T [n, r]: the rows of the inactive channels; B^T [r, m]: AXPYs over outputs
                        pmeta[mi, K.P_OFF_A] = na
                        a16.append(np.ascontiguousarray(np.asarray(mp.a, np.float16).T).view(np.uint16).reshape(-1))
                        na += n * r
                        pmeta[mi, K.P_OFF_B] = nb
                        b16.append(np.ascontiguousarray(np.asarray(mp.b, np.float16).T).view(np.uint16).reshape(-1))
                        nb += r * m
                        rmax = max(rmax, r)
        self.thr, self.pmeta = thr, pmeta
        self.cvals, self.a16, self.b16 = np.concatenate(cvals), np.concatenate(a16), np.concatenate(b16)
        self.rmax = rmax
        self._alloc_scratch(self.probs.size if hasattr(self, "probs") else 1)

    def _alloc_scratch(self, positions: int) -> None:
        s, meta = self.spec, self.meta
        H, I, D = s.hidden_size, s.intermediate_size, s.head_dim
        f = lambda n: np.zeros(n, np.float32)  # noqa: E731
        nmax = int(meta[:, K.N_IN].max())
        gmax = int((meta[:, K.N_IN] // meta[:, K.GROUP]).max())
        span = np.where(meta[:, K.BITS] == 4, meta[:, K.M_OUT] // 2, meta[:, K.M_OUT])
        splits = np.minimum(self._threads(), meta[:, K.N_IN] // meta[:, K.GROUP])
        tiles = np.where(span <= K.WHOLE_ROW, splits, -(-span // np.where(meta[:, K.BITS] == 4, K.TILE, K.TILE8)))
        per_layer = tiles[: s.num_layers * 7].reshape(s.num_layers, 7)
        items = int(max(per_layer[:, :3].sum(1).max(), per_layer[:, 4:6].sum(1).max(), tiles.max()))
        split_m = int(np.where(span <= K.WHOLE_ROW, meta[:, K.M_OUT], 0).max())
        self.cfg[10] = self._threads()
        self.probs = f(max(positions, 1))
        self.scratch = (f(H), f(s.num_heads * D), f(s.num_kv_heads * D), f(s.num_kv_heads * D), f(s.num_heads * D), f(H),
                        f(I), f(I), f(H), self.probs, f(D // 2), f(D // 2),
                        np.zeros((3, nmax), np.int64), np.zeros((3, gmax + 1), np.int64), np.zeros((3, gmax), np.float32),
                        np.zeros((3, getattr(self, "rmax", 1)), np.float32),
                        np.zeros((items, max(2 * K.TILE, K.TILE8, 2 * K.WHOLE_ROW)), np.float32),
                        np.zeros((items, 6), np.int64), np.zeros((items, split_m), np.float32))
        self._h = f(H)

    # -- one token -----------------------------------------------------------------------------------
    def _threads(self) -> int:
        import numba

        return min(self.threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)

    def step(self, token: int, pos: int, kcache: np.ndarray, vcache: np.ndarray) -> np.ndarray:
        """Logits [vocab] of ``token`` at ``pos``; writes its keys/values at ``pos`` of the caches
        [layers, 1, kv_heads, capacity, head_dim]."""
        if kcache.shape[3] > self.probs.size:
            self._alloc_scratch(kcache.shape[3])
        import numba

        numba.set_num_threads(self._threads())
        logits = np.empty(self.spec.vocab_size, np.float32)
        K.decode_step(self.embed(token), pos, self.meta, self.thr, self.pmeta, self.wq, self.s16, self.z16, self.s32,
                      self.z32, self.cvals, self.a16, self.b16, self.lbias, self.norms, self.qk_norms, self.inv_freq,
                      self.mscale, self.windows, kcache, vcache, self.cfg, self.fcfg, logits, self.counts, self.scratch)
        return logits

    @property
    def realized_sparsity(self) -> float:
        """Share of the seven projections' input channels skipped since the counters were last reset."""
        return 1.0 - self.counts[0] / self.counts[1] if self.counts[1] else 0.0

    def bytes_per_token(self) -> float:
        """Weight bytes one decode step reads at the realized sparsity: the active rows, the scales, the
        low-rank factors and the dense head."""
        meta = self.meta
        rows = meta[:, K.N_IN] * np.where(meta[:, K.BITS] == 4, meta[:, K.M_OUT] // 2, meta[:, K.M_OUT])  # not the stride
        sc = (meta[:, K.N_IN] // meta[:, K.GROUP]) * meta[:, K.M_OUT] * np.where(meta[:, K.S32] == 1, 8, 4)
        keep = 1.0 - self.realized_sparsity
        lin = rows[: self.head].sum() * keep + sc[: self.head].sum()
        r = self.pmeta[: self.head, K.P_RANK]
        low = (r * (meta[: self.head, K.N_IN] * (1 - keep) + meta[: self.head, K.M_OUT]) * 2).sum()
        return float(lin + low + rows[self.head] + sc[self.head])
