"""The native decode step's linears and whole steps, timed (docs/BENCHMARKS.md, "Where a decode step's
time goes").

    python benchmarks/native_kernels.py [PKG] [--threads 1] [--act f32,i16] [--steps 64]

Linears: the same call repeated 30 times with the weights in cache (a compute figure), the 20th
percentile. Steps: median of --steps one-token steps on an empty 256-position KV cache."""

from __future__ import annotations

import argparse
import time

import numpy as np

import edgeinfer  # noqa: F401  (loads OpenBLAS first, as the CLI does)
from edgeinfer import native
from edgeinfer.decode_tables import module_names
from edgeinfer.package import open_package


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", nargs="?", default="models/smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--act", default="f32,i16")
    ap.add_argument("--steps", type=int, default=64)
    a = ap.parse_args()
    pkg = open_package(a.package)
    s = pkg.spec
    names = module_names(pkg)
    picks = [0, 4, 6, len(names) - 1]  # q, gate, down of layer 0, and the head
    print(f"{a.package}, {native.variant()} build, {a.threads} thread(s)")
    for act in a.act.split(","):
        d = native.NativeDecoder(pkg, threads=a.threads, act=act)
        cells = []
        for idx in picks:
            lin = d._lins[idx]
            x = np.random.default_rng(0).standard_normal(lin.n_in).astype(np.float32)
            ts = []
            for _ in range(30):
                t = time.perf_counter()
                d.linear(idx, x)
                ts.append(time.perf_counter() - t)
            cells.append(f"{names[idx]} {lin.m_out}x{lin.n_in} {lin.bits}-bit {np.percentile(ts, 20) * 1e3:.3f} ms")
        k = np.zeros((s.num_layers, 1, s.num_kv_heads, 256, s.head_dim), np.float32)
        v = k.copy()
        ts = []
        for pos in range(a.steps):
            t = time.perf_counter()
            d.step(100 + pos, pos, k, v)
            ts.append(time.perf_counter() - t)
        step = float(np.median(ts))
        print(f"  {act}: " + "; ".join(cells) + f"; step {step * 1e3:.2f} ms = {1 / step:.1f} tok/s")
        d.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
