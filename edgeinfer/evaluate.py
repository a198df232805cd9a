"""Perplexity over non-overlapping windows, as in ../shared/data/README.md and llama.cpp's perplexity.

Convention: the file is read as one string and tokenized once, then cut into non-overlapping windows of
``window`` tokens. Each window runs from an empty cache; every token of a window but the first is
predicted (when the model expects a BOS, it is put before each window and all ``window`` tokens are
predicted). PPL = exp(mean negative log-likelihood over all predicted tokens).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import EdgeInferError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    predicted_tokens: int
    windows: int
    window: int
    total_windows: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise EdgeInferError(f"{p} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeInferError(f"{p} is not UTF-8 text") from None


def window_nll(model, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token) over ids[1:] given the preceding ids, and the count."""
    import mlx.core as mx

    cache = model.backend.new_cache(max_tokens=len(ids))
    logits = model.backend.forward(ids[:-1], cache, lazy=True)[0]
    if not isinstance(logits, mx.array):  # the ONNX backend returns numpy
        logits = mx.array(logits)
    targets = mx.array(ids[1:])
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, targets[:, None], axis=-1).sum()
    return float(nll.item()), len(ids) - 1


def perplexity(model, text: str, window: int = 512, max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    if window < 2:
        raise EdgeInferError(f"--window must be at least 2, not {window}")
    ids = model.tokenizer.encode(text, add_bos=False)
    bos = model.tokenizer.bos_token_id if model.tokenizer.add_bos else None
    total = len(ids) // window
    if total == 0:
        raise EdgeInferError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    n = total if max_windows is None else min(total, max_windows)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(range(n), desc="perplexity", unit="window", disable=None if progress else True, file=sys.stderr)
    for w in bar:
        chunk = ids[w * window : (w + 1) * window]
        if bos is not None:
            chunk = [bos] + chunk
        s, c = window_nll(model, chunk)
        nll += s
        count += c
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    bar.close()
    mean = nll / count
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, predicted_tokens=count, windows=n, window=window, total_windows=total,
        seconds=time.perf_counter() - t0,
    )
