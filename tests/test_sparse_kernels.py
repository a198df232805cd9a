"""The fast R-Sparse decode path (edgeinfer/sparse/kernels.py, engine.py, layout.py) and its plumbing into
the ONNX backend.

- The fused sparse linear against the formula in numpy (edgeinfer/sparse/reference.py), at several
  sparsities, with and without low-rank factors and column norms.
- The whole engine, keeping every channel, against the exact ONNX graph (accuracy_level 1) on every
  tiny architecture: the same decoder, summation order aside (logits within 2e-4, 32 greedy tokens equal).
- Under a plan calibrated on real activations, the ONNX backend's greedy tokens equal the numpy
  reference's, decoding on the KV cache the graph prefilled.

Plans are written here in the package format that ``edgeinfer sparsify`` writes (plan.py reads them):
thresholds at quantiles of the real activations' scores, low-rank factors from a truncated SVD.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import ARCHS

import edgeinfer
from edgeinfer.converters.onnx_export import add_onnx_graph
from edgeinfer.errors import EdgeInferError
from edgeinfer.model import GenerationConfig
from edgeinfer.package import open_package, sha256_file
from edgeinfer.sparse import kernels as K
from edgeinfer.sparse.engine import SparseEngine, keep_every_channel
from edgeinfer.sparse.layout import LAYOUT_FILE, write_fast_layout
from edgeinfer.sparse.plan import PROJECTIONS, ModulePlan, SparsePlan, level_key, plan_file_name
from edgeinfer.sparse.reference import ReferenceDecoder, sparse_linear

PROMPT = list(b"The quick brown fox jumps over the lazy dog; 0123456789!")[:24]
EXACT_ATOL = 2e-4


@pytest.fixture(scope="session")
def sparse_package(tiny_package, tmp_path_factory):
    """sparse_package(arch, bits=4, group=32) -> a copy of the tiny package with the exact graph and the fast layout."""
    root = tmp_path_factory.mktemp("sparse")
    cache: dict = {}

    def get(arch: str, bits: int = 4, group: int = 32):
        key = (arch, bits, group)
        if key not in cache:
            dst = root / f"{arch}-b{bits}-g{group}"
            shutil.copytree(tiny_package(arch, bits, group), dst)
            add_onnx_graph(dst, accuracy_level=1, progress=False)
            write_fast_layout(dst, progress=False)
            cache[key] = dst
        return cache[key]

    return get


def keep_all_plan(pkg) -> SparsePlan:
    return keep_every_channel(pkg.spec)


def calibrated_plan(pkg, level: float, rho: float, tokens: list[int], rank_share: float = 0.25) -> SparsePlan:
    """Thresholds at the ``level`` quantile of each module's scores on ``tokens`` (dense decode in numpy);
    with rho < 1, column norms and a rank-r SVD of W (r = rank_share * min(m, n))."""
    pkg = open_package(pkg) if not hasattr(pkg, "spec") else pkg
    ref = ReferenceDecoder(pkg)
    plan = SparsePlan(level=level, info={})
    for (i, p), xs in ref.record_inputs(tokens).items():
        W = ref.W[i, p]
        m, n = W.shape
        c = np.linalg.norm(W, axis=0).astype(np.float32) if rho < 1 else None
        scores = np.abs(np.array(xs)) * (1.0 if c is None else c)
        t = float(np.quantile(scores, level))
        a = b = None
        r = 0
        if rho < 1:
            r = max(1, int(rank_share * min(m, n)))
            u, sv, vt = np.linalg.svd(W, full_matrices=False)
            a, b = vt[:r].astype(np.float16), (u[:, :r] * sv[:r]).astype(np.float16)
        plan.modules[f"layers.{i}.{p}"] = ModulePlan(f"layers.{i}.{p}", m, n, level, rho, n, r, t, c, a, b)
    return plan


def save_plan(pkg_dir, plan: SparsePlan) -> None:
    """Writes ``plan`` as the package's plan of its level, in the format edgeinfer sparsify writes."""
    from safetensors.numpy import save_file

    key = level_key(plan.level)
    tensors = {}
    for name, mp in plan.modules.items():
        tensors[f"{name}.t"] = np.array([mp.t], np.float32)
        if mp.c is not None:
            tensors[f"{name}.c"] = mp.c
        if mp.a is not None:
            tensors[f"{name}.a"], tensors[f"{name}.b"] = mp.a, mp.b
    path = pkg_dir / plan_file_name(plan.level)
    path.parent.mkdir(exist_ok=True)
    save_file(tensors, str(path))
    manifest = json.loads((pkg_dir / "manifest.json").read_text())
    levels = manifest.setdefault("sparsity", {}).setdefault("levels", {})
    levels[key] = {"file": plan_file_name(plan.level), "sha256": sha256_file(path), "method": "rsparse", "search": "test",
                   "package_sha256": manifest["files"]["model.safetensors"]["sha256"],
                   "modules": {n: {"s": mp.s, "rho": mp.rho, "k": mp.k, "r": mp.r} for n, mp in plan.modules.items()}}
    (pkg_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _one_linear(eng: SparseEngine, mi: int, x: np.ndarray) -> np.ndarray:
    sc = eng.scratch
    out = np.zeros(int(eng.meta[mi, K.M_OUT]), np.float32)
    counts = np.zeros(2, np.int64)
    K._linears(x, np.array([mi]), (out, out, out), eng.meta, eng.thr, eng.pmeta, eng.wq, eng.s16, eng.z16, eng.s32,
               eng.z32, eng.cvals, eng.a16, eng.b16, eng.lbias, *sc[12:18], counts, sc[18], eng.cfg[10])
    return out


@pytest.fixture
def prefill_on_the_exact_graph(monkeypatch):
    """The sparse engine decodes in float after a dense prefill. The tests that hold it to the exact graph
    (or to MLX) prefill there too; the others run the default, the native step's int16 prefill (held to
    the same graph in tests/test_native.py)."""
    monkeypatch.setenv("EDGEINFER_NATIVE_PREFILL", "off")


@pytest.mark.parametrize("level,rho", [(0.3, 0.5), (0.5, 0.5), (0.7, 0.7), (0.5, 1.0)])
def test_fused_linear_equals_the_formula(sparse_package, level, rho):
    pkg = open_package(sparse_package("qwen2"))  # hidden 128, inter 256: 4 and 8 groups of 32; q/k/v biases
    plan = calibrated_plan(pkg, level, rho, PROMPT[:8])
    eng = SparseEngine(pkg, plan, threads=2)  # on two cores or more: each projection's groups split in two
    ref = ReferenceDecoder(pkg)
    rng = np.random.default_rng(0)
    skipped = []
    for i in range(pkg.spec.num_layers):
        for pi, p in enumerate(PROJECTIONS):
            mp = plan.module(i, p)
            x = rng.standard_normal(mp.n).astype(np.float32)
            x *= np.float32(mp.t / np.median(np.abs(x) * (1 if mp.c is None else mp.c)))  # about half above t
            got = _one_linear(eng, i * 7 + pi, x)
            want, active = sparse_linear(x.astype(np.float64), ref.W[i, p], mp.t, mp.c, mp.a, mp.b)
            want = want + ref.bias.get((i, p), 0.0)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            skipped.append(1 - active / mp.n)
            if rho == 1.0:  # magnitude sparsity: the dense linear of x with its small entries zeroed
                xm = np.where(np.abs(x) > mp.t, x, 0).astype(np.float64)
                np.testing.assert_allclose(got, ref.W[i, p] @ xm + ref.bias.get((i, p), 0.0), rtol=1e-4,
                                           atol=1e-4 * np.abs(want).max())
    assert 0.2 < np.mean(skipped) < 0.8  # the thresholds really drop channels


@pytest.mark.parametrize("bits", [4, 8])
def test_every_channel_kept_is_the_dense_package_linear(sparse_package, bits):
    pkg = open_package(sparse_package("llama", bits, 64 if bits == 8 else 32))
    eng = SparseEngine(pkg, keep_all_plan(pkg))
    ref = ReferenceDecoder(pkg)
    x = np.random.default_rng(1).standard_normal(pkg.spec.intermediate_size).astype(np.float32)
    for pi, p in enumerate(PROJECTIONS):
        W = ref.W[0, p]
        got = _one_linear(eng, pi, x[: W.shape[1]])
        np.testing.assert_allclose(got, W @ x[: W.shape[1]].astype(np.float64), rtol=0, atol=2e-6 * np.abs(W).sum(1).max())
    head = ref.head @ x[: pkg.spec.hidden_size].astype(np.float64)
    np.testing.assert_allclose(_one_linear(eng, eng.head, x[: pkg.spec.hidden_size]), head, rtol=0, atol=1e-5 * np.abs(head).max())


def test_rows_of_modules_sharing_an_input_are_one_run(sparse_package):
    """Layout v2: input channel j's rows of q|k|v (and of gate|up) are side by side, so a kept channel is one
    contiguous read; o and down stand alone. The bytes a step reads count rows, not the stride."""
    pkg = open_package(sparse_package("llama"))
    eng = SparseEngine(pkg)
    meta = eng.meta
    row = lambda mi: int(meta[mi, K.M_OUT]) // (2 if meta[mi, K.BITS] == 4 else 1)  # noqa: E731
    for i in range(pkg.spec.num_layers):
        for part in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)):
            mods = [i * 7 + PROJECTIONS.index(p) for p in part]
            assert [int(meta[mi, K.ROW_BYTES]) for mi in mods] == [sum(row(mi) for mi in mods)] * len(mods)
            assert [int(meta[mi, K.OFF_Q]) for mi in mods] == [int(meta[mods[0], K.OFF_Q]) + sum(row(m) for m in mods[:k])
                                                              for k in range(len(mods))]
    every_byte = (eng.wq.size - 1) + 2 * (eng.s16.size - 1 + eng.z16.size - 1) + 4 * (eng.s32.size - 1 + eng.z32.size - 1)
    assert eng.bytes_per_token() == every_byte  # nothing skipped yet: the whole layout, padding aside


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_keeping_every_channel_matches_the_exact_graph(sparse_package, arch, prefill_on_the_exact_graph):
    path = sparse_package(arch)
    dense = edgeinfer.load(path, backend="onnx", threads=1, decode="graph")
    pkg = open_package(path)
    sparse = edgeinfer.load(path, backend="onnx", threads=1)
    sparse.backend.set_sparsity(keep_all_plan(pkg))
    # logits of every decode step over the prompt, one token at a time after a dense prefill of 5
    for m in (dense, sparse):
        m.cache = m.backend.new_cache(64)
        m.backend.forward(PROMPT[:5], m.cache)
    for t in PROMPT[5:]:
        a = dense.backend.forward([t], dense.cache)
        b = sparse.backend.forward([t], sparse.cache)
        np.testing.assert_allclose(b, a, atol=EXACT_ATOL, rtol=0)
    n = dense.cache.offset
    np.testing.assert_allclose(sparse.cache.k_block[:, :, :, :n], dense.cache.k_block[:, :, :, :n], atol=1e-4, rtol=1e-4)
    cfg = GenerationConfig(max_tokens=32, ignore_eos=True)
    dense.reset()
    sparse.reset()
    a = list(dense.stream_ids(PROMPT[:12], cfg))
    b = list(sparse.stream_ids(PROMPT[:12], cfg))
    assert len(a) == 32 and a == b
    assert sparse.stats.realized_sparsity == 0.0 and dense.stats.realized_sparsity is None


