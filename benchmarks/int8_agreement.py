"""How far int8 activations move the logits: edgeinfer's ONNX graph and llama.cpp, each against the exact
(MLX, float) logits of the same package, on the same tokens (docs/BENCHMARKS.md, ONNX section).

    python benchmarks/int8_agreement.py models/gemma3-270m ~/.cache/edgeinfer/gguf/gemma-3-270m-q4_k_m.gguf
    python benchmarks/int8_agreement.py models/smollm2-135m-instruct ~/.cache/edgeinfer/gguf/SmolLM2-135M-Instruct.Q4_1.gguf --chat

Text: 3,000 characters of wikitext-2 test from offset 5,000 (200 tokens, BOS first when the model wants
one), or with --chat the chat prompt "What is the capital of France?". Needs llama-cpp-python (the
`peers` extra). The ONNX graph is run at accuracy level 4 whatever the package's manifest says.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

import edgeinfer
from edgeinfer.converters.onnx_export import add_onnx_graph


def logsoftmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("gguf")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"))
    a = ap.parse_args()
    from llama_cpp import Llama

    exact = edgeinfer.load(a.package, backend="mlx")
    tok = exact.tokenizer
    if a.chat:
        ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    else:
        text = Path(a.data).read_text(encoding="utf-8")[5000:8000]
        ids = ([tok.bos_token_id] if tok.add_bos else []) + tok.encode(text, add_bos=False)[:200]
    with tempfile.TemporaryDirectory() as d:
        fast_pkg = Path(d) / "pkg"
        shutil.copytree(a.package, fast_pkg)
        add_onnx_graph(fast_pkg, accuracy_level=4, progress=False)
        fast = edgeinfer.load(fast_pkg, backend="onnx").logits(ids)
    ref = exact.logits(ids)
    llm = Llama(model_path=str(Path(a.gguf).expanduser()), n_threads=2, n_ctx=512, verbose=False, logits_all=True)
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)])
    lr = logsoftmax(ref)
    for name, x in (("edgeinfer ONNX (int8 activations)", fast), ("llama.cpp", cpp)):
        lx = logsoftmax(x)
        kl = (np.exp(lr) * (lr - lx)).sum(-1).mean()
        top1 = (x.argmax(-1) == ref.argmax(-1)).mean()
        d = np.abs(x - ref).max(-1)
        print(f"{name:34s} mean KL {kl:.4f}  top-1 {top1:.3f}  per-position max |dlogit| {d.min():.2f}-{d.max():.2f}  "
              f"last argmax {int(x[-1].argmax())} (exact {int(ref[-1].argmax())})")


if __name__ == "__main__":
    main()
