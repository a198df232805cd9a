"""edgeinfer next to llama.cpp, onnxruntime-genai, mlx-lm and transformers: one run, one machine, the same
thread count, prompt and lengths, interleaved over the repetitions (issue 3).

    python benchmarks/peers.py [--peers all|NAME,...] [--threads 2] [-p 512] [-n 128] [-r 5] [--no-write]

Peers (each optional; a missing one is skipped with a notice; `pip install -e '.[peers]'` installs them):
  edgeinfer-onnx  edgeinfer.load(PKG, backend="onnx", threads=N) on the package (4-bit): the native step
                  (edgeinfer/native) for prompts and decode
  edgeinfer-int8  the same package on its ONNX graph alone (int8 activations; EDGEINFER_NATIVE=off), as
                  edgeinfer decoded before the native step
  edgeinfer-mlx   edgeinfer.load(PKG, backend="mlx") on the package (MLX's CPU backend on Linux)
  llama.cpp       llama-cpp-python on the GGUF the package was converted from (Q4_1, Q8_0 embedding)
  ort-genai       onnxruntime-genai on the model its own builder makes (-p int4 -e cpu) from the same weights
  mlx-lm          mlx-lm on the CPU, on the model `mlx_lm convert -q` makes (4-bit) from the same weights
  transformers    transformers, fp32, the same weights dequantized (the baseline)

The "same weights" for the builders is an HF folder written from the package by make_hf_checkpoint.py
(fp32, dequantized from the GGUF's 4-bit values); builders re-quantize it their own way. Built models are
cached under ~/.cache/edgeinfer/peers (EDGEINFER_CACHE), keyed by the package's weights hash.

Each repetition runs every peer in its own fresh process, in an order rotated from one repetition to the
next, and each process loads its model, warms up (one prefill and a short decode, not counted) and then
measures one prefill and one decode. Separate processes because: thread settings (OMP/OpenBLAS pools,
torch, ONNX Runtime, ggml) are fixed before a library is imported and never leak between peers; two
runtimes' spinning thread pools never compete for the two cores; each peer's peak memory is its own
process's; and a crashing peer cannot take the others down. Interleaving spreads the machine's noise
(other jobs, frequency) evenly over the peers instead of onto whichever ran last.

What is measured, the same way for every peer (as `edgeinfer bench` does):
  ppP  P random token ids (seeded, the same for every peer in a repetition) through an empty context,
       timed until the first token is chosen (greedy): P / seconds. Also reported as TTFT.
  tgN  after a 16-token prompt, N decode steps (forward + greedy choice, EOS ignored): N / seconds.
Tokenization is excluded. The memory read bandwidth is measured in its own process in every repetition
(edgeinfer.sysinfo), and the highest figure is the roofline: share = bytes read per token x tg t/s / bandwidth.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEERS = ["edgeinfer-onnx", "edgeinfer-int8", "edgeinfer-mlx", "llama.cpp", "ort-genai", "mlx-lm", "transformers"]
LABELS = {
    "edgeinfer-onnx": "edgeinfer, ONNX Runtime backend",
    "edgeinfer-int8": "edgeinfer, ONNX graph alone (int8)",
    "edgeinfer-mlx": "edgeinfer, MLX backend (CPU)",
    "llama.cpp": "llama.cpp (llama-cpp-python)",
    "ort-genai": "onnxruntime-genai",
    "mlx-lm": "mlx-lm (CPU)",
    "transformers": "transformers (fp32)",
}
# what a peer needs importable, and the distribution whose version is reported
NEEDS = {
    "edgeinfer-onnx": ("onnxruntime", "onnxruntime"),
    "edgeinfer-int8": ("onnxruntime", "onnxruntime"),
    "edgeinfer-mlx": ("mlx", "mlx"),
    "llama.cpp": ("llama_cpp", "llama-cpp-python"),
    "ort-genai": ("onnxruntime_genai", "onnxruntime-genai"),
    "mlx-lm": ("mlx_lm", "mlx-lm"),
    "transformers": ("transformers", "transformers"),
}
TG_PROMPT = 16
START, END = "<!-- peers:start -->", "<!-- peers:end -->"
DOC = ROOT / "docs" / "BENCHMARKS.md"
DEFAULT_PACKAGE = "smollm2-135m-instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Targets for edgeinfer-onnx (issue 15): (test kind, peer, minimum ratio)
TARGETS = [("tg", "llama.cpp", 1.2), ("tg", "ort-genai", 1.0), ("pp", "llama.cpp", 1.0), ("pp", "ort-genai", 1.0)]
RESULT_TAG = "PEERS-RESULT "


def cache_root() -> Path:
    return Path(os.environ.get("EDGEINFER_CACHE") or Path.home() / ".cache" / "edgeinfer")


# =====================================================================================================
# workers: one peer, one process, one repetition
# =====================================================================================================


def _argmax(x) -> int:
    import numpy as np

    return int(np.argmax(np.asarray(x).reshape(-1)))


class EdgeinferPeer:
    def __init__(self, spec: dict, backend: str):
        from edgeinfer.apps.bench import load_model

        self.model, self.backend, self.threads, self.threads_note = load_model(Path(spec["package"]), backend, spec["threads"])

    def pp(self, ids):
        from edgeinfer.apps.bench import measure_pp

        tps, ttft = measure_pp(self.model, ids)
        return ttft

    def tg(self, prompt, n):
        from edgeinfer.apps.bench import measure_tg

        return n / measure_tg(self.model, prompt, n)


class LlamaCppPeer:
    def __init__(self, spec: dict):
        from llama_cpp import Llama

        t = spec["threads"]
        self.llm = Llama(model_path=spec["gguf"], n_ctx=spec["ctx"], n_batch=512, n_ubatch=512, n_threads=t,
                         n_threads_batch=t, logits_all=False, verbose=False)
        self.threads_note = f"n_threads={t}, n_threads_batch={t}, n_batch=n_ubatch=512"

    def _next(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def pp(self, ids):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        self._next()
        return time.perf_counter() - t0

    def tg(self, prompt, n):
        self.llm.reset()
        self.llm.eval(prompt)
        tok = self._next()
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = self._next()
        return time.perf_counter() - t0


class GenaiPeer:
    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        self.og = og
        t = spec["threads"]
        cfg = og.Config(spec["genai_dir"])
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": t}}}}))
        self.model = og.Model(cfg)
        self.threads_note = f"session_options.intra_op_num_threads={t}"

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: EOS is never chosen, so every step is generated
        params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length)
        return self.og.Generator(self.model, params)

    def pp(self, ids):
        gen = self._generator(len(ids) + 2)  # allocating the generator (its KV buffers) is not timed
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()  # greedy choice from the prompt's logits; runs no model step
        return time.perf_counter() - t0

    def tg(self, prompt, n):
        gen = self._generator(len(prompt) + n + 2)
        gen.append_tokens(prompt)
        gen.generate_next_token()
        t0 = time.perf_counter()
        for _ in range(n):
            gen.generate_next_token()  # one model step on the last token, then the greedy choice
        dt = time.perf_counter() - t0
        if gen.is_done() and gen.token_count() < len(prompt) + n + 1:
            raise RuntimeError("onnxruntime-genai stopped early")
        return dt


class MlxLmPeer:
    def __init__(self, spec: dict):
        import importlib

        import mlx.core as mx

        mx.set_default_device(mx.cpu)
        from mlx_lm import load

        self.mx = mx
        self.gen = importlib.import_module("mlx_lm.generate")
        from mlx_lm.models.cache import make_prompt_cache

        self.make_cache = make_prompt_cache
        self.model, _ = load(spec["mlx_dir"])
        self.threads_note = "MLX takes no thread count"

    def pp(self, ids):
        cache = self.make_cache(self.model)
        t0 = time.perf_counter()
        it = self.gen.generate_step(self.mx.array(ids), self.model, max_tokens=1, prompt_cache=cache)
        next(it)
        dt = time.perf_counter() - t0
        it.close()
        return dt

    def tg(self, prompt, n):
        cache = self.make_cache(self.model)
        it = self.gen.generate_step(self.mx.array(prompt), self.model, max_tokens=n + 1, prompt_cache=cache)
        next(it)
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        dt = time.perf_counter() - t0
        it.close()
        return dt


class TransformersPeer:
    def __init__(self, spec: dict):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        torch.set_grad_enabled(False)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval()
        self.threads_note = f"torch.set_num_threads({spec['threads']})"

    def _run(self, ids, past=None):
        out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=past, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def pp(self, ids):
        t0 = time.perf_counter()
        self._run(ids)
        return time.perf_counter() - t0

    def tg(self, prompt, n):
        tok, past = self._run(prompt)
        t0 = time.perf_counter()
        for _ in range(n):
            tok, past = self._run([tok], past)
        return time.perf_counter() - t0


def make_peer(name: str, spec: dict):
    if name == "edgeinfer-onnx":
        return EdgeinferPeer(spec, "onnx")
    if name == "edgeinfer-int8":
        os.environ["EDGEINFER_NATIVE"] = "off"  # this worker's own process
        return EdgeinferPeer(spec, "onnx")
    if name == "edgeinfer-mlx":
        return EdgeinferPeer(spec, "mlx")
    return {"llama.cpp": LlamaCppPeer, "ort-genai": GenaiPeer, "mlx-lm": MlxLmPeer, "transformers": TransformersPeer}[name](spec)


def peak_rss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def worker(name: str, spec: dict) -> dict:
    """Runs in the peer's own process: load, warm up, one pp and one tg."""
    if name == "bandwidth":
        from edgeinfer.sysinfo import measure_read_bandwidth

        return {"status": "ok", **measure_read_bandwidth(spec["threads"])}
    t0 = time.perf_counter()
    try:
        peer = make_peer(name, spec)
    except Exception as e:  # an optional peer that cannot run here is reported, not fatal
        from edgeinfer.errors import EdgeInferError

        kind = "unavailable" if isinstance(e, (EdgeInferError, ImportError)) else "error"
        return {"status": kind, "reason": f"{type(e).__name__}: {e}".splitlines()[0]}
    load_s = time.perf_counter() - t0
    n = spec["n"]
    peer.pp(spec["warmup_pp"])
    peer.tg(spec["warmup_tg"], min(n, 16))
    pp_s = peer.pp(spec["pp_ids"])
    tg_s = peer.tg(spec["tg_prompt"], n)
    return {"status": "ok", "load_s": load_s, "pp_s": pp_s, "pp_tps": len(spec["pp_ids"]) / pp_s, "ttft_s": pp_s,
            "tg_s": tg_s, "tg_tps": n / tg_s, "peak_rss_bytes": peak_rss_bytes(),
            "threads_note": getattr(peer, "threads_note", "")}


