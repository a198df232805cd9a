"""The machine a benchmark ran on, its memory read bandwidth, and the bytes a package's decode step reads.

Used by ``edgeinfer bench`` and ``benchmarks/peers.py``. Nothing here imports MLX or ONNX Runtime unless
asked for their versions.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

# -- the machine --------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            return platform.processor()
    m = re.search(r"^(?:model name|Model Name|Hardware)\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def isa_flags() -> list[str]:
    """The vector extensions that matter for LLM kernels: avx2, fma, f16c, avx512*, avx_vnni, amx*, neon,
    asimd dot product (dotprod), i8mm, sve, sme."""
    if sys.platform == "darwin":
        if platform.machine() == "arm64":
            out = ["neon"]
            for key, name in (("hw.optional.arm.FEAT_DotProd", "dotprod"), ("hw.optional.arm.FEAT_I8MM", "i8mm"),
                              ("hw.optional.arm.FEAT_BF16", "bf16"), ("hw.optional.arm.FEAT_SME", "sme")):
                try:
                    r = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
                    if r.stdout.strip() == "1":
                        out.append(name)
                except (OSError, subprocess.SubprocessError):
                    pass
            return out
        return []
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    flags = set(m.group(1).split()) if m else set()
    keep = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
            "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "i8mm", "sve", "sve2", "sme"]
    out = [f for f in keep if f in flags]
    if "asimd" in out and "neon" not in out:  # aarch64 Linux calls NEON "asimd"
        out.insert(0, "neon")
    return out


def memory_bytes() -> int:
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            pass
    return 0


def l3_bytes() -> int:
    """The largest CPU cache (Linux sysfs), 0 when unknown."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.match(r"(\d+)([KMG]?)", _read(str(f)).strip())
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    return best


def version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    from . import __version__

    out = {"python": platform.python_version(), "edgeinfer": __version__}
    for dist in ("numpy", "mlx", "onnxruntime", *extra):
        v = version_of(dist)
        if v:
            out[dist] = v
    from . import _blas

    if _blas.loaded:
        out["blas"] = _blas.loaded
    return out


def machine(extra_versions: tuple[str, ...] = ()) -> dict:
    """A description of the machine and the software: CPU, cores, ISA, memory, OS, versions."""
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count() or 0,
        "isa": isa_flags(),
        "memory_bytes": memory_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions(extra_versions),
    }


def describe(m: dict) -> str:
    """One line: 'AMD EPYC, x86_64, 2 cores (avx2 avx512f ...), 23.4 GiB, Linux 6.18; Python 3.11.7, ...'."""
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items() if k != "blas")
    blas = m["versions"].get("blas")
    return (f"{m['cpu']}, {m['arch']}, {m['cores']} cores ({' '.join(m['isa']) or 'no vector flags read'}), "
            f"{m['memory_bytes'] / 2**30:.1f} GiB, {m['os']}; {v}" + (f"; BLAS {blas}" if blas else ""))


# -- memory read bandwidth ------------------------------------------------------------------------------

BANDWIDTH_METHOD = ("numpy float64 sum over a buffer of {mib} MiB (8x the largest cache, at least 256 MiB), "
                    "split across {threads} thread(s) (numpy releases the GIL inside the reduction) and on 1 thread; "
                    "best of {trials} passes each; the higher of the two")