def _reference_greedy(path, plan, prompt: list[int], steps: int) -> list[int]:
    """Prefill with the dense graph, then decode in numpy with the plan, on the graph's cache."""
    m = edgeinfer.load(path, backend="onnx", threads=1)
    cache = m.backend.new_cache(len(prompt) + steps + 1)
    tok = int(m.backend.forward(prompt, cache, last_only=True)[0, -1].argmax())
    ref = ReferenceDecoder(open_package(path))
    out = [tok]
    for _ in range(steps - 1):
        cache.reserve(1)
        tok = int(ref.step(tok, cache.offset, cache.k_block, cache.v_block, plan).argmax())
        cache.offset += 1
        out.append(tok)
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_onnx_backend_under_a_plan_gives_the_reference_tokens(sparse_package, tmp_path, arch):
    path = tmp_path / arch
    shutil.copytree(sparse_package(arch), path)
    plan = calibrated_plan(path, 0.5, 0.6, PROMPT[:16])
    save_plan(path, plan)
    m = edgeinfer.load(path, backend="onnx", threads=1, sparsity=0.5)
    got = list(m.stream_ids(PROMPT[:10], GenerationConfig(max_tokens=24, ignore_eos=True)))
    assert got == _reference_greedy(path, m.backend.sparsity_plan, PROMPT[:10], 24)
    assert 0.3 < m.stats.realized_sparsity < 0.7 and "of channels skipped" in m.stats.line()
    dense = list(edgeinfer.load(path, backend="onnx", threads=1).stream_ids(PROMPT[:10], GenerationConfig(max_tokens=24, ignore_eos=True)))
    assert got != dense  # the plan changes the computation (else the test above proves nothing)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_both_backends_give_the_same_tokens_under_a_plan(sparse_package, tmp_path, arch, prefill_on_the_exact_graph):
    """MLX's masked sparse linear and the ONNX backend's engine run one plan to the same greedy tokens
    (prefill dense on both: MLX in float, ONNX on the exact graph)."""
    path = tmp_path / arch
    shutil.copytree(sparse_package(arch), path)
    save_plan(path, calibrated_plan(path, 0.5, 0.6, PROMPT[:16]))
    cfg = GenerationConfig(max_tokens=32, ignore_eos=True)
    on_onnx = list(edgeinfer.load(path, backend="onnx", threads=1, sparsity=0.5).stream_ids(PROMPT[:10], cfg))
    on_mlx = list(edgeinfer.load(path, backend="mlx", sparsity=0.5).stream_ids(PROMPT[:10], cfg))
    dense = list(edgeinfer.load(path, backend="mlx").stream_ids(PROMPT[:10], cfg))
    assert on_onnx == on_mlx
    assert on_mlx != dense  # the plan changes the tokens, so the agreement above is not dense agreeing with dense


