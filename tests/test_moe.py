"""Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) on both backends, and expert budgets.

Parity: tiny random checkpoints built with transformers here, converted at 4 and 8 bits, against transformers
running the package's own dequantized weights (what is stored is what runs): logits within 1e-4 and 32 greedy
tokens identical, on MLX (dequantized experts through gather_mm, and quantized ones through gather_qmm) and ONNX
Runtime (the exact graph, accuracy level 1). Budgets: the routing against a numpy reference written here from
the definition in edgeinfer/moe.py, a hand-checked case, and the whole forward on both backends.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import BOS_TOKEN, EOS_ID, EOS_TOKEN, ROOT, _one_torch_thread, byte_level_tokenizer, cli_env, load_hf

from edgeinfer.errors import EdgeInferError
from edgeinfer.moe import ExpertBudget

PROMPT = list(b"The quick brown fox jumps over the lazy dog; 0123456789!"[:40])
ATOL = 1e-4

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=257,
               eos_token_id=EOS_ID, pad_token_id=None, num_experts_per_tok=2, tie_word_embeddings=False)
# Every input dimension a multiple of 64. Qwen2-MoE: a shared expert, and a dense layer (mlp_only_layers) between
# two MoE layers; Qwen3-MoE normalizes its top-k; OLMoE does not, and norms q/k over the whole projection.
MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=64, num_hidden_layers=3,
                                                                shared_expert_intermediate_size=128, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, moe_intermediate_size=64, head_dim=32,
                                                                norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, intermediate_size=64)),
}
MOE_ARCHS = list(MOE_CONFIGS)


def _build(arch: str, folder):
    import transformers

    _one_torch_thread()
    cls, model_cls, kw = MOE_CONFIGS[arch]
    model = getattr(transformers, model_cls)(getattr(transformers, cls)(**{**_COMMON, **kw})).eval()
    # Larger weights than transformers' default, so routing is decisive (no near-ties between experts)
    # and greedy decoding does not collapse onto one token.
    g = torch.Generator().manual_seed(MOE_ARCHS.index(arch))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            z = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * z if "norm" in name else (0.05 * z if "embed" in name or "lm_head" in name else 0.15 * z))
    model.save_pretrained(folder)
    byte_level_tokenizer(320).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKEN, "bos_token": BOS_TOKEN, "add_bos_token": False}))
    return folder


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-hf")
    return {a: _build(a, root / a) for a in MOE_ARCHS}


@pytest.fixture(scope="session")
def moe_package(moe_checkpoints, tmp_path_factory):
    from edgeinfer.converters.convert import convert

    root = tmp_path_factory.mktemp("moe-pkg")
    cache = {}

    def get(arch: str, bits: int):
        if (arch, bits) not in cache:
            cache[arch, bits] = convert(str(moe_checkpoints[arch]), root / f"{arch}-{bits}", bits=bits, progress=False,
                                        accuracy_level=1)
        return cache[arch, bits]

    return get


# -- package -> transformers checkpoint, written independently of converters/hf_import.py ---------------
def _package_tensor(t: dict, name: str) -> np.ndarray:
    from edgeinfer.converters.quantize import QuantizedTensor

    base = name[: -len(".weight")]
    if f"{base}.scales" not in t:
        return np.asarray(t[name], np.float32)
    w, s, b = t[name], t[f"{base}.scales"], t[f"{base}.biases"]
    bits = w.shape[-1] * 32 // (s.shape[-1] * 64)  # packed words per row, groups of 64 (the default)
    lead = w.shape[:-1]
    q = QuantizedTensor(w.reshape(-1, w.shape[-1]), s.reshape(-1, s.shape[-1]), b.reshape(-1, b.shape[-1]), bits, 64)
    return q.dequantize().reshape(*lead, -1)


def _hf_to_package(hf: str) -> tuple[str, int | None]:
    """(package tensor, expert index or None) holding a transformers checkpoint tensor."""
    import re

    m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight", hf)
    if m:
        proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}.get(m.group(3), m.group(3))
        return f"layers.{m.group(1)}.moe.experts.{proj}.weight", int(m.group(2))
    if hf == "model.embed_tokens.weight":
        return "embed.weight", None
    if hf in ("model.norm.weight", "lm_head.weight"):
        return hf.replace("model.", ""), None
    i, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf).groups()
    table = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm", "self_attn.": "attn.",
             "mlp.gate.": "moe.router.", "block_sparse_moe.gate.": "moe.router.", "mlp.shared_expert.": "moe.shared.",
             "mlp.shared_expert_gate.": "moe.shared_gate."}
    for a, b in table.items():
        if rest.startswith(a):
            return f"layers.{i}.{b}{rest[len(a):]}", None
    return f"layers.{i}.{rest}", None


@pytest.fixture(scope="session")
def reference(moe_checkpoints, moe_package, tmp_path_factory):
    """reference(arch, bits) -> transformers model running the package's dequantized weights."""
    from safetensors.numpy import load_file, save_file

    cache = {}

    def get(arch: str, bits: int):
        if (arch, bits) not in cache:
            src = moe_checkpoints[arch]
            dst = tmp_path_factory.mktemp(f"ref-{arch}-{bits}")
            pkg = load_file(str(moe_package(arch, bits) / "model.safetensors"))
            out = {}
            for hf, arr in load_file(str(src / "model.safetensors")).items():
                name, e = _hf_to_package(hf)
                t = _package_tensor(pkg, name)
                out[hf] = np.ascontiguousarray(t if e is None else t[e]).astype(np.float32)
                assert out[hf].shape == arr.shape, hf
            save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                (dst / f).write_bytes((src / f).read_bytes())
            cache[arch, bits] = load_hf(dst)
        return cache[arch, bits]

    return get


