"""R-Sparse (issue 5, quality half): the MLX sparse linear against the formula, the budget, calibration,
plan files, ``edgeinfer sparsify`` end to end, and bad inputs (one line, exit 2, package unchanged)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import cli_env
from edgeinfer.backends.mlx_backend import Linear
from edgeinfer.errors import EdgeInferError
from edgeinfer.sparse.plan import ModulePlan, available_levels, budget, load_plan, projection_shapes


def run_cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeinfer.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def folder_hash(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        h.update(str(f.relative_to(p)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.strip().split("\n") if x.startswith("edgeinfer: ")]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def calib_text(seed: int, words: int = 1400) -> str:
    """Plain English-like text made here (never the evaluation text): sentences from a fixed vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = ("the a river house small bright quickly stone people walked over under garden old new light "
             "music winter city morning ran found because while table window green story water across").split()
    out = []
    for _ in range(words // 8):
        out.append(" ".join(rng.choice(vocab, 8)).capitalize() + ".")
    return " ".join(out)


# -- the sparse linear ----------------------------------------------------------------------------------
def reference(w: np.ndarray, x: np.ndarray, mp: ModulePlan) -> np.ndarray:
    """The formula, token by token: y = W[:, S] x_S + B (A x_notS)."""
    out = []
    for xt in x.astype(np.float64):
        score = np.abs(xt) * (mp.c if mp.c is not None else 1.0)
        S = score > mp.t
        y = w[:, S].astype(np.float64) @ xt[S]
        if mp.r > 0:
            rest = np.where(S, 0.0, xt)
            y = y + mp.b.astype(np.float64) @ (mp.a.astype(np.float64) @ rest)
        out.append(y)
    return np.array(out)


def make_plan(w: np.ndarray, x: np.ndarray, s: float, rho: float) -> ModulePlan:
    m, n = w.shape
    k, r = budget(s, rho, m, n)
    c = np.linalg.norm(w, axis=0).astype(np.float32) if rho < 1 else None
    score = np.abs(x) * (c if c is not None else 1.0)
    t = -1.0 if k >= n else float(np.quantile(score, 1 - k / n))
    u, sv, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    a = vt[:r].astype(np.float16) if r else None
    b = (u[:, :r] * sv[:r]).astype(np.float16) if r else None
    return ModulePlan(name="layers.0.q", m=m, n=n, s=s, rho=rho, k=k, r=r, t=t, c=c, a=a, b=b)


def linear(w: np.ndarray, bits: int | None = None) -> Linear:
    if bits is None:
        return Linear({"x.weight": mx.array(w)}, "x", None, False, mx.float32)
    q, s, b = mx.quantize(mx.array(w), group_size=32, bits=bits)
    return Linear({"x.weight": q, "x.scales": s, "x.biases": b}, "x", (bits, 32), False, mx.float32)


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("s,rho", [(0.3, 1.0), (0.5, 0.8), (0.5, 1.0), (0.7, 0.6), (0.9, 0.5)])
def test_sparse_linear_equals_formula(bits, s, rho):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.1, (96, 64)).astype(np.float32)
    x = (rng.standard_t(3, (12, 64)) * 0.5).astype(np.float32)
    lin = linear(w, bits)
    w_used = np.array(lin.w) if bits is None else np.array(mx.dequantize(lin.w, *lin.quant[:2], group_size=32, bits=bits))
    mp = make_plan(w_used, x, s, rho)
    lin.set_sparse(mp, mx.float32)
    lin.sparse_all = True
    got = np.array(lin(mx.array(x[None])))[0]
    want = reference(w_used, x, mp)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the plan really drops channels: the result differs from dense by more than rounding
    assert np.abs(got - x @ w_used.T).max() > 1e-3
    # decode mode: one token sparse, several tokens (prefill) dense
    lin.sparse_all = False
    np.testing.assert_allclose(np.array(lin(mx.array(x[None, :1])))[0], want[:1], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(lin(mx.array(x[None]))), np.array(linear(w, bits)(mx.array(x[None]))))


