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

import os
from pathlib import Path

import numpy as np

from ..errors import EdgeInferError
from ..package import Package
from ..moe import check_moe, no_budget
from ..spec import rope_tables

ONNX_FILE = "model.onnx"


def native_unavailable(pkg: Package) -> str | None:
    """Why this package's one-token steps cannot run natively (one sentence), or None."""
    if pkg.spec.num_experts:
        return "the native decode step has no Mixture-of-Experts blocks"
    from ..native import unavailable

    return unavailable(pkg)


def graph_input_names(path: Path) -> set[str]:
    """The names of the graph's inputs (ModelProto.graph = 7, GraphProto.input = 11, ValueInfoProto.name
    = 1), read from the protobuf's wire format: importing onnx for this alone held 17 MB for the whole
    run. Anything that is not a well-formed ModelProto is one EdgeInferError."""
    data = memoryview(path.read_bytes())

    def fields(lo: int, hi: int):
        i = lo
        while i < hi:
            key, i = varint(i, hi)
            field, wire = key >> 3, key & 7
            if field == 0:
                raise ValueError("field number 0")
            if wire == 0:
                _, i = varint(i, hi)
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            elif wire == 2:
                n, i = varint(i, hi)
                if i + n > hi:
                    raise ValueError("a field runs past its message")
                yield field, i, i + n
                i += n
            else:
                raise ValueError(f"wire type {wire}")
            if i > hi:
                raise ValueError("truncated")

    def varint(i: int, hi: int) -> tuple[int, int]:
        v = shift = 0
        while True:
            if i >= hi or shift > 63:
                raise ValueError("a truncated varint")
            b = data[i]
            v |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return v, i

    try:
        names, graphs = set(), 0
        for f, lo, hi in fields(0, len(data)):
            if f != 7:
                continue
            graphs += 1
            for g, glo, ghi in fields(lo, hi):
                if g == 11:
                    names |= {bytes(data[a:b]).decode() for h, a, b in fields(glo, ghi) if h == 1}
        if not graphs:
            raise ValueError("no graph")
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgeInferError(f"cannot load {path}: not an ONNX model ({e})") from None
    return names