def _hf_greedy(model, ids, n=32):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def _edge_greedy(m, ids, n=32):
    from edgeinfer.model import GenerationConfig

    m.reset()
    return list(m.stream_ids(list(ids), GenerationConfig(max_tokens=n, ignore_eos=True)))


BACKENDS = [("mlx", {}), ("mlx", {"dequantize": False}), ("onnx", {})]


@pytest.fixture(scope="session")
def loaded(moe_package):
    import edgeinfer

    cache = {}

    def get(arch, bits, backend="mlx", **opts):
        key = (arch, bits, backend, tuple(sorted(opts.items())))
        if key not in cache:
            cache[key] = edgeinfer.load(moe_package(arch, bits), backend=backend, **opts)
        return cache[key]

    return get


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_parity_with_transformers(arch, bits, reference, loaded):
    ref = reference(arch, bits)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0].numpy()
    want_tokens = _hf_greedy(ref, PROMPT)
    assert len(set(want_tokens)) > 3  # the check means something: greedy text does not collapse
    for backend, opts in BACKENDS:
        m = loaded(arch, bits, backend, **opts)
        got = m.logits(PROMPT)
        assert np.abs(got - want).max() < ATOL, (backend, opts, np.abs(got - want).max())
        assert _edge_greedy(m, PROMPT) == want_tokens, (backend, opts)


