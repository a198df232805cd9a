"""Perplexity of edgeinfer packages next to transformers on the same weights, in one run.

    python benchmarks/perplexity.py --package models/smollm2-135m-instruct \
        --hf-gguf ~/.cache/edgeinfer/gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/wikitext-2-raw/wiki.test.raw --window 512 [--max-windows N [--spread]] [--json out.json]

``--package`` may be given several times (e.g. a GGUF's own types against a re-quantized 4-bit package), and
``--genai DIR`` adds onnxruntime-genai's builder model (benchmarks/peers.py makes it) run by ONNX Runtime on
the same windows and token ids, so that a peer's re-quantization is scored next to ours.

transformers loads the GGUF itself (dequantized to fp32) and tokenizes with its own GGUF tokenizer, as a
new user would; both sides use the convention of edgeinfer/evaluate.py (non-overlapping windows, every
token but the first of each window predicted, a BOS before each window when the model wants one).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def transformers_ppl(gguf: Path, text: str, window: int, max_windows: int | None, add_bos: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    total = len(ids) // window
    n = total if max_windows is None else min(total, max_windows)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for w in range(n):
        chunk = ids[w * window : (w + 1) * window]
        if add_bos:
            chunk = [tok.bos_token_id] + chunk
        x = torch.tensor([chunk])
        logits = model(x).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += len(chunk) - 1
    return {"ppl": math.exp(nll / count), "windows": n, "total_windows": total, "predicted_tokens": count,
            "seconds": time.perf_counter() - t0, "token_count": len(ids)}


class GenaiModel:
    """The builder's model.onnx as ``window_nll`` wants a model: one session run per window, empty past."""

    def __init__(self, folder: Path, tokenizer):
        import onnxruntime as ort

        cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv, self.head = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / cfg["filename"]), sess_options=so, providers=["CPUExecutionProvider"])
        self.tokenizer, self.backend = tokenizer, self

    def new_cache(self, max_tokens=None):
        return None

    def forward(self, ids, cache, lazy=False):
        import numpy as np

        x = np.asarray([ids], np.int64)
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
        empty = np.zeros((1, self.kv, 0, self.head), np.float32)
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
        return self.session.run(["logits"], feeds)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", required=True, action="append", help="a package folder (repeat for several)")
    ap.add_argument("--genai", type=Path, default=None, help="an onnxruntime-genai builder folder to score on the same windows")
    ap.add_argument("--hf-gguf", type=Path, default=None, help="GGUF for the transformers reference (omit to skip it)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--spread", action="store_true", help="with --max-windows: windows evenly spaced over the text")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    if a.hf_gguf and a.spread:  # before minutes of evaluation, not after
        ap.error("--hf-gguf takes the first windows; leave out --spread")

    import edgeinfer
    from edgeinfer.evaluate import perplexity, read_text

    text = read_text(a.data)
    result = {"data": a.data, "window": a.window, "packages": {},
              "machine": f"{platform.machine()} {platform.system()}, {__import__('os').cpu_count()} cores",
              "command": "python " + " ".join(sys.argv)}
    for pkg in a.package:
        m = edgeinfer.load(pkg)
        ours = perplexity(m, text, window=a.window, max_windows=a.max_windows, spread=a.spread).to_dict()
        ours["token_count"] = len(m.tokenizer.encode(text, add_bos=False))
        result["packages"][pkg] = ours
        print(f"{pkg}: ppl {ours['ppl']:.4f} over {ours['windows']} windows ({ours['seconds']:.0f} s)")
    first = result["packages"][a.package[0]]
    if a.genai:
        g = perplexity(GenaiModel(a.genai, m.tokenizer), text, window=a.window, max_windows=a.max_windows, spread=a.spread)
        result["genai"] = dict(g.to_dict(), folder=str(a.genai))
        print(f"onnxruntime-genai builder model: ppl {g.ppl:.4f} over {g.windows} windows ({g.seconds:.0f} s)")
    if a.hf_gguf:
        ref = transformers_ppl(a.hf_gguf, text, a.window, a.max_windows, m.tokenizer.add_bos)
        result["transformers"] = ref
        result["relative_difference"] = first["ppl"] / ref["ppl"] - 1
        print(f"transformers ppl {ref['ppl']:.4f} over {ref['windows']} windows ({ref['seconds']:.0f} s); "
              f"{a.package[0]} differs by {100 * result['relative_difference']:+.3f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
