"""``edgeinfer sparsify``: R-Sparse (and TEAL-style) activation-sparsity plans, calibrated offline.

For every layer i and projection p the plan fixes a sparsity s and a sparse share rho; from them the budget
(``edgeinfer.sparse.plan.budget``) gives the kept channels k and the rank r, the calibration activations
give the threshold t (so that on average k input channels score above it) and the truncated SVD of the
dequantized weight gives the low-rank factors. How (s, rho) are chosen per module is the search:

- ``uniform``: the same s everywhere; rho 1 for TEAL, else the best of a few shared values (by the fitness);
- ``greedy``: TEAL's per-projection allocation inside each layer (``GreedySplit``), the same s per layer;
- ``evolutionary``: R-Sparse's search over per-layer (s_i, rho_i) under the model-level constraint (the
  parameter-weighted mean of s_i is the target); the fitness (``Fitness``) compares the sparse model with
  dense on calibration windows, each token sparsified on its own ("all positions" mode of the MLX backend).

The search's candidates use thresholds from the dense model's activations; the chosen plan's thresholds are
then calibrated once more with the plan running (``recalibrate``), so the realized sparsity is the target.

Calibration data is text the model writes itself from fixed seed prompts (sampled with a fixed seed), or a
user's file; it is cut into windows, the last fifth held out to measure the realized sparsity. Nothing here
ever reads the evaluation text. Plans go to ``PKG/sparse/plan-<level>.safetensors`` and the manifest's
``sparsity`` section (docs/PACKAGE.md), written atomically: on any error or Ctrl-C the package is as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgeinfer.errors import EdgeInferError
from edgeinfer.package import MANIFEST, WEIGHTS, open_package, sha256_file
from edgeinfer.sparse.plan import (
    PLAN_DIR, PROJECTIONS, ModulePlan, SparsePlan, budget, level_key, plan_file_name, projection_shapes,
)

METHODS = ("rsparse", "teal")
SEARCHES = ("evolutionary", "greedy", "uniform")
FITNESS = ("kl", "ppl")

# Seed prompts of the self-generated calibration text: varied registers (story, explanation, dialogue,
# lists, code, facts), so the activations cover more than one kind of text.
SEED_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a curious twelve-year-old.",
    "Describe the history of the printing press and why it mattered.",
    "What are the main differences between a virus and a bacterium?",
    "Write a letter to a friend about a trip to the mountains.",
    "Give step-by-step instructions for baking a loaf of bread.",
    "Summarize the causes of the French Revolution.",
    "Write a Python function that checks whether a word is a palindrome, and explain it.",
    "Describe a busy market in a city you imagine, with sounds and smells.",
    "Why is the sky blue? Give a clear scientific explanation.",
    "Write a dialogue between a teacher and a student about climate change.",
    "List five tips for learning a new language and explain each one.",
    "Tell me about the life of a honeybee in a hive.",
    "Explain what a computer's memory and processor do, with an analogy.",
    "Write a news report about a small town that opens a new library.",
    "Describe the rules of chess to someone who has never played.",
]

WINDOW = 128  # tokens per calibration window (fitness and statistics)
MIN_FIT_WINDOWS = 4
QUANTILES = 4097  # points of each module's score distribution kept for thresholds
STAT_TOKENS = 1024  # calibration positions whose activations are kept for thresholds (sampled evenly)
GREEDY_TOKENS = 256  # of those, the ones the greedy allocation measures errors on
S_MAX = 0.95
RHO_MIN = 0.5
RHO_GRID = (0.6, 0.7, 0.8, 0.9, 1.0)
SENS_STEP = 0.1  # extra sparsity of one layer when its sensitivity is measured
SENS_SEEDS = (0.02, 0.04, 0.08)  # seeds of the search: s_i = target - a * (standardized sensitivity of layer i)


@dataclass
class SearchSettings:
    population: int = 12
    generations: int = 4
    fitness_windows: int = 8
    elites: int = 2
    fitness: str = "kl"  # Fitness.kind


# -- calibration data ------------------------------------------------------------------------------------
@dataclass
class Calibration:
    text: str
    source: str  # "generated" or the file's name
    fit: list[list[int]]  # windows for the statistics and the fitness
    held: list[list[int]]  # held-out windows: the realized sparsity
    tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def record(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "tokens": self.tokens, "window": WINDOW, **self.extra}


def generate_calibration(pkg_path: Path, tokens: int, seed: int, progress: bool) -> tuple[str, dict]:
    """About ``tokens`` tokens of text the model writes from the seed prompts (sampled: greedy text from
    small models loops), on the fastest backend the package has."""
    from edgeinfer.model import GenerationConfig, load
    from edgeinfer.sampling import SamplingParams

    model = load(pkg_path, backend="auto")
    per = max(32, -(-tokens // len(SEED_PROMPTS)))
    texts, done = [], 0
    bar = tqdm(total=tokens, desc="calibration text", unit="tok", disable=None if progress else True, file=sys.stderr)
    for i in range(4 * len(SEED_PROMPTS)):  # prompts that end early are asked again with another seed
        if done >= tokens:
            break
        prompt = SEED_PROMPTS[i % len(SEED_PROMPTS)]
        msgs = [{"role": "user", "content": prompt}]
        ids = model.tokenizer.encode_chat(msgs) if model.tokenizer.chat_template else model.tokenizer.encode(prompt)
        cfg = GenerationConfig(max_tokens=min(per, tokens - done + 1),
                               sampling=SamplingParams(temp=0.8, top_p=0.95, seed=seed + i))
        model.reset()
        out = list(model.stream_ids(ids, cfg))
        done += len(out)
        bar.update(len(out))
        texts.append(prompt + "\n" + model.tokenizer.decode(out))
    bar.close()
    info = {"backend": model.backend_name, "seed_prompts": len(SEED_PROMPTS), "sampling": "temp 0.8, top-p 0.95"}
    del model
    return "\n\n".join(texts), info


def make_calibration(model, text: str, source: str, extra: dict | None = None) -> Calibration:
    ids = model.tokenizer.encode(text, add_bos=False)
    bos = model.tokenizer.bos_token_id if model.tokenizer.add_bos else None
    n = len(ids) // WINDOW
    held = max(1, n // 5)
    if n - held < MIN_FIT_WINDOWS:
        need = (MIN_FIT_WINDOWS + 1) * WINDOW
        raise EdgeInferError(
            f"the calibration text ({source}) has {len(ids)} tokens; at least {need} are needed "
            f"({MIN_FIT_WINDOWS + 1} windows of {WINDOW})"
        )
    wins = [([bos] if bos is not None else []) + ids[w * WINDOW : (w + 1) * WINDOW] for w in range(n)]
    return Calibration(text=text, source=source, fit=wins[: n - held], held=wins[n - held :], tokens=len(ids), extra=extra or {})


# -- statistics ------------------------------------------------------------------------------------------
# The seven projections read four distinct inputs per layer: q/k/v the attention norm's output, gate/up the
# MLP norm's output; activations are kept once per input.
INPUT_OF = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}


@dataclass
class ModuleStats:
    m: int
    n: int
    levels: np.ndarray  # quantile levels of the tables below
    q_abs: np.ndarray  # quantiles of |x_j| over calibration tokens and channels
    q_c: np.ndarray  # quantiles of |x_j| * c_j
    c: np.ndarray  # ||W[:, j]||_2
    us: np.ndarray  # U_R Sigma_R [m, R] (the largest rank any candidate may use)
    vt: np.ndarray  # V_R^T [R, n]
    x: np.ndarray  # [GREEDY_TOKENS, n] activations for the greedy allocation's errors
    w: np.ndarray | None = None  # dequantized weight (only while the greedy allocation needs it)

    def threshold(self, k: int, rho: float) -> float:
        """t such that on average k of the n channels score above it."""
        if k >= self.n:
            return -1.0  # scores are >= 0: every channel kept
        if k <= 0:
            return float(np.finfo(np.float32).max)
        table = self.q_abs if rho >= 1 else self.q_c
        return float(np.interp(1.0 - k / self.n, self.levels, table))


def _weight_of(lin) -> np.ndarray:
    import mlx.core as mx

    if lin.quant is None:
        w = lin.w
    else:
        s, b, g, bits = lin.quant
        w = mx.dequantize(lin.w, s, b, group_size=g, bits=bits)
    return np.array(w.astype(mx.float32), dtype=np.float32)


def quantiles(a: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The values at ``levels`` of a's sorted entries (nearest rank: the table only has to place
    thresholds within a fraction of a percent)."""
    a = np.sort(a, axis=None)
    return a[np.round(levels * (a.size - 1)).astype(np.int64)].astype(np.float64)