def test_package_layout(moe_package):
    """Experts stacked [E, out, in] and quantized in MLX's layout; the router kept in float32."""
    from edgeinfer.converters.safetensors_io import SafetensorsFile
    from edgeinfer.package import open_package

    pkg = open_package(moe_package("qwen2_moe", 4))
    h = SafetensorsFile(pkg.weights_path).header
    assert h["layers.0.moe.experts.gate_proj.weight"]["shape"] == [4, 64, 64 * 4 // 32]
    assert h["layers.0.moe.experts.gate_proj.scales"]["shape"] == [4, 64, 1]
    assert h["layers.0.moe.experts.down_proj.weight"]["shape"] == [4, 64, 64 * 4 // 32]
    assert h["layers.0.moe.router.weight"]["dtype"] == "F32" and h["layers.0.moe.router.weight"]["shape"] == [4, 64]
    assert h["layers.0.moe.shared_gate.weight"]["dtype"] == "F32"
    assert "layers.0.moe.shared.gate_proj.scales" in h
    assert "layers.1.mlp.gate_proj.weight" in h and not any(k.startswith("layers.1.moe") for k in h)  # dense layer
    assert pkg.spec.num_experts == 4 and pkg.spec.shared_expert_size == 128 and pkg.spec.mlp_only_layers == [1]


def test_decode_bytes_count_the_experts_a_token_runs(moe_package):
    """bench's roofline: an MoE decode step reads top_k of each layer's stacked experts (or --moe-top-k)."""
    from edgeinfer.package import open_package
    from edgeinfer.sysinfo import decode_bytes_per_token, safetensors_sizes

    pkg = open_package(moe_package("qwen2_moe", 4))
    sizes = safetensors_sizes(pkg.weights_path)
    experts = sum(b for n, (_, b) in sizes.items() if ".moe.experts." in n)
    one = decode_bytes_per_token(pkg, 1)["bytes"]
    k = pkg.spec.num_experts_per_tok
    assert decode_bytes_per_token(pkg)["bytes"] - one == experts * k // pkg.spec.num_experts - experts // pkg.spec.num_experts
    assert decode_bytes_per_token(pkg, pkg.spec.num_experts)["bytes"] - one == experts - experts // pkg.spec.num_experts
    assert "of 4 experts per MoE layer" in decode_bytes_per_token(pkg)["basis"]


# -- expert budgets ------------------------------------------------------------------------------------
def reference_route(probs: np.ndarray, k: int, norm: bool, budget=None, mass=None, policy="substitute"):
    """Dense [T, E] expert weights of each token under a budget, from the definition (numpy, float64)."""
    T, E = probs.shape
    total = probs.sum(0)
    ranked = sorted(range(E), key=lambda e: -total[e])
    if mass is not None:
        n, acc = 0, 0.0
        while acc < mass * total.sum() and n < E:
            acc += total[ranked[n]]
            n += 1
        n = max(n, k)
    else:
        n = E if budget is None else budget
    kept = set(ranked[:n])
    out = np.zeros_like(probs)
    for t in range(T):
        own = sorted(range(E), key=lambda e: -probs[t, e])
        chosen = [e for e in own if e in kept][:k] if policy == "substitute" else [e for e in own[:k] if e in kept]
        w = probs[t, chosen]
        if norm and w.sum() > 0:
            w = w / w.sum()
        out[t, chosen] = w
    return out


def _dense(idx, w, E):
    idx, w = np.array(idx), np.array(w)
    out = np.zeros((idx.shape[0], E))
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), w)
    return out


def _block(loaded, arch):
    m = loaded(arch, 8)
    return m, next(ly.moe for ly in m.backend.layers if ly.moe is not None)


def _ctrl(m, budget):
    import mlx.core as mx

    from edgeinfer.moe import no_budget

    c = no_budget(m.spec) if budget is None else budget.controls(m.spec, m.spec.num_experts_per_tok)
    return mx.array(c, dtype=mx.float32)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])  # top-k renormalized, and not
def test_budget_routing_matches_reference(arch, loaded):
    import mlx.core as mx

    m, blk = _block(loaded, arch)
    E, k = m.spec.num_experts, m.spec.num_experts_per_tok
    x = mx.array(np.random.default_rng(0).standard_normal((12, 64)).astype(np.float32))
    probs = np.array(mx.softmax(x @ blk.router.T, axis=-1)).astype(np.float64)
    cases = [dict(budget=b, policy=p) for b in (k, k + 1, E) for p in ("substitute", "truncate")]
    cases += [dict(mass=f, policy=p) for f in (0.3, 0.7, 0.95) for p in ("substitute", "truncate")]
    distinct = set()
    for case in cases:
        idx, w, stats = blk.route(x, _ctrl(m, ExpertBudget(**case)), k)
        got = _dense(idx, w, E)
        want = reference_route(probs, k, m.spec.norm_topk_prob, **case)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(case))
        assert int(stats[1]) == int((want.sum(0) > 0).sum())  # distinct experts run
        distinct.add(int(stats[1]))
    assert len(distinct) > 1  # the budgets did bind