def test_level_zero_is_the_dense_graph(sparse_package):
    m = edgeinfer.load(sparse_package("llama"), backend="onnx", threads=1, sparsity=0)
    assert m.backend.sparse_engine is None and m.backend.sparse_counts() is None
    m.generate("abc", max_tokens=4)
    assert m.stats.realized_sparsity is None and "skipped" not in m.stats.line()


def test_a_level_without_the_fast_layout_is_one_clear_error(sparse_package, tmp_path):
    path = tmp_path / "nolayout"
    shutil.copytree(sparse_package("llama"), path)
    plan = keep_all_plan(open_package(path))
    plan.level = 0.5
    save_plan(path, plan)
    (path / LAYOUT_FILE).unlink()
    with pytest.raises(EdgeInferError, match="no fast sparse layout"):
        edgeinfer.load(path, backend="onnx", sparsity=0.5)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sparsity"].pop("layout")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeInferError, match="no fast sparse layout"):
        edgeinfer.load(path, backend="onnx", sparsity=0.5)


def test_a_level_with_no_plan_is_one_clear_error(sparse_package):
    with pytest.raises(EdgeInferError, match="no sparsity plan for level 0.30"):
        edgeinfer.load(sparse_package("llama"), backend="onnx", sparsity=0.3)


def test_a_layout_from_other_weights_is_refused(sparse_package, tmp_path):
    path = tmp_path / "stale"
    shutil.copytree(sparse_package("llama"), path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sparsity"]["layout"]["package_sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeInferError, match="other weights"):
        SparseEngine(open_package(path), None)


