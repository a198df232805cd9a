"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import EdgeInferError


@dataclass
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if self.temp < 0:
            raise EdgeInferError(f"--temp must be >= 0, not {self.temp}")
        if not 0 < self.top_p <= 1:
            raise EdgeInferError(f"--top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise EdgeInferError(f"--top-k must be >= 0, not {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise EdgeInferError(f"--min-p must be in [0, 1), not {self.min_p}")
        if self.repetition_penalty <= 0:
            raise EdgeInferError(f"--repetition-penalty must be > 0, not {self.repetition_penalty}")
        return self


class Sampler:
    """Maps the last position's logits [1, vocab] to a token id array [1] without leaving the device."""

    def __init__(self, params: SamplingParams):
        self.p = params.validate()
        self.key = mx.random.key(params.seed if params.seed is not None else int.from_bytes(__import__("os").urandom(4), "little"))

    def __call__(self, logits, history: list[int] | None = None):
        """``logits``: an MLX array, or numpy (the ONNX backend): plain greedy picks those on the host (an
        MLX copy and dispatch cost 4-5% of a SmolLM2 decode step), everything else goes to MLX."""
        p = self.p
        if not isinstance(logits, mx.array):
            if p.temp == 0 and (p.repetition_penalty == 1.0 or not history):
                return np.asarray(logits).argmax(axis=-1)
            logits = mx.array(logits)
        logits = logits.astype(mx.float32)
        if p.repetition_penalty != 1.0 and history:
            ids = mx.array(history[-p.repetition_context :])
            picked = logits[:, ids]
            picked = mx.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
            logits[:, ids] = picked
        if p.temp == 0:
            return mx.argmax(logits, axis=-1)
        logits = logits / p.temp
        neg = mx.array(-float("inf"), mx.float32)
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[:, -p.top_k][:, None]
            logits = mx.where(logits < kth, neg, logits)
        if p.min_p > 0:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            floor = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(p.min_p))
            logits = mx.where(logprobs < floor, neg, logits)
        if p.top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            sorted_logits = mx.take_along_axis(logits, order, axis=-1)
            probs = mx.softmax(sorted_logits, axis=-1)
            before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
            sorted_logits = mx.where(before >= p.top_p, neg, sorted_logits)
            inverse = mx.argsort(order, axis=-1)
            logits = mx.take_along_axis(sorted_logits, inverse, axis=-1)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logits, key=sub)
