"""The native decode step (``decode.c``): one C call per token on the package's own weights.

The ONNX backend runs its one-token steps here and everything longer (prefill, speculative verification)
on its graph; both read and write the same KV buffers. The library is built by the project's install
(setup.py) and loaded with ctypes; where it is absent (no C compiler at install), stale, or the package
holds something the step does not compute, ``unavailable(pkg)`` says why in one sentence and the backend
decodes with its graph.

Activations: ``i16`` (default) rounds each 32-input chunk of x to int16 against its own max, ``f32``
multiplies in float; EDGEINFER_NATIVE_ACT picks. A prompt's tokens (``forward`` without ``exact``) take
``i8`` where the CPU has AVX512-VNNI and the converter's check passed on the model (``check_prompt_act``,
recorded as the manifest's onnx.prompt_check): int8 inputs per 32-input chunk, as llama.cpp multiplies
everything, twice the products an instruction. The step, verification and scoring (``exact``) keep the
step's activations, so a token's logits are the step's bit for bit. EDGEINFER_NATIVE_PROMPT_ACT=i8|i16|f32
overrides the check. EDGEINFER_NATIVE=off|generic|avx2 picks the build
(``off`` disables the step). Prompts and draft chains run here too (``forward``, up to 32 tokens a call),
unless EDGEINFER_NATIVE_PREFILL=off sends them to the exact graph; EDGEINFER_NO_VNNI=1 keeps that batch
kernel off AVX512-VNNI.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
from pathlib import Path

import numpy as np

from ..decode_tables import DecodeTables, check_arch, module_names
from ..errors import EdgeInferError
from ..package import Package
from ..safetensors_map import drop_pages_of, drop_resident_pages, map_safetensors

ABI = 11
ACTS = {"f32": 0, "i16": 1, "i8": 2}
MAX_GROUPS, MAX_CHUNKS, MAX_HEAD_DIM = 1024, 4096, 1024  # decode.c's per-row stack buffers


class _Linear(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("row_bytes", ctypes.c_int64), ("n_in", ctypes.c_int32),
                ("m_out", ctypes.c_int32), ("bits", ctypes.c_int32), ("group", ctypes.c_int32),
                ("s32", ctypes.c_int32), ("zero", ctypes.c_int32),
                ("kq", ctypes.c_int32), ("pad", ctypes.c_int32)]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("layers", "heads", "kv_heads", "head_dim", "hidden", "inter", "qk_norm",
                                               "sandwich", "gelu", "vocab")] + \
               [(n, ctypes.c_float) for n in ("eps", "attn_scale", "attn_cap", "final_cap", "mscale", "pad")] + \
               [(n, ctypes.c_void_p) for n in ("norms", "qk_norms", "inv_freq", "windows", "lin")]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def variant() -> str:
    """The build this CPU runs: avx2 where it has AVX2, FMA and F16C, else generic."""
    want = os.environ.get("EDGEINFER_NATIVE", "").strip().lower()
    if want in ("off", "generic", "avx2"):
        return want
    if platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma", "f16c"} <= _cpu_flags():
        return "avx2"
    return "generic"


_LIB: dict[str, object] = {}


def _built_library(v: str) -> str | None:
    """The path of the built extension of variant ``v``, or None."""
    spec = importlib.util.find_spec(f"edgeinfer.native._decode_{v}")
    return spec.origin if spec is not None and spec.origin else None


def load_library():
    """The ctypes library of this CPU's build; raises EdgeInferError saying why it cannot be used."""
    v = variant()
    if v == "off":
        raise EdgeInferError("the native decode step is switched off (EDGEINFER_NATIVE=off)")
    if v in _LIB:
        return _LIB[v]
    origin = _built_library(v)
    if origin is None:
        raise EdgeInferError("the native decode kernels are not built (no C compiler when edgeinfer was installed?); "
                             "run `make setup` again with gcc or clang present")
    try:
        lib = ctypes.CDLL(origin)
    except OSError as e:
        raise EdgeInferError(f"cannot load the native decode kernels {Path(origin).name}: {e}") from None
    if lib.ei_abi() != ABI:
        raise EdgeInferError("the native decode kernels are stale (built from another decode.c); run `make setup` again")
    lib.ei_new.restype = ctypes.c_void_p
    lib.ei_new.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.ei_free.argtypes = [ctypes.c_void_p]
    lib.ei_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int64, ctypes.c_void_p]
    lib.ei_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    lib.ei_linear_apply.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.ei_linear_apply_tokens.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.ei_set_batch_act.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.ei_pack_stream.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    _LIB[v] = lib
    return lib


