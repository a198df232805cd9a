"""The memory planner (edgeinfer/memory.py): the estimate against measured peaks, refusals, a smaller
window when only that fits, the ring KV cache for sliding-window layers and at the plan's limit, and
layers streamed from disk.

Every test names its backend: ``edgeinfer.load`` and the CLI pick ONNX Runtime on Linux when a package
has a graph (converted packages do), while most of what is tested here (the ring KV cache, rollback,
quantized or dequantized weights, MLX's peak-memory counter, streamed layers) is MLX's.

SmolLM2 runs are kept short: float prefill runs at ~0.01 s a token here (with OpenBLAS loaded before MLX,
as benchmarks/memory_measure.py now does), quantized prefill at ~0.1 s a token."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cli_env
from edgeinfer.errors import EdgeInferError
from edgeinfer.memory import MiB, kv_cache_bytes, parse_budget, plan_memory, weight_parts
from edgeinfer.model import GenerationConfig
from edgeinfer.package import open_package



@pytest.fixture(scope="module")
def smol(smollm2_package):
    """SmolLM2, converted from its GGUF by the session fixture (a clean checkout has no models/)."""
    return smollm2_package


def measure(pkg, backend: str, *args) -> dict:
    """Loads and generates on ``backend`` in a fresh process (peak RSS is per process); returns the JSON
    it prints."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_measure.py"), str(pkg), "--backend", backend,
                          *map(str, args)], capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["backend"] == backend
    return d


def test_parse_budget():
    assert parse_budget("1.5GB") == 1_500_000_000
    assert parse_budget("800MiB") == 800 * MiB
    assert parse_budget("50%", total=1000) == 500
    assert parse_budget(1234) == 1234
    with pytest.raises(EdgeInferError, match="memory budget"):
        parse_budget("lots")


def test_kv_bytes_per_token_and_weight_bytes(tiny_package):
    pkg = open_package(tiny_package("gemma3", 4, 32))
    s = pkg.spec
    assert s.kv_bytes_per_token(2) == 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2
    total, caps = kv_cache_bytes(s, 200, 4)
    # two sliding layers (window 8) hold a ring of window + slack; the full layer holds all 200
    assert caps == [min(200, 8 + 64), 200, min(200, 8 + 64)]
    assert total == 2 * s.num_kv_heads * s.head_dim * 4 * sum(caps)
    parts = weight_parts(pkg, "float32")
    assert sum(p.stored for p in parts) == pkg.weights_path.stat().st_size - 8 - _header_len(pkg.weights_path)
    m = __import__("edgeinfer").load(pkg.path, backend="mlx", dequantize=False)
    assert m.backend.nbytes == sum(p.quantized for p in parts)
    m = __import__("edgeinfer").load(pkg.path, backend="mlx", dequantize=True)
    assert m.backend.nbytes == sum(p.dequantized for p in parts)


def _header_len(path) -> int:
    import struct

    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_estimate_within_10_percent_tiny(arch, tiny_package):
    d = measure(tiny_package(arch, 4, 32), "mlx", "--context", 256)
    # A tiny model's peak is nearly all the runtime's own memory (60-75 MB), which grows by 2 MiB after the
    # load standalone and once grew 7.4 MiB in a full-suite run; the 10% promise on a real model's weights
    # and cache is checked on SmolLM2 below.
    assert abs(d["estimate"] - d["peak_rss"]) <= max(0.10 * d["peak_rss"], 10 * MiB), d
    assert d["peak_rss"] <= d["budget"]


# Float weights: the 512-token context filled by one prefill chunk (~4 s). Quantized weights: MLX's
# quantized prefill is slow on the CPU (~0.1 s a token), so one 64-token chunk, planned as such
# (--prefill-chunk), into a 256-token context (the KV cache is allocated for all 256 either way).
@pytest.mark.parametrize("budget,context,deq,extra", [
    ("1GB", 512, True, ()),
    ("400MB", 256, False, ("--prompt-tokens", 64, "--prefill-chunk", 64, "--max-tokens", 4)),
], ids=["float-1GB-512", "quantized-400MB-256"])
def test_estimate_within_10_percent_smollm2(budget, context, deq, extra, smol):
    """SmolLM2 on MLX: float weights when they fit, quantized ones when not."""
    d = measure(smol, "mlx", "--budget", budget, "--context", context, *extra)
    assert d["dequantize"] is deq and d["context"] == context, d
    assert d["prompt_tokens"] + d["generated"] >= (context - 1 if not extra else 64), d
    assert abs(d["estimate"] - d["peak_rss"]) <= 0.10 * d["peak_rss"], d
    assert abs(d["estimate_mlx"] - d["peak_mlx"]) <= 0.10 * d["peak_mlx"], d
    assert d["peak_rss"] <= d["budget"]