def test_sparsity_zero_is_dense_exactly_and_rho_one_is_magnitude():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.1, (48, 80)).astype(np.float32)
    x = rng.normal(0, 1, (5, 80)).astype(np.float32)
    dense = np.array(linear(w)(mx.array(x[None])))
    lin = linear(w)
    zero = make_plan(w, x, 0.0, 1.0)
    assert (zero.k, zero.r) == (80, 0)
    lin.set_sparse(zero, mx.float32)
    lin.sparse_all = True
    np.testing.assert_array_equal(np.array(lin(mx.array(x[None]))), dense)
    mag = make_plan(w, x, 0.5, 1.0)
    assert mag.r == 0 and mag.c is None
    lin.set_sparse(mag, mx.float32)
    masked = np.where(np.abs(x) > mag.t, x, 0.0)
    np.testing.assert_allclose(np.array(lin(mx.array(x[None])))[0], masked @ w.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,n", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("rho", [0.5, 0.8, 1.0])
def test_budget_formula(m, n, s, rho):
    k, r = budget(s, rho, m, n)
    assert k == round(rho * (1 - s) * n)
    assert r == max(0, int(np.floor(((1 - s) * m * n - k * m) / (m + n))))
    # the weights read per token stay within the budget (up to rounding k), and the rank uses what is left
    assert k * m + r * (m + n) <= (1 - s) * m * n + 0.5 * m + 1e-6
    assert (1 - s) * m * n - (k * m + r * (m + n)) < m + n + m  # rounding of k and floor of r
    if rho == 1.0:
        assert r == 0


# -- the command, end to end on a tiny package -------------------------------------------------------------
@pytest.fixture()
def tiny_pkg(tiny_package, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_package("llama", 4), tmp_path / "pkg"))


