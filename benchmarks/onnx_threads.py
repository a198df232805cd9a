"""Decode tokens/s of the ONNX backend on 1 and 2 threads, interleaved (docs/BENCHMARKS.md)."""
import time

import numpy as np

from edgeinfer.package import open_package
from edgeinfer.backends.onnx_backend import ONNXModel
pkg = open_package("models/smollm2-135m-instruct")
res = {}
models = {t: ONNXModel(pkg, threads=t) for t in (1, 2)}
for r in range(5):
    for t, b in models.items():
        c = b.new_cache(); b.forward(list(range(100, 116)), c, last_only=True)
        t0 = time.perf_counter()
        for i in range(64): b.forward([100 + i], c, last_only=True)
        res.setdefault(t, []).append(64 / (time.perf_counter() - t0))
for t, v in res.items(): print(f"threads {t}: tg64 median {np.median(v):.1f} tok/s  (all {np.round(v,1)})")