def test_estimate_within_10_percent_smollm2_onnx(smol):
    """SmolLM2 on ONNX Runtime (the default backend on Linux): prompts and decode run on the native step,
    so the process holds its copy of the linears (made a few MiB of file pages at a time, each part's pages
    dropped once copied), the KV cache and the step's buffers; neither onnxruntime nor onnx is imported, and
    ORT's session is opened only for token trees (measured: estimate 184 MB, peak 173 MB; 213 MB with
    onnxruntime imported and the head's file pages held whole while it was copied, 473 MB with the graph)."""
    d = measure(smol, "onnx", "--budget", "4GB", "--context", 256)
    assert d["backend"] == "onnx" and d["context"] == 256, d
    assert abs(d["estimate"] - d["peak_rss"]) <= 0.10 * d["peak_rss"], d
    assert d["peak_rss"] <= d["estimate"]


def test_estimate_with_the_graph_opened_at_load(smol, monkeypatch):
    """EDGEINFER_NATIVE_PREFILL=off: the graph prefills, so ORT's weights and the exact graph's fp32 copy of
    its largest matrix count too (measured: estimate 522 MB, peak 471 MB). That last term is an upper bound:
    MLAS dequantized Gemma 3's whole 640 MiB head per call, but only about half of SmolLM2's 8-bit one."""
    monkeypatch.setenv("EDGEINFER_NATIVE_PREFILL", "off")
    d = measure(smol, "onnx", "--budget", "4GB", "--context", 256)
    assert abs(d["estimate"] - d["peak_rss"]) <= 0.15 * d["peak_rss"], d
    assert d["peak_rss"] <= d["estimate"]


def test_budget_too_small_is_refused(tmp_path, smol):
    pkg = open_package(smol)
    for backend in ("mlx", "onnx"):
        plan = plan_memory(pkg, "20MB", backend=backend)
        assert not plan.fits and plan.backend == backend
        assert plan.min_budget_bytes > 20_000_000
        assert "smallest budget that works" in plan.refusal()
        # the named budget does fit
        base = next(t.bytes for t in plan.terms if t.name == "process")
        again = plan_memory(pkg, plan.min_budget_bytes + 2 * MiB, backend=backend, baseline=base)
        assert again.fits and again.total_bytes <= again.budget_bytes
    with pytest.raises(EdgeInferError, match="smallest budget that works"):
        __import__("edgeinfer").load(smol, backend="mlx", memory_budget="20MB")
    out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "plan", "-m", str(smol), "--backend", "mlx", "--memory-budget", "20MB"],
                         capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "smallest budget that works" in out.stderr


def test_plan_refusal_is_said_once_and_names_its_configuration(smol):
    """`plan` said its does-not-fit sentence on stdout and stderr, and named "quantized weights, fp16 KV cache,
    every layer read from disk" whatever the configuration (ONNX: fp32 KV, every weight in memory)."""
    configs = {"mlx": "with quantized weights, a float16 KV cache, 256 tokens of context and every layer read from disk "
                      "at each step (MLX)",
               "onnx": "with the ONNX graph's weights all in memory, a float32 KV cache and 256 tokens of context (ONNX Runtime)"}
    for backend, config in configs.items():
        out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "plan", "-m", str(smol), "--backend", backend,
                              "--memory-budget", "20MB"], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
        assert out.returncode == 2
        err = out.stderr
        assert err.count("\n") == 1 and err.startswith("edgeinfer: ") and err.rstrip().endswith(config), err
        assert "does not fit in" not in out.stdout and "smallest budget" not in out.stdout
        assert out.stdout.startswith(f"memory plan for {smol} on {backend} (the smallest configuration; it does not fit)")
        # the smallest budget is the total of the plan shown
        total = next(ln.split()[1:3] for ln in out.stdout.splitlines() if ln.strip().startswith("total "))
        assert f"the smallest budget that works is {' '.join(total)} (" in err
    pkg = open_package(smol)
    for backend in configs:
        p = plan_memory(pkg, "20MB", backend=backend)
        assert not p.fits and p.min_budget_bytes == p.total_bytes and p.to_dict()["min_budget_config"] in configs[backend]
        assert p.explain().endswith(p.refusal()) and p.refusal() not in p.explain(verdict=False)
    # options fixed by the caller are what the smallest budget is for
    p = plan_memory(pkg, "20MB", backend="mlx", kv_dtype="float32", resident_layers=30, dequantize=True)
    assert not p.fits and p.min_budget_bytes == p.total_bytes
    assert p.refusal().endswith("with weights dequantized to float32, a float32 KV cache, 256 tokens of context and "
                                "all 30 layers in memory (MLX)")
    p = plan_memory(pkg, "20MB", backend="mlx", context=1024, resident_layers=10)
    assert p.refusal().endswith("with quantized weights, a float16 KV cache, 1024 tokens of context and 10 of 30 layers "
                                "in memory, the others read from disk at each step (MLX)")