def test_budget_hand_checked(loaded):
    """3 tokens, 4 experts, top-2, probabilities chosen by hand (router logits = log p)."""
    import mlx.core as mx

    m, blk = _block(loaded, "qwen2_moe")  # no top-k renormalization
    p = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.45, 0.35, 0.1], [0.05, 0.1, 0.25, 0.6]])
    # summed: [0.65, 0.85, 0.7, 0.8] -> ranked 1, 3, 2, 0
    router = np.zeros((4, 64), np.float32)
    router[:, :3] = np.log(p).T
    saved, blk.router = blk.router, mx.array(router)
    try:
        x = mx.array(np.eye(64, dtype=np.float32)[:3])

        def run(**b):
            idx, w, st = blk.route(x, _ctrl(m, ExpertBudget(**b)), 2)
            return _dense(idx, w, 4), np.array(st)

        sub, st = run(budget=2)  # keeps {1, 3}
        np.testing.assert_allclose(sub, [[0, 0.3, 0, 0.1], [0, 0.45, 0, 0.1], [0, 0.1, 0, 0.6]], atol=1e-6)
        np.testing.assert_allclose(st, [4, 2, 1.65 / 2.45], atol=1e-6)
        trunc, st = run(budget=2, policy="truncate")
        np.testing.assert_allclose(trunc, [[0, 0.3, 0, 0], [0, 0.45, 0, 0], [0, 0, 0, 0.6]], atol=1e-6)
        np.testing.assert_allclose(st, [4, 2, 1.35 / 2.45], atol=1e-6)
        np.testing.assert_allclose(run(mass=0.5)[0], sub, atol=1e-6)  # 0.85 + 0.8 >= 1.5 of 3.0
        three, _ = run(mass=0.6)  # needs a third expert (2): token 1 gets its own top-2 back
        np.testing.assert_allclose(three[1], [0, 0.45, 0.35, 0], atol=1e-6)
        np.testing.assert_allclose(run(budget=4)[0], [[0.5, 0.3, 0, 0], [0, 0.45, 0.35, 0], [0, 0, 0.25, 0.6]], atol=1e-6)
    finally:
        blk.router = saved


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_budget_forward_both_backends(arch, loaded):
    """B = all experts is the unbudgeted model exactly; B = top_k changes it; the two backends agree under every
    budget, stats included; alternating budgets on one loaded model shows no stale mask in a compiled graph."""
    E, k = None, None
    results = {}
    for backend in ("mlx", "onnx"):
        m = loaded(arch, 4, backend)
        E, k = m.spec.num_experts, m.spec.num_experts_per_tok
        b = m.backend
        budgets = [None, ExpertBudget(budget=E), ExpertBudget(budget=k), ExpertBudget(budget=k, policy="truncate"),
                   ExpertBudget(mass=0.5), None, ExpertBudget(budget=k)]
        out = []
        for bud in budgets:
            logits = np.array(b.forward(PROMPT[:24], b.new_cache(64), expert_budget=bud))
            out.append((logits, [dict(s) for s in b.moe_stats]))
        results[backend] = out
        assert np.array_equal(out[0][0], out[1][0])  # every expert == no budget, exactly
        assert np.array_equal(out[0][0], out[5][0]) and np.array_equal(out[2][0], out[6][0])
        assert np.abs(out[2][0] - out[0][0]).max() > 1e-3  # the budget binds
        assert np.abs(out[3][0] - out[2][0]).max() > 1e-3  # and the policies differ
        for logits, stats in out[2:4]:
            assert all(s["kept"] <= k < s["requested"] for s in stats) and all(0 < s["mass_kept"] < 1 for s in stats)
        assert all(s["kept"] == s["requested"] and s["mass_kept"] == pytest.approx(1) for s in out[0][1])
    for (a, sa), (o, so) in zip(results["mlx"], results["onnx"]):
        assert np.abs(a - o).max() < ATOL
        assert [(s["requested"], s["kept"]) for s in sa] == [(s["requested"], s["kept"]) for s in so]
        assert [s["mass_kept"] for s in sa] == pytest.approx([s["mass_kept"] for s in so], abs=1e-5)