def test_layout_is_recorded_and_written_atomically(sparse_package, tmp_path, monkeypatch):
    path = tmp_path / "atomic"
    shutil.copytree(sparse_package("llama"), path)
    info = json.loads((path / "manifest.json").read_text())["sparsity"]["layout"]
    assert info["sha256"] == sha256_file(path / LAYOUT_FILE) and info["bytes"] == (path / LAYOUT_FILE).stat().st_size
    (path / LAYOUT_FILE).unlink()
    before = (path / "manifest.json").read_bytes()
    import safetensors.numpy

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(EdgeInferError, match="could not write the sparse layout"):
        write_fast_layout(path, progress=False)
    assert (path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (path / "sparse").iterdir()) == []


@pytest.mark.slow
def test_smollm2_engine_keeping_every_channel_gives_the_exact_graph_tokens(smollm2_package, tmp_path):
    path = tmp_path / "smol"
    shutil.copytree(smollm2_package, path)
    add_onnx_graph(path, accuracy_level=1, progress=False)  # replaces the int8 graph with the exact one
    write_fast_layout(path, progress=False)
    dense = edgeinfer.load(path, backend="onnx")
    sparse = edgeinfer.load(path, backend="onnx")
    sparse.backend.set_sparsity(keep_all_plan(open_package(path)))
    ids = dense.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    cfg = GenerationConfig(max_tokens=32, ignore_eos=True)
    a = list(dense.stream_ids(ids, cfg))
    b = list(sparse.stream_ids(ids, cfg))
    assert a == b