@pytest.fixture()
def calib_file(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(calib_text(0))
    return p


def test_sparsify_teal_uniform_end_to_end(tiny_pkg, calib_file, tmp_path):
    r = run_cli("sparsify", tiny_pkg, "--sparsity", "0.4", "0.5", "--method", "teal", "--calib", calib_file, "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads((tiny_pkg / "manifest.json").read_text())
    levels = man["sparsity"]["levels"]
    assert sorted(levels) == ["0.40", "0.50"] and available_levels(tiny_pkg) == [0.4, 0.5]
    for key, e in levels.items():
        assert e["method"] == "teal" and e["search"] == "uniform"
        assert e["package_sha256"] == man["files"]["model.safetensors"]["sha256"]
        assert e["calib"]["source"] == "calib.txt"
        assert e["calib"]["sha256"] == hashlib.sha256(calib_file.read_text().encode()).hexdigest()
        assert "sparsify" in e["command"] and "--calib" in e["command"]
        # thresholds calibrated to s give s on held-out calibration text (the sparse model running)
        assert abs(e["realized"] - float(key)) <= 0.02, (key, e["realized"])
        for name, mod in e["modules"].items():
            assert mod["rho"] == 1.0 and mod["r"] == 0 and mod["s"] == float(key)
        plan = load_plan(tiny_pkg, float(key))
        assert len(plan.modules) == 2 * 7
        q = plan.module(0, "q")
        assert q.c is None and q.a is None and q.k == budget(float(key), 1.0, q.m, q.n)[0]

    # the plan runs: generate and eval under it; sparse differs from dense
    dense = run_cli("generate", "-m", tiny_pkg, "--backend", "mlx", "-p", "The river", "--max-tokens", "12", "--no-stats")
    sparse = run_cli("generate", "-m", tiny_pkg, "--backend", "mlx", "-p", "The river", "--max-tokens", "12", "--no-stats",
                     "--sparsity", "0.5")
    assert dense.returncode == 0 and sparse.returncode == 0, sparse.stderr
    ev = tmp_path / "eval.txt"
    ev.write_text(calib_text(7))
    out = {}
    for lv in ("0", "0.5"):
        e = run_cli("eval", "-m", tiny_pkg, "--sparsity", lv, "--json", "ppl", "--data", ev, "--window", "128", "-q")
        assert e.returncode == 0, e.stderr
        out[lv] = json.loads(e.stdout)["ppl"]
    assert out["0.5"] != out["0"] and np.isfinite(out["0.5"])
    g = run_cli("eval", "-m", tiny_pkg, "--backend", "mlx", "--sparsity", "0.5", "--json", "gen", "--max-tokens", "8", "-q")
    assert g.returncode == 0, g.stderr
    res = json.loads(g.stdout)
    assert 0.0 <= res["agreement"] <= 1.0 and len(res["samples"]) == 8
    assert all(s["dense"] is not None and s["sparse"] is not None for s in res["samples"])


def test_sparsify_rsparse_search_and_plan_roundtrip(tiny_pkg, calib_file):
    import edgeinfer
    from edgeinfer.converters.sparsify import plan_tensors

    r = run_cli("sparsify", tiny_pkg, "--sparsity", "0.5", "--calib", calib_file, "--population", "4",
                "--generations", "2", "--fitness-windows", "2", "-q")
    assert r.returncode == 0, r.stderr
    e = json.loads((tiny_pkg / "manifest.json").read_text())["sparsity"]["levels"]["0.50"]
    assert e["method"] == "rsparse" and e["search"] == "evolutionary"
    assert e["fitness"]["evaluations"] >= 4 + 2
    # the default fitness: mean KL divergence from dense on the calibration windows, positive under a plan
    assert e["fitness"]["kind"] == "kl" and 0 < e["fitness"]["value"] < 10
    # one sensitivity per layer, measured before the search (the tiny model's layers differ)
    sens = e["fitness"]["layer_sensitivity"]
    assert len(sens) == len({nm.split(".")[1] for nm in e["modules"]}) and len(set(sens)) > 1
    # the model-level constraint: parameter-weighted mean of s is the target
    m = edgeinfer.load(tiny_pkg, backend="mlx", sparsity=0.5)
    shapes = projection_shapes(m.spec)
    sizes = {nm: shapes[nm.split(".")[-1]] for nm in e["modules"]}
    mean = sum(e["modules"][nm]["s"] * a * b for nm, (a, b) in sizes.items()) / sum(a * b for a, b in sizes.values())
    assert abs(mean - 0.5) < 1e-3
    plan = m.backend.sparsity_plan
    for nm, mod in e["modules"].items():
        mp = plan.modules[nm]
        assert (mp.k, mp.r) == budget(mod["s"], mod["rho"], mp.m, mp.n)
        assert (mp.c is None) == (mod["rho"] >= 1) and (mp.a is None) == (mp.r == 0)
    # round trip: the tensors written are the tensors read
    from safetensors.numpy import load_file

    stored = load_file(str(tiny_pkg / e["file"]))
    again = plan_tensors(plan)
    assert stored.keys() == again.keys()
    for k in stored:
        np.testing.assert_array_equal(stored[k], again[k])
    # decode steps under the loaded plan: one-token logits differ from dense, prefill does not
    dense = edgeinfer.load(tiny_pkg, backend="mlx")
    ids = [5, 70, 80, 90, 100]
    c1, c2 = m.backend.new_cache(), dense.backend.new_cache()
    np.testing.assert_array_equal(np.array(m.backend.forward(ids, c1)), np.array(dense.backend.forward(ids, c2)))
    assert np.abs(np.array(m.backend.forward([7], c1)) - np.array(dense.backend.forward([7], c2))).max() > 1e-4


def test_sparsify_generated_calibration(tiny_pkg):
    r = run_cli("sparsify", tiny_pkg, "--sparsity", "0.3", "--method", "teal", "--search", "greedy",
                "--calib-generate", "900", "--seed", "3", "-q")
    assert r.returncode == 0, r.stderr
    e = json.loads((tiny_pkg / "manifest.json").read_text())["sparsity"]["levels"]["0.30"]
    assert e["calib"]["source"] == "generated" and e["seed"] == 3 and e["search"] == "greedy"
    # greedy allocates per projection: layers keep the target on average, projections differ
    mods = e["modules"]
    assert len({round(v["s"], 4) for v in mods.values()}) > 1
    assert abs(e["realized"] - 0.3) <= 0.03


# -- bad inputs: one line, exit 2, the package unchanged ------------------------------------------------
def test_calibration_too_short(tiny_pkg, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    before = folder_hash(tiny_pkg)
    one_line_error(run_cli("sparsify", tiny_pkg, "--sparsity", "0.5", "--calib", short), "short.txt", "at least")
    assert folder_hash(tiny_pkg) == before


def test_bad_plans_give_one_line(tiny_pkg, tiny_package, calib_file, tmp_path):
    r = run_cli("sparsify", tiny_pkg, "--sparsity", "0.5", "--method", "teal", "--calib", calib_file, "-q")
    assert r.returncode == 0, r.stderr
    gen = ("generate", "-m", tiny_pkg, "--backend", "mlx", "-p", "Hi", "--max-tokens", "2")
    before = folder_hash(tiny_pkg)

    # a level with no plan: the error lists the levels there
    one_line_error(run_cli(*gen, "--sparsity", "0.3"), "no sparsity plan for level 0.30", "0.50")
    # a plan made for another package: this package's plan entry grafted onto another package's weights
    other = Path(shutil.copytree(tiny_package("llama", 8), tmp_path / "other"))
    man_other = json.loads((other / "manifest.json").read_text())
    man = json.loads((tiny_pkg / "manifest.json").read_text())
    shutil.copytree(tiny_pkg / "sparse", other / "sparse")
    man_other["sparsity"] = man["sparsity"]
    (other / "manifest.json").write_text(json.dumps(man_other))
    one_line_error(run_cli("generate", "-m", other, "--backend", "mlx", "-p", "Hi", "--max-tokens", "2", "--sparsity", "0.5"),
                   "made for other weights")
    with pytest.raises(EdgeInferError, match="other weights"):
        load_plan(other, 0.5)
    assert folder_hash(tiny_pkg) == before

    # a corrupted plan file
    plan_file = tiny_pkg / "sparse" / "plan-0.50.safetensors"
    data = bytearray(plan_file.read_bytes())
    data[-5] ^= 0xFF
    plan_file.write_bytes(bytes(data))
    before = folder_hash(tiny_pkg)
    one_line_error(run_cli(*gen, "--sparsity", "0.5"), "corrupted")
    # ... and sparsifying again over it replaces it cleanly
    assert folder_hash(tiny_pkg) == before
    r = run_cli("sparsify", tiny_pkg, "--sparsity", "0.5", "--method", "teal", "--calib", calib_file, "-q")
    assert r.returncode == 0, r.stderr
    assert load_plan(tiny_pkg, 0.5).module(0, "q").t > 0
    names = [p.name for p in (tiny_pkg / "sparse").iterdir()]
    assert "plan-0.50.safetensors" in names and not [x for x in names if x.startswith(".")], names  # no temporaries left


def test_sparsify_bad_arguments_leave_package_unchanged(tiny_pkg, calib_file):
    before = folder_hash(tiny_pkg)
    one_line_error(run_cli("sparsify", tiny_pkg, "--sparsity", "1.2", "--calib", calib_file), "--sparsity must be in (0, 1), not 1.2")
    one_line_error(run_cli("sparsify", tiny_pkg, "--sparsity", "0.5", "--calib", calib_file.parent / "nope.txt"), "nope.txt")
    r = run_cli("sparsify", tiny_pkg, "--sparsity", "0.5", "--calib", calib_file, "--fitness", "bogus")
    assert r.returncode == 2 and "argument --fitness: invalid choice" in r.stderr
    assert folder_hash(tiny_pkg) == before


# -- one short real-model check ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_realized_sparsity_on_held_out_text(smollm2_package, tmp_path):
    pkg = Path(shutil.copytree(smollm2_package, tmp_path / "smollm2"))
    r = run_cli("sparsify", pkg, "--sparsity", "0.5", "--method", "teal", "--calib-generate", "512", "-q")
    assert r.returncode == 0, r.stderr
    e = json.loads((pkg / "manifest.json").read_text())["sparsity"]["levels"]["0.50"]
    assert e["calib"]["source"] == "generated" and e["calib"]["tokens"] >= 450
    assert abs(e["realized"] - 0.5) <= 0.02, e["realized"]
    # at 50% the calibration perplexity rises but stays finite and in range of dense
    assert e["fitness"]["dense_ppl"] < e["fitness"]["ppl"] < 3 * e["fitness"]["dense_ppl"]


def test_chat_sparsity_command_switches_plan(tiny_pkg, calib_file, capsys):
    import argparse

    import edgeinfer
    from edgeinfer.apps.chat_repl import Repl

    r = run_cli("sparsify", tiny_pkg, "--sparsity", "0.5", "--method", "teal", "--calib", calib_file, "-q")
    assert r.returncode == 0, r.stderr
    m = edgeinfer.load(tiny_pkg, backend="mlx")
    repl = Repl(m, argparse.Namespace(system=None, no_markdown=True), {"max_tokens": 4})
    repl.session.model.cache_tokens = [1, 2]
    repl.commands["/sparsity"]("0.5")
    assert m.sparsity == 0.5 and m.backend.sparsity_plan is not None and m.cache_tokens == []
    assert m.backend.layers[0].q.sparse is not None
    repl.commands["/sparsity"]("")
    assert "0.50" in capsys.readouterr().out
    with pytest.raises(EdgeInferError, match="no sparsity plan for level 0.30.*0.50"):
        repl.commands["/sparsity"]("0.3")
    repl.commands["/sparsity"]("0")
    assert m.sparsity == 0.0 and m.backend.layers[0].q.sparse is None
