"""Decode speed against the memory budget when the weights do not fit: per-layer streaming.

For each fraction f of the weights' in-memory size (quantized, as stored), the budget is the plan's
non-weight terms plus f times the weights; the planner then keeps as many layers resident as fit and
reads the others from the package file at every step (O_DIRECT, so every read reaches the disk). Each
point runs in a fresh process after dropping the page cache (root only). Prints a Markdown table.

    python benchmarks/memory_stream.py models/smollm2-135m-instruct [--fractions 1,0.9,0.8,0.7,0.6,0.5] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def weights_budget(pkg_path: str, fraction: float, context: int) -> tuple[int, int]:
    """(total budget, weight bytes): the plan's other terms in this process plus ``fraction`` of the
    weights' in-memory bytes (quantized, every layer resident)."""
    from edgeinfer.memory import plan_memory
    from edgeinfer.package import open_package
    from edgeinfer.tokenizer import Tokenizer

    pkg = open_package(pkg_path)
    Tokenizer(pkg.path, pkg.tokenizer_info)  # loaded as the run will, so that the baseline matches
    full = plan_memory(pkg, budget=1 << 40, context=context, dequantize=False, kv_dtype="float16")
    w = next(t.bytes for t in full.terms if t.name == "weights")
    # 4 MiB: the measuring process starts a little larger than this one (its own imports)
    return int(full.total_bytes - w + fraction * w) + (4 << 20), w


def point(pkg: str, budget: int, context: int, tokens: int) -> dict:
    import resource

    import edgeinfer  # first: it loads OpenBLAS before MLX
    import mlx.core as mx
    from edgeinfer.model import GenerationConfig

    m = edgeinfer.load(pkg, backend="mlx", memory_budget=budget, context=context)
    b = m.backend
    ids = m.tokenizer.encode("The history of the city begins")
    io0 = _io_read_bytes()
    r0 = b.bytes_read
    mx.reset_peak_memory()
    cfg = GenerationConfig(max_tokens=tokens, ignore_eos=True)
    out = list(m.stream_ids(ids, cfg))
    st = m.stats
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = len(ids) // 512 + 1 + (len(out) - 1)  # forward passes: prefill chunk(s), then one per decoded token
    return dict(resident_layers=m.plan.resident_layers, layers=m.plan.num_layers, budget=budget, estimate=m.plan.total_bytes,
                resident_weight_bytes=b.nbytes, decode_tps=st.decode_tps, tokens=len(out), peak_rss=rss,
                peak_mlx=mx.get_peak_memory(), read_per_step=(b.bytes_read - r0) / steps,
                disk_read_per_step=(_io_read_bytes() - io0) / steps if io0 is not None else None,
                direct=bool(b.streamer and b.streamer.direct), dequantize=m.plan.dequantize)


def _io_read_bytes():
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--fractions", default="1,0.9,0.8,0.7,0.6,0.5")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.point is not None:
        print(json.dumps(point(a.package, a.point, a.context, a.tokens)))
        return 0

    from edgeinfer.memory import fmt_bytes

    b100, w = weights_budget(a.package, 1.0, a.context)  # once: every tokenizer load grows this process
    rows = []
    for f in [float(x) for x in a.fractions.split(",")]:
        dropped = drop_page_cache()
        budget = int(b100 - (1 - f) * w)
        out = subprocess.run([sys.executable, __file__, a.package, "--point", str(budget), "--context", str(a.context),
                              "--tokens", str(a.tokens)], capture_output=True, text=True)
        if out.returncode != 0:
            rows.append(f"| {f:.0%} | | refused: {out.stderr.strip().splitlines()[-1]} | | | | |")
            continue
        d = json.loads(out.stdout.strip().splitlines()[-1])
        disk = fmt_bytes(d["disk_read_per_step"]) if d["disk_read_per_step"] is not None else "n/a"
        rows.append(f"| {f:.0%} | {fmt_bytes(d['budget'])} | {d['resident_layers']}/{d['layers']} | {fmt_bytes(d['resident_weight_bytes'])} "
                    f"| {d['decode_tps']:.2f} | {fmt_bytes(d['read_per_step'])} ({disk} at the block layer) "
                    f"| {fmt_bytes(d['peak_rss'])} / est. {fmt_bytes(d['estimate'])} |"
                    + ("" if dropped else " (page cache not dropped)"))
    print(f"weights in memory (quantized): {fmt_bytes(w)}; context {a.context}; {a.tokens} decoded tokens a point")
    print("| weights budget | total budget | layers resident | resident weights | decode tok/s | read from disk per token | peak RSS / plan |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