def truncated_svd(w: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_R Sigma_R [m, R], V_R^T [R, n]) of w, from the eigenvectors of the smaller Gram matrix in float64:
    several times faster here than a full SVD, and exact enough for the leading components kept."""
    m, n = w.shape
    R = min(R, m, n)
    if R <= 0:
        return np.zeros((m, 0), np.float32), np.zeros((0, n), np.float32)
    w64 = w.astype(np.float64)
    if m >= n:
        ev, v = np.linalg.eigh(w64.T @ w64)
        v = v[:, ::-1][:, :R]
        return (w64 @ v).astype(np.float32), v.T.astype(np.float32)
    ev, u = np.linalg.eigh(w64 @ w64.T)
    sv = np.sqrt(np.maximum(ev[::-1][:R], 0.0))
    u = u[:, ::-1][:, :R]
    a = (u.T @ w64) / np.where(sv > 0, sv, 1.0)[:, None]
    return (u * sv).astype(np.float32), a.astype(np.float32)


def collect_activations(model, windows: list[list[int]], plan: SparsePlan | None, progress: bool) -> dict:
    """The projections' inputs, (layer, input kind) -> [tokens, n] float32, on about STAT_TOKENS positions
    (a fixed random sample of each window), through the MLX backend's input hook, with the model dense
    (``plan`` None) or running ``plan`` at every position."""
    import mlx.core as mx

    be = model.backend
    be.set_sparsity(plan, mode="all")
    rng = np.random.default_rng(0)
    total = sum(len(w) for w in windows)
    frac = min(1.0, STAT_TOKENS / total)
    acts: dict[tuple[int, str], list[np.ndarray]] = {}
    pick: list[np.ndarray] = []  # positions kept from the current window

    def hook(i: int, kind: str):
        def observe(x):
            a = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
            acts.setdefault((i, kind), []).append(a[pick[0]].astype(np.float16))
        return observe

    for i, ly in enumerate(be.layers):
        for kind in set(INPUT_OF.values()):
            getattr(ly, kind).observe = hook(i, kind)
    try:
        desc = "activations" + (" (sparse)" if plan is not None else "")
        for win in tqdm(windows, desc=desc, unit="window", disable=None if progress else True, file=sys.stderr):
            L = len(win)
            pick[:] = [np.sort(rng.choice(L, size=max(1, int(round(L * frac))), replace=False))]
            be.forward(win, be.new_cache(max_tokens=L))
    finally:
        for ly in be.layers:
            for p in PROJECTIONS:
                getattr(ly, p).observe = None
    return {key: np.concatenate(v).astype(np.float32) for key, v in acts.items()}


def recalibrate(model, plan: SparsePlan, windows: list[list[int]], progress: bool) -> None:
    """Thresholds again, from the inputs the projections see with the plan running. Calibrated on the
    dense model, thresholds let through fewer channels once earlier layers run sparse (SmolLM2 at 50%:
    52.7% realized on held-out text); one pass under the plan brings that back to the target."""
    acts = collect_activations(model, windows, plan, progress)
    for name, mp in plan.modules.items():
        if 0 < mp.k < mp.n:
            i, p = int(name.split(".")[1]), name.split(".")[2]
            score = np.abs(acts[(i, INPUT_OF[p])])
            if mp.c is not None:
                score = score * mp.c
            mp.t = float(np.quantile(score, 1.0 - mp.k / mp.n))


def collect_stats(model, cal: Calibration, r_max: dict[str, int], keep_weights: bool, progress: bool) -> dict[str, ModuleStats]:
    """Runs the dense model over the fit windows, then per module: score quantiles, column norms and the
    truncated SVD of the dequantized weight."""
    be = model.backend
    spec = model.spec
    acts = collect_activations(model, cal.fit, None, progress)
    shapes = projection_shapes(spec)
    levels = np.linspace(0.0, 1.0, QUANTILES)
    stats: dict[str, ModuleStats] = {}
    bar = tqdm(total=spec.num_layers * len(PROJECTIONS), desc="thresholds and SVD", unit="module",
               disable=None if progress else True, file=sys.stderr)
    for i, ly in enumerate(be.layers):
        xs = {kind: acts.pop((i, kind)) for kind in set(INPUT_OF.values())}
        q_abs = {kind: quantiles(np.abs(x), levels) for kind, x in xs.items()}
        for p in PROJECTIONS:
            m, n = shapes[p]
            w = _weight_of(getattr(ly, p))
            x = xs[INPUT_OF[p]]
            c = np.linalg.norm(w, axis=0).astype(np.float32)
            us, vt = truncated_svd(w, r_max[p])
            stats[f"layers.{i}.{p}"] = ModuleStats(
                m=m, n=n, levels=levels, q_abs=q_abs[INPUT_OF[p]], q_c=quantiles(np.abs(x) * c, levels), c=c,
                us=us, vt=vt, x=x[:: max(1, len(x) // GREEDY_TOKENS)][:GREEDY_TOKENS],
                w=w if keep_weights else None,
            )
            bar.update()
    bar.close()
    return stats


# -- plans -----------------------------------------------------------------------------------------------
Allocation = dict  # module name -> (s, rho)


def build_plan(stats: dict[str, ModuleStats], alloc: Allocation, level: float, info: dict | None = None) -> SparsePlan:
    plan = SparsePlan(level=level, info=info or {})
    for name, st in stats.items():
        s, rho = alloc[name]
        k, r = budget(s, rho, st.m, st.n)
        r = min(r, st.us.shape[1])
        plan.modules[name] = ModulePlan(
            name=name, m=st.m, n=st.n, s=float(s), rho=float(rho), k=k, r=r, t=st.threshold(k, rho),
            c=st.c.copy() if rho < 1 else None,
            a=st.vt[:r].astype(np.float16) if r > 0 else None,
            b=st.us[:, :r].astype(np.float16) if r > 0 else None,
        )
    return plan


def layer_weights(spec) -> np.ndarray:
    """Parameters of each layer's seven projections: the weights of the model-level sparsity mean."""
    per = sum(m * n for m, n in projection_shapes(spec).values())
    return np.full(spec.num_layers, float(per))


