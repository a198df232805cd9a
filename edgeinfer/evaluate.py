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
    spread: bool = False  # the windows were spaced evenly over the text, not the first ones

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


def perplexity(model, text: str, window: int = 512, max_windows: int | None = None, progress: bool = True,
               spread: bool = False) -> PerplexityResult:
    """Perplexity over non-overlapping ``window``-token windows: all of them, the first ``max_windows``, or
    with ``spread`` that many spaced evenly over the whole text (a sample of every part of it)."""
    if window < 2:
        raise EdgeInferError(f"--window must be at least 2, not {window}")
    ids = model.tokenizer.encode(text, add_bos=False)
    bos = model.tokenizer.bos_token_id if model.tokenizer.add_bos else None
    total = len(ids) // window
    if total == 0:
        raise EdgeInferError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    n = total if max_windows is None else min(total, max_windows)
    picks = [round(i * (total - 1) / max(n - 1, 1)) for i in range(n)] if spread and n < total else range(n)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(picks, desc="perplexity", unit="window", disable=None if progress else True, file=sys.stderr)
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
        seconds=time.perf_counter() - t0, spread=spread and n < total,
    )


# -- R-Sparse quality --------------------------------------------------------------------------------------
# Prompts of the generation check: a mix of facts, instructions and open text, so that garbled output shows.
GEN_PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Explain in two sentences why the sea is salty.",
    "Write a haiku about autumn leaves.",
    "List the first five planets of the solar system in order from the sun.",
    "How do I make a cup of tea?",
    "Continue the story: The old clock in the hallway stopped at midnight, and",
    "What is 12 times 12? Show your reasoning.",
    "Give three reasons why people keep dogs as pets.",
]


def sparse_every_position(model) -> None:
    """Puts a model loaded with a sparsity level into the all-positions mode (each token of a window
    sparsified on its own, as TEAL evaluates perplexity); a dense model is left as it is."""
    if not getattr(model, "sparsity", 0.0):
        return
    be = model.backend
    if getattr(be, "sparsity_mode", None) is None:
        raise EdgeInferError(f"perplexity under --sparsity needs the all-positions mode, which the {model.backend_name} "
                             f"backend lacks; use --backend mlx")
    be.set_sparsity(be.sparsity_plan, mode="all")


def generation_check(model, prompts: list[str], max_tokens: int = 48, progress: bool = True) -> dict:
    """Greedy continuations of ``prompts`` dense and at the model's sparsity level (decode steps sparse,
    prefill dense, as generation runs). Returns the texts, the teacher-forced agreement (the share of the
    dense continuation's tokens that the sparse model also picks greedily when fed the dense text) and,
    per prompt, the tokens before the free sparse continuation first differs from dense."""
    import numpy as np

    from .model import GenerationConfig
    from .sampling import SamplingParams

    level = model.sparsity
    tok = model.tokenizer
    cfg = GenerationConfig(max_tokens=max_tokens, sampling=SamplingParams())
    samples, agree, total = [], 0, 0
    for prompt in tqdm(prompts, desc="generation check", unit="prompt", disable=None if progress else True, file=sys.stderr):
        ids = tok.encode_chat([{"role": "user", "content": prompt}]) if tok.chat_template else tok.encode(prompt)
        model.set_sparsity(0.0)
        dense = list(model.stream_ids(ids, cfg))
        model.set_sparsity(level)
        sparse = list(model.stream_ids(ids, cfg))
        model.reset()
        be = model.backend
        cache = be.new_cache(max_tokens=len(ids) + len(dense) + 1)
        preds = [int(np.asarray(be.forward(ids, cache, last_only=True))[0, -1].argmax())]
        for t in dense[:-1]:
            preds.append(int(np.asarray(be.forward([t], cache))[0, -1].argmax()))
        match = sum(p == d for p, d in zip(preds, dense))
        agree, total = agree + match, total + len(dense)
        prefix = next((i for i, (a, b) in enumerate(zip(dense, sparse)) if a != b), min(len(dense), len(sparse)))
        samples.append({"prompt": prompt, "dense": tok.decode(dense), "sparse": tok.decode(sparse),
                        "agreement": match / max(1, len(dense)), "prefix": prefix})
    return {"agreement": agree / max(1, total), "tokens": total,
            "mean_prefix": sum(s["prefix"] for s in samples) / max(1, len(samples)), "samples": samples}


def greedy_agreement(model, reference, prompts: list[str], max_tokens: int = 32, progress: bool = True) -> dict:
    """Greedy chat answers of ``model`` checked against the exact ``reference`` (a model on MLX, or ORT at
    accuracy level 1), teacher-forced: one reference prefill over prompt + answer gives the exact model's
    logits at every answer position, and the answers are equal exactly when the reference's argmax is the
    model's token at each of them (greedy decoding is then the same, step by step). At the first position
    where they differ, ``margin`` is the reference's logit of its own choice minus that of the model's
    token: how near a tie the model turned the other way."""
    import numpy as np

    from .model import GenerationConfig
    from .sampling import SamplingParams

    tok = model.tokenizer
    cfg = GenerationConfig(max_tokens=max_tokens, sampling=SamplingParams())
    rows = []
    for prompt in tqdm(prompts, desc="greedy agreement", unit="prompt", disable=None if progress else True, file=sys.stderr):
        ids = tok.encode_chat([{"role": "user", "content": prompt}]) if tok.chat_template else tok.encode(prompt)
        model.reset()
        answer = list(model.stream_ids(ids, cfg))
        logits = np.asarray(reference.logits(ids + answer))[len(ids) - 1: len(ids) - 1 + len(answer)]
        exact = logits.argmax(-1)
        diff = np.nonzero(exact != np.asarray(answer))[0]
        row = {"prompt": prompt, "answer": tok.decode(answer), "tokens": len(answer), "equal": not len(diff)}
        if len(diff):
            t = int(diff[0])
            row.update(first_difference=t, margin=float(logits[t, exact[t]] - logits[t, answer[t]]),
                       exact_token=tok.decode([int(exact[t])]), model_token=tok.decode([answer[t]]))
        rows.append(row)
    equal = sum(r["equal"] for r in rows)
    margins = [r["margin"] for r in rows if not r["equal"]]
    return {"prompts": len(rows), "equal": equal, "max_margin": max(margins, default=0.0), "rows": rows}
