"""``edgeinfer bench``: prefill and decode speed of a package, like llama-bench.

For each backend: load the model, warm up (one prefill of -p tokens and a short decode, not counted),
then -r repetitions of
  ppP  P random token ids (seeded; no tokenizer) through an empty cache: P / (time to the first token);
  tgN  N decode steps after a 16-token prompt, EOS ignored: N / (decode time).
Both go through ``Model.stream_ids``, the path generation takes (greedy sampling included, as in a
real answer). Reported: mean and standard deviation of tokens/s over the repetitions, TTFT of the
P-token prompt, the process's peak resident memory from loading to the end, and the share of the
memory-bandwidth roofline that decode reaches: (weight bytes read per token x tg tokens/s) / the read
bandwidth measured in the same run (``edgeinfer.sysinfo``).
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeinfer import sysinfo
from edgeinfer.errors import EdgeInferError

TG_PROMPT = 16  # tokens before the decode steps of a tg test


@dataclass
class BenchConfig:
    model: Path
    backends: list[str] = field(default_factory=lambda: ["auto"])
    prompt_tokens: int = 512
    gen_tokens: int = 128
    reps: int = 5
    threads: int | None = None
    seed: int = 0
    warmup: bool = True
    bandwidth: bool = True
    memory: dict = field(default_factory=dict)  # memory_budget / context / kv_overflow for the planner
    sparsity: float = 0.0  # an R-Sparse level the package holds a plan for (0: dense)
    speculative: dict = field(default_factory=dict)  # draft / num_draft / tree (edgeinfer.speculative)


def _check(c: BenchConfig) -> None:
    if c.prompt_tokens < 1:
        raise EdgeInferError(f"-p must be at least 1 token (got {c.prompt_tokens})")
    if c.gen_tokens < 1:
        raise EdgeInferError(f"-n must be at least 1 token (got {c.gen_tokens})")
    if c.reps < 1:
        raise EdgeInferError(f"-r must be at least 1 repetition (got {c.reps})")
    if c.threads is not None and c.threads < 1:
        raise EdgeInferError(f"--threads must be at least 1 (got {c.threads})")
    if not c.backends or any(not b for b in c.backends):
        raise EdgeInferError("--backend needs a backend name (mlx, onnx, auto), or several separated by commas")


# -- peak memory -----------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Resets the process's resident-set high-water mark (Linux: /proc/self/clear_refs); False where
    that is not possible (the peak then counts from the process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    m = re.search(r"VmHWM:\s+(\d+)\s+kB", sysinfo._read("/proc/self/status"))
    if m:
        return int(m.group(1)) * 1024
    from edgeinfer.model import peak_rss_bytes

    return peak_rss_bytes()


# -- threads -------------------------------------------------------------------------------------------


def _openblas_threads(n: int) -> bool:
    """Sets the thread count of the OpenBLAS edgeinfer loaded for MLX (its float matmuls)."""
    import ctypes

    from edgeinfer import _blas

    if not _blas.loaded:
        return False
    try:
        ctypes.CDLL(_blas.loaded).openblas_set_num_threads(int(n))
        return True
    except (OSError, AttributeError):
        return False


def load_model(path: Path, backend: str, threads: int | None, memory: dict | None = None):
    """Loads the package on ``backend``, passing ``threads`` to backends that take a thread count.
    Returns (model, backend name, threads used or None, a note on threads)."""
    import edgeinfer

    opts = dict(memory or {}, **({} if threads is None else {"threads": threads}))
    try:
        m = edgeinfer.load(path, backend=backend, **opts)
        note = "" if threads is None else "passed to the backend"
    except TypeError as e:
        if "threads" not in str(e):
            raise
        m = edgeinfer.load(path, backend=backend, **(memory or {}))
        note = "the backend takes no thread count"
    name = getattr(m.backend, "backend", None) or backend
    if name == "mlx" and threads is not None:
        ok = _openblas_threads(threads)
        note = ("MLX's own CPU kernels take no thread count; OpenBLAS (its float matmuls) set to "
                f"{threads}" if ok else "MLX takes no thread count")
    used = getattr(m.backend, "threads", None) or threads
    return m, name, used, note


# -- measuring -------------------------------------------------------------------------------------------


def random_ids(rng, n: int, vocab: int) -> list[int]:
    return [int(x) for x in rng.integers(0, vocab, size=n)]


def _run(model, ids: list[int], max_tokens: int):
    from edgeinfer.model import GenerationConfig

    model.reset()
    cfg = GenerationConfig(max_tokens=max_tokens, ignore_eos=True)
    got = sum(1 for _ in model.stream_ids(ids, cfg))
    if got != max_tokens:
        raise EdgeInferError(f"the model stopped after {got} of {max_tokens} tokens ({model.stats.finish_reason})")
    return model.stats


def measure_pp(model, ids: list[int]) -> tuple[float, float]:
    """(tokens/s, TTFT seconds) of a prefill of ``ids`` from an empty cache."""
    st = _run(model, ids, 1)
    return len(ids) / st.prefill_seconds, st.ttft


def measure_tg(model, prompt: list[int], n: int) -> float:
    """tokens/s of ``n`` decode steps after ``prompt``."""
    st = _run(model, prompt, n + 1)
    return n / st.decode_seconds


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def bench_backend(c: BenchConfig, backend: str, progress=None) -> dict:
    import numpy as np

    gc.collect()
    exact_peak = reset_peak_rss()
    t0 = time.perf_counter()
    model, name, threads, note = load_model(c.model, backend, c.threads, dict(c.memory, sparsity=c.sparsity) if c.sparsity else c.memory)
    load_s = time.perf_counter() - t0
    if c.speculative.get("draft"):
        from edgeinfer.speculative import make_speculator

        model.speculative = make_speculator(model, **c.speculative)
    vocab = model.spec.vocab_size
    room = model.cache.max_tokens
    if c.prompt_tokens + 1 > room or TG_PROMPT + c.gen_tokens + 1 > room:
        raise EdgeInferError(f"-p {c.prompt_tokens} / -n {c.gen_tokens} do not fit this model's context of {room} tokens")
    rng = np.random.default_rng(c.seed)
    if c.warmup:
        measure_pp(model, random_ids(rng, c.prompt_tokens, vocab))
        measure_tg(model, random_ids(rng, TG_PROMPT, vocab), min(c.gen_tokens, 16))
    pp, ttft, tg = [], [], []
    for r in range(c.reps):
        tps, t = measure_pp(model, random_ids(rng, c.prompt_tokens, vocab))
        pp.append(tps)
        ttft.append(t)
        tg.append(measure_tg(model, random_ids(rng, TG_PROMPT, vocab), c.gen_tokens))
        if progress:
            progress(f"{name} rep {r + 1}/{c.reps}: pp{c.prompt_tokens} {pp[-1]:.1f} t/s, tg{c.gen_tokens} {tg[-1]:.1f} t/s")
    peak = peak_rss()
    out = {
        "backend": name,
        "requested_backend": backend,
        "threads": threads,
        "threads_note": note,
        "load_seconds": load_s,
        "tests": [
            {"test": f"pp{c.prompt_tokens}", "kind": "pp", "tokens": c.prompt_tokens, **_stats(pp)},
            {"test": f"tg{c.gen_tokens}", "kind": "tg", "tokens": c.gen_tokens, "prompt_tokens": TG_PROMPT, **_stats(tg)},
        ],
        "ttft_s": {"mean": mean_sd(ttft)[0], "sd": mean_sd(ttft)[1], "samples": ttft, "prompt_tokens": c.prompt_tokens},
        "peak_memory_bytes": peak,
        "peak_memory_note": "peak resident set of the process from loading the model to the end of its runs"
        if exact_peak else "peak resident set of the process since it started",
    }
    if model.speculative is not None:  # the last tg run's drafting on these random ids
        out["speculative"] = {"draft": model.speculative.describe(), **model.speculative.stats.to_dict()}
    if getattr(model.backend, "dequantized", False):
        out["weights_note"] = "this backend holds the weights dequantized to float; it reads more bytes per token than the package stores"
    del model
    gc.collect()
    return out


def _stats(xs: list[float]) -> dict:
    m, sd = mean_sd(xs)
    return {"tps_mean": m, "tps_sd": sd, "samples": xs}


def params_count(pkg) -> int:
    """Parameters of the package's weights (packed quantized tensors unpacked; scales/biases not counted)."""
    sizes = sysinfo.safetensors_sizes(pkg.weights_path)
    q = pkg.quantization
    per = q.get("tensors", {})
    n = 0
    for name, (shape, _) in sizes.items():
        if name.endswith((".scales", ".biases")):
            continue
        count = 1
        for d in shape:
            count *= d
        base = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{base}.scales" in sizes:
            count = count * 32 // int(per.get(base, q).get("bits", 32))
        n += count
    return n


