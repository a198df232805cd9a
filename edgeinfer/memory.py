"""The memory planner: decides before loading how a package fits a memory budget, and says why.

On a laptop the weights, the KV cache and everything else share one pool of memory. ``plan_memory``
estimates the peak memory of the process for a configuration, term by term:

- the process itself before loading (measured: its resident set with the tokenizer loaded);
- the resident weights: exact, from the package (the manifest's file size and the safetensors header),
  at the precision they will have in memory (dequantized to the compute dtype, or kept quantized);
- the transient of loading (one part's source while it is converted);
- the KV cache at the planned context, at the KV precision, with sliding-window layers in a ring of
  about their window;
- activations of a prefill chunk (attention scores dominate) and the backend's workspace;
- the buffers of streamed layers (weights read from the package file at every step).

and picks the first configuration that fits, trying levers in order of cost: float weights when they
fit, else quantized ones (MLX's CPU backend is faster with float weights); the KV cache in the compute
dtype, else fp16; the model's full context, else (when the user did not ask for a context) the largest
context that fits; all layers resident, else the first k resident and the rest read from disk at every
step. MoE models on MLX have a lever before the context: all experts resident, else an expert cache of
the most experts per layer that fit (the others read from disk when routed to; at least top-k). When
nothing fits it refuses, naming the smallest budget that would work.

R-Sparse low-rank factors and MoE expert budgets are further levers; this build has neither (the plan
says so rather than pretending).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeInferError

MiB = 1 << 20
GiB = 1 << 30
KV_STEP = 256  # the KV cache grows in steps of this many tokens
RING_SLACK = 64  # sliding-window rings hold the window plus this many tokens (KVCache's default)
MIN_CONTEXT = 256  # the planner does not shrink the context below this on its own
# Measured on MLX's Linux CPU backend: the process grows beyond MLX's own peak counter by about 6 MiB
# (threads, allocator slack) plus BLAS packing buffers that grow with the largest matrix, up to about
# 26 MiB (tiny models: +6 MiB; SmolLM2: +32 MiB); see tests/test_memory.py. ONNX: an estimate. The
# native step: its tables, thread pool and what the load leaves on the heap, measured at 1-5 MB beyond
# its weights, cache and buffers, with room for a machine whose allocator keeps more.
WORKSPACE = {"mlx": (6 * MiB, 26 * MiB), "onnx": (64 * MiB, 0), "native": (12 * MiB, 0)}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ST_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "F64": 8, "I64": 8}


def fmt_bytes(n: float) -> str:
    n = float(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": MiB,
          "g": 1000**3, "gb": 1000**3, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def parse_budget(text: str | int | float, total: int | None = None) -> int:
    """``"1.5GB"``, ``"800MiB"``, ``"60%"`` (of the device's memory, ``total``) or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|[a-z]*)", s)
    if not m or (m.group(2) not in _UNITS and m.group(2) != "%"):
        raise EdgeInferError(f"cannot read the memory budget {text!r}; write it like 1.5GB, 800MiB or 60%")
    value = float(m.group(1))
    if m.group(2) == "%":
        if not 0 < value <= 100:
            raise EdgeInferError(f"a memory budget in percent must be above 0 and at most 100, not {text}")
        total = total if total is not None else device_memory()["total"]
        return int(total * value / 100)
    return int(value * _UNITS[m.group(2)])


# -- the device --------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), None when there is none."""
    rel = "/"
    text = _read("/proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[0] == "0" or "memory" in parts[1].split(",")):
            rel = parts[2] or "/"
            break
    for f in (f"/sys/fs/cgroup{rel}/memory.max", "/sys/fs/cgroup/memory.max",
              f"/sys/fs/cgroup/memory{rel}/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        v = _read(f)
        if v and v != "max" and v.isdigit() and int(v) < (1 << 60):
            return int(v)
    return None


def _meminfo() -> dict[str, int]:
    out = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts and parts[0].isdigit():
            out[k] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def device_memory() -> dict:
    """``{"total", "available", "source"}``: the memory this process may plan with, and where that
    figure comes from (macOS: ``hw.memsize`` and MLX's recommended working set; Linux: the cgroup limit
    if one is set, else MemAvailable)."""
    if sys.platform == "darwin":
        import subprocess

        total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True).stdout.strip() or 0)
        avail, source = total, "hw.memsize"
        try:
            import mlx.core as mx

            info = mx.metal.device_info() if hasattr(mx, "metal") else mx.device_info()
            ws = int(info.get("max_recommended_working_set_size", 0))
            if ws:
                avail, source = min(total, ws), "MLX's recommended working set (hw.memsize " + fmt_bytes(total) + ")"
        except Exception:
            pass
        return {"total": total, "available": avail, "source": source}
    info = _meminfo()
    total = info.get("MemTotal", 0)
    limit = cgroup_limit()
    if limit is not None:
        return {"total": min(total, limit) if total else limit, "available": limit, "source": "the cgroup memory limit"}
    return {"total": total, "available": info.get("MemAvailable", total), "source": "MemAvailable"}


def headroom(dev: dict) -> int:
    """Left for the OS and other programs: a quarter of the memory on macOS (where the GPU shares it),
    a tenth (at least 256 MiB, at most 2 GiB) elsewhere."""
    if sys.platform == "darwin":
        return max(dev["total"] // 4, GiB) if dev["source"] == "hw.memsize" else 0
    return min(max(dev["available"] // 10, 256 * MiB), 2 * GiB)


def default_budget(baseline: int = 0) -> tuple[int, str]:
    """The budget when the user gives none: what the device has available, less headroom, plus what this
    process already holds (it counts in the plan)."""
    dev = device_memory()
    room = headroom(dev)
    b = max(0, dev["available"] - room) + (baseline if dev["source"] == "MemAvailable" else 0)
    return b, f"device default: {dev['source']} {fmt_bytes(dev['available'])} less {fmt_bytes(room)} headroom"


def process_rss(trim: bool = False) -> int:
    """The resident set of this process now (Linux), or its peak so far elsewhere. ``trim``: on glibc the
    heap's free memory is returned first (a tokenizer's parse leaves tens of MB free but resident, which a
    load that allocates with malloc, as the native step's does, reuses)."""
    if trim:
        trim_heap()
    statm = _read("/proc/self/statm")
    if statm:
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def trim_heap() -> None:
    """Returns the heap's free memory to the OS (glibc's malloc_trim; nothing elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


# -- the package --------------------------------------------------------------------------------------
def safetensors_index(path: str | Path) -> dict[str, dict]:
    """Tensor name -> ``{"dtype", "shape", "start", "end"}`` with absolute byte offsets in the file,
    from the safetensors header alone."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise EdgeInferError(f"cannot read the safetensors header of {path}: {e}") from None
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = {"dtype": t["dtype"], "shape": list(t["shape"]), "start": base + a, "end": base + b}
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass
class Part:
    """A loadable unit of the weights: the embedding, the head, the final norm or one layer."""

    name: str
    stored: int  # bytes in the file
    quantized: int  # bytes in memory when kept quantized (scales in the compute dtype)
    dequantized: int  # bytes in memory when dequantized to the compute dtype
    transient_q: int  # extra bytes while loading it quantized
    transient_dq: int  # extra bytes while loading it dequantized


def weight_parts(pkg, compute_dtype: str, key_of=None) -> list[Part]:
    """Per part, its bytes on disk and in memory, exact from the safetensors header. Quantized scales and
    biases are held in the compute dtype (in their stored dtype under bfloat16), like the MLX backend.
    ``key_of(name)``: another grouping (None leaves a tensor out), e.g. one MoE layer's stacked experts."""
    dt = DTYPE_BYTES[compute_dtype]
    stored_compute = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[compute_dtype]
    index = safetensors_index(pkg.weights_path)
    groups: dict[str, list[str]] = {}
    for name in index:
        key = key_of(name) if key_of else ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]
        if key is not None:
            groups.setdefault(key, []).append(name)
    parts = []
    for key, names in groups.items():
        stored = q = dq = tq = tdq = 0
        for name in names:
            t = index[name]
            nbytes = t["end"] - t["start"]
            numel = _numel(t["shape"])
            stored += nbytes
            owner = name.rsplit(".", 1)[0]
            # A tensor kept in its stored dtype becomes the resident array itself (no transient); one
            # that is converted holds its stored source until the conversion is done.
            cast = nbytes if t["dtype"] != stored_compute else 0
            if name.endswith((".scales", ".biases")) and owner + ".weight" in index:
                sdt = _ST_BYTES[t["dtype"]] if compute_dtype == "bfloat16" else dt
                q += numel * sdt
                tq += 0 if compute_dtype == "bfloat16" else cast
                tdq += nbytes + numel * 4  # cast to float32 for dequantizing
            elif name.endswith(".weight") and owner + ".scales" in index:
                scales = index[owner + ".scales"]
                full = int(t["shape"][0]) * _numel(scales["shape"][1:]) * _group_size(pkg, owner)
                q += nbytes
                dq += full * dt
                # kept quantized: the packed weight is the resident array; dequantized: the packed
                # source and the float32 result (then cast to the compute dtype)
                tdq += nbytes + (full * 4 if dt != 4 else 0)
            else:
                q += numel * dt
                dq += numel * dt
                tq += cast
                tdq += cast
        parts.append(Part(key, stored, q, dq, tq, tdq))
    return parts


def _group_size(pkg, base: str) -> int:
    q = pkg.quantization
    return int(q.get("tensors", {}).get(base, q).get("group_size") or q.get("group_size") or 64)


def kv_cache_bytes(spec, context: int, dtype_bytes: int, ring_sliding: bool = True) -> tuple[int, list[int]]:
    """Bytes of the KV cache holding ``context`` tokens, and the per-layer capacities: full-attention
    layers hold the context; sliding-window layers a ring of the window plus a little slack."""
    caps = []
    for t in spec.layer_types:
        if t == "sliding" and spec.sliding_window and ring_sliding:
            caps.append(min(context, spec.sliding_window + RING_SLACK))
        else:
            caps.append(context)
    per = 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes
    return per * sum(caps), caps


def native_activation_bytes(spec, cap: int, chunk: int = 32) -> int:
    """The native step's buffers (decode.c): a chunk's residual stream, projections, MLP, int16 inputs and
    group sums, the attention probabilities of every head over the cache, the last token's logits."""
    s = spec
    per_token = 4 * (4 * s.hidden_size + 2 * (s.num_heads + s.num_kv_heads) * s.head_dim + 2 * s.intermediate_size)
    inputs = chunk * max(s.hidden_size, s.intermediate_size) * (2 + 8 / 32)
    return int(chunk * per_token + inputs + 3 * chunk * 1024 * 4 + s.num_heads * cap * 4 + s.vocab_size * 4)


def activation_bytes(spec, chunk: int, cap: int, dtype_bytes: int) -> int:
    """The live intermediates of one prefill chunk of ``chunk`` tokens against a cache of ``cap``
    positions: attention scores and probabilities in float32 dominate, then the MLP, the projections and
    the residual stream. (Measured within a few percent on MLX's CPU backend.)"""
    s = spec
    L = chunk
    attention = 2 * s.num_heads * L * cap * 4 + L * cap  # scores, probabilities, the boolean mask
    qkv = L * (s.num_heads + 2 * s.num_kv_heads) * s.head_dim * dtype_bytes
    mlp = 3 * L * s.intermediate_size * dtype_bytes
    stream = 2 * L * s.hidden_size * dtype_bytes
    logits = 2 * s.vocab_size * 4  # the last position's logits (prefill asks for those only)
    return max(attention + qkv, mlp) + stream + logits


# -- the plan -------------------------------------------------------------------------------------------
@dataclass
class Term:
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """What the planner decided, and why. ``total_bytes`` is the estimated peak of the process."""

    package: str
    backend: str
    budget_bytes: int
    budget_source: str
    total_bytes: int
    context_tokens: int
    requested_context: int
    fits: bool
    dequantize: bool
    compute_dtype: str
    kv_dtype: str
    kv_overflow: str
    resident_layers: int
    num_layers: int
    weight_file_bytes: int
    kv_bytes_per_token: int
    bytes_read_per_token: int
    min_budget_bytes: int
    min_budget_config: str = ""  # what min_budget_bytes is the total of (when it does not fit: the plan shown)
    terms: list[Term] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    experts_note: str = "MoE experts: none (a dense model)"
    sparse_note: str = "R-Sparse: off"
    expert_cache: int = 0  # experts per MoE layer kept resident, the rest read on demand; 0: all resident

    @property
    def mlx_bytes(self) -> int:
        """The part of the estimate that MLX's own peak-memory counter sees (weights, KV, activations)."""
        return sum(t.bytes for t in self.terms if t.name not in ("process", "workspace", "stream buffer"))

    def backend_options(self) -> dict:
        """Keyword options for the backend that carry out this plan."""
        if self.backend != "mlx":
            return {}
        return dict(dequantize=self.dequantize, max_context=self.context_tokens, kv_dtype=self.kv_dtype,
                    kv_overflow=self.kv_overflow, resident_layers=self.resident_layers,
                    expert_cache=self.expert_cache or None)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def explain(self, verdict: bool = True) -> str:
        """The plan, term by term, and what was chosen; with ``verdict``, a last line saying whether it fits
        (``edgeinfer plan`` leaves a refusal out of it and prints that on stderr, once)."""
        lines = [f"memory plan for {self.package} on {self.backend}"
                 + ("" if self.fits else " (the smallest configuration; it does not fit)"),
                 f"  budget {fmt_bytes(self.budget_bytes)} ({self.budget_source})"]
        w = max(len(t.name) for t in self.terms) if self.terms else 8
        for t in self.terms:
            lines.append(f"  {t.name:<{w}}  {fmt_bytes(t.bytes):>10}  {t.note}")
        lines.append(f"  {'total':<{w}}  {fmt_bytes(self.total_bytes):>10}  estimated peak of the process")
        lines.append(f"  {self.sparse_note}; {self.experts_note}")
        if self.choices:
            lines.append("chose:")
            lines += [f"  - {c}" for c in self.choices]
        if self.fits:
            lines.append(f"fits: {fmt_bytes(self.total_bytes)} of {fmt_bytes(self.budget_bytes)} "
                         f"({100 * self.total_bytes / max(self.budget_bytes, 1):.0f}%)")
        elif verdict:
            lines.append(self.refusal())
        return "\n".join(lines)

    def refusal(self) -> str:
        return (f"{self.package} does not fit in {fmt_bytes(self.budget_bytes)}: the smallest budget that works is "
                f"{fmt_bytes(self.min_budget_bytes)} ({self.min_budget_bytes} bytes), with {self.min_budget_config}"
                + ("; ONNX Runtime holds every expert in memory, the expert cache needs --backend mlx"
                   if self.backend == "onnx" and "per MoE layer" in self.experts_note else ""))


def _device_is_cpu(backend: str) -> bool:
    if backend != "mlx":
        return True
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def plan_memory(package, budget=None, context: int | None = None, backend: str = "mlx", *,
                dequantize: bool | None = None, kv_dtype: str | None = None, resident_layers: int | None = None,
                kv_overflow: str = "refuse", prefill_chunk: int = 512, baseline: int | None = None,
                compute_dtype: str | None = None, sparsity_plan=None, expert_cache: int | None = None,
                native: bool = True) -> MemoryPlan:
    """Plans ``package`` (an opened Package) into ``budget`` (bytes, a string such as "1.5GB" or "60%",
    or None for the device default) for ``context`` tokens (None: the model's maximum, which the planner
    may shrink). Options given explicitly are kept; the others are chosen. Raises nothing when it does
    not fit: the plan's ``fits`` is False and ``refusal()`` names the smallest budget."""
    spec = package.spec
    if backend == "onnx":  # reads the scales of every linear (native_bytes): before the baseline, see below
        from .backends.onnx_backend import native_unavailable
        from .native import resident_bytes

        native_bytes = resident_bytes(package) if native and native_unavailable(package) is None else 0
    if baseline is None:
        # ONNX Runtime's native step allocates its copy with malloc, into the heap's free memory: counting
        # that memory overstated Qwen2.5-Coder's peak by 42 MB. MLX's terms were measured untrimmed.
        baseline = process_rss(trim=backend == "onnx")
    if budget is None:
        budget_bytes, source = default_budget(baseline)
    else:
        budget_bytes = parse_budget(budget)
        source = f"--memory-budget {budget}" if isinstance(budget, str) else "given"
    if context is not None and context < 2:
        raise EdgeInferError(f"--context must be at least 2 tokens, not {context}")
    max_ctx = spec.max_position_embeddings
    requested = int(context) if context else max_ctx
    cpu = _device_is_cpu(backend)
    if compute_dtype is None:
        compute_dtype = "float32" if cpu else ("bfloat16" if spec.arch == "gemma3" else "float16")
    dt = DTYPE_BYTES[compute_dtype]
    parts = weight_parts(package, compute_dtype)
    quantized_pkg = any(p.quantized != p.dequantized for p in parts)
    file_bytes = int(package.manifest["files"].get("model.safetensors", {}).get("bytes") or package.weights_path.stat().st_size)
    n = spec.num_layers
    layer_parts = {int(p.name.split(".")[1]): p for p in parts if p.name.startswith("layers.")}
    other_parts = [p for p in parts if not p.name.startswith("layers.")]
    if spec.tie_embeddings:
        other_parts = [p for p in other_parts if p.name != "lm_head"]
    # MoE on MLX: the stacked experts of each layer, which an expert cache keeps only some of in memory.
    # (ONNX Runtime loads every initializer of the graph, experts included, and its graph routes inside
    # one session run: nothing can read an expert once routing has picked it, so no cache there.)
    E, top_k = int(spec.num_experts or 0), int(spec.num_experts_per_tok or 0)
    expert_parts = {int(p.name): p for p in weight_parts(package, compute_dtype, key_of=_expert_key)} if E else {}
    if expert_cache is not None and E and not top_k <= int(expert_cache) <= E:
        raise EdgeInferError(f"the expert cache needs between {top_k} (top-k) and {E} experts per layer, not {expert_cache}")

    if backend == "onnx":
        # The graph reads the package's own weights file by offset plus what it derives (model.onnx.data);
        # ORT holds both (measured after load: SmolLM2 +180 MiB for 94 + 62 MiB of files). The exact graph
        # (accuracy level 1) also dequantizes each quantized matrix to fp32 per call: the largest one (the
        # head) is its peak workspace (measured: Gemma 3 270M's run peak +930 MiB, its head 640 MiB).
        files = package.manifest["files"]
        onnx_weights = sum(int(v.get("bytes", 0)) for k, v in files.items() if k.startswith("model.onnx")) + file_bytes
        # With the native decode step (edgeinfer.native) the graph runs exact, and the step holds its own
        # copy of the linears in blocks of 8 rows (measured SmolLM2: +94 MiB).
        if native_bytes:
            from .decode_tables import module_names
            from .native import PACK_TRANSIENT_BYTES

            # the copy is made a few MiB of rows at a time, each part's file pages dropped after it: at most
            # one part (and its scales widened to float32) is held beside the copy
            index = safetensors_index(package.weights_path)
            load_transient = min(PACK_TRANSIENT_BYTES, max(sum(t["end"] - t["start"] for k, t in index.items()
                                                                if k.rsplit(".", 1)[0] == name) for name in module_names(package)))
        # With the native step, prompts run there too (unless EDGEINFER_NATIVE_PREFILL=off) and ORT's session
        # is opened only to verify a token tree (--tree), and neither onnxruntime nor onnx is imported before:
        # a plain chat holds the native copy, plus one linear's file pages at a time while that copy is made.
        native_chunks = bool(native_bytes) and os.environ.get("EDGEINFER_NATIVE_PREFILL", "").lower() != "off"
        exact_graph = bool(native_bytes) or package.manifest.get("onnx", {}).get("accuracy_level", 4) != 4
        onnx_dequant = max((p.dequantized for p in parts), default=0) if exact_graph and quantized_pkg else 0

    sparse_terms, sparse_note = _sparse_terms(package, backend, sparsity_plan)

    def estimate(deq: bool, kvd: str, ctx: int, k: int, ecap: int | None = expert_cache) -> list[Term]:
        kvb = DTYPE_BYTES[kvd]
        terms = [Term("process", baseline, "this process before loading (measured, tokenizer included)")] + sparse_terms
        if backend == "onnx":
            kv, caps = kv_cache_bytes(spec, ctx, 4, ring_sliding=False)
            if native_chunks:
                act = native_activation_bytes(spec, ctx)
                terms.append(Term("native weights", native_bytes, "the native step's copy of the linears (prompts and decode)"))
                terms.append(Term("kv cache", kv, f"{ctx} tokens x {fmt_bytes(kv / max(ctx, 1))}/token (float32)"))
                terms.append(Term("activations", act, "a 32-token chunk of the native step"))
                terms.append(Term("workspace", WORKSPACE["native"][0], "the step's tables and threads, allocator slack"))
                # The load's peak (the largest linear's file pages while it is copied) comes before the cache
                # and buffers exist: only what it has beyond them adds to the process's peak.
                terms.append(Term("loading", max(0, load_transient - kv - act), f"the file pages being copied "
                                  f"({fmt_bytes(load_transient)} at most), beyond the cache and buffers made after "
                                  "(a token-tree verification opens the ONNX graph on top)"))
                return terms
            terms.append(Term("weights", onnx_weights, "the ONNX graph's weights, as ONNX Runtime loads them"))
            terms.append(Term("kv cache", kv, f"{ctx} tokens x {fmt_bytes(kv / max(ctx, 1))}/token (float32)"))
            terms.append(Term("activations", activation_bytes(spec, min(prefill_chunk, ctx), ctx, 4), f"a {min(prefill_chunk, ctx)}-token prefill chunk"))
            terms.append(Term("workspace", WORKSPACE["onnx"][0], "ONNX Runtime's arena and threads (an estimate)"))
            if native_bytes:
                terms.append(Term("native weights", native_bytes, "the native decode step's copy of the linears"))
            if onnx_dequant:
                terms.append(Term("dequantized matrix", onnx_dequant, "the exact graph's fp32 copy of its largest matrix, per call"))
            return terms
        res = [p for p in other_parts] + [layer_parts[i] for i in range(min(k, n))]
        wbytes = sum(p.dequantized if deq else p.quantized for p in res)
        cached = [expert_parts[i] for i in range(min(k, n)) if i in expert_parts] if ecap and E else []
        mem_of = (lambda p: p.dequantized) if deq else (lambda p: p.quantized)
        wbytes -= sum(mem_of(p) - mem_of(p) * ecap // E for p in cached)  # only ``cap`` slots of E are held
        streamed = [layer_parts[i] for i in range(k, n)]
        how = "dequantized to " + compute_dtype if deq and quantized_pkg else ("quantized, as stored" if quantized_pkg else "as stored, in " + compute_dtype)
        terms.append(Term("weights", wbytes, f"{len(res) - len(other_parts)} of {n} layers resident, {how}"
                          f" (file: {fmt_bytes(file_bytes)})"))
        trans = {p.name: (p.transient_dq if deq else p.transient_q) for p in res}
        for p in cached:  # cached experts are never loaded stacked: read one at a time, below
            trans[f"layers.{p.name}"] -= p.transient_dq if deq else p.transient_q
        load = max(trans.values() or [0])
        kv, caps = kv_cache_bytes(spec, ctx, kvb)
        per_token = 2 * spec.num_kv_heads * spec.head_dim * kvb
        nslide = sum(1 for c, t in zip(caps, spec.layer_types) if t == "sliding" and spec.sliding_window)
        note = f"{ctx} tokens x {fmt_bytes(per_token * (n - nslide))}/token ({kvd})"
        if nslide:
            note += f"; {nslide} sliding-window layers in a ring of {min(ctx, spec.sliding_window + RING_SLACK)}"
        cap = max(caps) if caps else ctx
        chunk = min(prefill_chunk, ctx)
        act = activation_bytes(spec, chunk, cap + (chunk if nslide or kv_overflow == "rotate" else 0), dt)
        if kvd != compute_dtype:
            act += 2 * spec.num_kv_heads * spec.head_dim * cap * dt  # one layer's cache cast for attention
        grow = 2 * spec.num_kv_heads * spec.head_dim * kvb * cap  # one layer's old buffer while growing
        run = kv + act + grow
        terms.append(Term("kv cache", kv, note))
        if cached:
            one = max(cached, key=mem_of)
            # a miss: one expert's source and conversion, and one projection's slots rewritten
            miss = ((one.transient_dq if deq else one.transient_q) + one.stored) // E + mem_of(one) * ecap // E // 3
            terms.append(Term("expert reads", miss, f"{ecap} of {E} experts per layer resident (LRU); a miss reads "
                              f"{fmt_bytes(one.stored // E)} from {package.weights_path.name}"))
        if streamed:
            span = max(p.stored for p in streamed) + 8192
            layer_mem = max(p.quantized for p in streamed)
            terms.append(Term("streamed layer", 2 * layer_mem, f"{len(streamed)} layers read from disk at each step; "
                              f"{fmt_bytes(sum(p.stored for p in streamed))}/token read"))
            terms.append(Term("stream buffer", span, "one aligned read buffer"))
        if load > run:  # the peak is at load time, before the KV cache exists
            terms.append(Term("loading", load - kv, "converting one part while loading (more than the run's activations)"))
        else:
            terms.append(Term("activations", act + grow, f"a {chunk}-token prefill chunk, and one layer's cache while it grows"))
        base_ws, blas = WORKSPACE["mlx"]
        # BLAS packing and scratch grow with the largest operands: the weights' and the prefill's
        biggest = min(max(spec.vocab_size, spec.intermediate_size) * spec.hidden_size * dt, act)
        terms.append(Term("workspace", base_ws + min(blas, biggest), "MLX on the CPU: BLAS buffers, threads, allocator slack (measured)"))
        return terms

    def total(terms):
        return sum(t.bytes for t in terms)

    deq_opts = [dequantize] if dequantize is not None else ([True, False] if (quantized_pkg and cpu and backend == "mlx") else [not quantized_pkg and False])
    if backend == "mlx" and dequantize is None and not cpu:
        deq_opts = [False]
    kv_opts = [kv_dtype] if kv_dtype else ([compute_dtype] + (["float16"] if compute_dtype == "float32" and backend == "mlx" else []))
    k_all = n if resident_layers is None else max(0, min(int(resident_layers), n))
    floor_ctx = min(requested, MIN_CONTEXT)
    choices: list[str] = []
    found = None
    # 1. everything resident at the requested context, cheapest precision sacrifices last
    for deq in deq_opts:
        for kvd in kv_opts:
            t = estimate(deq, kvd, requested, k_all)
            if total(t) <= budget_bytes:
                found = (deq, kvd, requested, k_all, t)
                break
        if found:
            break
    # 1b. MoE: only some experts per layer resident (most first), the others read from disk when routed to;
    # before a shorter context or streamed layers, which cost every token, where a cache hit costs nothing
    ecap = expert_cache
    if not found and backend == "mlx" and expert_parts and expert_cache is None:
        for c in range(E - 1, top_k - 1, -1):
            for deq, kvd in ((d, v) for d in deq_opts for v in kv_opts):
                t = estimate(deq, kvd, requested, k_all, c)
                if total(t) <= budget_bytes:
                    found, ecap = (deq, kvd, requested, k_all, t), c
                    break
            if found:
                break
    # 2. a shorter context, when the user did not ask for one
    if not found and context is None and backend in ("mlx", "onnx"):
        for deq in deq_opts:
            for kvd in kv_opts:
                lo_t = estimate(deq, kvd, floor_ctx, k_all)
                if total(lo_t) > budget_bytes:
                    continue
                lo, hi = floor_ctx, requested
                while hi - lo > 1:  # the largest context that fits
                    mid = (lo + hi) // 2
                    if total(estimate(deq, kvd, mid, k_all)) <= budget_bytes:
                        lo = mid
                    else:
                        hi = mid
                ctx = lo if lo < KV_STEP else lo // KV_STEP * KV_STEP if lo // KV_STEP * KV_STEP >= floor_ctx else lo
                found = (deq, kvd, ctx, k_all, estimate(deq, kvd, ctx, k_all))
                choices.append(f"context {ctx} tokens instead of {requested}: the KV cache for {requested} does not fit")
                break
            if found:
                break
    # 3. stream layers from disk
    ctx3 = requested if context is not None else floor_ctx
    deq3, kvd3 = deq_opts[-1], kv_opts[-1]
    if not found and backend == "mlx" and resident_layers is None:
        for k in range(n - 1, -1, -1):
            t = estimate(False if dequantize is None else dequantize, kvd3, ctx3, k)
            if total(t) <= budget_bytes:
                found = (False if dequantize is None else dequantize, kvd3, ctx3, k, t)
                break
    small = (False if dequantize is None and backend == "mlx" else deq3, kvd3, ctx3,
             0 if (backend == "mlx" and resident_layers is None) else k_all)
    smallest = total(estimate(*small))
    fits = found is not None
    if not found:
        found = (deq3, kvd3, ctx3, 0 if (backend == "mlx" and resident_layers is None) else k_all,
                 estimate(deq3, kvd3, ctx3, 0 if (backend == "mlx" and resident_layers is None) else k_all))
    deq, kvd, ctx, k, terms = found
    if backend == "mlx":
        if quantized_pkg:
            if deq:
                choices.insert(0, f"weights dequantized to {compute_dtype} at load: fast float matmuls, and they fit")
            elif dequantize is None and cpu:
                choices.insert(0, "weights kept quantized (slower matmuls on the CPU): dequantized ones do not fit")
            else:
                choices.insert(0, "weights kept quantized")
        bits = package.quantization.get("bits")
        choices.append(f"weight precision: {bits}-bit as stored (the only precision in this package)")
        if kvd != compute_dtype:
            choices.append(f"KV cache in {kvd} instead of {compute_dtype}: half the bytes per token")
        if ecap and expert_parts:
            per = max(p.stored for p in expert_parts.values()) // E
            choices.append(f"{ecap} of {E} experts per MoE layer resident in an LRU cache instead of all {E}: the others are read "
                           f"from {package.weights_path.name} when routed to, up to {top_k} x {fmt_bytes(per)} per layer a token "
                           f"(more in a prefill chunk; an expert budget bounds it)")
        if k < n:
            choices.append(f"{k} of {n} layers resident; the other {n - k} are read from {package.weights_path.name} "
                           f"at every step ({fmt_bytes(sum(layer_parts[i].stored for i in range(k, n)))} a token)")
        if any(t == "sliding" for t in spec.layer_types) and spec.sliding_window:
            choices.append(f"sliding-window layers keep a ring of {spec.sliding_window + RING_SLACK} positions, not the whole context")
    choices.append(f"at {ctx} tokens the KV cache " + ("rotates (keeps the last tokens)" if kv_overflow == "rotate" else "refuses to grow, with a clear message"))
    per_tok = 2 * spec.num_kv_heads * spec.head_dim * DTYPE_BYTES[kvd] * n
    return MemoryPlan(
        package=str(package.path), backend=backend, budget_bytes=int(budget_bytes), budget_source=source,
        total_bytes=int(total(terms)), context_tokens=int(ctx), requested_context=requested, fits=fits,
        dequantize=bool(deq), compute_dtype=compute_dtype, kv_dtype=kvd, kv_overflow=kv_overflow,
        resident_layers=int(k), num_layers=n, weight_file_bytes=file_bytes, kv_bytes_per_token=per_tok,
        bytes_read_per_token=(sum(layer_parts[i].stored for i in range(k, n))
                              + sum(top_k * expert_parts[i].stored // E for i in range(k) if ecap and i in expert_parts)) if backend == "mlx" else 0,
        min_budget_bytes=int(smallest), min_budget_config=_configuration(backend, *small, n, compute_dtype, quantized_pkg),
        terms=terms, choices=choices, experts_note=_experts_note(package, ecap if backend == "mlx" else None),
        sparse_note=sparse_note, expert_cache=int(ecap or 0) if backend == "mlx" else 0,
    )


def _configuration(backend: str, deq: bool, kvd: str, ctx: int, k: int, n: int, compute_dtype: str, quantized: bool) -> str:
    """The configuration an estimate was made for, in words (the refusal's smallest budget names it)."""
    if backend == "onnx":
        return f"the ONNX graph's weights all in memory, a float32 KV cache and {ctx} tokens of context (ONNX Runtime)"
    weights = (f"weights dequantized to {compute_dtype}" if deq else "quantized weights") if quantized else f"{compute_dtype} weights"
    layers = ("every layer read from disk at each step" if k == 0 else f"all {n} layers in memory" if k >= n
              else f"{k} of {n} layers in memory, the others read from disk at each step")
    return f"{weights}, a {kvd} KV cache, {ctx} tokens of context and {layers} (MLX)"


PLAN_KEYS = ("memory_budget", "context", "kv_overflow", "prefill_chunk")


def plan_for_model(package, backend: str, opts: dict) -> tuple[MemoryPlan, dict]:
    """Called by ``Model.__init__``: plans the package from the load options (``memory_budget``,
    ``context``, ``kv_overflow`` and any backend option the caller fixed), refuses with one clear line
    when it does not fit, and returns the plan and the backend's options."""
    opts = dict(opts)
    mine = {k: opts.pop(k) for k in PLAN_KEYS if k in opts}
    fixed = {k: opts[k] for k in ("dequantize", "kv_dtype", "resident_layers", "expert_cache") if opts.get(k) is not None}
    dtype = opts.get("dtype")
    plan = plan_memory(package, budget=mine.get("memory_budget"), context=mine.get("context"), backend=backend,
                       kv_overflow=mine.get("kv_overflow") or "refuse", prefill_chunk=mine.get("prefill_chunk") or 512,
                       compute_dtype=_dtype_name(dtype), sparsity_plan=opts.get("sparsity_plan"),
                       native=opts.get("decode") != "graph", **fixed)
    if not plan.fits:
        msg = plan.refusal()
        if backend == "onnx" and plan.expert_cache == 0 and "per MoE layer" in plan.experts_note and "expert_cache" not in fixed:
            alt = plan_memory(package, budget=mine.get("memory_budget"), context=mine.get("context"), backend="mlx",
                              kv_overflow=mine.get("kv_overflow") or "refuse", compute_dtype=_dtype_name(dtype))
            if alt.fits:
                msg += f" (MLX fits it in {fmt_bytes(alt.total_bytes)}" + (f" with {alt.expert_cache} experts per layer cached)" if alt.expert_cache else ")")
        raise EdgeInferError(msg)
    if backend == "onnx" and "expert_cache" in fixed:
        raise EdgeInferError("an expert cache needs the MLX backend (--backend mlx): ONNX Runtime holds every expert of "
                             "the graph in memory, and its graph routes and runs the experts in one session run")
    if backend == "onnx" and mine.get("kv_overflow") == "rotate":
        raise EdgeInferError("--kv-overflow rotate needs the MLX backend (--backend mlx); the ONNX backend's cache "
                             "refuses at the planned context")
    if backend == "mlx":
        opts.update({k: v for k, v in plan.backend_options().items() if k not in fixed})
    return plan, opts


def _dtype_name(d) -> str | None:
    if d is None:
        return None
    s = str(d).split(".")[-1]
    return s if s in DTYPE_BYTES else None


def _expert_key(name: str) -> str | None:
    """Groups one MoE layer's stacked experts (``layers.{i}.moe.experts.*``) under ``i``."""
    return name.split(".")[1] if ".moe.experts." in name else None


def _experts_note(package, cap: int | None = None) -> str:
    """MoE models: the stacked experts' share of the stored weights, and how many stay resident."""
    s = package.spec
    if not s.num_experts:
        return "MoE experts: none (a dense model)"
    index = safetensors_index(package.weights_path)
    experts = sum(t["end"] - t["start"] for name, t in index.items() if ".moe.experts." in name)
    total = sum(t["end"] - t["start"] for t in index.values()) or 1
    return (f"MoE experts: {s.num_experts} per MoE layer, top-{s.num_experts_per_tok}, {fmt_bytes(experts)} stored "
            f"({experts / total:.0%} of the weights), " + (f"{cap} per layer resident in a cache" if cap else "all resident"))


def _sparse_terms(package, backend: str, plan) -> tuple[list[Term], str]:
    """An R-Sparse level adds its low-rank factors and column norms, and on the ONNX backend the fast
    decode path's input-major copy of the weights (edgeinfer/sparse/layout.py)."""
    if plan is None:
        return [], "R-Sparse: off"
    factors = sum(sum(int(t.nbytes) for t in (mp.a, mp.b, mp.c) if t is not None) for mp in plan.modules.values())
    terms = [Term("R-Sparse factors", factors, f"level {plan.level:.2f}: low-rank factors and column norms")]
    if backend == "onnx":
        from .sparse.layout import layout_bytes

        terms.append(Term("R-Sparse layout", layout_bytes(package), "input-major weights of the sparse decode steps (mapped)"))
    return terms, f"R-Sparse: level {plan.level:.2f}, {fmt_bytes(sum(t.bytes for t in terms))}"