def exact_graph_bytes(path: Path) -> bytes:
    """The graph with every MatMulNBits at accuracy level 1 (float activations), serialized; its external
    data stays where it is (a few hundred KB of protobuf, read without the weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 1
    return model.SerializeToString()


class ONNXCache:
    """The KV buffers, one float32 block per kind shared by the native step, the sparse engine and the
    graph; the graph's OrtValues and rope tables are made only when a session binds them (``ort_views``),
    so that a plain chat on the native step never imports onnxruntime."""

    def __init__(self, spec, max_tokens: int, rope_inputs: dict[str, tuple[int, str]], step: int = 256):
        self.spec = spec
        self.rope_inputs = rope_inputs  # graph input -> (layer whose rope it is, "cos"|"sin")
        self.step = step
        self.max_tokens = max_tokens
        self.offset = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._views = None

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
        # one block per kind, each layer's buffer a view of it: the sparse decode engine
        # (edgeinfer.sparse) reads and writes all layers through the block in one call
        self.k_block = np.zeros((s.num_layers,) + shape, np.float32)
        self.v_block = np.zeros((s.num_layers,) + shape, np.float32)
        new_k, new_v = list(self.k_block), list(self.v_block)
        for old, new in zip(self.keys + self.values, new_k + new_v):
            new[:, :, : self.offset] = old[:, :, : self.offset]
        self.keys, self.values = new_k, new_v
        self._views = None
        return True

    def ort_views(self):
        """(keys, values, rope) as OrtValues over these buffers, for binding; made again after ``reserve``
        replaces the buffers."""
        if self._views is None:
            import onnxruntime as ort

            ov = ort.OrtValue.ortvalue_from_numpy
            tables = {layer: rope_tables(self.spec, layer, self.capacity) for layer in {layer for layer, _ in self.rope_inputs.values()}}
            # the arrays are kept beside their OrtValues, which only borrow numpy's memory
            self._rope_arrays = {name: tables[layer][0 if kind == "cos" else 1] for name, (layer, kind) in self.rope_inputs.items()}
            self._views = ([ov(a) for a in self.keys], [ov(a) for a in self.values],
                           {name: ov(a) for name, a in self._rope_arrays.items()})
        return self._views

    def trim_to(self, n: int) -> None:
        self.offset = max(0, min(n, self.offset))

    def compact(self, start: int, picks) -> int:
        """Keeps the positions ``start + picks[j]`` (a tree's accepted path) at ``start + j`` and drops the
        rest after them; returns how many positions are kept."""
        picks = np.asarray(picks, np.int64)
        moved = np.nonzero(picks != np.arange(len(picks)))[0]
        if len(moved):
            src, dst = start + picks[moved], start + moved
            for buf in self.keys + self.values:  # in place: the OrtValues borrow these buffers
                buf[:, :, dst] = buf[:, :, src]
        self.trim_to(start + len(picks))
        return self.offset

    def reset(self) -> None:
        self.offset = 0


class ONNXModel:
    """``forward(tokens, cache)`` runs a chunk after the cached context and returns logits (numpy)."""

    backend = "onnx"

    def __init__(self, pkg: Package, threads: int | None = None, providers: list[str] | None = None,
                 graph: Path | None = None, moe_top_k: int | None = None, sparsity_plan=None, decode: str = "native"):
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            raise EdgeInferError("the ONNX backend needs onnxruntime; install it with: pip install onnxruntime")
        self.spec = pkg.spec
        path = Path(graph) if graph else pkg.path / ONNX_FILE
        if not path.exists():
            raise EdgeInferError(f"{pkg.path} has no ONNX graph ({ONNX_FILE}); add one with: "
                                 f"edgeinfer convert {pkg.path} --backend onnx")
        providers = providers or ["CPUExecutionProvider"]
        if providers != ["CPUExecutionProvider"]:  # the CPU provider is always there: no import for it
            import onnxruntime as ort

            available = ort.get_available_providers()
            missing = [p for p in providers if p not in available]
            if missing:
                raise EdgeInferError(f"execution provider {', '.join(missing)} is not installed; this onnxruntime has: {', '.join(available)}")
        if threads is not None and threads < 1:
            raise EdgeInferError(f"--threads must be at least 1, not {threads}")
        self.threads = threads
        # The native step (edgeinfer.native) runs one-token steps, prompts and draft chains; the graph
        # (then with float activations, so that every answer stays the exact model's: int8 activations in
        # prefill had flipped first tokens, "L'Étoile" for "Paris") verifies token trees.
        self.pkg = pkg
        self.native = None
        self.native_unavailable = "not wanted" if decode == "graph" else native_unavailable(pkg)
        if self.native_unavailable is None:
            from ..native import NativeDecoder

            self.native = NativeDecoder(pkg, threads=threads)
        # prompts and draft chains too, unless EDGEINFER_NATIVE_PREFILL=off sends them to the exact graph
        self.native_chunks = self.native is not None and os.environ.get("EDGEINFER_NATIVE_PREFILL", "").lower() != "off"
        self.exact = self.native is not None or pkg.manifest.get("onnx", {}).get("accuracy_level", 4) != 4
        self._graph, self._wanted_providers = path, providers
        self._session = None
        self._bound_cache = None
        # The graph's inputs, from its protobuf alone (neither onnxruntime nor onnx is imported: 34 + 17 MB
        # resident here): with prompts on the native step the session is opened only for a token tree.
        names = graph_input_names(path)
        need = {"input_ids", "seqlens_k", "total_sequence_length", "logits_start"}
        if not need <= names:
            raise EdgeInferError(f"{path} is not an edgeinfer graph (inputs {sorted(names)})")
        self.rope_inputs = {n: (int(n.rsplit("_", 1)[1]), n.split("_")[1]) for n in names if n.startswith("rope_")}
        # Tree attention (speculative decoding): graphs exported since it exist take per-token position
        # offsets and an attention bias over the speculated tokens; zeros make a plain causal chunk.
        self.tree_inputs = {"position_delta", "tree_bias"} <= names
        if not self.native_chunks:
            self._open_session()
        # MoE graphs take the expert budget and top-k as inputs and return per-layer stats (edgeinfer/moe.py)
        check_moe(self.spec, None, moe_top_k)
        self.moe_top_k = int(moe_top_k or self.spec.num_experts_per_tok)
        self.moe_stats: list[dict] = []
        # R-Sparse (edgeinfer/sparse): one-token steps under a plan run the numba engine on the same KV
        # buffers; prefill stays dense.
        self.sparse_engine = None
        self.sparsity_plan = None
        self.set_sparsity(sparsity_plan)

    def _open_session(self):
        """The ORT session over the graph (exact when the native step exists), opened once."""
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            if self.threads:
                so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            self._ov = ort.OrtValue.ortvalue_from_numpy
            try:
                model = exact_graph_bytes(self._graph) if self.native is not None else str(self._graph)
                if not isinstance(model, str):
                    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self._graph.parent))
                self._session = ort.InferenceSession(model, sess_options=so, providers=self._wanted_providers)
            except Exception as e:  # ORT raises its own exception types with multi-line text
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EdgeInferError(f"cannot load {self._graph}: {first}") from None
            self._binding = self._session.io_binding()
            self._bound_cache = None
            self._tree_bound = self.tree_inputs  # the zeros are bound at the first plain call
        return self._session

    @property
    def session(self):
        return self._open_session()

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers() if self._session is not None else list(self._wanted_providers)

    def set_sparsity(self, plan, mode: str | None = None) -> None:
        """Switches the R-Sparse plan (None: dense). Only decode steps are sparse on this backend."""
        if mode not in (None, "decode"):
            raise EdgeInferError(f"the ONNX backend runs sparsity on decode steps only, not in mode {mode!r}; use --backend mlx")
        if plan is not None and self.sparse_engine is None:
            from ..sparse.engine import SparseEngine

            self.sparse_engine = SparseEngine(self.pkg, plan, threads=self.threads)
        elif self.sparse_engine is not None:
            self.sparse_engine.set_plan(plan)
        self.sparsity_plan = plan

    def sparse_counts(self) -> tuple[int, int] | None:
        """(active, total) input channels of the sparse decode steps so far; None without a plan."""
        if self.sparsity_plan is None:
            return None
        c = self.sparse_engine.counts
        return int(c[0]), int(c[1])

    def new_cache(self, max_tokens: int | None = None) -> ONNXCache:
        return ONNXCache(self.spec, max_tokens or self.spec.max_position_embeddings, self.rope_inputs)

    def check_tree(self) -> None:
        """Raises unless this graph can verify a token tree (``forward`` with ``positions``/``visible``)."""
        if not self.tree_inputs:
            raise EdgeInferError("this package's ONNX graph predates tree attention (--tree); re-export it with "
                                 "`edgeinfer convert PKG --backend onnx`, use a chain (--num-draft), or --backend mlx")
        if any(t == "sliding" for t in self.spec.layer_types) and self.spec.sliding_window:
            # GroupQueryAttention counts its window from the row in the chunk, not from a tree node's depth
            raise EdgeInferError("tree attention on the ONNX backend needs a model without sliding-window layers; "
                                 "use a chain (--num-draft) or --backend mlx")

    def forward(self, tokens, cache: ONNXCache, lazy: bool = False, last_only: bool = False,
                positions=None, visible=None, expert_budget=None) -> np.ndarray:
        """Runs ``tokens`` (ids) after the cached context; returns logits [1, L, vocab] (or [1, 1, vocab]
        with ``last_only``). Advances the cache. ``lazy`` is MLX's (ORT runs synchronously).

        Tree attention: ``positions`` [L] (siblings share one) and ``visible`` [L, K] bool (which of the
        last K positions after this write each token sees), as on the MLX backend."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        L = ids.shape[1]
        if L == 1 and self.sparsity_plan is not None and positions is None and not self.spec.num_experts:
            if cache.reserve(1):
                self._bound_cache = None  # new buffers: the graph's binding is stale
            logits = self.sparse_engine.step(int(ids[0, 0]), cache.offset, cache.k_block, cache.v_block)
            cache.offset += 1
            return logits.reshape(1, 1, -1)
        if self.native is not None and positions is None and (L == 1 or self.native_chunks):
            # one token, a prompt or a draft chain: the native step, on the same KV buffers as the graph
            if cache.reserve(L):
                self._bound_cache = None
            if L == 1:
                logits = self.native.step(int(ids[0, 0]), cache.offset, cache.k_block, cache.v_block)
            else:
                # a prompt (only its last logits wanted) takes the prompt's activations; verification and
                # scoring, which read every position, the step's
                logits = self.native.forward(ids[0], cache.offset, cache.k_block, cache.v_block, L - 1 if last_only else 0,
                                             exact=not last_only)
            cache.offset += L
            return logits.reshape(1, logits.size // self.spec.vocab_size, -1)
        self._open_session()
        if positions is not None:
            self.check_tree()
            delta = np.asarray(positions, np.int64) - np.arange(cache.offset, cache.offset + L)
            bias = np.where(np.asarray(visible, bool), 0.0, -np.inf).astype(np.float32)
            self._binding.bind_cpu_input("position_delta", delta.reshape(1, L))
            self._binding.bind_cpu_input("tree_bias", bias.reshape(1, 1, *bias.shape))
            self._tree_bound = True
        elif self._tree_bound:  # back to the plain causal chunk
            self._binding.bind_cpu_input("position_delta", np.zeros((1, 1), np.int64))
            self._binding.bind_cpu_input("tree_bias", np.zeros((1, 1, 1, 1), np.float32))
            self._tree_bound = False
        b = self._binding
        if cache.reserve(L) or self._bound_cache is not cache:
            keys, values, rope = cache.ort_views()
            for i in range(self.spec.num_layers):
                for kind, vals in (("key", keys), ("value", values)):
                    b.bind_ortvalue_input(f"past_{kind}_{i}", vals[i])
                    b.bind_ortvalue_output(f"present_{kind}_{i}", vals[i])
            for name, value in rope.items():
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
        if self.spec.num_experts:
            ctrl = no_budget(self.spec) if expert_budget is None else expert_budget.controls(self.spec, self.moe_top_k)
            b.bind_cpu_input("moe_ctrl", np.array(ctrl, np.float32))
            b.bind_cpu_input("moe_top_k", np.array([self.moe_top_k], np.int64))
            stats = np.empty((sum(map(self.spec.is_moe_layer, range(self.spec.num_layers))), 3), np.float32)
            b.bind_ortvalue_output("moe_stats", self._ov(stats))
        self.session.run_with_iobinding(b)
        cache.offset = total
        if self.spec.num_experts:
            layers = [i for i in range(self.spec.num_layers) if self.spec.is_moe_layer(i)]
            self.moe_stats = [dict(layer=i, requested=int(r), kept=int(k), mass_kept=float(m)) for i, (r, k, m) in zip(layers, stats)]
        return logits
