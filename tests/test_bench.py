"""``edgeinfer bench`` on a tiny package, and the markdown writing of benchmarks/peers.py on synthetic
results. Fast; no speed is asserted (speed is the benchmark's job, not the tests')."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT
from edgeinfer.cli import main
from edgeinfer.package import open_package
from edgeinfer.sysinfo import decode_bytes_per_token, safetensors_sizes


def _bench(capsys, *args) -> tuple[int, str, str]:
    rc = main(["bench", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bench_json(tiny_package, capsys):
    pkg = tiny_package("llama", 4)
    rc, out, err = _bench(capsys, "-m", str(pkg), "-p", "16", "-n", "8", "-r", "2", "--backend", "mlx", "--threads", "2", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["config"]["prompt_tokens"] == 16 and r["config"]["gen_tokens"] == 8 and r["config"]["reps"] == 2
    assert r["model"]["params"] > 0 and r["model"]["weights_bytes"] > 0
    m = r["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["os"] and m["memory_bytes"] > 0
    assert {"python", "edgeinfer", "numpy", "mlx"} <= set(m["versions"])
    bw = r["bandwidth"]
    assert bw["bytes_per_s"] > 1e8 and bw["threads"] == 2 and bw["buffer_bytes"] >= 256 << 20
    (res,) = r["results"]
    assert res["backend"] == "mlx" and res["threads"] == 2 and "thread" in res["threads_note"]
    tests = {t["test"]: t for t in res["tests"]}
    assert set(tests) == {"pp16", "tg8"}
    for t in tests.values():
        assert len(t["samples"]) == 2 and all(s > 0 for s in t["samples"])
        assert t["tps_mean"] == pytest.approx(sum(t["samples"]) / 2) and t["tps_sd"] >= 0
    assert 0 < res["ttft_s"]["mean"] < 60 and res["ttft_s"]["prompt_tokens"] == 16
    assert res["peak_memory_bytes"] > 10 << 20
    assert 0 < res["roofline_share"] < 1
    assert r["bytes_per_token"]["bytes"] > 0


def test_bench_table(tiny_package, capsys):
    pkg = tiny_package("llama", 4)
    rc, out, err = _bench(capsys, "-m", str(pkg), "-p", "8", "-n", "4", "-r", "1", "--backend", "mlx")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("| model") and "t/s" in lines[0]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("|")]
    assert any(row[5] == "pp8" and "±" in row[6] for row in cells)
    assert any(row[5] == "tg4" and "±" in row[6] for row in cells)
    assert "bandwidth roofline" in out and "machine:" in out
    assert "rep 1/1" in err  # progress goes to stderr, never into the table


@pytest.mark.parametrize("args, words", [
    (["-p", "0"], "-p must be at least 1"),
    (["-n", "0"], "-n must be at least 1"),
    (["-r", "0"], "-r must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--backend", "nope"], "nope"),
])
def test_bench_bad_input(tiny_package, capsys, args, words):
    rc, out, err = _bench(capsys, "-m", str(tiny_package("llama", 4)), "-p", "4", "-n", "2", "-r", "1", *args)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err


def test_bench_missing_package(tmp_path, capsys):
    rc, out, err = _bench(capsys, "-m", str(tmp_path / "nothing"), "-p", "4")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_bench_prompt_past_context(tiny_package, capsys):
    rc, out, err = _bench(capsys, "-m", str(tiny_package("llama", 4)), "-p", "5000", "-n", "2", "-r", "1", "--backend", "mlx")
    assert rc == 2 and "context" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_bench_runs_under_the_memory_plan(tiny_package, capsys, backend):
    pkg = str(tiny_package("llama", 4, 32))
    rc, out, err = _bench(capsys, "-m", pkg, "-p", "4", "-n", "2", "-r", "1", "--backend", backend, "--memory-budget", "1KB")
    assert rc == 2 and "the smallest budget that works is" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _bench(capsys, "-m", pkg, "-p", "4", "-n", "2", "-r", "1", "--backend", backend, "--context", "64", "--json")
    assert rc == 0, err


@pytest.mark.parametrize("arch", ["llama", "llama3_rope"])  # untied and tied heads
def test_bytes_per_token(tiny_package, arch):
    pkg = open_package(tiny_package(arch, 4))
    sizes = safetensors_sizes(pkg.weights_path)
    total = sum(b for _, b in sizes.values())
    embed = sum(b for n, (_, b) in sizes.items() if n.startswith("embed."))
    row = embed / pkg.spec.vocab_size
    got = decode_bytes_per_token(pkg)
    assert got["tied"] == pkg.spec.tie_embeddings
    # untied: everything but the embedding matrix, plus one row; tied: the head reads all of it, plus one row
    want = total + row if pkg.spec.tie_embeddings else total - embed + row
    assert got["bytes"] == int(want)


# -- benchmarks/peers.py: the markdown, on synthetic results -----------------------------------------------


def _peers():
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ok(name, pp, tg):
    p = _peers()
    # the mean is pulled far off by one slow repetition: the tables and the ratios must follow the median
    s = lambda x: p.summarize([x - 1.0, x, x + 1.0, x + 2.0, x - 0.9 * x])  # noqa: E731
    return {"peer": name, "status": "ok", "reps": 5, "pp_tps": s(pp), "tg_tps": s(tg), "ttft_s": p.summarize([512 / pp] * 3),
            "load_s": p.summarize([1.0, 1.1]), "peak_rss_bytes": 300 << 20, "threads_note": "2 threads"}


def _report(peers, results):
    p = _peers()
    return p, {
        "date": "2026-01-01 00:00 UTC", "command": "python benchmarks/peers.py -r 3",
        "config": {"prompt_tokens": 512, "gen_tokens": 128, "reps": 3, "threads": 2, "seed": 0},
        "peers": peers, "results": results, "targets": p.ratios(results),
        "bandwidth": {"bytes_per_s": 20e9, "n": 3, "method": "numpy sum"}, "bytes_note": "from the package",
        "weights": {k: "4-bit" for k in peers}, "prep_commands": {"hf_dir": "python make_hf_checkpoint.py A B"},
        "machine_line": "AMD EPYC, 2 cores", "versions": {"python": "3.11", "edgeinfer": "0.1.0"},
    }


def test_peers_targets_and_markdown(tmp_path):
    results = {"edgeinfer-onnx": dict(_ok("edgeinfer-onnx", 1200.0, 95.0), roofline_share=0.42),
               "llama.cpp": _ok("llama.cpp", 1000.0, 90.0), "ort-genai": _ok("ort-genai", 1500.0, 90.0),
               "mlx-lm": {"peer": "mlx-lm", "status": "skipped", "reason": "mlx-lm is not installed"}}
    p, report = _report(list(results), results)
    t = {(x["test"], x["peer"]): x for x in report["targets"]}
    assert t[("tg", "llama.cpp")]["result"] == "miss" and t[("tg", "llama.cpp")]["ratio"] == pytest.approx(95 / 90)  # < 1.2x
    assert t[("tg", "ort-genai")]["result"] == "pass"  # 1.06x >= 1.0x
    assert t[("pp", "llama.cpp")]["result"] == "pass" and t[("pp", "ort-genai")]["result"] == "miss"  # 0.8x
    md = p.render_markdown(report)
    assert md.startswith(p.START) and md.endswith(p.END)
    assert "| pp512 t/s | tg128 t/s |" in md
    assert "| 1200.0 (120.0–1202.0) |" in md and "42.0%" in md and "decodes at 42.0% of the memory-bandwidth roofline" in md
    assert "tg128 ≥ 1.2x llama.cpp | 1.06x | **missed** |" in md
    assert "skipped: mlx-lm is not installed" in md
    assert "python benchmarks/peers.py -r 3" in md and "AMD EPYC" in md and "make_hf_checkpoint" in md

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\nbefore\n\n{p.START}\nold table\n{p.END}\n\nafter\n")
    p.write_section(doc, md)
    text = doc.read_text()
    assert "old table" not in text and text.count(p.START) == 1 and text.count(p.END) == 1
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    p.write_section(doc, md)  # idempotent
    assert doc.read_text() == text

    fresh = tmp_path / "NEW.md"
    fresh.write_text("# Benchmarks\n")
    p.write_section(fresh, md)
    assert fresh.read_text() == "# Benchmarks\n\n" + md + "\n"


def test_peers_targets_not_measured():
    results = {"edgeinfer-onnx": {"peer": "edgeinfer-onnx", "status": "unavailable", "reason": "no onnx backend"},
               "llama.cpp": _ok("llama.cpp", 1000.0, 90.0)}
    p, report = _report(list(results), results)
    assert all(x["ratio"] is None and x["result"].startswith("not measured") for x in report["targets"])
    md = p.render_markdown(report)
    assert "unavailable: no onnx backend" in md and "**missed**" not in md