# =====================================================================================================
# the driver
# =====================================================================================================


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONWARNINGS", None)
    return env


def run_worker(name: str | None, spec: dict, timeout: float, script: str = __file__, tag: str = RESULT_TAG) -> dict:
    """Runs ``script --worker [name]`` in a fresh process with ``spec`` on stdin; its result is the last
    stdout line starting with ``tag`` (other benchmarks reuse this with their own script and tag)."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker"] + ([name] if name else [])
    try:
        r = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=thread_env(spec["threads"]),
                           timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "reason": f"exit {r.returncode}: {tail}"}


def _run_prep(cmd: list[str], out: Path, log) -> None:
    log(f"preparing {out}: {' '.join(shlex.quote(c) for c in cmd)}")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    cmd = [tmp if c == str(out) else c for c in cmd]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=str(ROOT), env=thread_env(os.cpu_count() or 1))
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} failed: {tail}")
    tmp.rename(out)


def prepare(peers: list[str], pkg, cache: Path, log) -> tuple[dict, dict, dict]:
    """Builds (once, cached) the HF folder, the onnxruntime-genai model and the mlx-lm model that the
    peers need. Returns (paths, commands, failures)."""
    key = pkg.manifest["files"]["model.safetensors"]["sha256"][:12]
    base = f"{pkg.name}-{key}"
    paths = {"hf_dir": cache / f"{base}-hf-fp32", "genai_dir": cache / f"{base}-genai-int4-cpu", "mlx_dir": cache / f"{base}-mlx-q4"}
    py = sys.executable
    cmds = {
        "hf_dir": [py, "benchmarks/make_hf_checkpoint.py", str(pkg.path), str(paths["hf_dir"]), "--dtype", "float32"],
        "genai_dir": [py, "-m", "onnxruntime_genai.models.builder", "-i", str(paths["hf_dir"]), "-o", str(paths["genai_dir"]),
                      "-p", "int4", "-e", "cpu", "-c", str(cache / "genai-builder-cache")],
        "mlx_dir": [py, "-m", "mlx_lm", "convert", "--hf-path", str(paths["hf_dir"]), "--mlx-path", str(paths["mlx_dir"]), "-q"],
    }
    need = {"transformers": ["hf_dir"], "ort-genai": ["hf_dir", "genai_dir"], "mlx-lm": ["hf_dir", "mlx_dir"]}
    wanted = []
    for p in peers:
        for k in need.get(p, []):
            if k not in wanted:
                wanted.append(k)
    failures = {}
    cache.mkdir(parents=True, exist_ok=True)
    for k in wanted:
        if paths[k].exists():
            continue
        if k != "hf_dir" and "hf_dir" in failures:
            failures[k] = failures["hf_dir"]
            continue
        try:
            _run_prep(cmds[k], paths[k], log)
        except RuntimeError as e:
            failures[k] = str(e)
    return {k: str(v) for k, v in paths.items()}, {k: display(v) for k, v in cmds.items() if k in wanted}, failures


def display(cmd: list[str]) -> str:
    """A command as a reader would type it: python for this interpreter, paths relative to the
    repository or the home folder."""
    home = str(Path.home())
    out = []
    for c in cmd:
        c = "python" if c == sys.executable else str(c)
        if c.startswith(str(ROOT) + os.sep):
            c = c[len(str(ROOT)) + 1:]
        elif c.startswith(home + os.sep):
            c = "~" + c[len(home):]
        out.append(c if c.startswith("~") else shlex.quote(c))
    return " ".join(out)


def summarize(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "mean": statistics.fmean(samples),
            "sd": statistics.stdev(samples) if len(samples) > 1 else 0.0, "n": len(samples)}


def aggregate(name: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        bad = runs[-1] if runs else {"status": "skipped", "reason": "not run"}
        return {"peer": name, "status": bad["status"], "reason": bad.get("reason", "")}
    out = {"peer": name, "status": "ok", "reps": len(ok),
           "pp_tps": summarize([r["pp_tps"] for r in ok]), "tg_tps": summarize([r["tg_tps"] for r in ok]),
           "ttft_s": summarize([r["ttft_s"] for r in ok]), "load_s": summarize([r["load_s"] for r in ok]),
           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok), "threads_note": ok[-1].get("threads_note", ""),
           "samples": {"pp_tps": [r["pp_tps"] for r in ok], "tg_tps": [r["tg_tps"] for r in ok]}}
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        out["failed_reps"] = len(failed)
        out["reason"] = failed[-1].get("reason", "")
    return out


def ratios(results: dict[str, dict]) -> list[dict]:
    """edgeinfer-onnx against the targets of issue 15: pass, miss, or not measured."""
    ours = results.get("edgeinfer-onnx", {})
    rows = []
    for kind, peer, need in TARGETS:
        other = results.get(peer, {})
        key = f"{kind}_tps"
        row = {"test": kind, "peer": peer, "target": need}
        if ours.get("status") == "ok" and other.get("status") == "ok":
            row["ratio"] = ours[key]["median"] / other[key]["median"]
            row["result"] = "pass" if row["ratio"] >= need else "miss"
        else:
            missing = [n for n, r in (("edgeinfer-onnx", ours), (peer, other)) if r.get("status") != "ok"]
            row["ratio"] = None
            row["result"] = "not measured (" + ", ".join(missing) + " did not run)"
        rows.append(row)
    return rows


def _f(s: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    if not s:
        return "—"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


def render_markdown(report: dict) -> str:
    """The section of docs/BENCHMARKS.md between the peers markers (markers included)."""
    c = report["config"]
    p, n = c["prompt_tokens"], c["gen_tokens"]
    lines = [START, "## Side by side with llama.cpp, onnxruntime-genai, mlx-lm and transformers", "",
             f"Written by `benchmarks/peers.py` from one run ({report['date']}), {c['reps']} repetition"
             f"{'s' if c['reps'] != 1 else ''} interleaved "
             f"(every peer in its own fresh process each repetition, the order rotated), {c['threads']} threads for "
             f"every peer, pp{p} (random token ids, empty context, until the first greedy token) and tg{n} (after a "
             f"{TG_PROMPT}-token prompt, greedy, EOS ignored); warm-up not counted; median (lowest–highest) over the "
             "repetitions. Tokenization is excluded.", "",
             f"Machine: {report['machine_line']}." + _load_note(report.get("load_average")), "",
             "```sh", report["command"], "```", "",
             f"| peer | weights | pp{p} t/s | tg{n} t/s | TTFT ({p} tok) ms | peak RSS MiB | decode roofline share |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in report["peers"]:
        r = report["results"][name]
        label = LABELS.get(name, name)
        weights = report["weights"].get(name, "")
        if r["status"] != "ok":
            lines.append(f"| {label} | {weights} | {r['status']}: {r.get('reason', '')} | | | | |".replace("\n", " "))
            continue
        share = r.get("roofline_share")
        lines.append(f"| {label} | {weights} | {_f(r['pp_tps'])} | {_f(r['tg_tps'])} | {_f(r['ttft_s'], 0, 1000)} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {'—' if share is None else f'{100 * share:.1f}%'} |")
    lines += ["", "Targets for edgeinfer's ONNX backend (issue 15), as ratios of the medians above:", "",
              "| target | ratio | result |", "| --- | ---: | --- |"]
    for t in report["targets"]:
        ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        result = t["result"] if t["result"] != "miss" else "**missed**"
        lines.append(f"| {t['test']}{p if t['test'] == 'pp' else n} ≥ {t['target']:.1f}x {t['peer']} | {ratio} | {result} |")
    ours = report["results"].get("edgeinfer-onnx", {})
    if ours.get("roofline_share") is not None:
        lines += ["", f"edgeinfer's ONNX backend decodes at {100 * ours['roofline_share']:.1f}% of the memory-bandwidth "
                      "roofline (below)."]
    bw = report.get("bandwidth")
    if bw:
        lines += ["", f"Memory read bandwidth, measured in the same run: {bw['bytes_per_s'] / 1e9:.1f} GB/s, the highest of "
                      f"{bw['n']} measurements, one each repetition ({bw['method']}). Roofline share = weight bytes read "
                      "per decoded token x tg t/s / that bandwidth; bytes per token: " + report["bytes_note"] + "."]
    notes = [f"- {LABELS.get(k, k)}: {r['threads_note']}" for k, r in report["results"].items() if r.get("threads_note")]
    if notes:
        lines += ["", "Threads:", ""] + notes
    if report.get("prep_commands"):
        lines += ["", "The peers' models were made from the package with:", "", "```sh"]
        lines += list(report["prep_commands"].values()) + ["```"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", END]
    return "\n".join(lines)


def _load_note(la: dict | None) -> str:
    if not la or la.get("start") is None or la.get("end") is None:
        return ""
    return (f" Load average (1 min) {la['start']:.2f} at the start of the run and {la['end']:.2f} at its end "
            "(the benchmark's own processes count; far above the thread count means other work shared the machine).")


def write_section(doc: Path, section: str) -> None:
    """Replaces the text between the peers markers of ``doc`` (markers included), or appends the section."""
    text = doc.read_text() if doc.exists() else ""
    i, j = text.find(START), text.find(END)
    if i >= 0 and j > i:
        text = text[:i] + section + text[j + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def bytes_per_token(pkg, gguf: Path | None) -> tuple[dict, str]:
    """Weight bytes read per decoded token: edgeinfer's from the package, llama.cpp's from the GGUF's tensors."""
    from edgeinfer.sysinfo import decode_bytes_per_token, native_decode_bytes_per_token

    ours = decode_bytes_per_token(pkg)
    out = {"edgeinfer-onnx": ours["bytes"], "edgeinfer-int8": ours["bytes"], "edgeinfer-mlx": ours["bytes"]}
    note = f"edgeinfer {ours['bytes'] / 2**20:.1f} MiB ({ours['basis']})"
    nat = native_decode_bytes_per_token(pkg)
    if nat:
        out["edgeinfer-onnx"] = nat["bytes"]
        note = f"edgeinfer-onnx {nat['bytes'] / 2**20:.1f} MiB ({nat['basis']}); the others of edgeinfer " + note[len("edgeinfer "):]
    if gguf and gguf.exists():
        try:
            from gguf import GGUFReader

            r = GGUFReader(str(gguf))
            sizes = {t.name: int(t.n_bytes) for t in r.tensors}
            emb = sizes.get("token_embd.weight", 0)
            tied = "output.weight" not in sizes
            rest = sum(v for k, v in sizes.items() if k != "token_embd.weight")
            out["llama.cpp"] = int(rest + (emb if tied else 0) + emb / max(1, pkg.spec.vocab_size))
            note += f"; llama.cpp {out['llama.cpp'] / 2**20:.1f} MiB (the GGUF's tensors, the same way)"
        except Exception:  # the gguf reader is best effort here
            pass
    note += ("; the other peers' files differ in layout, so no share is given for them (the MLX backend "
             "on a CPU holds the weights as float32, so it reads about 4x more than its share assumes)")
    return out, note


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="all", help=f"comma-separated subset of: {', '.join(PEERS)} (default all)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every peer (default 2)")
    ap.add_argument("-p", type=int, default=512, help="prompt tokens of the prefill test (default 512)")
    ap.add_argument("-n", type=int, default=128, help="decode steps (default 128)")
    ap.add_argument("-r", type=int, default=5, help="repetitions (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--package", default=DEFAULT_PACKAGE, help=f"edgeinfer package or catalog name (default {DEFAULT_PACKAGE})")
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF for llama.cpp (default: the package's source GGUF)")
    ap.add_argument("--cache", type=Path, default=None, help="where built peer models go (default ~/.cache/edgeinfer/peers)")
    ap.add_argument("--doc", type=Path, default=DOC, help="the markdown file whose peers section is replaced")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing it into the doc")
    ap.add_argument("--json", type=Path, default=None, help="also write the full results here")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one peer process may take (default 1800)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        spec = json.loads(sys.stdin.read())
        print(RESULT_TAG + json.dumps(worker(a.worker, spec)), flush=True)
        return 0

    from edgeinfer.errors import EdgeInferError

    try:
        return drive(a)
    except EdgeInferError as e:
        print(f"peers: {e}", file=sys.stderr)
        return 2


def drive(a) -> int:
    import numpy as np

    from edgeinfer import sysinfo
    from edgeinfer.apps.resolve import resolve_package
    from edgeinfer.errors import EdgeInferError
    from edgeinfer.package import open_package

    def log(s):
        print(s, file=sys.stderr, flush=True)

    peers = PEERS if a.peers == "all" else [p.strip() for p in a.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise EdgeInferError(f"unknown peer {', '.join(unknown)} (known: {', '.join(PEERS)})")
    for flag, v in (("-p", a.p), ("-n", a.n), ("-r", a.r), ("--threads", a.threads)):
        if v < 1:
            raise EdgeInferError(f"{flag} must be at least 1 (got {v})")
    pkg = open_package(resolve_package(a.package))
    src = pkg.manifest.get("source", {})
    gguf = a.gguf or (Path(src["path"]) if str(src.get("path", "")).endswith(".gguf") else cache_root() / "gguf" / DEFAULT_GGUF)
    cache = a.cache or cache_root() / "peers"

    results: dict[str, dict] = {}
    active = []
    for p in peers:
        mod, dist = NEEDS[p]
        if importlib.util.find_spec(mod) is None:
            results[p] = {"peer": p, "status": "skipped", "reason": f"{dist} is not installed (pip install -e '.[peers]')"}
            log(f"{p}: skipped, {dist} is not installed")
        elif p == "llama.cpp" and not gguf.exists():
            results[p] = {"peer": p, "status": "skipped", "reason": f"{gguf} is missing"}
            log(f"{p}: skipped, {gguf} is missing")
        else:
            active.append(p)
    paths, prep_cmds, failures = prepare(active, pkg, cache, log)
    need = {"transformers": "hf_dir", "ort-genai": "genai_dir", "mlx-lm": "mlx_dir"}
    for p in list(active):
        if need.get(p) in failures:
            results[p] = {"peer": p, "status": "error", "reason": failures[need[p]]}
            log(f"{p}: skipped, {failures[need[p]]}")
            active.remove(p)

    vocab = pkg.spec.vocab_size
    runs: dict[str, list[dict]] = {p: [] for p in active}
    bws: list[dict] = []
    base_spec = {"package": str(pkg.path), "gguf": str(gguf), "threads": a.threads, "n": a.n,
                 "ctx": max(a.p, TG_PROMPT + a.n) + 64, **paths}
    t_start = time.perf_counter()
    load_start = _loadavg()
    if load_start is not None and load_start > 0.5:
        log(f"note: the 1-minute load average is {load_start:.2f} before the run: other work is using the CPU, and "
            "peers whose threads spin-wait (llama.cpp's OpenMP, ONNX Runtime) suffer most; run on an idle machine for the record")
    for rep in range(a.r):
        rng = np.random.default_rng([a.seed, rep])
        spec = dict(base_spec,
                    pp_ids=rng.integers(0, vocab, a.p).tolist(), tg_prompt=rng.integers(0, vocab, TG_PROMPT).tolist(),
                    warmup_pp=rng.integers(0, vocab, a.p).tolist(), warmup_tg=rng.integers(0, vocab, TG_PROMPT).tolist())
        order = ["bandwidth"] + active[rep % len(active):] + active[: rep % len(active)] if active else ["bandwidth"]
        for name in order:
            if name != "bandwidth" and runs[name] and runs[name][-1]["status"] in ("unavailable",):
                continue  # a peer that cannot load here is not retried every repetition
            r = run_worker(name, spec, a.timeout)
            if name == "bandwidth":
                if r.get("status") == "ok":
                    bws.append(r)
                continue
            runs[name].append(r)
            if r["status"] == "ok":
                log(f"rep {rep + 1}/{a.r} {name}: pp{a.p} {r['pp_tps']:.1f} t/s, tg{a.n} {r['tg_tps']:.1f} t/s")
            else:
                log(f"rep {rep + 1}/{a.r} {name}: {r['status']}: {r.get('reason', '')}")
    for p in active:
        results[p] = aggregate(p, runs[p])

    bpt, bytes_note = bytes_per_token(pkg, gguf)
    bandwidth = None
    if bws:
        best = max(bws, key=lambda b: b["bytes_per_s"])
        bandwidth = {"bytes_per_s": best["bytes_per_s"], "n": len(bws), "method": best["method"],
                     "samples": [b["bytes_per_s"] for b in bws]}
        for p, r in results.items():
            if r.get("status") == "ok" and p in bpt:
                r["roofline_share"] = bpt[p] * r["tg_tps"]["median"] / bandwidth["bytes_per_s"]
    machine = sysinfo.machine(extra_versions=("llama-cpp-python", "onnxruntime-genai", "mlx-lm", "transformers", "torch"))
    command = "python benchmarks/peers.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "config": {"prompt_tokens": a.p, "gen_tokens": a.n, "reps": a.r, "threads": a.threads, "seed": a.seed,
                   "package": str(pkg.path), "gguf": str(gguf)},
        "peers": peers,
        "results": results,
        "targets": ratios(results),
        "bandwidth": bandwidth,
        "bytes_per_token": bpt,
        "bytes_note": bytes_note,
        "weights": weights_labels(pkg, gguf),
        "prep_commands": prep_cmds,
        "machine": machine,
        "machine_line": sysinfo.describe(machine).split("; ")[0] + f", {platform.python_implementation()} {platform.python_version()}",
        "versions": {k: v for k, v in machine["versions"].items() if k != "blas"},
        "seconds": time.perf_counter() - t_start,
        "load_average": {"start": load_start, "end": _loadavg()},
    }
    section = render_markdown(report)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    if a.no_write:
        print(section)
    else:
        write_section(a.doc, section)
        log(f"wrote the peers section of {a.doc}")
    for t in report["targets"]:
        log(f"target {t['test']} >= {t['target']}x {t['peer']}: "
            + ("—" if t["ratio"] is None else f"{t['ratio']:.2f}x") + f" {t['result']}")
    return 0


def _loadavg() -> float | None:
    """The 1-minute load average: a reader can see whether other work shared the machine."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def weights_labels(pkg, gguf: Path) -> dict[str, str]:
    q = pkg.quantization
    ours = f"package: {q.get('bits')}-bit g{q.get('group_size')}" + (" (embedding 8-bit)" if q.get("tensors", {}).get("embed") else "")
    return {
        "edgeinfer-onnx": ours, "edgeinfer-int8": ours, "edgeinfer-mlx": ours + ", held as fp32 on a CPU",
        "llama.cpp": f"{gguf.name}", "ort-genai": "builder int4 (block 32)", "mlx-lm": "mlx_lm convert -q (4-bit g64)",
        "transformers": "fp32 (dequantized)",
    }


if __name__ == "__main__":
    sys.exit(main())