def test_plan_command_explains(tmp_path, smol):
    out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "plan", "-m", str(smol), "--backend", "mlx", "--memory-budget", "2GB",
                          "--context", "4096"], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for word in ("weights", "kv cache", "4096 tokens", "activations", "workspace", "dequantized", "R-Sparse", "fits:"):
        assert word in out.stdout, word


def test_smaller_window_when_only_that_fits(smol):
    """A budget that fits the float weights but not the full context's KV cache gets a shorter context,
    and the run that fills that context stays under the budget.

    The weights are fixed to float (--dequantize yes): left to itself the planner would rather keep them
    quantized at the full 8192 tokens, and which lever it takes then hinges on the process's own size
    (within ~70 MiB); filling a quantized context of thousands of tokens would take minutes. 720MB fits
    SmolLM2's float weights and 256-1024 tokens of float32 KV cache (process of 50-110 MiB), which one
    prefill of at most two 512-token chunks fills in a few seconds."""
    d = measure(smol, "mlx", "--budget", "720MB", "--dequantize", "yes", "--max-tokens", 2)
    assert d["dequantize"] is True and d["kv_dtype"] == "float32" and 256 <= d["context"] <= 1024, d
    assert d["context"] % 256 == 0  # the largest multiple of the KV step that fits
    assert d["prompt_tokens"] + d["generated"] >= d["context"] - 1
    assert d["estimate"] <= d["budget"] and d["peak_rss"] <= d["budget"], d
    assert abs(d["estimate"] - d["peak_rss"]) <= 0.10 * d["peak_rss"], d


def test_onnx_plan_shortens_the_context(smol):
    """The planner for ONNX Runtime (what ``--backend auto`` picks on Linux): float32 KV cache, no MLX
    levers, a shorter context when the full one does not fit, and a refusal when nothing does."""
    pkg = open_package(smol)
    full = plan_memory(pkg, "64GB", backend="onnx", baseline=80 * MiB)
    assert full.fits and full.context_tokens == 8192 and full.kv_dtype == "float32" and full.resident_layers == full.num_layers
    short = plan_memory(pkg, full.total_bytes - 100 * MiB, backend="onnx", baseline=80 * MiB)
    assert short.fits and 256 <= short.context_tokens < 8192 and short.total_bytes <= short.budget_bytes
    assert any("context" in c and "instead of 8192" in c for c in short.choices)
    assert short.backend_options() == {}


def test_context_limit_refuses_or_rotates(tiny_package):
    import edgeinfer

    pkg = tiny_package("llama", 32)
    m = edgeinfer.load(pkg, backend="mlx", context=64)
    assert m.plan.context_tokens == 64 and m.cache.max_tokens == 64
    with pytest.raises(EdgeInferError, match="memory plan"):
        list(m.stream_ids([5] * 70, GenerationConfig(max_tokens=4)))
    out = list(m.stream_ids([5] * 40, GenerationConfig(max_tokens=100, ignore_eos=True)))
    assert len(out) == 64 - 40 and m.stats.finish_reason == "context"
    r = edgeinfer.load(pkg, backend="mlx", context=64, kv_overflow="rotate")
    out = list(r.stream_ids([5] * 40, GenerationConfig(max_tokens=100, ignore_eos=True)))
    assert len(out) == 100 and r.cache.offset > 64
    assert all(k.shape[2] == 64 for k in r.cache.keys)  # never grew past the plan


