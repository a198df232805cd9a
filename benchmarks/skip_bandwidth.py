"""What skipping half of a weight stream buys on this CPU, by the size of the runs skipped.

    python benchmarks/skip_bandwidth.py [--mib 192] [--threads 1,2] [-r 5] [--runs 448,4864,14336,28672,57344]

Activation sparsity only speeds up a memory-bound decode step if the bytes it does not need are bytes the
memory system does not fetch. This streams a buffer far larger than the caches (benchmarks/c/skip_bandwidth.c,
compiled here with the system's C compiler), once whole and once reading a random half of it in runs of R
bytes kept in address order, with and without a software prefetch cursor 2 KiB ahead over the kept runs.
The run sizes that matter for Qwen2.5-0.5B (896 hidden, 4864 intermediate) at 4 bits: 448 B is one input
channel of q, o or down in an input-major layout (per-channel R-Sparse / TEAL), 4864 B one channel of
gate|up; 14336 B is a 32-input group of all 896 rows of o or down in a group-major layout, 28672 B a
64-input group. Prints a markdown table of medians: time to read the half / time to read it all, and the
speed-up a decode step made only of such reads could reach at 50% sparsity (2.0x is the ideal).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent / "c" / "skip_bandwidth.c"


def build(out: Path) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        sys.exit("skip_bandwidth.py: no C compiler (cc, gcc or clang) on PATH")
    flags = ["-O2", "-fopenmp"]
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        if " avx2 " in cpu:
            flags.append("-mavx2")
    except OSError:
        pass
    exe = out / "skip_bandwidth"
    subprocess.run([cc, *flags, str(SRC), "-o", str(exe)], check=True)
    return exe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=192, help="buffer size (far above the last-level cache)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--runs", default="448,4864,14336,28672,57344", help="run sizes in bytes, multiples of 64")
    a = ap.parse_args()
    runs = [int(x) for x in a.runs.split(",")]
    threads = [int(x) for x in a.threads.split(",")]
    if any(r < 64 or r % 64 for r in runs) or any(t < 1 for t in threads):
        print("skip_bandwidth.py: run sizes must be multiples of 64 bytes, threads at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        rows = []
        for t in threads:
            for r in runs:
                out = subprocess.run([str(exe), str(a.mib), str(r), str(t), "2048", str(a.reps)], check=True,
                                     capture_output=True, text=True).stdout.split("\n")
                vals = [list(map(float, line.split()[2:])) for line in out if line.strip()]
                dense, skip, pf = (statistics.median(v[i] for v in vals) for i in range(3))
                rows.append((t, r, dense, skip, pf))
    print(f"Buffer {a.mib} MiB, half of it skipped in random runs; medians of {a.reps}.\n")
    print("| threads | run bytes | read all, ms | read the half, ms | with prefetch, ms | speed-up at 50% |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for t, r, dense, skip, pf in rows:
        print(f"| {t} | {r} | {dense:.2f} | {skip:.2f} | {pf:.2f} | {dense / min(skip, pf):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