def test_one_token_forward_ignores_budget(loaded):
    """A single token's own top-k holds the most mass, so any budget >= top_k leaves it alone."""
    m = loaded("olmoe", 8)
    b = m.backend
    cache = b.new_cache(64)
    b.forward(PROMPT[:8], cache)
    free = np.array(b.forward([65], cache))
    cache.trim_to(8)
    capped = np.array(b.forward([65], cache, expert_budget=ExpertBudget(budget=2, policy="truncate")))
    assert np.array_equal(free, capped)


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_moe_top_k_matches_transformers(backend, reference, loaded):
    """--moe-top-k: the model with k = 1 (and 3), as transformers computes it with that top-k."""
    ref = reference("qwen3_moe", 8)
    for k in (1, 3):
        for mod in ref.modules():
            if hasattr(mod, "top_k") and hasattr(mod, "norm_topk_prob"):
                mod.top_k = k
        try:
            with torch.no_grad():
                want = ref(torch.tensor([PROMPT])).logits[0].numpy()
            want_tokens = _hf_greedy(ref, PROMPT, 16)
        finally:
            for mod in ref.modules():
                if hasattr(mod, "top_k") and hasattr(mod, "norm_topk_prob"):
                    mod.top_k = 2
        m = loaded("qwen3_moe", 8, backend, moe_top_k=k)
        assert np.abs(m.logits(PROMPT) - want).max() < ATOL
        assert _edge_greedy(m, PROMPT, 16) == want_tokens  # the compiled decode step too
        assert all(s["requested"] == k for s in m.backend.moe_stats)


def test_bad_inputs(loaded, tmp_path):
    m = loaded("mixtral", 8)
    b = m.backend
    with pytest.raises(EdgeInferError, match="below the top-k"):
        b.forward(PROMPT[:4], b.new_cache(16), expert_budget=ExpertBudget(budget=1))
    for kwargs, msg in ((dict(budget=2, mass=0.5), "exactly one"), (dict(mass=1.5), r"\(0, 1\]"), (dict(budget=0), "at least 1"),
                        (dict(budget=2, policy="drop"), "substitute, truncate"), (dict(), "exactly one")):
        with pytest.raises(EdgeInferError, match=msg):
            ExpertBudget(**kwargs)
    with pytest.raises(EdgeInferError, match="moe-top-k must be in 1..4"):
        b.set_moe_top_k(5)