def project(s: np.ndarray, target: float, weights: np.ndarray) -> np.ndarray:
    """The nearest s (a common shift, then clipped to [0, S_MAX]) whose weighted mean is the target."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.average(np.clip(s + mid, 0.0, S_MAX), weights=weights) < target:
            lo = mid
        else:
            hi = mid
    return np.clip(s + (lo + hi) / 2, 0.0, S_MAX)


def per_layer(spec, s: np.ndarray, rho: np.ndarray) -> Allocation:
    return {f"layers.{i}.{p}": (float(s[i]), float(rho[i])) for i in range(spec.num_layers) for p in PROJECTIONS}


class Fitness:
    """How far the sparse model ("all positions" mode) is from dense on a fixed set of calibration windows:
    ``kl``, the mean KL divergence of its next-token distributions from dense's (lower is better), or ``ppl``,
    its perplexity on the calibration text (R-Sparse's choice). KL compares whole distributions at every
    position, so it depends less on which tokens a short, self-generated text happens to contain."""

    def __init__(self, model, stats, windows: list[list[int]], level: float, kind: str = "kl", dense=None):
        self.model, self.stats, self.windows, self.level, self.kind = model, stats, windows, level, kind
        self.evaluations = 0
        self.dense = dense_logprobs(model, windows) if kind == "kl" and dense is None else dense

    def __call__(self, alloc: Allocation | None) -> float:
        return self.plan(build_plan(self.stats, alloc, self.level) if alloc is not None else None)

    def plan(self, plan: SparsePlan | None) -> float:
        self.model.backend.set_sparsity(plan, mode="all")
        self.evaluations += 1
        return self.kl() if self.kind == "kl" else self.ppl()

    def ppl(self) -> float:
        from edgeinfer.evaluate import window_nll

        nll = cnt = 0
        for w in self.windows:
            a, b = window_nll(self.model, w)
            nll, cnt = nll + a, cnt + b
        return math.exp(nll / cnt)

    def kl(self) -> float:
        import mlx.core as mx

        total = cnt = 0
        for w, p in zip(self.windows, self.dense):
            q = _logprobs(self.model, w)
            total += float((mx.exp(p) * (p - q)).sum().item())
            cnt += len(w) - 1
        return total / cnt


def _logprobs(model, ids: list[int]):
    import mlx.core as mx

    logits = model.backend.forward(ids[:-1], model.backend.new_cache(max_tokens=len(ids)), lazy=True)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def dense_logprobs(model, windows: list[list[int]]) -> list:
    """Dense next-token log-probabilities of each window (float16 where the vocabulary is large)."""
    import mlx.core as mx

    model.backend.set_sparsity(None)
    out = []
    for w in windows:
        lp = _logprobs(model, w)
        if lp.size > 1 << 24:
            lp = lp.astype(mx.float16)
        mx.eval(lp)
        out.append(lp)
    return out


def search_uniform(spec, fit: Fitness, target: float, method: str, progress: bool) -> tuple[Allocation, dict]:
    ones = np.full(spec.num_layers, target)
    if method == "teal":
        return per_layer(spec, ones, np.ones(spec.num_layers)), {}
    scores = {}
    for rho in tqdm(RHO_GRID, desc=f"uniform rho @ {target:.2f}", disable=None if progress else True, file=sys.stderr):
        scores[rho] = fit(per_layer(spec, ones, np.full(spec.num_layers, rho)))
    best = min(scores, key=scores.get)
    return per_layer(spec, ones, np.full(spec.num_layers, best)), {f"rho_{fit.kind}": {str(k): v for k, v in scores.items()}}


class GreedySplit:
    """TEAL's allocation inside each layer, as a path: starting dense, repeatedly raise by ``step`` the
    sparsity of the projection whose output error grows least per weight skipped, up to S_MAX. The error is
    measured on each projection's own output (relative L2 on calibration activations), not on the block's
    output. ``split(i, s)`` reads the path where layer i's parameter-weighted sparsity is s (interpolating
    within a step, so the mean is exact): TEAL's greedy allocation at a uniform s, and the per-projection
    split of the evolutionary search's per-layer s_i."""

    def __init__(self, spec, stats: dict[str, ModuleStats], step: float = 0.05, progress: bool = False):
        self.paths = []
        for i in tqdm(range(spec.num_layers), desc="greedy allocation", unit="layer", disable=None if progress else True,
                      file=sys.stderr):
            self.paths.append(self._path([f"layers.{i}.{p}" for p in PROJECTIONS], stats, step))

    @staticmethod
    def _path(names: list[str], stats: dict[str, ModuleStats], step: float) -> tuple[np.ndarray, np.ndarray]:
        size = np.array([stats[nm].m * stats[nm].n for nm in names], np.float64)
        ys = {nm: stats[nm].x @ stats[nm].w.T for nm in names}
        memo: dict[tuple[str, int], float] = {}

        def err(nm: str, q: int) -> float:  # error at sparsity q * step
            if (nm, q) not in memo:
                st = stats[nm]
                t = st.threshold(budget(q * step, 1.0, st.m, st.n)[0], 1.0)
                drop = np.where(np.abs(st.x) > t, 0.0, st.x)
                memo[nm, q] = float(np.sum((drop @ st.w.T) ** 2) / max(float(np.sum(ys[nm] ** 2)), 1e-30))
            return memo[nm, q]

        qs = np.zeros(len(names), np.int64)
        top = int(round(S_MAX / step))
        points = [qs * step]
        while True:
            best, best_cost = -1, math.inf
            for j, nm in enumerate(names):
                if qs[j] < top:
                    cost = (err(nm, qs[j] + 1) - err(nm, qs[j])) / size[j]
                    if cost < best_cost:
                        best, best_cost = j, cost
            if best < 0:
                break
            qs[best] += 1
            points.append(qs * step)
        per_proj = np.array(points)  # [steps, 7]
        return per_proj @ size / size.sum(), per_proj

    def split(self, i: int, s: float) -> dict[str, float]:
        layer_s, per_proj = self.paths[i]
        j = int(np.clip(np.searchsorted(layer_s, s), 1, len(layer_s) - 1))
        a, b = layer_s[j - 1], layer_s[j]
        w = 0.0 if b <= a else float(np.clip((s - a) / (b - a), 0.0, 1.0))
        row = (1 - w) * per_proj[j - 1] + w * per_proj[j]
        return dict(zip(PROJECTIONS, row.tolist()))

    def allocation(self, s: np.ndarray, rho: np.ndarray) -> Allocation:
        return {f"layers.{i}.{p}": (sp, float(rho[i])) for i in range(len(self.paths))
                for p, sp in self.split(i, float(s[i])).items()}