def run_bench(c: BenchConfig, progress=None) -> dict:
    from edgeinfer.package import open_package

    _check(c)
    pkg = open_package(c.model)
    bpt = sysinfo.decode_bytes_per_token(pkg, c.memory.get("moe_top_k"))
    results = [bench_backend(c, b, progress) for b in c.backends]
    bw = None
    if c.bandwidth:  # in a child process, after the runs: its buffer never counts in their peak memory
        bw = sysinfo.measure_read_bandwidth_subprocess(c.threads or os.cpu_count() or 1)
    nat = sysinfo.native_decode_bytes_per_token(pkg) if "onnx" in c.backends and not c.sparsity else None
    for r in results:
        tg = next(t for t in r["tests"] if t["kind"] == "tg")
        if bw:
            read = nat["bytes"] if nat and r.get("backend") == "onnx" else bpt["bytes"]
            r["roofline_share"] = read * tg["tps_mean"] / bw["bytes_per_s"]
    q = pkg.quantization
    return {
        "model": {"name": pkg.name, "path": str(pkg.path), "arch": pkg.spec.arch,
                  "params": params_count(pkg), "weights_bytes": pkg.weights_path.stat().st_size,
                  "quantization": f"{q.get('bits', 16)}-bit" + (f" g{q['group_size']}" if q.get("group_size") else "")},
        "config": {"prompt_tokens": c.prompt_tokens, "gen_tokens": c.gen_tokens, "reps": c.reps, "threads": c.threads,
                   "seed": c.seed, "tg_prompt_tokens": TG_PROMPT, "warmup": c.warmup, "sparsity": c.sparsity,
                   "measured": "Model.stream_ids on random token ids (tokenization excluded), greedy, EOS ignored; "
                               "one warm-up of each test first, not counted"},
        "bytes_per_token": bpt,
        "bandwidth": bw,
        "machine": sysinfo.machine(),
        "results": results,
    }


