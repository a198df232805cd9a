"""The fast CPU decode step for R-Sparse: one numba call runs a whole token through every layer.

Why this shape:

- Skipping input channel j only saves memory traffic if column j of W is contiguous, so the linears are
  stored input-major (``edgeinfer.sparse.layout``): row j holds the package's m quantized values of column j
  (4-bit: low nibbles are outputs 0..m/2-1, high nibbles m/2..m-1, so unpacking stores contiguously and
  vectorizes), and the scales/biases of input group G sit in ``[G, m]`` arrays. Then, exactly as the package
  defines w = scale * q + bias,

      y = sum_G scale_G * (sum_{j in G active} x_j q_j) + bias_G * (sum_{j in G active} x_j)

  reads only the active rows, and its inner loop is an AXPY over m contiguous outputs.
- One call per token, not one per linear: SmolLM2 has 210 linears a token and a Python call costs more
  than a small linear. Norms, rope, attention over the ORT KV buffers, the MLP and the head are in here.
- Threads: an empty ``prange`` region costs about 3 us here (2 cores, OpenMP layer), about 0.4 ms a token
  for SmolLM2's 120 regions, so each group of linears sharing an input (q|k|v, gate|up, o, down, the head)
  is one region over work items; TBB schedules them (``_prefer_tbb``).
- numba has no float16 on the CPU and promotes uint8 arithmetic to int64 (8 lanes instead of 16); the
  small LLVM intrinsics below convert half floats (vcvtph2ps) and nibbles (byte ops, vcvtdq2ps) directly.

What skipping saves here (2-core AMD EPYC VM, one thread, SmolLM2's 210 projections in one call, weights
not in cache): 9.0 ms a token with every channel, 8.5-8.8 ms with a random half skipped, 7.0 ms skipping
every other row, 5.9 ms skipping whole groups of 32 rows. A SmolLM2 row is 96-768 bytes, and the
hardware prefetchers (adjacent lines, streams) fetch much of a skipped row anyway; a software prefetch of
the next active rows (below) gains about 0.3-0.5 ms. With weights in cache the same half saves 40%.

Layout v2 stores the rows of q|k|v and of gate|up side by side (one run of 480 and 1536 bytes per input
channel for SmolLM2; ``ROW_BYTES`` is the stride); the kernel is unchanged, each module still has its own
pass, but a kept channel is one contiguous read and a skipped one a longer hole. Measured in one process,
the two layouts alternating token by token, one thread, CPU time per token (p25 of 120 steps; load
average 4.6 on the 2 cores): dense 12.7 vs 13.1 ms (noise), 30% 13.6 -> 13.3, 50% 12.3 -> 11.8 (-4%),
70% 10.1 -> 9.7 (-4%); a second run gave -7% at 50% and 70%.

Tried and dropped (same method): cutting each projection of a shared input into chunks of 2, 4 or 8 input
groups and alternating q, k, v chunk by chunk (no gain, 2 groups 3% slower); visiting a group's active rows
in a scrambled order (stride 13) so that the stream prefetchers stop running into skipped rows (no gain,
4% slower at 0 and 70%); the head output-major (rows of the package's own layout streamed once, a dot
product per output and group): 4.5-6 ms against 3.0-3.4 ms for the input-major head, float reductions per
output cost more than the bytes saved.

Where the time goes (1 thread, CPU time per token, p25 of 256 steps, load average 4.6): SmolLM2's
head is 30.4 MiB of the 93.7 MiB a dense step reads (8-bit tied embedding, never sparse) and takes about
3 ms; the layers' scales are 12.7 MiB, read whenever any row of a group is kept. So at 50% the step still
reads 68.3 MiB: even a step that ran at the bandwidth roof would be only 1.37x the engine's own dense
step, and the engine's dense step is about 5% slower than ORT's int8 MatMulNBits graph (12.4 vs 11.7 ms).
Measured: ORT dense 11.7 ms, engine 0% 12.4, 30% 12.8, 50% 11.4 (1.03x ORT), 70% 9.0 (1.30x ORT).
Two threads on this shared 2-core VM measure the other jobs (TBB's calling thread ends up doing the work
items itself; ORT's spinning pool doubles its time), so they are left to an idle machine:

    python benchmarks/sparse_speed.py -n 64 -r 3 --threads 1   # and --threads 2

That benchmark on the busy VM (load 3.6-3.7; levels 0.3/0.5/0.7, magnitude plans, realized 0.26/0.54/0.75),
CPU ms per token with one thread: ORT dense 12.4, engine 14.1 / 14.2 / 12.8 / 10.2 (0.97x ORT at 50%,
1.21x at 70%); wall tok/s 58.8, 46.2 / 47.7 / 54.0 / 70.2, llama.cpp 44.8. With two threads ORT dense fell
to 30.6 tok/s and llama.cpp to 10.5 (their spinning pools on shared cores) while the engine gave 35.5 / 42.7
/ 54.1 / 70.9: "1.77x at 50%" there is the baseline collapsing, not the engine scaling.
"""