def _ring_vs_full(m, ids, chunk):
    from edgeinfer.backends.mlx_backend import KVCache

    b = m.backend
    ref = np.array(b.forward(ids, KVCache(m.spec, b.kv_dtype, max_tokens=256, slack=1000))[0])
    cache = b.new_cache()
    rows = []
    for i in range(0, 150, chunk):
        rows.append(np.array(b.forward(ids[i : i + chunk], cache)[0]))
    for t in ids[150:]:
        rows.append(np.array(b.forward([t], cache)[0]))
    return np.concatenate(rows), ref, cache


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_layers_in_a_ring(arch, tiny_package):
    """Sliding-window layers keep a ring of window + slack; chunked prefill across the wrap and decode
    agree with a cache that holds everything."""
    import edgeinfer

    m = edgeinfer.load(tiny_package(arch, 32), backend="mlx")
    ids = [int(x) for x in np.random.default_rng(0).integers(0, 250, 200)]
    got, ref, cache = _ring_vs_full(m, ids, 50)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    ring = [k.shape[2] for k, g in zip(cache.keys, cache.group_of) if g == 1]
    assert ring and max(ring) == m.spec.sliding_window + 64 < 200


def test_chat_rollback_after_the_ring_wrapped(tiny_package):
    import edgeinfer

    m = edgeinfer.load(tiny_package("mistral", 32), backend="mlx")
    ids = [int(x) for x in np.random.default_rng(1).integers(0, 250, 150)]
    m._prefill(ids, 64)
    # back to 120: the ring (window 16 + 64 slack, positions 70..149) still holds the 15 it needs
    last, reused = m._prefill(ids[:120] + [7], 64)
    assert reused == 120
    np.testing.assert_allclose(np.array(last)[0], m.logits(ids[:120] + [7])[-1], atol=1e-4)
    # back to 60: those positions were overwritten, so the cache starts over
    last, reused = m._prefill(ids[:60] + [7], 64)
    assert reused == 0
    np.testing.assert_allclose(np.array(last)[0], m.logits(ids[:60] + [7])[-1], atol=1e-4)


def test_streamed_layers_match_resident(tiny_package):
    import edgeinfer

    pkg = tiny_package("qwen2", 4, 32)
    full = edgeinfer.load(pkg, backend="mlx", dequantize=False)
    part = edgeinfer.load(pkg, backend="mlx", dequantize=False, resident_layers=1)
    assert part.plan.resident_layers == 1 and part.backend.layers[1] is None
    ids = list(range(30, 70))
    np.testing.assert_allclose(part.logits(ids), full.logits(ids), rtol=0, atol=1e-4)
    before = part.backend.bytes_read
    a = full.generate("hello", max_tokens=6)
    b = part.generate("hello", max_tokens=6)
    assert a == b
    streamed = sum(p.stored for p in weight_parts(part.package, "float32") if p.name in ("layers.1", "layers.2"))
    assert part.backend.bytes_read - before >= 6 * streamed  # every step read both streamed layers
    assert part.plan.bytes_read_per_token == streamed


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_plan_on_every_model(backend, tiny_package):
    import edgeinfer

    m = edgeinfer.load(tiny_package("llama", 4, 32), backend=backend)
    assert m.backend_name == backend
    p = m.plan
    assert p.backend == backend
    assert p.budget_bytes > 0 and p.total_bytes <= p.budget_bytes and p.context_tokens == m.cache.max_tokens
    assert "memory plan" in p.explain()


TINY_MOE = ROOT / "models" / "tiny-moe-q4"


@pytest.mark.skipif(not (TINY_MOE / "model.safetensors").exists(), reason="models/tiny-moe-q4 is built by models/tiny-moe/assemble.py")
def test_estimate_within_10_percent_expert_cache():
    """The trained MoE under a budget between the all-resident estimate and a 3-expert cache's: the plan
    keeps only some experts per layer resident, and the run stays within the budget and 10% of the estimate."""
    pkg = open_package(TINY_MOE)
    d0 = measure(TINY_MOE, "mlx", "--budget", "4GB", "--context", 256, "--dequantize", "no")
    est = lambda **kw: plan_memory(pkg, "4GB", context=256, dequantize=False, baseline=0, **kw).total_bytes
    baseline = d0["estimate"] - est()  # the fresh process's own baseline, as its plan measured it
    budget = baseline + (est(expert_cache=3) + min(est(), est(kv_dtype="float16"))) // 2
    plan = plan_memory(pkg, budget, context=256, dequantize=False, baseline=baseline)
    assert plan.fits and 3 <= plan.expert_cache < 8, plan.explain()
    d = measure(TINY_MOE, "mlx", "--budget", budget, "--context", 256, "--dequantize", "no")
    assert d["estimate"] <= budget and abs(d["estimate"] - d["peak_rss"]) <= 0.10 * d["peak_rss"], d
    assert d["peak_rss"] <= d["budget"], d