def layer_sensitivity(spec, fit: Fitness, target: float, progress: bool) -> np.ndarray:
    """How much the fitness worsens when one layer alone is SENS_STEP sparser than the uniform ``target``
    (rho = 1): one evaluation per layer, made once per sparsify run (at the first level searched) and shared."""
    L = spec.num_layers
    base = fit(per_layer(spec, np.full(L, target), np.ones(L)))
    out = np.zeros(L)
    for i in tqdm(range(L), desc="layer sensitivity", unit="layer", disable=None if progress else True, file=sys.stderr):
        s = np.full(L, target)
        s[i] = min(S_MAX, target + SENS_STEP)
        out[i] = fit(per_layer(spec, s, np.ones(L))) - base
    return out


def search_evolutionary(spec, fit: Fitness, target: float, method: str, cfg: SearchSettings, seed: int,
                        progress: bool, sens: np.ndarray | None = None) -> tuple[Allocation, dict]:
    """R-Sparse's search: a population of per-layer (s_i, rho_i), elitist, tournament selection, uniform
    crossover per layer, Gaussian mutation of s and steps of rho, every child projected back onto the
    model-level constraint. All seven projections of layer i take s_i: spreading s_i along TEAL's greedy
    path (``GreedySplit``) measured worse on SmolLM2 (TEAL greedy against uniform, wikitext-2, 16 evenly
    spaced windows: 37.2 vs 34.0 at 40%, 48.8 vs 44.6 at 50%, 84.9 vs 87.4 at 60%; calibration ppl 7.94 vs
    7.81 at 40%). The uniform allocation (TEAL's, rho = 1; and rho = 0.9) seeds the population, so the
    result is never worse on the calibration fitness than those; so do allocations that give the layers
    that ``sens`` (``layer_sensitivity``) found most sensitive less sparsity (random per-layer mutations
    of the uniform allocation are nearly always worse: with only those, SmolLM2's and Gemma 3's searches
    returned the uniform seed)."""
    rng = np.random.default_rng(seed)
    L = spec.num_layers
    wts = layer_weights(spec)
    fixed_rho = method == "teal"

    def clean(s, rho):
        rho = np.ones(L) if fixed_rho else np.clip(np.round(rho * 20) / 20, RHO_MIN, 1.0)
        return project(s, target, wts), rho

    pop = [clean(np.full(L, target), np.ones(L))]
    if not fixed_rho:
        pop.append(clean(np.full(L, target), np.full(L, 0.9)))
    if sens is not None and np.std(sens) > 0:
        z = (sens - sens.mean()) / sens.std()
        pop += [clean(target - a * z, np.ones(L)) for a in SENS_SEEDS]
    pop = pop[: cfg.population]
    while len(pop) < cfg.population:
        s = target + rng.normal(0.0, 0.08, L)
        rho = np.where(rng.random(L) < 0.5, 1.0, rng.choice(np.array(RHO_GRID), size=L))
        pop.append(clean(s, rho))
    scored: list[tuple[float, np.ndarray, np.ndarray]] = []
    total = cfg.population + (cfg.generations - 1) * (cfg.population - cfg.elites)
    bar = tqdm(total=total, desc=f"search @ {target:.2f}", unit="eval", disable=None if progress else True, file=sys.stderr)
    history = []
    for gen in range(cfg.generations):
        for s, rho in pop:
            scored.append((fit(per_layer(spec, s, rho)), s, rho))
            bar.update()
            bar.set_postfix(best=f"{min(x[0] for x in scored):.3f}")
        scored.sort(key=lambda x: x[0])
        scored = scored[: cfg.population]
        history.append(round(scored[0][0], 4))
        if gen == cfg.generations - 1:
            break

        def tournament():
            a, b = rng.choice(len(scored), 2, replace=False)
            return scored[min(a, b)]

        pop = []
        while len(pop) < cfg.population - cfg.elites:
            (_, s1, r1), (_, s2, r2) = tournament(), tournament()
            take = rng.random(L) < 0.5
            s, rho = np.where(take, s1, s2), np.where(take, r1, r2)
            mut = rng.random(L) < 0.3
            s = s + mut * rng.normal(0.0, 0.05, L)
            rho = rho + (rng.random(L) < 0.2) * rng.choice([-0.1, 0.1], L)
            pop.append(clean(s, rho))
        scored = scored[: cfg.elites]  # the elites carry over with their fitness
    bar.close()
    best = scored[0]
    return per_layer(spec, best[1], best[2]), {f"best_{fit.kind}_by_generation": history}