from __future__ import annotations

import glob
import os
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..decode_tables import PROJECTIONS  # noqa: F401  (the modules' order in ``meta``)


def _prefer_tbb() -> None:
    """TBB's scheduler, not OpenMP's, for the parallel regions: with TBB the calling thread takes the
    work items a busy worker has not started, while an OpenMP region waits at its barrier for a thread
    the OS has descheduled. Measured here with the two cores shared with other jobs (SmolLM2 at 50%):
    OpenMP median 203 ms a token (worst 2.9 s), TBB 39 ms. The ``tbb`` wheel puts libtbb in the
    environment's lib/, outside the loader's path, so it is loaded first. NUMBA_THREADING_LAYER wins."""
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return
    import ctypes
    import importlib

    for d in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for f in sorted(glob.glob(os.path.join(d, "lib", "libtbb.so.12*")) + glob.glob(os.path.join(d, "lib", "libtbb.12*.dylib"))):
            try:
                ctypes.CDLL(f, mode=ctypes.RTLD_GLOBAL)
                importlib.import_module("numba.np.ufunc.tbbpool")  # raises when numba cannot use this TBB
            except (OSError, ImportError):
                continue
            numba.config.THREADING_LAYER = "tbb"
            return


_prefer_tbb()


# columns of the per-module table ``meta`` (int64): where the module's bytes are and how to read them
OFF_Q, N_IN, M_OUT, BITS, GROUP, OFF_S, S32, ROW_BYTES, OFF_BIAS = range(9)
META_COLS = 9
# columns of the per-module plan table ``pmeta`` (int64)
P_OFF_C, P_RANK, P_OFF_A, P_OFF_B = range(4)
PMETA_COLS = 4

TILE = 512  # outputs per work item (4-bit: half-rows, so 1024 outputs): 2 x 2 KiB accumulators in L1
# 8-bit rows (the head): a 4 KiB page per row and work item; 512-byte pieces of rows 49 KiB apart were
# about 2x slower on SmolLM2's head (TLB misses, prefetchers stopping at each piece)
TILE8 = 4096
WHOLE_ROW = 2048  # spans up to this many (half-)positions are read as whole rows


@intrinsic
def _f16(typingctx, v):
    """uint16 holding IEEE half bits -> float32 (exact, subnormals included)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def _nibble(high: bool):
    @intrinsic
    def nib(typingctx, b):
        sig = types.float32(types.uint8)

        def codegen(context, builder, signature, args):
            v = args[0]
            if high:
                v = builder.lshr(v, ir.Constant(ir.IntType(8), 4))
            else:
                v = builder.and_(v, ir.Constant(ir.IntType(8), 15))
            return builder.uitofp(v, ir.FloatType())

        return sig, codegen

    return nib


_lo4 = _nibble(False)
_hi4 = _nibble(True)


@intrinsic
def _u8f(typingctx, b):
    sig = types.float32(types.uint8)

    def codegen(context, builder, signature, args):
        return builder.uitofp(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hints the cache line of ``arr[idx]`` into L1 (llvm.prefetch, read, high locality)."""
    sig = types.void(arr, types.int64)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        mod = builder.module
        try:
            fn = mod.get_global("llvm.prefetch.p0")
        except KeyError:
            i32 = ir.IntType(32)
            fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name="llvm.prefetch.p0")
        i32 = ir.IntType(32)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(fastmath=True, cache=True)