def _quant(pkg: Package, name: str) -> tuple[int, int]:
    quant = pkg.quantization
    per = quant.get("tensors", {}).get(name, quant)
    return int(per.get("bits", quant.get("bits", 32))), int(per.get("group_size", quant.get("group_size", 0)))


def unavailable(pkg: Package) -> str | None:
    """Why the native step cannot decode this package (one sentence), or None when it can."""
    try:
        load_library()
        check_arch(pkg.spec, "the native decode step")
    except EdgeInferError as e:
        return str(e)
    s = pkg.spec
    if s.head_dim > MAX_HEAD_DIM:
        return f"the native decode step takes head_dim up to {MAX_HEAD_DIM}, not {s.head_dim}"
    if pkg.quantization.get("mode", "affine") != "affine":
        return "the native decode step reads affine-quantized weights only"
    for name in module_names(pkg):
        bits, group = _quant(pkg, name)
        if bits > 8:
            return f"the native decode step reads quantized weights (8 bits or fewer); {name} has {bits}"
        if group % 32:
            return f"the native decode step needs groups of a multiple of 32 inputs; {name} has {group}"
    return None


def tile_bits(bits: int) -> int:
    """The width decode.c computes values of ``bits`` at: 4 and 5 as they are, the others widened to 8."""
    return bits if bits in (4, 5) else 8


PACK_ROWS_BYTES = 2 << 20  # source bytes packed between two page drops
# The most one linear's packing holds beside its copy (a part's file pages, its scales read as float32,
# allocator slack): measured 11 MB on Qwen2.5-Coder 0.5B's 136 MB head, 5 MB on the other linears.
PACK_TRANSIENT_BYTES = 12 << 20