# -- realized sparsity ------------------------------------------------------------------------------------
def realized_sparsity(model, plan: SparsePlan, windows: list[list[int]]) -> float:
    """Weights not read per token, as a share of the seven projections' weights, measured on held-out
    windows with the sparse model running ("all positions"): 1 - (|S| m + r (m + n)) / (m n) per module and
    token, averaged with parameter weights."""
    import mlx.core as mx

    be = model.backend
    be.set_sparsity(plan, mode="all")
    skipped = np.zeros(1)
    params = sum(mp.m * mp.n for mp in plan.modules.values())
    tokens = [0]

    def hook(mp: ModulePlan, first: bool):
        def observe(x):
            a = np.abs(np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1]))
            if mp.c is not None:
                a = a * mp.c
            kept = (a > mp.t).sum(axis=1)
            skipped[0] += float(np.sum(mp.m * mp.n - kept * mp.m - mp.r * (mp.m + mp.n)))
            if first:
                tokens[0] += a.shape[0]
        return observe

    for i, ly in enumerate(be.layers):
        for p in PROJECTIONS:
            getattr(ly, p).observe = hook(plan.module(i, p), i == 0 and p == "q")
    try:
        for w in windows:
            be.forward(w[:-1], be.new_cache(max_tokens=len(w)))
    finally:
        for ly in be.layers:
            for p in PROJECTIONS:
                getattr(ly, p).observe = None
    return float(skipped[0] / (params * tokens[0]))