def _prepare(x, mi, thr, meta, pmeta, cvals, a16, idx, starts, sxs, z):
    """Selects the active channels of module ``mi`` for input ``x``: their indices per input group
    (``idx``, ``starts``), the per-group sums of the active x (``sxs``), and the low-rank input
    z = A x_notS (``z``, through A^T's rows of the inactive channels). Returns the active count."""
    n = meta[mi, N_IN]
    g = meta[mi, GROUP]
    t = thr[mi]
    offc = pmeta[mi, P_OFF_C]
    r = pmeta[mi, P_RANK]
    offa = pmeta[mi, P_OFF_A]
    for k in range(r):
        z[k] = 0.0
    cnt = 0
    for G in range(n // g):
        starts[G] = cnt
        s = np.float32(0.0)
        for j in range(G * g, (G + 1) * g):
            xj = x[j]
            score = abs(xj) if offc < 0 else abs(xj) * cvals[offc + j]
            if score > t:
                idx[cnt] = j
                cnt += 1
                s += xj
            elif r > 0:
                base = offa + j * r
                for k in range(r):
                    z[k] += xj * _f16(a16[base + k])
        sxs[G] = s
    starts[n // g] = cnt
    return cnt


@njit(fastmath=True, cache=True)
def _tile(x, mi, lo, hi, g0, g1, meta, pmeta, wq, s16, z16, s32, z32, b16, lbias, idx, starts, sxs, z, out, acc):
    """Outputs [lo, hi) of module ``mi`` (4-bit: half-row positions, each giving outputs i and i + m/2)
    over input groups [g0, g1); the low-rank term and the bias come with the part that has group 0.
    Inner loops index slices from 0: numba wraps negative indices, and an index it cannot prove
    non-negative (base + i) turns every load into a scalar insert instead of a vector load."""
    m = meta[mi, M_OUT]
    bits = meta[mi, BITS]
    rb = meta[mi, ROW_BYTES]
    offq = meta[mi, OFF_Q] + lo
    offs = meta[mi, OFF_S]
    f32s = meta[mi, S32] != 0
    w = hi - lo
    half = m // 2
    parts = 2 if bits == 4 else 1  # 4-bit: outputs lo..hi and half+lo..half+hi
    for p in range(parts):
        o = out[lo + p * half: hi + p * half]
        for i in range(w):
            o[i] = 0.0
    a_lo = acc[:w]
    a_hi = acc[w: 2 * w]
    last = starts[g1]
    for G in range(g0, g1):
        a0 = starts[G]
        a1 = starts[G + 1]
        if a0 == a1:
            continue
        for i in range(parts * w):
            acc[i] = 0.0
        t = a0
        while t + 3 < a1:
            # the next four active rows (this group's or the next one's): skipped rows break the
            # hardware prefetchers' streams, and each row piece is only a few cache lines
            for u in range(t + 4, min(t + 8, last)):
                pr = offq + idx[u] * rb
                for c in range(0, w, 64):
                    _prefetch(wq, pr + c)
            j0 = idx[t]
            j1 = idx[t + 1]
            j2 = idx[t + 2]
            j3 = idx[t + 3]
            x0 = x[j0]
            x1 = x[j1]
            x2 = x[j2]
            x3 = x[j3]
            q0 = wq[offq + j0 * rb: offq + j0 * rb + w]
            q1 = wq[offq + j1 * rb: offq + j1 * rb + w]
            q2 = wq[offq + j2 * rb: offq + j2 * rb + w]
            q3 = wq[offq + j3 * rb: offq + j3 * rb + w]
            if bits == 4:
                for i in range(w):
                    c0 = q0[i]
                    c1 = q1[i]
                    c2 = q2[i]
                    c3 = q3[i]
                    a_lo[i] += x0 * _lo4(c0) + x1 * _lo4(c1) + x2 * _lo4(c2) + x3 * _lo4(c3)
                    a_hi[i] += x0 * _hi4(c0) + x1 * _hi4(c1) + x2 * _hi4(c2) + x3 * _hi4(c3)
            else:
                for i in range(w):
                    a_lo[i] += x0 * _u8f(q0[i]) + x1 * _u8f(q1[i]) + x2 * _u8f(q2[i]) + x3 * _u8f(q3[i])
            t += 4
        while t < a1:
            j0 = idx[t]
            x0 = x[j0]
            q0 = wq[offq + j0 * rb: offq + j0 * rb + w]
            if bits == 4:
                for i in range(w):
                    c0 = q0[i]
                    a_lo[i] += x0 * _lo4(c0)
                    a_hi[i] += x0 * _hi4(c0)
            else:
                for i in range(w):
                    a_lo[i] += x0 * _u8f(q0[i])
            t += 1
        sx = sxs[G]
        for p in range(parts):
            base = lo + p * half
            o = out[base: base + w]
            a = acc[p * w: (p + 1) * w]
            srow = offs + G * m + base
            if f32s:
                sc = s32[srow: srow + w]
                bi = z32[srow: srow + w]
                for i in range(w):
                    o[i] += sc[i] * a[i] + bi[i] * sx
            else:
                sc16 = s16[srow: srow + w]
                bi16 = z16[srow: srow + w]
                for i in range(w):
                    o[i] += _f16(sc16[i]) * a[i] + _f16(bi16[i]) * sx
    if g0 > 0:
        return
    r = pmeta[mi, P_RANK]
    offb = pmeta[mi, P_OFF_B]
    ob = meta[mi, OFF_BIAS]
    for p in range(parts):
        base = lo + p * half
        o = out[base: base + w]
        for k in range(r):
            zk = z[k]
            bk = b16[offb + k * m + base: offb + k * m + base + w]
            for i in range(w):
                o[i] += zk * _f16(bk[i])
        if ob >= 0:
            lb = lbias[ob + base: ob + base + w]
            for i in range(w):
                o[i] += lb[i]


@njit(fastmath=True, cache=True, parallel=True)
def _linears(x, mods, outs, meta, thr, pmeta, wq, s16, z16, s32, z32, cvals, a16, b16, lbias,
             idx, starts, sxs, zs, accs, items, counts, parts, nsplit):
    """Every module in ``mods`` applied to the same input ``x``; module k writes ``outs[k]``, a view of
    the step's scratch. One parallel region over work items.

    A projection's rows are read whole (one contiguous run per active channel): its input groups are
    split over ``nsplit`` items (the threads), each summing into its own row of ``parts``, added up after
    the region. Splitting the outputs instead would read every row in pieces, and pieces of a few hundred
    bytes cost about as much memory traffic as the whole row here (the hardware prefetchers fetch ahead).
    The head's rows are long (49 KB for SmolLM2), so it is split by outputs, in page-sized pieces."""
    nitems = 0
    nparts = 0
    for k in range(mods.size):
        mi = mods[k]
        counts[0] += _prepare(x, mi, thr, meta, pmeta, cvals, a16, idx[k], starts[k], sxs[k], zs[k])
        counts[1] += meta[mi, N_IN]
        span = meta[mi, M_OUT] // 2 if meta[mi, BITS] == 4 else meta[mi, M_OUT]
        nG = meta[mi, N_IN] // meta[mi, GROUP]
        if span <= WHOLE_ROW:
            ns = min(nsplit, nG)
            for sidx in range(ns):
                items[nitems, 0] = k
                items[nitems, 1] = 0
                items[nitems, 2] = span
                items[nitems, 3] = (nG * sidx) // ns
                items[nitems, 4] = (nG * (sidx + 1)) // ns
                items[nitems, 5] = -1 if ns == 1 else nparts
                nparts += 0 if ns == 1 else 1
                nitems += 1
        else:
            tile = TILE if meta[mi, BITS] == 4 else TILE8
            for lo in range(0, span, tile):
                items[nitems, 0] = k
                items[nitems, 1] = lo
                items[nitems, 2] = min(lo + tile, span)
                items[nitems, 3] = 0
                items[nitems, 4] = nG
                items[nitems, 5] = -1
                nitems += 1
    for it in prange(nitems):
        k = items[it, 0]
        slot = items[it, 5]
        dst = outs[k] if slot < 0 else parts[slot]
        _tile(x, mods[k], items[it, 1], items[it, 2], items[it, 3], items[it, 4], meta, pmeta, wq, s16, z16,
              s32, z32, b16, lbias, idx[k], starts[k], sxs[k], zs[k], dst, accs[it])
    for it in range(nitems):
        slot = items[it, 5]
        if slot < 0:
            continue
        o = outs[items[it, 0]]
        pr = parts[slot]
        m = meta[mods[items[it, 0]], M_OUT]
        if items[it, 3] == 0:
            for i in range(m):
                o[i] = pr[i]
        else:
            for i in range(m):
                o[i] += pr[i]


@njit(fastmath=True, cache=True)
def _rmsnorm(x, w, eps, out):
    s = np.float32(0.0)
    for i in range(x.size):
        s += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(s / np.float32(x.size) + np.float32(eps))
    for i in range(x.size):
        out[i] = x[i] * inv * w[i]


@njit(fastmath=True, cache=True)
def _rope(v, cos, sin):
    half = cos.size
    for i in range(half):
        a = v[i]
        b = v[half + i]
        v[i] = a * cos[i] - b * sin[i]
        v[half + i] = b * cos[i] + a * sin[i]


@njit(fastmath=True, cache=True)
def _gelu_tanh(x):
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


@njit(fastmath=True, cache=True)
def decode_step(x, pos, meta, thr, pmeta, wq, s16, z16, s32, z32, cvals, a16, b16, lbias,
                norms, qk_norms, inv_freq, mscale, windows, kcache, vcache, cfg, fcfg, logits, counts, scratch):
    """One token (its embedding ``x``, already scaled) at position ``pos``: writes its keys/values into
    ``kcache``/``vcache`` [layers, 1, kv_heads, capacity, head_dim] and the logits into ``logits``.

    cfg (int64): layers, heads, kv_heads, head_dim, hidden, inter, qk_norm, sandwich, gelu, head module,
    threads (the input-group split of each projection).
    fcfg (float64): eps, attn scale, attn softcap (0 none), final softcap (0 none).
    norms [layers, 4, hidden]: attn, mlp, post-attn, post-mlp; qk_norms [layers, 2, head_dim].
    """
    L, nh, nkv, hd, H, I = cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], cfg[5]
    qk_norm, sandwich, gelu, head_mi = cfg[6] != 0, cfg[7] != 0, cfg[8] != 0, cfg[9]
    eps = fcfg[0]
    scale = np.float32(fcfg[1])
    cap = np.float32(fcfg[2])
    fcap = np.float32(fcfg[3])
    (h, qbuf, kbuf, vbuf, att, obuf, gbuf, ubuf, dbuf, probs, cosb, sinb,
     idx, starts, sxs, zs, accs, items, parts) = scratch
    nsplit = cfg[10]
    groups = nh // nkv
    half = hd // 2
    lcounts = np.zeros(2, np.int64)
    mods3 = np.empty(3, np.int64)
    mods2 = np.empty(2, np.int64)
    mods1 = np.empty(1, np.int64)
    for li in range(L):
        base = li * 7
        _rmsnorm(x, norms[li, 0], eps, h)
        mods3[0] = base
        mods3[1] = base + 1
        mods3[2] = base + 2
        _linears(h, mods3, (qbuf, kbuf, vbuf), meta, thr, pmeta, wq, s16, z16, s32, z32, cvals, a16, b16, lbias,
                 idx, starts, sxs, zs, accs, items, lcounts, parts, nsplit)
        if qk_norm:
            for hh in range(nh):
                seg = qbuf[hh * hd:(hh + 1) * hd]
                _rmsnorm(seg.copy(), qk_norms[li, 0], eps, seg)
            for hh in range(nkv):
                seg = kbuf[hh * hd:(hh + 1) * hd]
                _rmsnorm(seg.copy(), qk_norms[li, 1], eps, seg)
        for i in range(half):
            ang = np.float64(pos) * inv_freq[li, i]
            cosb[i] = np.float32(np.cos(ang) * mscale)
            sinb[i] = np.float32(np.sin(ang) * mscale)
        for hh in range(nh):
            _rope(qbuf[hh * hd:(hh + 1) * hd], cosb[:half], sinb[:half])
        for hh in range(nkv):
            _rope(kbuf[hh * hd:(hh + 1) * hd], cosb[:half], sinb[:half])
            for d in range(hd):
                kcache[li, 0, hh, pos, d] = kbuf[hh * hd + d]
                vcache[li, 0, hh, pos, d] = vbuf[hh * hd + d]
        start = 0
        if windows[li] > 0:
            start = max(0, pos - windows[li] + 1)
        for hh in range(nh):
            kv = hh // groups
            qv = qbuf[hh * hd:(hh + 1) * hd]
            mx = np.float32(-np.inf)
            for s in range(start, pos + 1):
                kr = kcache[li, 0, kv, s]
                acc = np.float32(0.0)
                for d in range(hd):
                    acc += qv[d] * kr[d]
                acc *= scale
                if cap > 0:
                    acc = np.tanh(acc / cap) * cap
                probs[s] = acc
                if acc > mx:
                    mx = acc
            tot = np.float32(0.0)
            for s in range(start, pos + 1):
                e = np.exp(probs[s] - mx)
                probs[s] = e
                tot += e
            o = att[hh * hd:(hh + 1) * hd]
            for d in range(hd):
                o[d] = 0.0
            for s in range(start, pos + 1):
                p = probs[s] / tot
                vr = vcache[li, 0, kv, s]
                for d in range(hd):
                    o[d] += p * vr[d]
        mods1[0] = base + 3
        _linears(att, mods1, (obuf, obuf, obuf), meta, thr, pmeta, wq, s16, z16, s32, z32, cvals, a16, b16, lbias,
                 idx, starts, sxs, zs, accs, items, lcounts, parts, nsplit)
        if sandwich:
            _rmsnorm(obuf.copy(), norms[li, 2], eps, obuf)
        for i in range(H):
            x[i] += obuf[i]
        _rmsnorm(x, norms[li, 1], eps, h)
        mods2[0] = base + 4
        mods2[1] = base + 5
        _linears(h, mods2, (gbuf, ubuf, ubuf), meta, thr, pmeta, wq, s16, z16, s32, z32, cvals, a16, b16, lbias,
                 idx, starts, sxs, zs, accs, items, lcounts, parts, nsplit)
        for i in range(I):
            gv = gbuf[i]
            if gelu:
                gv = _gelu_tanh(gv)
            else:
                gv = gv / (np.float32(1.0) + np.exp(-gv))
            gbuf[i] = gv * ubuf[i]
        mods1[0] = base + 6
        _linears(gbuf, mods1, (dbuf, dbuf, dbuf), meta, thr, pmeta, wq, s16, z16, s32, z32, cvals, a16, b16, lbias,
                 idx, starts, sxs, zs, accs, items, lcounts, parts, nsplit)
        if sandwich:
            _rmsnorm(dbuf.copy(), norms[li, 3], eps, dbuf)
        for i in range(H):
            x[i] += dbuf[i]
    counts[0] += lcounts[0]
    counts[1] += lcounts[1]
    _rmsnorm(x, norms[L, 0], eps, h)
    mods1[0] = head_mi
    _linears(h, mods1, (logits, logits, logits), meta, thr, pmeta, wq, s16, z16, s32, z32, cvals, a16, b16, lbias,
             idx, starts, sxs, zs, accs, items, lcounts, parts, nsplit)
    if fcap > 0:
        for i in range(logits.size):
            logits[i] = np.tanh(logits[i] / fcap) * fcap
