"""What deciding sparsity per group of input channels costs, against per channel (TEAL / R-Sparse's sparse
part), measured on a real model's activations.

    python benchmarks/block_sparse_error.py -m /tmp/q4/qwen-q4g64s [--tokens 400] [--levels 0.4,0.5] [--units 8,32,64]

A kernel can only turn skipped inputs into skipped memory reads when they lie in long contiguous runs
(benchmarks/skip_bandwidth.py: random runs under about 14 KiB save nothing on the EPYC VMs). For a
[m, n] 4-bit linear that means skipping whole groups of U inputs (U * m / 2 bytes). This records every
projection's input vectors over wikitext-2 tokens (dense, float64, ``sparse.reference.ReferenceDecoder``),
calibrates on the first half and measures on the second, and reports the relative output error
||W x - W x_kept||^2 / ||W x||^2 summed over the projections that share an input (q|k|v, o, gate|up,
down), averaged over the layers, for:

- per channel: the (1-s) n largest |x_j| of each token kept;
- groups of U in the stored order: the (1-s) n / U groups of largest sum of x_j^2 kept;
- groups of U after a channel permutation: channels sorted by their calibration mean |x_j| first, so that
  channels that are large together share groups (the cheapest co-activation order).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
INPUTS = {"q|k|v": ("q", "k", "v"), "o": ("o",), "gate|up": ("gate", "up"), "down": ("down",)}


def relative_error(ws, x, keep) -> float:
    num = den = 0.0
    for w in ws:
        num += float(np.square((x * ~keep) @ w.T).sum())
        den += float(np.square(x @ w.T).sum())
    return num / den


def keep_channels(x, s):
    n = x.shape[1]
    k = int(round((1 - s) * n))
    a = np.abs(x)
    return a >= np.sort(a, 1)[:, n - k][:, None]


def keep_groups(x, s, u, perm):
    n = x.shape[1]
    mass = np.square(x[:, perm]).reshape(x.shape[0], n // u, u).sum(2)
    k = int(round((1 - s) * n / u))
    kept = np.repeat(mass >= np.sort(mass, 1)[:, n // u - k][:, None], u, 1)
    out = np.empty_like(kept)
    out[:, perm] = kept
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True, help="an edgeinfer package (its dequantized weights are used)")
    ap.add_argument("--tokens", type=int, default=400, help="wikitext-2 tokens decoded (half calibrate, half measure)")
    ap.add_argument("--levels", default="0.4,0.5")
    ap.add_argument("--units", default="8,32,64")
    ap.add_argument("--data", default=str(DATA))
    a = ap.parse_args()
    from edgeinfer.errors import EdgeInferError
    from edgeinfer.package import open_package
    from edgeinfer.sparse.reference import ReferenceDecoder

    levels = [float(x) for x in a.levels.split(",")]
    units = [int(x) for x in a.units.split(",")]
    try:
        pkg = open_package(a.model)
        text = Path(a.data).read_text(encoding="utf-8")
    except (EdgeInferError, OSError) as e:
        print(f"block_sparse_error.py: {e}", file=sys.stderr)
        return 2
    if a.tokens < 16 or any(not 0 < s < 1 for s in levels) or any(u < 1 for u in units):
        print("block_sparse_error.py: --tokens >= 16, levels in (0, 1), units >= 1", file=sys.stderr)
        return 2
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(pkg.path / "tokenizer.json"))
    ids = tok.encode(text[len(text) // 3:][:20 * a.tokens]).ids[: a.tokens]
    print(f"decoding {len(ids)} tokens densely in float64 (about 0.25 s a token for a 0.5B model)...", file=sys.stderr)
    ref = ReferenceDecoder(pkg)
    acts = {k: np.asarray(v, np.float32) for k, v in ref.record_inputs(ids).items()}
    L = pkg.spec.num_layers
    half = len(ids) // 2
    cols = ["per channel"] + [f"groups of {u}" for u in units] + [f"groups of {u}, permuted" for u in units]
    print(f"\n{pkg.path.name}: relative output error, mean over {L} layers; calibration {half} tokens, measured on "
          f"{len(ids) - half} (wikitext-2 test, from a third into the file).\n")
    print("| sparsity | input | " + " | ".join(cols) + " |")
    print("| ---: | --- | " + " | ".join("---:" for _ in cols) + " |")
    for s in levels:
        for name, projs in INPUTS.items():
            sums = np.zeros(len(cols))
            for i in range(L):
                x = acts[(i, projs[0])]
                cal, ev = x[:half], x[half:]
                ws = [ref.W[i, p].astype(np.float32) for p in projs]
                perm = np.argsort(-np.abs(cal).mean(0))
                ident = np.arange(x.shape[1])
                keeps = [keep_channels(ev, s)] + [keep_groups(ev, s, u, ident) for u in units] + \
                        [keep_groups(ev, s, u, perm) for u in units]
                sums += [relative_error(ws, ev, k) for k in keeps]
            print(f"| {s:.2f} | {name} | " + " | ".join(f"{v / L:.4f}" for v in sums) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
