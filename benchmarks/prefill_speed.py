"""Prompt speed of the ONNX backend's default path (the native step) on one package, in this process.

    python benchmarks/prefill_speed.py PKG [--tokens 64] [--threads 2] [-r 5]

Random token ids (seeded), an empty cache each repetition, the last position's logits only (what a
generation asks for); prints the median seconds and tokens/s. EDGEINFER_NATIVE_PREFILL=off measures the
exact graph instead, EDGEINFER_NO_VNNI=1 the AVX2 batch kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=5)
    a = ap.parse_args()
    if a.tokens < 1 or a.reps < 1:
        print("prefill_speed.py: --tokens and -r must be at least 1", file=sys.stderr)
        return 2
    import numpy as np

    import edgeinfer
    from edgeinfer.errors import EdgeInferError

    try:
        m = edgeinfer.load(a.package, backend="onnx", threads=a.threads)
    except EdgeInferError as e:
        print(f"prefill_speed.py: {e}", file=sys.stderr)
        return 2
    ids = [int(x) for x in np.random.default_rng(0).integers(100, min(20000, m.spec.vocab_size), a.tokens)]
    times = []
    for _ in range(a.reps):
        cache = m.backend.new_cache(a.tokens + 1)
        t = time.perf_counter()
        m.backend.forward(ids, cache, last_only=True)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(f"{Path(a.package).name}: {a.tokens} tokens, {a.threads} threads: {med:.3f} s median of {a.reps} ({a.tokens / med:.1f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
