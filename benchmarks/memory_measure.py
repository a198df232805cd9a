"""Measures one load-and-generate run against its memory plan: the plan's estimate, the process's peak
resident set and MLX's peak-memory counter. Prints one JSON line.

    python benchmarks/memory_measure.py PKG [--backend mlx|onnx] [--budget 300MB] [--context N] [--prompt-tokens N]
        [--max-tokens N] [--prefill-chunk N] [--dequantize yes|no]

The prompt is ``--prompt-tokens`` copies of one token id, so that the context fills up to the plan's
bound when asked. tests/test_memory.py runs this in a fresh process (peak RSS is per process).

edgeinfer is imported before MLX, as the CLI does: on Linux it loads OpenBLAS first, without which
MLX's float matmuls fall back to the reference BLAS (tens of times slower, and other buffers).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--backend", default="mlx", choices=["mlx", "onnx", "auto"])
    ap.add_argument("--budget", default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default: fill the planned context but the generated tokens")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk, planned for and used")
    ap.add_argument("--kv-overflow", default="refuse")
    ap.add_argument("--resident-layers", type=int, default=None)
    ap.add_argument("--dequantize", choices=["yes", "no"], default=None, help="fix the weight lever (default: the plan picks)")
    ap.add_argument("--stream-io", default=None)
    a = ap.parse_args()

    import edgeinfer  # first: it preloads OpenBLAS before MLX (see above)
    import mlx.core as mx
    from edgeinfer.model import GenerationConfig

    opts = {}
    if a.resident_layers is not None:
        opts["resident_layers"] = a.resident_layers
    if a.stream_io:
        opts["stream_io"] = a.stream_io
    if a.dequantize:
        opts["dequantize"] = a.dequantize == "yes"
    m = edgeinfer.load(a.package, backend=a.backend, memory_budget=a.budget, context=a.context, kv_overflow=a.kv_overflow,
                       prefill_chunk=a.prefill_chunk, **opts)
    plan = m.plan
    n = a.prompt_tokens if a.prompt_tokens is not None else plan.context_tokens - a.max_tokens - 1
    ids = [next(i for i in range(5, m.spec.vocab_size) if i not in m.tokenizer.eos_token_ids)] * max(n, 1)
    mx.reset_peak_memory()
    out = list(m.stream_ids(ids, GenerationConfig(max_tokens=a.max_tokens, ignore_eos=True, prefill_chunk=a.prefill_chunk)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:  # ru_maxrss survives fork+exec (a child of a big process inherits its peak); VmHWM does not
        rss = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    print(json.dumps(dict(
        package=a.package, backend=m.backend_name, budget=plan.budget_bytes, estimate=plan.total_bytes, estimate_mlx=plan.mlx_bytes,
        peak_rss=rss, peak_mlx=mx.get_peak_memory(), context=plan.context_tokens, prompt_tokens=len(ids),
        generated=len(out), kv_bytes=m.cache.nbytes() if hasattr(m.cache, "nbytes") else None, dequantize=plan.dequantize, kv_dtype=plan.kv_dtype,
        resident_layers=plan.resident_layers, fits=plan.fits,
    )))
    return 0


if __name__ == "__main__":
    sys.exit(main())