def measure_read_bandwidth(threads: int = 1, trials: int = 5, size_bytes: int | None = None) -> dict:
    """Measures the memory read bandwidth in bytes/s: the best of ``trials`` passes of a numpy sum over a
    buffer far larger than the caches, on 1 thread and on ``threads`` threads (each summing its own
    slice), taking the higher. Returns {"bytes_per_s", "single_thread", "multi_thread", "threads",
    "buffer_bytes", "method"}."""
    import numpy as np

    size = size_bytes or max(256 << 20, 8 * l3_bytes())
    buf = np.ones(size // 8, dtype=np.float64)  # written once, so every page is real
    threads = max(1, int(threads))

    def one_pass(parts) -> float:
        if len(parts) == 1:
            t0 = time.perf_counter()
            parts[0].sum()
            return time.perf_counter() - t0
        barrier = threading.Barrier(len(parts) + 1)

        def work(p):
            barrier.wait()
            p.sum()

        ts = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        return time.perf_counter() - t0

    single = buf.nbytes / min(one_pass([buf]) for _ in range(trials))
    multi = None
    if threads > 1:
        parts = np.array_split(buf, threads)
        multi = buf.nbytes / min(one_pass(parts) for _ in range(trials))
    best = max(single, multi or 0.0)
    return {"bytes_per_s": best, "single_thread": single, "multi_thread": multi, "threads": threads,
            "buffer_bytes": int(buf.nbytes),
            "method": BANDWIDTH_METHOD.format(mib=buf.nbytes >> 20, threads=threads, trials=trials)}


def measure_read_bandwidth_subprocess(threads: int = 1, trials: int = 5) -> dict:
    """The same, in a child process, so that its buffer does not count in the caller's peak memory."""
    code = ("import json,sys; from edgeinfer.sysinfo import measure_read_bandwidth as m; "
            f"print(json.dumps(m(threads={int(threads)}, trials={int(trials)})))")
    env = dict(os.environ, EDGEINFER_BLAS="none")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        from .errors import EdgeInferError

        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeInferError(f"the memory bandwidth measurement failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- bytes read per decoded token -------------------------------------------------------------------------

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_sizes(path: str | Path) -> dict[str, tuple[list[int], int]]:
    """name -> (shape, bytes) from a safetensors file's header (the data is not read)."""
    from .memory import safetensors_index

    return {name: (t["shape"], t["end"] - t["start"]) for name, t in safetensors_index(path).items()}


def native_decode_bytes_per_token(pkg) -> dict | None:
    """What one decode step of the native step (edgeinfer.native, the ONNX backend's default) reads: its
    own copy of every linear, the head included (rows padded to 8, no biases for symmetric linears, so
    not the package's bytes), and one embedding row; None where that step cannot run the package."""
    from .backends.onnx_backend import native_unavailable

    if native_unavailable(pkg) is not None:
        return None
    from .native import resident_bytes

    stored = decode_bytes_per_token(pkg)
    row = stored["embedding_bytes"] / max(1, int(pkg.spec.vocab_size))
    lin = resident_bytes(pkg)
    return {"bytes": int(lin + row), "basis": "the native step's copy of the linears, the head included, and one embedding row; KV cache not counted"}


def decode_bytes_per_token(pkg, experts_per_token: int | None = None) -> dict:
    """The weight bytes one decode step reads, from the package as stored (its manifest and the tensor
    header of its weights file): every tensor of the layers, the final norm, the output head, and one
    row of the embedding; a tied head reads the whole embedding matrix (with its scales and biases).
    In an MoE layer only the experts a token runs count (``experts_per_token``, default the model's top-k,
    of the stacked experts). The KV cache is not counted (it grows with the context; for a short context
    it is small).

    Returns {"bytes", "embedding_bytes", "head_bytes", "layer_bytes", "tied", "basis"}."""
    sizes = safetensors_sizes(pkg.weights_path)
    tied = bool(pkg.spec.tie_embeddings)
    vocab = max(1, int(pkg.spec.vocab_size))
    embed = sum(b for n, (_, b) in sizes.items() if n.startswith("embed."))
    head = sum(b for n, (_, b) in sizes.items() if n.startswith("lm_head."))
    rest = sum(b for n, (_, b) in sizes.items() if not n.startswith(("embed.", "lm_head.")) and ".moe.experts." not in n)
    experts = sum(b for n, (_, b) in sizes.items() if ".moe.experts." in n)
    if experts:
        k = experts_per_token or pkg.spec.num_experts_per_tok
        rest += experts * k // pkg.spec.num_experts
    row = embed / vocab
    head_read = embed if tied else head
    q = pkg.quantization
    basis = (f"package weights as stored ({q.get('bits', 16)}-bit" + (f", groups of {q['group_size']}" if q.get("group_size") else "")
             + "), one embedding row, " + ("the tied head (whole embedding)" if tied else "the head")
             + (f", {experts_per_token or pkg.spec.num_experts_per_tok} of {pkg.spec.num_experts} experts per MoE layer" if experts else "")
             + "; KV cache not counted")
    return {"bytes": int(rest + head_read + row), "embedding_bytes": int(embed), "head_bytes": int(head_read),
            "layer_bytes": int(rest), "tied": tied, "basis": basis}


if __name__ == "__main__":  # python -m edgeinfer.sysinfo [THREADS]: the machine and its read bandwidth
    t = int(sys.argv[1]) if len(sys.argv) > 1 else (os.cpu_count() or 1)
    m = machine()
    print(describe(m))
    bw = measure_read_bandwidth(t)
    print(f"read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (1 thread {bw['single_thread'] / 1e9:.1f}"
          + (f", {t} threads {bw['multi_thread'] / 1e9:.1f}" if bw["multi_thread"] else "") + ")")