def test_cli_flags(moe_package, tiny_package):
    """Through the CLI: --moe-top-k runs; MoE flags on a dense model and a budget below top-k exit with status 2."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "edgeinfer.cli", "generate", "--max-tokens", "4", "-p", "hello",
                               "--backend", "mlx", "--no-stats", "--meter", "none", *args],
                              capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300)

    pkg = str(moe_package("mixtral", 4))
    ok = run("-m", pkg, "--moe-top-k", "1")
    assert ok.returncode == 0, ok.stderr
    r = run("-m", pkg, "--expert-budget", "1", "--draft", "ngram")
    assert r.returncode == 2 and r.stderr.strip().startswith("edgeinfer:") and "below the top-k" in r.stderr
    r = run("-m", pkg, "--expert-budget", "2")
    assert r.returncode == 0 and "without --draft" in r.stderr
    dense = str(tiny_package("llama", 4))
    for flags in (("--moe-top-k", "1"), ("--expert-budget", "2", "--draft", "ngram")):
        r = run("-m", dense, *flags)
        assert r.returncode == 2 and "Mixture-of-Experts" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bytes_read_follow_the_budget(loaded):
    """Weight bytes a forward reads: all but the experts, plus the experts actually run (fewer under a budget)."""
    from edgeinfer.memory import safetensors_index
    from edgeinfer.moe import weight_bytes_read

    m = loaded("qwen3_moe", 4, "onnx")
    b = m.backend
    index = safetensors_index(m.package.weights_path)
    expert = sum(t["end"] - t["start"] for n, t in index.items() if n.startswith("layers.0.moe.experts.")) // 8
    b.forward(PROMPT[:24], b.new_cache(64))
    free = weight_bytes_read(m.package, b.moe_stats)
    b.forward(PROMPT[:24], b.new_cache(64), expert_budget=ExpertBudget(budget=2))
    capped = weight_bytes_read(m.package, b.moe_stats)
    assert free - capped == expert * sum(s["requested"] - 2 for s in b.moe_stats)  # both layers at 2 experts
    b.forward([65], b.new_cache(64))
    assert weight_bytes_read(m.package, b.moe_stats) == capped  # a decode step runs its top-2 per layer


def test_onnx_experts_run_only_when_routed(moe_package):
    """Each ONNX expert's nodes sit in an If branch taken only when a token is routed to it (so an expert a
    budget leaves out launches no kernels), and rewriting the accuracy level reaches the branches' matmuls."""
    import onnx

    from edgeinfer.converters.onnx_export import _set_accuracy

    model = onnx.load(str(moe_package("qwen3_moe", 4) / "model.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "MatMulNBits" and ".moe.experts." in n.name]
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 8 * 2  # every expert of both MoE layers
    _set_accuracy(model, 1)
    levels = [a.i for n in ifs for a0 in n.attribute if a0.name == "then_branch" for x in a0.g.node
              if x.op_type == "MatMulNBits" for a in x.attribute if a.name == "accuracy_level"]
    assert len(levels) == 3 * 8 * 2 and set(levels) == {1}


def test_streamed_moe_layers(moe_package, loaded):
    """Layers read from disk at every step (the memory planner's last lever) carry their experts too."""
    import edgeinfer

    streamed = edgeinfer.load(moe_package("qwen2_moe", 4), backend="mlx", resident_layers=1, dequantize=False)
    assert streamed.backend.streamer is not None
    np.testing.assert_allclose(streamed.logits(PROMPT), loaded("qwen2_moe", 4, "mlx", dequantize=False).logits(PROMPT), atol=1e-5)


def _rewrite_checkpoint(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(edit(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_stacked_expert_checkpoints(moe_checkpoints, moe_package, tmp_path):
    """A checkpoint in transformers' stacked layout (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])
    converts to the same package tensors as the per-expert one."""
    from edgeinfer.converters.convert import convert
    from edgeinfer.converters.safetensors_io import SafetensorsFile

    def stack(t):
        out = {}
        for i in range(2):
            p = f"model.layers.{i}.mlp.experts"
            g = [t.pop(f"{p}.{e}.gate_proj.weight") for e in range(8)]
            u = [t.pop(f"{p}.{e}.up_proj.weight") for e in range(8)]
            out[f"{p}.gate_up_proj"] = np.stack([np.concatenate([a, b]) for a, b in zip(g, u)])
            out[f"{p}.down_proj"] = np.stack([t.pop(f"{p}.{e}.down_proj.weight") for e in range(8)])
        return {**t, **out}

    src = _rewrite_checkpoint(moe_checkpoints["qwen3_moe"], tmp_path / "stacked", stack)
    pkg = convert(str(src), tmp_path / "pkg", bits=8, backend="mlx", progress=False)
    a, b = SafetensorsFile(pkg / "model.safetensors"), SafetensorsFile(moe_package("qwen3_moe", 8) / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert np.array_equal(a.get(k), b.get(k)), k


def test_missing_expert_is_an_error(moe_checkpoints, tmp_path):
    from edgeinfer.converters.convert import convert

    def drop(t):
        del t["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
        return t

    src = _rewrite_checkpoint(moe_checkpoints["mixtral"], tmp_path / "broken", drop)
    with pytest.raises(EdgeInferError, match=r"layer 1 has gate_proj for experts \[0, 1, 2\], not all 4"):
        convert(str(src), tmp_path / "out", bits=4, progress=False)
    assert not (tmp_path / "out").exists()


def test_verify_cost_benchmark_on_the_trained_moe():
    """benchmarks/moe_verify_cost.py on the committed tiny MoE: a budget of top_k keeps top_k experts per layer
    in a multi-token forward, and only the unbudgeted row is its own reference."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_verify_cost.py"), "--moe", str(ROOT / "models" / "tiny-moe-q4"),
                        "--sizes", "1", "5", "-r", "1", "--mass", "0.9", "--ppl-windows", "1", "--ppl-window", "64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert set(rows) == {(t, b) for t in ("1", "5") for b in ("none", "B=2", "B=4", "mass 0.9")}
    assert rows["5", "none"][2] == "1.00x" and rows["5", "none"][6] == "+0.00%"
    assert rows["5", "B=2"][3].endswith("-> 2.00") and float(rows["5", "B=2"][5]) > float(rows["5", "none"][5])