def symmetric_zero(bits: int, scales: np.ndarray, biases: np.ndarray) -> int:
    """2^(bits-1) when every bias is -2^(bits-1) times its scale (a GGUF's Q5_0 and Q8_0 import so), else 0:
    such a linear's stream stores no biases, half a bit a weight less at groups of 32."""
    z = 1 << (bits - 1)
    step = max(1, (256 << 10) // max(scales[:1].nbytes, 1))
    for r0 in range(0, scales.shape[0], step):  # 256 KiB of rows at a time, their file pages dropped after
        parts = [scales[r0:r0 + step], biases[r0:r0 + step]]
        sc, bi = (np.asarray(a, np.float32) for a in parts)
        drop_pages_of(parts)
        if not np.array_equal(bi, sc * np.float32(-z)):  # exact in float32: z is a power of two
            return 0
    return z


def block_bytes(n: int, groups: int, tbits: int, es: int, zero: int, kq: bool) -> int:
    """Bytes of one block of 8 rows in decode.c's stream (its block_bytes): per group the scales and
    biases (es bytes each; no biases when symmetric; the 6-bit sc and m, a byte each, with K-quant heads
    plus d and -dmin, float16, per 8 groups), then the tiles."""
    head = 16 if kq else (8 if zero else 16) * es
    return groups * (head + (n // groups // 32) * {4: 128, 5: 160, 8: 256}[tbits]) + (groups // 8 * 32 if kq else 0)


def kquant_factors(scales: np.ndarray, biases: np.ndarray, group: int):
    """(d, -dmin) float16 [m, G/8] and (sc, m) bytes [m, G] with scales = d * sc and biases = -dmin * m
    exactly, sc and m in 0..63: a GGUF's Q4_K and Q5_K as imported (float32 products, 2 bits a weight at
    groups of 32, against 0.625 factored); None for any other linear. llama.cpp sets each super-block's d
    so that its largest sc is 63, which is how d is found here; every product is checked."""
    m, G = scales.shape
    if group != 32 or G % 8 or scales.dtype != np.float32 or biases.dtype != np.float32:
        return None
    out = [np.empty((m, G // 8), np.float16), np.empty((m, G // 8), np.float16), np.empty((m, G), np.uint8), np.empty((m, G), np.uint8)]
    step = max(1, (256 << 10) // max(scales[:1].nbytes, 1))
    for r0 in range(0, m, step):
        for i, (x, sign) in enumerate(((scales, 1), (biases, -1))):
            v = np.asarray(x[r0:r0 + step], np.float32).reshape(-1, G // 8, 8) * np.float32(sign)
            drop_pages_of([x[r0:r0 + step]])
            if (v < 0).any():
                return None
            d = (v.max(-1) / 63).astype(np.float16)
            d32 = d.astype(np.float32)[..., None]
            q = np.rint(v / np.where(d32 > 0, d32, 1))
            if not ((q <= 63).all() and np.array_equal(d32 * q, v)):
                return None
            out[i][r0:r0 + step] = d if sign > 0 else -d
            out[2 + i][r0:r0 + step] = q.reshape(-1, G).astype(np.uint8)
    return out


def pack_stream(lib, packed: np.ndarray, bits: int, tbits: int, scales: np.ndarray, biases: np.ndarray,
                s32: bool | None = None, drop: bool = False, zero: int = 0, kq=None) -> np.ndarray:
    """decode.c's stream of one linear (the layout above its tile_value), from the package's packed words,
    [m / 8, block_bytes]: per block of 8 rows (padded with zero rows) and group of inputs, the 8 scales, the
    8 biases (float16, or float32 with ``s32``: by default unless both are float16; none with ``zero``, see
    symmetric_zero; kquant_factors' ``kq`` in their place, see decode.c), then the group's tiles of values
    at ``tbits``. One pass of C: numpy's unpacking and transposes took most of the 23 s a 0.5B model loaded in
    (tests/test_native.py keeps them as the reference). Packed a few MiB of rows at a time; with ``drop``
    the file pages of each part are dropped once it is copied, so that a 136 MB head does not sit in memory
    twice while it loads."""
    m, n = packed.shape[0], packed.shape[1] * 32 // bits
    groups = scales.shape[1]
    if s32 is None:
        s32 = not (scales.dtype == np.float16 and biases.dtype == np.float16)
    sdt = np.float32 if s32 else np.float16
    es = np.dtype(sdt).itemsize
    out = np.empty(((m + 7) // 8, block_bytes(n, groups, tbits, es, zero, kq is not None)), np.uint8)
    step = max(8, PACK_ROWS_BYTES // max(packed[:1].nbytes + 2 * scales[:1].nbytes, 1) // 8 * 8)
    for r0 in range(0, m, step):
        parts = [packed[r0:r0 + step], scales[r0:r0 + step], biases[r0:r0 + step]]
        q, sc, bi = np.ascontiguousarray(parts[0]), np.ascontiguousarray(parts[1], sdt), np.ascontiguousarray(parts[2], sdt)
        if kq is None:
            ptrs = sc.ctypes.data, bi.ctypes.data
        else:  # the four factor arrays of these rows, behind one pointer array
            rows = [np.ascontiguousarray(f[r0:r0 + step]) for f in kq]
            arr = (ctypes.c_void_p * 4)(*[f.ctypes.data for f in rows])
            ptrs = None, ctypes.addressof(arr)
        lib.ei_pack_stream(q.ctypes.data, q.shape[0], n, bits, tbits, *ptrs, int(s32), int(bool(zero)), n // groups,
                           out[r0 // 8:].ctypes.data)
        if drop:
            drop_pages_of(parts)
    return out


def heads(bits: int, group: int, scales: np.ndarray, biases: np.ndarray):
    """(zero, kq) of a linear's stream: symmetric (no biases), K-quant factored heads, or neither."""
    zero = symmetric_zero(bits, scales, biases)
    return zero, (None if zero else kquant_factors(scales, biases, group))


def resident_bytes(pkg: Package) -> int:
    """Bytes of the step's own copy of the linears (``NativeDecoder``), from the safetensors header and the
    scales and biases (read to tell symmetric and K-quant linears, whose heads are smaller): values at 4, 5
    or 8 bits (others widened to 8), scales and biases as stored (bfloat16 as float32), rows padded to a
    multiple of 8, the additive biases in float32."""
    from ..memory import safetensors_index

    index = safetensors_index(pkg.weights_path)
    arrays = map_safetensors(pkg.weights_path)
    total = 0
    for name in module_names(pkg):
        bits, group = _quant(pkg, name)
        w, sc = index[f"{name}.weight"], index[f"{name}.scales"]
        m = int(w["shape"][0])
        n = int(w["shape"][1]) * 32 // bits
        per = 2 if sc["dtype"] == "F16" and index[f"{name}.biases"]["dtype"] == "F16" else 4
        scb = [arrays[f"{name}.scales"], arrays[f"{name}.biases"]]
        zero, kq = heads(bits, group, *scb)
        total += (m + 7) // 8 * block_bytes(n, int(sc["shape"][1]), tile_bits(bits), per, zero, kq is not None)
        drop_pages_of(scb)
        total += 4 * m if f"{name}.bias" in index else 0
    return total


class NativeDecoder:
    """``step(token, pos, k_block, v_block) -> logits``, as the sparse engine's, on the native library."""

    def __init__(self, pkg: Package, threads: int | None = None, act: str | None = None, prompt_act: str | None = None):
        why = unavailable(pkg)
        if why:
            raise EdgeInferError(why)
        self.lib = load_library()
        self.spec = s = pkg.spec
        act = (act or os.environ.get("EDGEINFER_NATIVE_ACT") or "i16").lower()
        if act not in ("f32", "i16"):
            raise EdgeInferError(f"EDGEINFER_NATIVE_ACT must be one of f32, i16, not {act!r}")
        # the converter's check (check_prompt_act) decides whether this model's prompts may round to int8
        check = pkg.manifest.get("onnx", {}).get("prompt_check") or {}
        prompt = (prompt_act or os.environ.get("EDGEINFER_NATIVE_PROMPT_ACT")
                  or (check["act"] if check.get("passed") else act)).lower()
        if prompt not in ACTS:
            raise EdgeInferError(f"EDGEINFER_NATIVE_PROMPT_ACT must be one of {', '.join(ACTS)}, not {prompt!r}")
        self.act = act
        w = map_safetensors(pkg.weights_path)
        self.tables = t = DecodeTables(pkg, w)
        self._keep = []  # every array a pointer below refers to
        from ..memory import trim_heap

        names = module_names(pkg)
        lins = (_Linear * len(names))()
        for i, name in enumerate(names):
            lins[i] = self._linear(pkg, w, name)
            # copied: its file pages can go now (the embedding's rows are read again for every token), and
            # the packing's freed buffers, which the heap would keep resident (10-20 MB by the last linear)
            drop_pages_of(w[f"{name}.{part}"] for part in ("weight", "scales", "biases", "bias") if f"{name}.{part}" in w)
            trim_heap()
        self._lins = lins
        drop_resident_pages(w)  # the linears are copied; only embedding rows are read from the mapping now
        m = _Model()
        m.layers, m.heads, m.kv_heads, m.head_dim = s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim
        m.hidden, m.inter, m.qk_norm, m.sandwich = s.hidden_size, s.intermediate_size, int(s.qk_norm), int(s.sandwich_norm)
        m.gelu, m.vocab = int(s.mlp_act == "gelu_tanh"), s.vocab_size
        m.eps, m.attn_scale = s.rms_norm_eps, s.attn_scale
        m.attn_cap, m.final_cap = s.attn_logit_softcap or 0.0, s.final_logit_softcap or 0.0
        m.mscale = t.mscale
        m.norms, m.qk_norms = t.norms.ctypes.data, t.qk_norms.ctypes.data
        m.inv_freq, m.windows = t.inv_freq.ctypes.data, t.windows.ctypes.data
        m.lin = ctypes.addressof(lins)
        self._model = m
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = int(threads or cores)
        self._ctx = self.lib.ei_new(ctypes.byref(m), self.threads, ACTS[act])
        if not self._ctx:
            raise EdgeInferError("the native decode step could not allocate its buffers")
        self._chunk = int(self.lib.ei_max_tokens())
        # i8 needs AVX512-VNNI (the library says); without it prompts take the step's activations
        self.prompt_act = prompt if self.lib.ei_set_batch_act(self._ctx, ACTS[prompt]) == 0 else act
        self._batch_act = self.prompt_act

    def _linear(self, pkg: Package, w: dict, name: str) -> _Linear:
        bits, group = _quant(pkg, name)
        q = np.asarray(w[f"{name}.weight"])
        m = q.shape[0]
        n = q.shape[1] * 32 // bits
        if n % 32 or n // group > MAX_GROUPS or n // 32 > MAX_CHUNKS:
            raise EdgeInferError(f"the native decode step cannot read {name} ({m}x{n}, groups of {group})")
        sc, bi = np.asarray(w[f"{name}.scales"]), np.asarray(w[f"{name}.biases"])
        s32 = not (sc.dtype == np.float16 and bi.dtype == np.float16)
        bias = np.array(w[f"{name}.bias"], np.float32) if f"{name}.bias" in w else None
        tb = tile_bits(bits)  # 2/3/6 bits are widened to 8, exactly (as the ONNX graph does)
        zero, kq = heads(bits, group, sc, bi)
        arrs = [pack_stream(self.lib, q, bits, tb, sc, bi, s32=s32, drop=True, zero=zero, kq=kq)] + ([bias] if bias is not None else [])
        self._keep.extend(arrs)
        lin = _Linear()
        lin.q = arrs[0].ctypes.data
        lin.bias = arrs[1].ctypes.data if bias is not None else None
        lin.row_bytes, lin.n_in, lin.m_out, lin.bits, lin.group, lin.s32, lin.zero = n * tb // 8, n, m, tb, group, int(s32), zero
        lin.kq = int(kq is not None)
        return lin

    def step(self, token: int, pos: int, kcache: np.ndarray, vcache: np.ndarray) -> np.ndarray:
        """Logits [vocab] of ``token`` at ``pos``; writes its keys/values at ``pos`` of the caches
        [layers, 1, kv_heads, capacity, head_dim] (float32, C-contiguous)."""
        if not (kcache.flags.c_contiguous and vcache.flags.c_contiguous and kcache.dtype == np.float32):
            raise EdgeInferError("the native decode step needs contiguous float32 KV buffers")
        x = self.tables.embed(token)
        logits = np.empty(self.spec.vocab_size, np.float32)
        if self.lib.ei_step(self._ctx, x.ctypes.data, pos, kcache.ctypes.data, vcache.ctypes.data, kcache.shape[3],
                            logits.ctypes.data):
            raise EdgeInferError("the native decode step ran out of memory")
        return logits

    def forward(self, ids, pos: int, kcache: np.ndarray, vcache: np.ndarray, start: int = 0,
                exact: bool = True) -> np.ndarray:
        """Tokens ``ids`` at positions pos, pos+1, ... (prefill, or verifying a draft chain), each seeing
        the cache and the tokens before it; writes their keys and values; returns the logits of the tokens
        from ``start`` on, [len(ids) - start, vocab]. The weights are read once per chunk of up to
        ``ei_max_tokens()`` tokens. ``exact``: every token's logits are what ``step`` would give it;
        otherwise (a prompt) the chunks take ``prompt_act``."""
        if not (kcache.flags.c_contiguous and vcache.flags.c_contiguous and kcache.dtype == np.float32):
            raise EdgeInferError("the native decode step needs contiguous float32 KV buffers")
        self._batch(exact)
        ids = [int(t) for t in ids]
        n, chunk, V = len(ids), self._chunk, self.spec.vocab_size
        logits = np.empty((max(n - start, 0), V), np.float32)
        for c0 in range(0, n, chunk):
            part = ids[c0: c0 + chunk]
            x = np.ascontiguousarray(np.stack([self.tables.embed(t) for t in part]), np.float32)
            first = max(start - c0, 0)
            out = logits[c0 + first - start:] if first < len(part) else logits[:0]
            rc = self.lib.ei_forward(self._ctx, x.ctypes.data, len(part), pos + c0, kcache.ctypes.data, vcache.ctypes.data,
                                     kcache.shape[3], first, out.ctypes.data)
            if rc:
                raise EdgeInferError("the native decode step ran out of memory")
        return logits

    def linear(self, index: int, x: np.ndarray) -> np.ndarray:
        """Module ``index`` (module_names order) applied to x alone: for tests and benchmarks."""
        lin = self._lins[index]
        x = np.ascontiguousarray(x, np.float32)
        y = np.empty(lin.m_out, np.float32)
        self.lib.ei_linear_apply(self._ctx, ctypes.byref(lin), x.ctypes.data, y.ctypes.data)
        return y

    def _batch(self, exact: bool) -> None:
        want = self.act if exact else self.prompt_act
        if want != self._batch_act:
            self.lib.ei_set_batch_act(self._ctx, ACTS[want])
            self._batch_act = want

    def linear_tokens(self, index: int, x: np.ndarray, exact: bool = True) -> np.ndarray:
        """Module ``index`` applied to the rows of x [T, n_in] (T <= ``ei_max_tokens()``) as ``forward``
        applies it: for tests and benchmarks."""
        lin = self._lins[index]
        x = np.ascontiguousarray(x, np.float32)
        self._batch(exact)
        y = np.empty((x.shape[0], lin.m_out), np.float32)
        if self.lib.ei_linear_apply_tokens(self._ctx, ctypes.byref(lin), x.ctypes.data, x.shape[0], y.ctypes.data):
            raise EdgeInferError("the native decode step ran out of memory")
        return y

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self.lib.ei_free(self._ctx)
            self._ctx = None

    __del__ = close


# Chat prompts for the prompt-activation check, apart from tests/data/chat_prompts.txt (which measures the result)
CHECK_PROMPTS = (
    "What is the capital of Germany?", "Name two animals that live in the sea.", "How many hours are in a day?",
    "What colour do you get by mixing blue and yellow?", "Who discovered penicillin?",
    "Translate \"good night\" into German.", "What is 9 times 7?", "Give me a word that rhymes with \"light\".",
    "Write a Python function that checks whether a number is even.", "What is the largest ocean on Earth?",
    "Explain what a verb is in one sentence.", "What does RAM stand for?", "Why do leaves change colour in autumn?",
    "Suggest a name for a small grey kitten.", "How do I sort a dictionary by value in Python?",
    "Write two sentences about the moon.",
)


def check_prompt_act(pkg: Package, act: str = "i8", tokens: int = 16, threads: int | None = None,
                     progress: bool = True) -> dict | None:
    """Whether prompts may take ``act`` on this model: the greedy answers (``tokens`` long) to CHECK_PROMPTS
    with their prompts in ``act`` and the decode steps exact, against the exact model (one exact forward
    over prompt + answer). Returns {"act", "passed", "equal", "prompts", "tokens", "max_margin"}: passed
    when at most one answer differs; None when this CPU or build cannot run ``act``. Rounding a prompt's activations to 8 bits leaves Qwen2.5's answers as they
    were and changes a third of SmolLM2-135M's (docs/BENCHMARKS.md), so it is decided per model."""
    import sys

    from tqdm import tqdm

    from ..tokenizer import Tokenizer

    nat = NativeDecoder(pkg, threads=threads, prompt_act=act)
    try:
        if nat.prompt_act != act:
            return None
        tok, s = Tokenizer(pkg.path, pkg.tokenizer_info), pkg.spec
        equal, margins = 0, []
        for prompt in tqdm(CHECK_PROMPTS, desc=f"{act} prompt check", unit="prompt", leave=False,
                           disable=None if progress else True, file=sys.stderr):
            ids = tok.encode_chat([{"role": "user", "content": prompt}]) if tok.chat_template else tok.encode(prompt)
            shape = (s.num_layers, 1, s.num_kv_heads, len(ids) + tokens, s.head_dim)
            k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            answer = [int(nat.forward(ids, 0, k, v, len(ids) - 1, exact=False)[-1].argmax())]
            for pos in range(len(ids), len(ids) + tokens - 1):
                answer.append(int(nat.step(answer[-1], pos, k, v).argmax()))
            k[:], v[:] = 0, 0
            ref = nat.forward(ids + answer[:-1], 0, k, v, len(ids) - 1, exact=True)
            diff = np.nonzero(ref.argmax(-1) != np.asarray(answer))[0]
            if len(diff):
                t = int(diff[0])
                margins.append(float(ref[t].max() - ref[t, answer[t]]))
            else:
                equal += 1
        n = len(CHECK_PROMPTS)
        return {"act": act, "passed": equal >= n - 1, "equal": equal, "prompts": n, "tokens": tokens,
                "max_margin": round(max(margins, default=0.0), 4)}
    finally:
        nat.close()