# -- writing ---------------------------------------------------------------------------------------------
def plan_tensors(plan: SparsePlan) -> dict[str, np.ndarray]:
    out = {}
    for name, mp in plan.modules.items():
        out[f"{name}.t"] = np.array([mp.t], np.float32)
        if mp.c is not None:
            out[f"{name}.c"] = np.ascontiguousarray(mp.c, np.float32)
        if mp.r > 0:
            out[f"{name}.a"] = np.ascontiguousarray(mp.a, np.float16)
            out[f"{name}.b"] = np.ascontiguousarray(mp.b, np.float16)
    return out


def write_plans(pkg_dir: Path, plans: list[tuple[SparsePlan, dict]]) -> None:
    """Plan files under temporary names, then renamed over the old ones (kept aside until the manifest is
    written), then the manifest last; any failure, Ctrl-C included, puts everything back."""
    from safetensors.numpy import save_file

    sdir = pkg_dir / PLAN_DIR
    made_dir = not sdir.exists()
    sdir.mkdir(exist_ok=True)
    temps, moved, placed = [], [], []
    try:
        for plan, entry in plans:
            final = pkg_dir / plan_file_name(plan.level)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            temps.append(tmp)
            save_file(plan_tensors(plan), str(tmp), metadata={"level": level_key(plan.level)})
            os.chmod(tmp, 0o644)  # as readable as the package's other files (the writer makes it 0600)
            entry["sha256"] = sha256_file(tmp)
        for (plan, _), tmp in zip(plans, temps):
            final = pkg_dir / plan_file_name(plan.level)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                moved.append((old, final))
            os.replace(tmp, final)
            placed.append(final)
        mpath = pkg_dir / MANIFEST
        manifest = json.loads(mpath.read_text())
        sp = manifest.setdefault("sparsity", {})
        levels = sp.setdefault("levels", {})
        for plan, entry in plans:
            levels[level_key(plan.level)] = entry
        sp["levels"] = dict(sorted(levels.items()))
        mtmp = mpath.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        temps.append(mtmp)
        mtmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.chmod(mtmp, (pkg_dir / MANIFEST).stat().st_mode & 0o777)
        os.replace(mtmp, mpath)
    except BaseException:
        for f in placed:
            f.unlink(missing_ok=True)
        for old, final in moved:
            os.replace(old, final)
        for t in temps:
            t.unlink(missing_ok=True)
        if made_dir and not any(sdir.iterdir()):
            sdir.rmdir()
        raise
    for old, _ in moved:
        old.unlink(missing_ok=True)


