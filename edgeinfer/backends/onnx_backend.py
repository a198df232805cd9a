"""The ONNX Runtime backend: the package's ``model.onnx`` on ORT's CPU (or another) execution provider.

The KV cache is one numpy buffer per layer and kind, ``[1, kv_heads, capacity, head_dim]``, bound through
IO binding as both ``past_*`` and ``present_*``: GroupQueryAttention appends in place. Capacity grows in
steps (a copy per step, never per token); rolling back is lowering ``offset``. The rotary cos/sin
tables are graph inputs sized with the buffers, so a long maximum context costs nothing until used.

The exporter writes the already-fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization,
MatMulNBits), so ORT's optimizer has little left to do at load: measured 0.00-0.09 s of a 0.3-0.5 s load
for SmolLM2 and Gemma 3 270M. A saved ORT-optimized copy was no faster to load and duplicated the
weights on disk (111-373 MB), so none is kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeInferError
from ..package import Package
from ..spec import rope_tables

ONNX_FILE = "model.onnx"


class ONNXCache:
    def __init__(self, spec, max_tokens: int, rope_inputs: dict[str, tuple[int, str]], step: int = 256):
        import onnxruntime as ort

        self._ort = ort
        self.spec = spec
        self.rope_inputs = rope_inputs  # graph input -> (layer whose rope it is, "cos"|"sin")
        self.rope: dict = {}
        self.step = step
        self.max_tokens = max_tokens
        self.offset = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.ort_keys: list = []
        self.ort_values: list = []

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, n: int) -> bool:
        """Makes room for ``n`` more positions; returns True when the buffers were replaced."""
        need = self.offset + n
        if need > self.max_tokens:
            raise EdgeInferError(f"the context would grow to {need} tokens, past this model's limit of {self.max_tokens}")
        if need <= self.capacity:
            return False
        cap = min(((need + self.step - 1) // self.step) * self.step, self.max_tokens)
        s = self.spec
        shape = (1, s.num_kv_heads, cap, s.head_dim)
        new_k = [np.zeros(shape, np.float32) for _ in range(s.num_layers)]
        new_v = [np.zeros(shape, np.float32) for _ in range(s.num_layers)]
        for old, new in zip(self.keys + self.values, new_k + new_v):
            new[:, :, : self.offset] = old[:, :, : self.offset]
        self.keys, self.values = new_k, new_v
        ov = self._ort.OrtValue.ortvalue_from_numpy
        self.ort_keys = [ov(a) for a in new_k]
        self.ort_values = [ov(a) for a in new_v]
        tables = {layer: rope_tables(s, layer, cap) for layer in {layer for layer, _ in self.rope_inputs.values()}}
        # the arrays are kept beside their OrtValues, which only borrow numpy's memory
        self.rope_arrays = {name: tables[layer][0 if kind == "cos" else 1] for name, (layer, kind) in self.rope_inputs.items()}
        self.rope = {name: ov(a) for name, a in self.rope_arrays.items()}
        return True

    def trim_to(self, n: int) -> None:
        self.offset = max(0, min(n, self.offset))

    def reset(self) -> None:
        self.offset = 0


class ONNXModel:
    """``forward(tokens, cache)`` runs a chunk after the cached context and returns logits (numpy)."""

    backend = "onnx"

    def __init__(self, pkg: Package, threads: int | None = None, providers: list[str] | None = None,
                 graph: Path | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EdgeInferError("the ONNX backend needs onnxruntime; install it with: pip install onnxruntime") from None
        self.spec = pkg.spec
        path = Path(graph) if graph else pkg.path / ONNX_FILE
        if not path.exists():
            raise EdgeInferError(f"{pkg.path} has no ONNX graph ({ONNX_FILE}); add one with: "
                                 f"edgeinfer convert {pkg.path} --backend onnx")
        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise EdgeInferError(f"execution provider {', '.join(missing)} is not installed; this onnxruntime has: {', '.join(available)}")
        if threads is not None and threads < 1:
            raise EdgeInferError(f"--threads must be at least 1, not {threads}")
        self.threads = threads
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own exception types with multi-line text
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgeInferError(f"cannot load {path}: {first}") from None
        names = {i.name for i in self.session.get_inputs()}
        need = {"input_ids", "seqlens_k", "total_sequence_length", "logits_start"}
        if not need <= names:
            raise EdgeInferError(f"{path} is not an edgeinfer graph (inputs {sorted(names)})")
        self.rope_inputs = {n: (int(n.rsplit("_", 1)[1]), n.split("_")[1]) for n in names if n.startswith("rope_")}
        self._binding = self.session.io_binding()
        self._ov = ort.OrtValue.ortvalue_from_numpy
        self._bound_cache = None
        self.providers = self.session.get_providers()

    def new_cache(self, max_tokens: int | None = None) -> ONNXCache:
        return ONNXCache(self.spec, max_tokens or self.spec.max_position_embeddings, self.rope_inputs)

    def forward(self, tokens, cache: ONNXCache, lazy: bool = False, last_only: bool = False) -> np.ndarray:
        """Runs ``tokens`` (ids) after the cached context; returns logits [1, L, vocab] (or [1, 1, vocab]
        with ``last_only``). Advances the cache. ``lazy`` is MLX's (ORT runs synchronously)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        L = ids.shape[1]
        b = self._binding
        if cache.reserve(L) or self._bound_cache is not cache:
            for i in range(self.spec.num_layers):
                for kind, vals in (("key", cache.ort_keys), ("value", cache.ort_values)):
                    b.bind_ortvalue_input(f"past_{kind}_{i}", vals[i])
                    b.bind_ortvalue_output(f"present_{kind}_{i}", vals[i])
            for name, value in cache.rope.items():
                b.bind_ortvalue_input(name, value)
            self._bound_cache = cache
        total = cache.offset + L
        start = L - 1 if last_only else 0
        kept = L - start
        logits = np.empty((1, kept, self.spec.vocab_size), np.float32)
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        b.bind_cpu_input("logits_start", np.array([start], np.int64))
        b.bind_ortvalue_output("logits", self._ov(logits))
        self.session.run_with_iobinding(b)
        cache.offset = total
        return logits
