"""The MoE expert cache (edgeinfer/backends/expert_cache.py): only some experts per layer resident, the others
read from the memory-mapped package file when routed to; the memory planner's "experts cached" lever.

Exactness: every (token, expert) product is the same row computation whichever slot holds the expert, so
the cached forward must equal the all-resident one bit for bit (logits and greedy tokens)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cli_env
from edgeinfer.backends.expert_cache import SlotPolicy
from edgeinfer.errors import EdgeInferError
from edgeinfer.memory import MiB, plan_memory
from edgeinfer.model import GenerationConfig
from edgeinfer.moe import ExpertBudget
from edgeinfer.package import open_package
from test_moe import PROMPT, moe_checkpoints, moe_package  # noqa: F401  (fixtures: tiny random MoE packages)

TRAINED = ROOT / "models" / "tiny-moe-q4"
needs_trained = pytest.mark.skipif(not (TRAINED / "model.safetensors").exists(),
                                   reason="models/tiny-moe-q4 is built by models/tiny-moe/assemble.py, not in a clean checkout")


def _greedy(m, ids, n=32):
    m.reset()
    return list(m.stream_ids(list(ids), GenerationConfig(max_tokens=n, ignore_eos=True, speculative=False)))


def _check_exact(path, caps, ids, dequantize):
    import edgeinfer

    ref = edgeinfer.load(path, backend="mlx", dequantize=dequantize)
    assert ref.backend.expert_cache is None
    logits, tokens = ref.logits(ids), _greedy(ref, ids)
    for cap in caps:
        m = edgeinfer.load(path, backend="mlx", dequantize=dequantize, expert_cache=cap)
        st = m.backend.expert_cache_stats
        assert st["capacity"] == cap and st["resident_bytes"] > 0
        np.testing.assert_array_equal(m.logits(ids), logits, err_msg=f"capacity {cap}")
        assert _greedy(m, ids) == tokens, f"capacity {cap}"
        st = m.backend.expert_cache_stats
        assert st["misses"] > 0 and st["bytes_read"] == st["misses"] * st["expert_bytes"]
        # the prompt alone routes to more experts than the smallest caches hold: those ran in rounds
        assert st["max_touched"] > cap or cap >= 4


@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
def test_exact_random_moe(dequantize, moe_package):  # noqa: F811
    """A tiny random Qwen3-MoE (8 experts, top-2): cached at 2, 5 and 8 experts per layer."""
    _check_exact(moe_package("qwen3_moe", 4), [2, 5, 8], PROMPT, dequantize)


@needs_trained
def test_exact_trained_moe():
    """The trained model (8 layers x 8 experts, top-2, 4-bit) at 2, 4 and 6 experts per layer."""
    from edgeinfer.tokenizer import Tokenizer

    pkg = open_package(TRAINED)
    ids = Tokenizer(pkg.path, pkg.tokenizer_info).encode("def parse(text):\n    ")
    _check_exact(TRAINED, [2, 4, 6], ids, False)


def test_policy_hand_checked():
    """Two slots; the access sequence and what each policy must do, worked out by hand."""
    seq = [[0, 1], [0], [2], [1], [0, 3], [0]]
    lru = SlotPolicy(2, "lru")
    got = [[k for k, _ in lru.admit(s)] for s in seq]
    # [0,1] miss miss | 0 hit | 2 miss, evicts 1 (0 used later) | 1 miss, evicts 0 | 0,3 miss miss | 0 hit
    assert got == [[0, 1], [], [2], [1], [0, 3], []]
    assert (lru.hits, lru.misses) == (2, 6)
    lfu = SlotPolicy(2, "lfu")
    got = [[k for k, _ in lfu.admit(s)] for s in seq]
    # 0 is used twice by step 2: LFU keeps it; 2 then 1 each evict the other (each used once, older goes)
    # [0,3]: 0 hit, 3 evicts 1 | 0 hit
    assert got == [[0, 1], [], [2], [1], [3], []]
    assert (lfu.hits, lfu.misses) == (3, 5)
    # slots are reused, never more than the capacity
    assert sorted(lfu.slot.values()) == [0, 1]
    with pytest.raises(EdgeInferError, match="policy"):
        SlotPolicy(2, "fifo")


def test_counters_follow_routing(moe_package):  # noqa: F811
    """The counters against the routing the cache saw, replayed by hand: with 2 slots and one token at a
    time (top-2: both slots needed every step), a layer hits exactly the experts the previous token of
    that layer also used, and misses the others."""
    import edgeinfer

    m = edgeinfer.load(moe_package("qwen3_moe", 4), backend="mlx", dequantize=False, expert_cache=2)
    b = m.backend
    ec = b.expert_cache
    seen: dict[int, list[set]] = {}
    run = ec.run

    def spy(block, i, x, idx):
        seen.setdefault(i, []).append({int(e) for e in np.array(idx).ravel()})
        return run(block, i, x, idx)

    ec.run = spy
    cache = b.new_cache(64)
    for tok in PROMPT[:12]:
        b.forward([tok], cache)
    hits = misses = 0
    for steps in seen.values():
        prev: set = set()
        for now in steps:
            hits, misses, prev = hits + len(now & prev), misses + len(now - prev), now
    st = b.expert_cache_stats
    assert len(seen) == m.spec.num_layers and all(len(v) == 12 for v in seen.values())
    assert (st["hits"], st["misses"]) == (hits, misses) and 0 < hits and misses < 12 * 2 * len(seen)
    assert st["tokens"] == 12 and st["max_touched"] == 2 and st["bytes_read"] == misses * st["expert_bytes"]


def test_budget_bounds_touched_experts(moe_package):  # noqa: F811
    """An expert budget of B caps the distinct experts a forward touches per layer, and so its misses."""
    import edgeinfer

    m = edgeinfer.load(moe_package("qwen3_moe", 4), backend="mlx", dequantize=False, expert_cache=3)
    b = m.backend
    b.forward(PROMPT, b.new_cache(64), expert_budget=ExpertBudget(budget=3))
    st = b.expert_cache_stats
    assert st["max_touched"] <= 3 and st["max_misses"] <= 3
    b.forward(PROMPT, b.new_cache(64))
    assert b.expert_cache_stats["max_touched"] > 3  # unbudgeted, the prompt touches more


def test_bad_capacity(moe_package):  # noqa: F811
    import edgeinfer

    path = moe_package("qwen3_moe", 4)
    for cap in (1, 9):
        with pytest.raises(EdgeInferError, match="between 2 .top-k. and 8 experts"):
            edgeinfer.load(path, backend="mlx", expert_cache=cap)
    with pytest.raises(EdgeInferError, match="expert cache needs the MLX backend"):
        edgeinfer.load(path, backend="onnx", expert_cache=4)


@needs_trained
def test_plan_chooses_cache_and_refuses_too_small():
    pkg = open_package(TRAINED)
    base = 70 * MiB
    full = plan_memory(pkg, "4GB", context=256, dequantize=False, baseline=base)
    assert full.expert_cache == 0 and "all resident" in full.experts_note
    two = plan_memory(pkg, "4GB", context=256, dequantize=False, baseline=base, expert_cache=2)
    low = plan_memory(pkg, "4GB", context=256, dequantize=False, baseline=base, kv_dtype="float16")
    budget = (two.total_bytes + min(full.total_bytes, low.total_bytes)) // 2
    p = plan_memory(pkg, budget, context=256, dequantize=False, baseline=base)
    assert p.fits and 2 <= p.expert_cache < 8 and p.resident_layers == 8, p.explain()
    assert any("experts per MoE layer resident" in c for c in p.choices) and "resident in a cache" in p.experts_note
    assert p.backend_options()["expert_cache"] == p.expert_cache
    # ONNX Runtime holds every expert: no cache there, and its refusal says where the cache is
    o = plan_memory(pkg, budget, context=256, backend="onnx", baseline=base)
    assert not o.fits and o.expert_cache == 0 and "--backend mlx" in o.refusal()
    # a budget too small for anything, even top-k experts per layer and every layer streamed: exit 2, one line
    out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "plan", "-m", str(TRAINED), "--backend", "mlx",
                          "--memory-budget", "20MB"], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "smallest budget that works" in out.stderr
    with pytest.raises(EdgeInferError, match="between 2 .top-k. and 8"):
        plan_memory(pkg, "4GB", expert_cache=1)