# -- the command -----------------------------------------------------------------------------------------
def sparsify(pkg_dir: str | Path, levels: list[float], method: str = "rsparse", search: str | None = None,
             calib_file: str | None = None, calib_generate: int = 2048, seed: int = 0, command: str = "",
             settings: SearchSettings | None = None, progress: bool = True) -> dict:
    """Makes and writes one plan per level; returns the manifest's ``sparsity.levels`` entries written."""
    from edgeinfer.evaluate import read_text
    from edgeinfer.model import load

    pkg_dir = Path(pkg_dir)
    pkg = open_package(pkg_dir)
    if method not in METHODS:
        raise EdgeInferError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    search = search or ("evolutionary" if method == "rsparse" else "uniform")
    if search not in SEARCHES:
        raise EdgeInferError(f"--search must be one of {', '.join(SEARCHES)}, not {search!r}")
    if not levels:
        raise EdgeInferError("give at least one level: --sparsity 0.5")
    for lv in levels:
        if not 0.0 < lv < S_MAX:
            raise EdgeInferError(f"a sparsity level must be above 0 and below {S_MAX}, not {lv}")
    if len({level_key(x) for x in levels}) != len(levels):
        raise EdgeInferError("the sparsity levels repeat (they are kept to two decimals)")
    if calib_generate < 1:
        raise EdgeInferError(f"--calib-generate must be a positive number of tokens, not {calib_generate}")
    settings = settings or SearchSettings()
    if settings.fitness not in FITNESS:
        raise EdgeInferError(f"--fitness must be one of {', '.join(FITNESS)}, not {settings.fitness!r}")
    if settings.population < 2 or settings.generations < 1 or settings.fitness_windows < 1:
        raise EdgeInferError("--population must be at least 2, --generations and --fitness-windows at least 1")
    settings.elites = min(settings.elites, settings.population - 1)
    weights_sha = pkg.manifest["files"].get(WEIGHTS, {}).get("sha256")
    if not weights_sha:
        raise EdgeInferError(f"{pkg_dir}'s manifest has no SHA-256 for {WEIGHTS}")

    # Calibration text first: a file that is too short fails before any model is loaded.
    if calib_file:
        text, source, extra = read_text(calib_file), Path(calib_file).name, {}
    else:
        text, source, extra = None, "generated", {}
    model = load(pkg_dir, backend="mlx")
    if text is not None:
        make_calibration(model, text, source)
    else:
        text, extra = generate_calibration(pkg_dir, calib_generate, seed, progress)
    cal = make_calibration(model, text, source, extra)

    spec = pkg.spec
    shapes = projection_shapes(spec)
    lo = min(levels)
    # The largest rank any candidate can ask for: the smallest sparsity the search may give a layer, rho at
    # its floor (the evolutionary search clips s to [0, S_MAX]; others use the level itself).
    s_floor = 0.0 if search == "evolutionary" else lo
    r_max = {p: (0 if method == "teal" else budget(s_floor, RHO_MIN, m, n)[1]) for p, (m, n) in shapes.items()}
    stats = collect_stats(model, cal, r_max, keep_weights=search == "greedy", progress=progress)
    split = GreedySplit(spec, stats, progress=progress) if search == "greedy" else None

    step = max(1, len(cal.fit) // settings.fitness_windows)
    fwins = cal.fit[::step][: settings.fitness_windows]
    out = []
    ppl_fit = Fitness(model, stats, fwins, 0.0, kind="ppl")
    dense_ppl = ppl_fit.plan(None)
    dense_lp = dense_logprobs(model, fwins) if settings.fitness == "kl" else None
    sens = None  # per-layer sensitivity, measured at the first level the evolutionary search runs
    for lv in levels:
        fit = Fitness(model, stats, fwins, lv, kind=settings.fitness, dense=dense_lp)
        if search == "uniform":
            alloc, detail = search_uniform(spec, fit, lv, method, progress)
        elif search == "greedy":
            alloc, detail = split.allocation(np.full(spec.num_layers, lv), np.ones(spec.num_layers)), {}
            if method == "rsparse":  # TEAL's allocation of s, then the best shared rho on the calibration windows
                scores = {rho: fit({k: (v[0], rho) for k, v in alloc.items()}) for rho in RHO_GRID}
                best = min(scores, key=scores.get)
                alloc = {k: (v[0], best) for k, v in alloc.items()}
                detail = {f"rho_{fit.kind}": {str(k): v for k, v in scores.items()}}
        else:
            if sens is None:
                sens = layer_sensitivity(spec, fit, lv, progress)
            alloc, detail = search_evolutionary(spec, fit, lv, method, settings, seed, progress, sens)
            detail["layer_sensitivity"] = [round(float(x), 6) for x in sens]
        plan = build_plan(stats, alloc, lv)
        recalibrate(model, plan, cal.fit, progress)
        score = fit.plan(plan)
        calib_ppl = ppl_fit.plan(plan)
        realized = realized_sparsity(model, plan, cal.held)
        entry = {
            "file": plan_file_name(lv),
            "sha256": None,  # set when the file is written
            "method": method,
            "search": search,
            "package_sha256": weights_sha,
            "calib": cal.record(),
            "seed": seed,
            "command": command,
            "realized": round(realized, 4),
            "fitness": {"kind": fit.kind, "value": round(score, 6), "windows": len(fwins), "dense_ppl": round(dense_ppl, 4), "ppl": round(calib_ppl, 4),
                        "evaluations": fit.evaluations, **detail},
            "modules": {nm: {"s": round(mp.s, 4), "rho": round(mp.rho, 4), "k": mp.k, "r": mp.r} for nm, mp in plan.modules.items()},
        }
        if search == "evolutionary":
            entry["fitness"].update(population=settings.population, generations=settings.generations, elites=settings.elites)
        plan.info = entry
        out.append((plan, entry))
        if progress:
            print(f"sparsity {level_key(lv)} ({method}, {search}): calibration ppl {calib_ppl:.3f} (dense {dense_ppl:.3f}), "
                  f"realized {realized:.3f} on held-out text", file=sys.stderr)
    del model
    write_plans(pkg_dir, out)
    try:
        from edgeinfer.sparse.layout import write_fast_layout
    except ImportError:
        print("edgeinfer: the fast decode layout is not available in this build; plans written without it", file=sys.stderr)
    else:
        write_fast_layout(pkg_dir, progress=progress)
    return {level_key(p.level): e for p, e in out}