# -- output ------------------------------------------------------------------------------------------------


def _size(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def format_table(r: dict) -> str:
    m = r["model"]
    rows = [("model", "size", "params", "backend", "threads", "test", "t/s")]
    for res in r["results"]:
        for t in res["tests"]:
            rows.append((f"{m['name']} {m['quantization']}", _size(m["weights_bytes"]), f"{m['params'] / 1e6:.2f} M",
                         res["backend"], str(res["threads"] or "default"), t["test"],
                         f"{t['tps_mean']:.2f} ± {t['tps_sd']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 2, 4, 5, 6}

    def line(row):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    out = [line(rows[0]), sep] + [line(row) for row in rows[1:]]
    out.append("")
    bpt, bw = r["bytes_per_token"], r["bandwidth"]
    for res in r["results"]:
        t = res["ttft_s"]
        s = (f"{res['backend']}: TTFT ({t['prompt_tokens']} tokens) {t['mean'] * 1000:.1f} ± {t['sd'] * 1000:.1f} ms, "
             f"peak memory {res['peak_memory_bytes'] / 2**20:.0f} MiB, load {res['load_seconds']:.2f} s")
        if "roofline_share" in res:
            s += f", decode at {100 * res['roofline_share']:.1f}% of the bandwidth roofline"
        out.append(s)
        if res.get("threads_note"):
            out.append(f"    threads: {res['threads_note']}")
        if res.get("weights_note"):
            out.append(f"    note: {res['weights_note']}")
        if res.get("speculative"):
            sp = res["speculative"]
            out.append(f"    speculative ({sp['draft']}): {sp['acceptance_length']:.2f} tokens per verification, "
                       f"{sp['accepted']}/{sp['drafted']} drafts accepted (random token ids: drafts rarely match)")
    if bw:
        out.append(f"memory read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['method']}); "
                   f"{bpt['bytes'] / 2**20:.1f} MiB read per decoded token ({bpt['basis']})")
    out.append(f"machine: {sysinfo.describe(r['machine'])}")
    return "\n".join(out)


def main_bench(a) -> int:
    """The CLI entry: ``a`` has model, p, n, r, backend, threads, seed, json, no_warmup."""
    import json

    from edgeinfer.apps.resolve import resolve_package

    backends = [b.strip() for b in (a.backend or "auto").split(",")]
    c = BenchConfig(model=Path(a.model) if a.model else None, backends=backends, prompt_tokens=a.p, gen_tokens=a.n,
                    reps=a.r, threads=a.threads, seed=a.seed, warmup=not a.no_warmup,
                    memory=dict(memory_budget=a.memory_budget, context=a.context, kv_overflow=a.kv_overflow,
                                **({} if a.moe_top_k is None else {"moe_top_k": a.moe_top_k})),
                    sparsity=getattr(a, "sparsity", 0.0),
                    speculative=dict(draft=a.draft, num_draft=a.num_draft, tree=a.tree))
    if a.expert_budget is not None or a.expert_mass is not None:  # MoE-Spec caps verification passes only
        from edgeinfer.moe import ExpertBudget

        c.speculative["expert_budget"] = ExpertBudget(budget=a.expert_budget, mass=a.expert_mass, policy=a.budget_policy)
    _check(c)  # before fetching anything
    from edgeinfer.speculative import check_options

    check_options(a.draft, a.num_draft, a.tree)
    c.model = resolve_package(a.model)
    if a.draft not in (None, "ngram"):
        c.speculative["draft"] = str(resolve_package(a.draft))
    progress = None if a.json else (lambda s: print(s, file=sys.stderr, flush=True))
    r = run_bench(c, progress=progress)
    print(json.dumps(r, indent=1) if a.json else format_table(r))
    return 0
