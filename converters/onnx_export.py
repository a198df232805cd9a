"""Package -> ``model.onnx``: the same decoder as the MLX backend, as one ONNX Runtime graph.

One graph serves prefill and decode: ``input_ids [1, S]`` after ``total_sequence_length - S`` cached
positions. The KV cache is ``past_key_i``/``past_value_i [1, kv_heads, capacity, head_dim]``; the runtime
binds ``present_*`` to the same buffers, so GroupQueryAttention writes the new positions in place and
nothing is reallocated per token.

Quantized weights go through ``MatMulNBits`` on its fast path (``accuracy_level=4``, no zero points),
which computes ``w' = scale * (q - 2^(bits-1))``. The package's affine layout ``w = scale * q + bias``
differs from that by ``c = bias + 2^(bits-1) * scale`` per group, so each quantized linear adds
``sum_g (sum of x over group g) * c[g, n]``: a GEMV over K/group_size inputs, exact, and skipped when
``c`` is zero (symmetric sources such as GGUF Q4_0/Q8_0). 4- and 8-bit weights are the package's own
bytes (MLX packs values little-endian, which is MatMulNBits' nibble order); other widths are widened to
8 bits without loss.

The graph and the tensors it derives (fused projections, fp32 scales, rotary tables) live in
``model.onnx`` + ``model.onnx.data``; tensors usable as stored are read from ``model.safetensors`` itself
(ONNX external data by offset), so the tied embedding/head table exists once on disk and in memory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from edgeinfer.errors import EdgeInferError
from edgeinfer.package import Package

from .quantize import pack_bits, unpack_bits
from .safetensors_io import SafetensorsFile

ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"
OPSET = 21
ALIGN = 4096  # external data offsets page-aligned, so ORT can map them


class _Graph:
    """Accumulates nodes and initializers; big initializers go to external data."""

    def __init__(self, data_path: Path, data_location: str, weights: SafetensorsFile, weights_rel: str):
        import onnx
        from onnx import helper

        self.onnx, self.helper = onnx, helper
        self.nodes: list = []
        self.inits: list = []
        self.names: set[str] = set()
        self.data_location = data_location
        self.data = open(data_path, "wb")
        self.weights = weights
        self.weights_rel = weights_rel
        self._n = 0
        self.group_sums: dict = {}  # (input, group size) -> its per-group sums, shared by the linears reading it

    def close(self) -> None:
        self.data.close()

    def uniq(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def _external(self, name: str, dtype: int, shape, location: str, offset: int, length: int) -> str:
        t = self.onnx.TensorProto()
        t.name = name
        t.data_type = dtype
        t.dims.extend(int(d) for d in shape)
        t.data_location = self.onnx.TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        self.names.add(name)
        return name

    def const(self, name: str, arr: np.ndarray) -> str:
        """A tensor this graph derives: inline when small, else appended to model.onnx.data."""
        arr = np.ascontiguousarray(arr)
        if name in self.names:
            raise ValueError(f"duplicate initializer {name}")
        dtype = self.helper.np_dtype_to_tensor_dtype(arr.dtype)
        if arr.nbytes < 1024:
            self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
            self.names.add(name)
            return name
        pos = self.data.tell()
        pad = -pos % ALIGN
        self.data.write(b"\0" * pad)
        self.data.write(arr.tobytes())
        return self._external(name, dtype, arr.shape, self.data_location, pos + pad, arr.nbytes)

    def stored(self, name: str, tensor: str, dtype, shape, expert: int | None = None) -> str:
        """A tensor of model.safetensors used as stored (same bytes), viewed with another dtype/shape;
        ``expert``: only that slice of a stacked [E, ...] MoE tensor."""
        info = self.weights.header[tensor]
        a, b = info["data_offsets"]
        if expert is not None:
            per = (b - a) // int(info["shape"][0])
            a, b = a + expert * per, a + (expert + 1) * per
        length = b - a
        if length != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{tensor}: {length} bytes cannot be viewed as {dtype} {shape}")
        return self._external(name, self.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape, self.weights_rel,
                              self.weights._base + a, length)

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None, **attrs):
        base = name or op
        outs = [self.uniq(base) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=self.uniq(base + "_node"), domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def int64(self, values) -> str:
        return self.const(self.uniq("i64"), np.asarray(values, dtype=np.int64))


class _ExpertView:
    """One expert of stacked [E, ...] MoE tensors, seen as plain 2-D tensors (what _Linear reads)."""

    def __init__(self, weights: SafetensorsFile, expert: int):
        self.weights, self.expert = weights, expert
        self.header = {k: dict(v, shape=v["shape"][1:]) for k, v in weights.header.items()
                       if ".moe.experts." in k and isinstance(v, dict)}

    def get(self, name: str) -> np.ndarray:
        return self.weights.get(name)[self.expert]


class _Linear:
    """One projection (or several fused along N, sharing their input) as graph nodes."""

    def __init__(self, g: _Graph, pkg: Package, names: list[str], accuracy_level: int, expert: int | None = None):
        self.g = g
        w = _ExpertView(g.weights, expert) if expert is not None else g.weights
        quant = pkg.quantization
        per = quant.get("tensors", {})
        qp = [per.get(n, quant) for n in names]
        self.quantized = all(f"{n}.scales" in w.header for n in names)
        if not self.quantized and any(f"{n}.scales" in w.header for n in names):
            raise EdgeInferError(f"{names}: fused projections mix quantized and float weights")
        label = names[0] if len(names) == 1 else names[0].rsplit(".", 1)[0] + "." + "_".join(n.rsplit(".", 1)[1] for n in names)
        label += "" if expert is None else f".{expert}"
        biases = [w.get(f"{n}.bias") if f"{n}.bias" in w.header else None for n in names]
        if self.quantized:
            bits = {q.get("bits") for q in qp}
            groups = {q.get("group_size") for q in qp}
            if len(bits) != 1 or len(groups) != 1:
                raise EdgeInferError(f"{names}: fused projections with different quantization")
            bits, group = bits.pop(), groups.pop()
            packed = [w.get(f"{n}.weight") for n in names]
            scales = [np.asarray(w.get(f"{n}.scales"), np.float32) for n in names]
            offs = [np.asarray(w.get(f"{n}.biases"), np.float32) for n in names]
            self.N = sum(s.shape[0] for s in scales)
            self.K = packed[0].shape[1] * 32 // bits
            G = self.K // group
            self.out_bits = bits if bits in (4, 8) else 8
            # Widened values are re-centred on MatMulNBits' zero point (2^(out-1)): left at 0..2^bits-1, the
            # int8 product and the offset GEMV would be two large terms that cancel, and the cancellation
            # multiplies the int8 activations' rounding error (Gemma 3's 5-bit tensors: KL 0.55 -> see docs).
            shift = 2 ** (self.out_bits - 1) - 2 ** (bits - 1)
            if len(names) == 1 and bits in (4, 8):
                B = g.stored(f"{label}.B", f"{names[0]}.weight", np.uint8, (self.N, G, group * bits // 8), expert=expert)
            else:
                qs = [unpack_bits(np.asarray(p), bits) + shift for p in packed]
                q = np.concatenate(qs, axis=0) if len(qs) > 1 else qs[0]
                B = g.const(f"{label}.B", pack_bits(q, self.out_bits).view(np.uint8).reshape(self.N, G, group * self.out_bits // 8))
            s = np.concatenate(scales, 0)
            if len(names) == 1 and w.header[f"{names[0]}.scales"]["dtype"] == "F32":
                S = g.stored(f"{label}.scales", f"{names[0]}.scales", np.float32, (self.N * G,), expert=expert)
            else:
                S = g.const(f"{label}.scales", s.reshape(-1))
            corr = np.concatenate(offs, 0) + float(2 ** (bits - 1)) * s  # [N, G]: w = s * (q8 - zp) + corr
            self.corr = None if not np.any(corr) else g.const(f"{label}.corr", np.ascontiguousarray(corr.T))
            self.group = group
            self.G = G
            self.B, self.S = B, S
            self.accuracy_level = accuracy_level
        else:
            mats = [np.asarray(w.get(f"{n}.weight"), np.float32) for n in names]
            W = np.concatenate(mats, 0) if len(mats) > 1 else mats[0]
            self.N, self.K = W.shape
            self.W = g.const(f"{label}.weight_t", np.ascontiguousarray(W.T))
        self.bias = None
        if any(b is not None for b in biases):
            full = [np.asarray(b, np.float32) if b is not None else np.zeros(m, np.float32)
                    for b, m in zip(biases, self._sizes(names))]
            self.bias = g.const(f"{label}.bias", np.concatenate(full))
        self.label = label

    def _sizes(self, names):
        w = self.g.weights
        return [w.header[f"{n}.scales" if self.quantized else f"{n}.weight"]["shape"][0] for n in names]

    def __call__(self, x: str) -> str:
        g = self.g
        if not self.quantized:
            y = g.node("MatMul", [x, self.W], name=self.label)
            return g.node("Add", [y, self.bias]) if self.bias else y
        ins = [x, self.B, self.S] + (["", "", self.bias] if self.bias else [])
        y = g.node("MatMulNBits", ins, domain="com.microsoft", name=self.label, K=self.K, N=self.N,
                   bits=self.out_bits, block_size=self.group, accuracy_level=self.accuracy_level)
        if self.corr is None:
            return y
        # per-group input sums [1, S, G] times the offsets [G, N]; the sums computed once per input (an MoE
        # expert's gate and up projections share them)
        key = (x, self.group)
        if key not in g.group_sums:
            xg = g.node("Reshape", [x, g.int64([0, 0, self.G, self.group])])
            g.group_sums[key] = g.node("ReduceSum", [xg, g.int64([-1])], keepdims=0)
        return g.node("Add", [y, g.node("MatMul", [g.group_sums[key], self.corr])])


def _moe_block(g: _Graph, spec, p: str, h: str, expert_lin, projections, stats: list[str]) -> str:
    """An MoE layer as plain ONNX ops: router softmax, the expert budget (graph input ``moe_ctrl`` = [experts
    kept, mass share, truncate], as edgeinfer/moe.py and the MLX block define it), top-k with k the graph
    input ``moe_top_k``, then per expert the rows routed to it (NonZero + Gather), its MatMulNBits, and a
    ScatterND-add back, inside an If that skips an expert no token picked (no kernels, no weight reads). ORT's
    contrib MoE/QMoE kernels fix k as an attribute and route inside the kernel, so neither the budget nor a
    run-time k could be expressed with them."""
    from onnx import TensorProto

    E, H = spec.num_experts, spec.hidden_size
    f = TensorProto.FLOAT
    x = g.node("Reshape", [h, g.int64([-1, H])])  # [T, H]
    router = np.asarray(g.weights.get(f"{p}.moe.router.weight"), np.float32)
    probs = g.node("Softmax", [g.node("MatMul", [x, g.const(f"{p}.moe.router_t", np.ascontiguousarray(router.T))])], axis=-1)
    ctrl = lambda i: g.node("Gather", ["moe_ctrl", g.int64(i)], axis=0)  # noqa: E731  scalars
    kf = g.node("Cast", [g.node("Squeeze", ["moe_top_k"])], to=f)
    mass = g.node("ReduceSum", [probs, g.int64([0])], keepdims=0)  # [E]
    sorted_mass, order = g.node("TopK", [mass, g.int64([E])], n_out=2, axis=-1, largest=1, sorted=1)
    before = g.node("CumSum", [sorted_mass, g.int64(0)], exclusive=1)
    share = g.node("Mul", [ctrl(1), g.node("ReduceSum", [mass], keepdims=0)])
    by_mass = g.node("Max", [g.node("ReduceSum", [g.node("Cast", [g.node("Less", [before, share])], to=f)], keepdims=0), kf])
    zero = g.const(g.uniq("zero"), np.array(0, np.float32))
    keep_n = g.node("Where", [g.node("Greater", [ctrl(1), zero]), by_mass, ctrl(0)])
    kept_sorted = g.node("Cast", [g.node("Less", [g.const(g.uniq("rank"), np.arange(E, dtype=np.float32)), keep_n])], to=f)
    kept = g.node("Greater", [g.node("ScatterElements", [g.const(g.uniq("zeros"), np.zeros(E, np.float32)), order, kept_sorted], axis=0),
                              g.const(g.uniq("half"), np.array(0.5, np.float32))])
    k = "moe_top_k"
    _, idx_s = g.node("TopK", [g.node("Where", [kept, probs, g.const(g.uniq("m1"), np.array(-1, np.float32))]), k], n_out=2, axis=-1)
    w_s = g.node("GatherElements", [probs, idx_s], axis=-1)
    w0, idx0 = g.node("TopK", [probs, k], n_out=2, axis=-1)
    survive = g.node("Gather", [kept, idx0], axis=0)
    trunc = g.node("Greater", [ctrl(2), zero])
    idx = g.node("Where", [trunc, g.node("Where", [survive, idx0, g.node("Gather", [order, g.int64(0)], axis=0)]), idx_s])
    w = g.node("Where", [trunc, g.node("Where", [survive, w0, zero]), w_s])
    # stats: distinct experts requested and run, share of the requested mass kept
    depth, onoff = g.int64([E]), g.const(g.uniq("onoff"), np.array([0, 1], np.float32))
    distinct = lambda oh: g.node("ReduceSum", [g.node("ReduceMax", [oh, g.int64([0, 1])], keepdims=0)], keepdims=0)  # noqa: E731
    used = g.node("Mul", [g.node("OneHot", [idx, depth, onoff], axis=-1),
                          g.node("Unsqueeze", [g.node("Cast", [g.node("Greater", [w, zero])], to=f), g.int64([-1])])])
    stats.append(g.node("Concat", [g.node("Unsqueeze", [t, g.int64([0])]) for t in (
        distinct(g.node("OneHot", [idx0, depth, onoff], axis=-1)), distinct(used),
        g.node("Div", [g.node("ReduceSum", [w], keepdims=0), g.node("ReduceSum", [w0], keepdims=0)]))], axis=0))
    if spec.norm_topk_prob:
        w = g.node("Div", [w, g.node("Max", [g.node("ReduceSum", [w, g.int64([-1])], keepdims=1),
                                             g.const(g.uniq("tiny"), np.array(1e-20, np.float32))])])
    route = g.node("ScatterElements", [g.node("Mul", [probs, zero]), idx, w], axis=1, reduction="add")  # [T, E]
    out = g.node("Mul", [x, zero])
    for e in range(E):
        col = g.node("Reshape", [g.node("Gather", [route, g.int64([e])], axis=1), g.int64([-1])])  # [T]
        rows = g.node("Reshape", [g.node("NonZero", [g.node("Greater", [col, zero])]), g.int64([-1])])
        # The expert's nodes sit in an If branch taken only when a token is routed to it: an expert left out
        # (by top-k or by an expert budget) then costs no kernel launches, not only no weight reads (on the
        # tiny MoE, the unrouted experts' ~25 small nodes each were a third of a decode step's kernels).
        outer, g.nodes = g.nodes, []
        xe = g.node("Unsqueeze", [g.node("Gather", [x, rows], axis=0), g.int64([0])])  # [1, n, H]
        gate = expert_lin(f"{p}.moe.experts.gate_proj", e)(xe)
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), expert_lin(f"{p}.moe.experts.up_proj", e)(xe)])
        ye = g.node("Squeeze", [expert_lin(f"{p}.moe.experts.down_proj", e)(act), g.int64([0])])
        ye = g.node("Mul", [ye, g.node("Unsqueeze", [g.node("Gather", [col, rows], axis=0), g.int64([-1])])])
        ran = g.node("ScatterND", [out, g.node("Unsqueeze", [rows, g.int64([-1])]), ye], reduction="add")
        body, g.nodes = g.nodes, outer
        skipped = g.uniq("skipped")
        branch = lambda nodes, y: g.helper.make_graph(nodes, g.uniq(f"{p}.expert{e}"), [],  # noqa: E731
                                                      [g.helper.make_tensor_value_info(y, f, None)])
        out = g.node("If", [g.node("Greater", [g.node("Size", [rows]), g.int64(0)])], then_branch=branch(body, ran),
                     else_branch=branch([g.helper.make_node("Identity", [out], [skipped])], skipped))
    out = g.node("Reshape", [out, g.node("Shape", [h])])
    if spec.shared_expert_size:
        sg, su = projections([f"{p}.moe.shared.gate_proj", f"{p}.moe.shared.up_proj"], h)
        sh = expert_lin(f"{p}.moe.shared.down_proj", None)(g.node("Mul", [g.node("Mul", [sg, g.node("Sigmoid", [sg])]), su]))
        gate_w = np.asarray(g.weights.get(f"{p}.moe.shared_gate.weight"), np.float32)
        gate = g.node("Sigmoid", [g.node("MatMul", [h, g.const(f"{p}.moe.shared_gate_t", np.ascontiguousarray(gate_w.T))])])
        out = g.node("Add", [out, g.node("Mul", [gate, sh])])
    return out


def build_graph(pkg: Package, onnx_path: Path, data_path: Path, accuracy_level: int = 4, fuse: bool = True,
                progress=None, data_location: str = ONNX_DATA) -> None:
    """Writes the graph to ``onnx_path`` and its tensors to ``data_path``, both in the package folder; the
    graph names its data file ``data_location``."""
    from onnx import TensorProto, helper

    spec = pkg.spec
    if spec.arch not in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        raise EdgeInferError(f"the ONNX exporter does not know the {spec.arch} architecture")
    weights = SafetensorsFile(pkg.weights_path)
    g = _Graph(Path(data_path), data_location, weights, os.path.relpath(pkg.weights_path, Path(onnx_path).parent))
    H, D, nq, nkv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    eps = float(spec.rms_norm_eps)
    try:
        f32 = lambda n: g.const(n, np.asarray(weights.get(n), np.float32))  # noqa: E731
        lin = lambda names: _Linear(g, pkg, names, accuracy_level)  # noqa: E731

        def fusable(names: list[str]) -> bool:
            """One MatMulNBits for several projections needs one storage format for all of them
            (GGUF Q4_K_M mixes 4-, 5- and 6-bit tensors within a layer)."""
            if not fuse:
                return False
            per = pkg.quantization.get("tensors", {})
            kinds = {(f"{n}.scales" in weights.header, repr(per.get(n, pkg.quantization))) for n in names}
            return len(kinds) == 1

        def projections(names: list[str], x: str) -> list[str]:
            if fusable(names):
                sizes = [weights.header[f"{n}.scales" if f"{n}.scales" in weights.header else f"{n}.weight"]["shape"][0]
                         for n in names]
                return g.node("Split", [lin(names)(x), g.int64(sizes)], n_out=len(names), axis=-1)
            return [lin([n])(x) for n in names]

        # -- embedding: rows of the (possibly quantized) table, shared with a tied head -------------
        embed = lin(["embed"]) if "embed.scales" in weights.header else None
        ids = "input_ids"
        if embed is not None:
            rows = g.node("Gather", [embed.B, ids], axis=0)  # [1, S, G, bytes per group]
            if embed.out_bits == 4:
                lo = g.node("BitwiseAnd", [rows, g.const("u8_15", np.array(15, np.uint8))])
                hi = g.node("BitShift", [rows, g.const("u8_4", np.array(4, np.uint8))], direction="RIGHT")
                pair = g.node("Concat", [g.node("Unsqueeze", [lo, g.int64([-1])]), g.node("Unsqueeze", [hi, g.int64([-1])])], axis=-1)
                q = g.node("Reshape", [pair, g.int64([0, 0, embed.G, embed.group])])
            else:
                q = rows
            qf = g.node("Cast", [q], to=TensorProto.FLOAT)
            sc = g.node("Reshape", [embed.S, g.int64([embed.N, embed.G])])
            s_rows = g.node("Unsqueeze", [g.node("Gather", [sc, ids], axis=0), g.int64([-1])])
            zp = g.const("embed.zp", np.array(-(2 ** (embed.out_bits - 1)), np.float32))
            x = g.node("Mul", [g.node("Add", [qf, zp]), s_rows])  # scale * (q - zp)
            if embed.corr is not None:  # + the per-group offset, [G, N] transposed back to rows
                corr_rows = g.node("Gather", [g.node("Transpose", [embed.corr], perm=[1, 0]), ids], axis=0)
                x = g.node("Add", [x, g.node("Unsqueeze", [corr_rows, g.int64([-1])])])
            x = g.node("Reshape", [x, g.int64([0, 0, H])], name="embed")
        else:
            table = np.asarray(weights.get("embed.weight"), np.float32)
            x = g.node("Gather", [g.const("embed.weight", table), ids], axis=0, name="embed")
        if spec.embed_scale != 1.0:
            x = g.node("Mul", [x, g.const("embed_scale", np.array(spec.embed_scale, np.float32))])

        # -- rotary tables: graph inputs the runtime fills for its planned context (a table for the
        # whole 32k context of Gemma 3 would be 67 MB on disk); named after the first layer using them
        tables: dict = {}

        def rope_for(layer: int):
            key = (spec.rope_base(layer), repr(spec.rope_scaling_for(layer)))
            if key not in tables:
                tables[key] = (f"rope_cos_{layer}", f"rope_sin_{layer}")
            return tables[key]

        def mlp(p: str, h: str) -> str:
            """The feed-forward block of layer ``p``: the place an MoE block (router + experts under an
            expert budget) goes; its projections go through ``lin``, where R-Sparse linears go."""
            if spec.is_moe_layer(int(p.split(".")[1])):
                return _moe_block(g, spec, p, h, lambda n, e: _Linear(g, pkg, [n], accuracy_level, expert=e),
                                  projections, moe_stats)
            gate, up = projections([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], h)
            if spec.mlp_act == "silu":
                act = g.node("Mul", [gate, g.node("Sigmoid", [gate])])
            else:
                act = g.node("FastGelu", [gate], domain="com.microsoft")
            return lin([f"{p}.mlp.down_proj"])(g.node("Mul", [act, up]))

        moe_stats: list[str] = []
        seqlens, total = "seqlens_k", "total_sequence_length"
        positions, bias = tree_inputs(g)
        h = g.node("SimplifiedLayerNormalization", [x, f32("layers.0.attn_norm.weight")], axis=-1, epsilon=eps, name="l0.attn_norm")
        residual = x
        kv_inputs, kv_outputs = [], []
        for i in range(spec.num_layers):
            if progress:
                progress(i)
            p = f"layers.{i}"
            qkv_names = [f"{p}.attn.{n}_proj" for n in "qkv"]
            packed = not spec.qk_norm and fusable(qkv_names)
            if packed:
                qkv_in = [lin(qkv_names)(h), "", ""]  # [q | k | v] in one tensor, as GroupQueryAttention takes it
            else:
                q, k, v = projections(qkv_names, h)
            if spec.qk_norm_full:  # OLMoE: over the whole projection
                q = g.node("SimplifiedLayerNormalization", [q, f32(f"{p}.attn.q_norm.weight")], axis=-1, epsilon=eps)
                k = g.node("SimplifiedLayerNormalization", [k, f32(f"{p}.attn.k_norm.weight")], axis=-1, epsilon=eps)
            elif spec.qk_norm:
                q = g.node("Reshape", [g.node("SimplifiedLayerNormalization",
                                              [g.node("Reshape", [q, g.int64([0, 0, nq, D])]), f32(f"{p}.attn.q_norm.weight")],
                                              axis=-1, epsilon=eps), g.int64([0, 0, nq * D])])
                k = g.node("Reshape", [g.node("SimplifiedLayerNormalization",
                                              [g.node("Reshape", [k, g.int64([0, 0, nkv, D])]), f32(f"{p}.attn.k_norm.weight")],
                                              axis=-1, epsilon=eps), g.int64([0, 0, nkv * D])])
            if not packed:
                qkv_in = [q, k, v]
            cos, sin = rope_for(i)
            past_k, past_v = f"past_key_{i}", f"past_value_{i}"
            pres_k, pres_v = f"present_key_{i}", f"present_value_{i}"
            kv_inputs += [past_k, past_v]
            kv_outputs += [pres_k, pres_v]
            attrs = dict(num_heads=nq, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
                         scale=float(spec.attn_scale or D ** -0.5))
            if spec.layer_types and spec.layer_types[i] == "sliding" and spec.sliding_window:
                attrs["local_window_size"] = int(spec.sliding_window)  # same count as HF: the query and W-1 before it
            if spec.attn_logit_softcap:
                attrs["softcap"] = float(spec.attn_logit_softcap)
            attn = g.uniq(f"l{i}.attn")
            g.nodes.append(helper.make_node(
                "GroupQueryAttention", qkv_in + [past_k, past_v, seqlens, total, cos, sin, positions, bias], [attn, pres_k, pres_v],
                name=f"l{i}.gqa", domain="com.microsoft", **attrs))
            o = lin([f"{p}.attn.o_proj"])(attn)
            if spec.sandwich_norm:
                o = g.node("SimplifiedLayerNormalization", [o, f32(f"{p}.post_attn_norm.weight")], axis=-1, epsilon=eps)
            h, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [o, residual, f32(f"{p}.mlp_norm.weight")],
                                       n_out=4, domain="com.microsoft", epsilon=eps, name=f"l{i}.mlp_norm")
            m = mlp(p, h)
            if spec.sandwich_norm:
                m = g.node("SimplifiedLayerNormalization", [m, f32(f"{p}.post_mlp_norm.weight")], axis=-1, epsilon=eps)
            nxt = f"layers.{i + 1}.attn_norm.weight" if i + 1 < spec.num_layers else "norm.weight"
            h, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [m, residual, f32(nxt)], n_out=4,
                                       domain="com.microsoft", epsilon=eps, name=f"l{i}.out_norm")

        # -- head: only the positions from logits_start on --------------------------------------------
        h = g.node("Slice", [h, "logits_start", g.int64([2**62]), g.int64([1])])
        if spec.tie_embeddings:
            head = embed
            if head is None:
                logits = g.node("MatMul", [h, g.node("Transpose", ["embed.weight"], perm=[1, 0])])
        else:
            head = lin(["lm_head"])
        if head is not None:
            logits = head(h)
        if spec.final_logit_softcap:
            c = g.const("final_softcap", np.array(spec.final_logit_softcap, np.float32))
            logits = g.node("Mul", [g.node("Tanh", [g.node("Div", [logits, c])]), c])
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

        cap = "kv_capacity"
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            helper.make_tensor_value_info("logits_start", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("position_delta", TensorProto.INT64, [1, "delta_tokens"]),
            helper.make_tensor_value_info("tree_bias", TensorProto.FLOAT, [1, 1, "bias_rows", "bias_keys"]),
        ] + [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rope_positions", D // 2]) for t in tables.values() for n in t] \
          + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, nkv, cap, D]) for n in kv_inputs]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "kept", spec.vocab_size])] + [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, nkv, cap, D]) for n in kv_outputs]
        if moe_stats:  # the expert budget and k as data, and per MoE layer [requested, kept, mass kept]
            inputs += [helper.make_tensor_value_info("moe_ctrl", TensorProto.FLOAT, [3]),
                       helper.make_tensor_value_info("moe_top_k", TensorProto.INT64, [1])]
            g.nodes.append(helper.make_node("Reshape", [g.node("Concat", moe_stats, axis=0), g.int64([-1, 3])], ["moe_stats"],
                                            name="moe_stats"))
            outputs.append(helper.make_tensor_value_info("moe_stats", TensorProto.FLOAT, [len(moe_stats), 3]))
        graph = helper.make_graph(g.nodes, f"edgeinfer_{spec.arch}", inputs, outputs, initializer=g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="edgeinfer")
        model.ir_version = 10
    finally:
        g.close()
    with open(onnx_path, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def tree_inputs(g: _Graph) -> tuple[str, str]:
    """GroupQueryAttention's position_ids and attention_bias, for verifying speculated token trees in one
    pass: ``position_ids = range(total - S, total) + position_delta`` and an additive bias that is zero
    for the context and ``tree_bias`` [1, 1, S, K] over the last K positions. A plain causal chunk
    passes zeros of shape [1, 1] and [1, 1, 1, 1] (bound once: ORT's IO binding cannot bind initializers
    that inputs override, so these are plain inputs)."""
    from onnx import TensorProto, helper

    delta, tree = "position_delta", "tree_bias"
    total = g.node("Cast", ["total_sequence_length"], to=TensorProto.INT64)
    rows = g.node("Shape", ["input_ids"], start=1, end=2)  # [S]
    start = g.node("Sub", [total, g.node("Squeeze", [rows])])
    steps = g.node("Range", [start, total, g.const("i64_one", np.array(1, np.int64))])
    positions = g.node("Add", [g.node("Unsqueeze", [steps, g.int64([0])]), delta], name="position_ids")
    keys = g.node("Shape", [tree], start=3, end=4)  # [K]
    context = g.node("Sub", [g.node("Unsqueeze", [total, g.int64([0])]), keys])
    ones = g.int64([1, 1])
    zeros = g.node("ConstantOfShape", [g.node("Concat", [ones, rows, context], axis=0)],
                   value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    tail = g.node("Expand", [tree, g.node("Concat", [ones, rows, keys], axis=0)])
    return positions, g.node("Concat", [zeros, tail], axis=3, name="attention_bias")


# Text for the int8-activation check: generic prose, never evaluation data.
CHECK_TEXT = (
    "The old lighthouse stood at the end of the harbour, and every evening the keeper climbed its narrow "
    "stairs to light the lamp. Ships passing in the night relied on its steady beam to find their way home. "
    "In the morning he wrote down the weather, the tides and the names of the boats that had come in, "
    "then walked to the village to buy bread, cheese and a newspaper. Children often asked him whether he "
    "was lonely, and he always answered that the sea was good company, as long as one listened to it."
)
MAX_CHECK_KL = 0.05  # mean KL (nats) of the int8-activation graph to the exact one; SmolLM2 0.003, Gemma 3 0.002


def _set_accuracy(model, level: int) -> None:
    from onnx import AttributeProto

    def nodes(graph):  # MoE experts' MatMulNBits sit in If branches (_moe_block)
        for n in graph.node:
            yield n
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH:
                    yield from nodes(a.g)

    for n in nodes(model.graph):
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = level


def _set_data_location(model, location: str) -> None:
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value.startswith(ONNX_DATA):
                e.value = location


def check_int8_activations(pkg: Package, graph_path: Path, tokens: int = 128) -> dict:
    """Runs the graph at accuracy level 4 (int8 activations) and 1 (float) on CHECK_TEXT; returns the
    mean KL of the fast logits to the exact ones and their top-1 agreement."""
    import onnx

    from edgeinfer.backends.onnx_backend import ONNXModel
    from edgeinfer.tokenizer import Tokenizer

    tok = Tokenizer(pkg.path, pkg.tokenizer_info)
    ids = tok.encode(CHECK_TEXT)[:tokens]
    model = onnx.load(str(graph_path), load_external_data=False)
    exact_path = graph_path.with_name(graph_path.name + ".exact")
    logits = []
    try:
        for level, path in ((4, graph_path.with_name(graph_path.name + ".fast")), (1, exact_path)):
            _set_accuracy(model, level)
            onnx.save(model, str(path))
            try:
                b = ONNXModel(pkg, graph=path, decode="graph")  # the graph itself: the native step patches it exact
                logits.append(b.forward(ids, b.new_cache(len(ids)))[0].astype(np.float64))
            finally:
                path.unlink(missing_ok=True)
    finally:
        exact_path.unlink(missing_ok=True)

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    fast, exact = (logsoftmax(x) for x in logits)
    kl = float((np.exp(exact) * (exact - fast)).sum(-1).mean())
    top1 = float((fast.argmax(-1) == exact.argmax(-1)).mean())
    return {"kl": round(kl, 5), "top1": round(top1, 4), "tokens": len(ids), "max_kl": MAX_CHECK_KL}


def _check_prompts(pkg: Package, progress: bool) -> dict | None:
    """The native step's int8-prompt check (edgeinfer.native.check_prompt_act), where it runs here."""
    from edgeinfer.backends.onnx_backend import native_unavailable
    from edgeinfer.native import check_prompt_act

    if native_unavailable(pkg) is not None:
        return None
    r = check_prompt_act(pkg, progress=progress)
    if r and not r["passed"] and progress:  # news for the person converting, not for a library caller
        print(f"edgeinfer: 8-bit prompt activations changed {r['prompts'] - r['equal']} of {r['prompts']} greedy answers "
              f"on this model: its prompts run at the decode step's precision", file=sys.stderr)
    return r


def add_onnx_graph(pkg_dir: str | Path, accuracy_level: int | None = None, fuse: bool = True, progress: bool = True) -> Path:
    """Adds (or replaces) ``model.onnx`` + ``model.onnx.data`` in a package and records them in its
    manifest. Files are written under temporary names and renamed into place; the manifest is replaced
    last, so an interrupted run leaves the package as it was (at worst with an unrecorded graph).

    ``accuracy_level=None`` (auto) writes the fast graph (int8 activations) when its logits stay within
    ``MAX_CHECK_KL`` of the exact graph's on a short text, else the exact graph, and records the check in
    the manifest (it caught uncentred widened weights on Gemma 3: KL 0.55, now 0.002). The native step's
    int8-prompt check is recorded there too (onnx.prompt_check)."""
    import json

    from tqdm import tqdm

    from edgeinfer.package import MANIFEST, open_package, sha256_file

    try:
        import onnx
    except ImportError:
        raise EdgeInferError("writing ONNX graphs needs the onnx package: pip install onnx") from None
    pkg = open_package(pkg_dir)
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise EdgeInferError(f"accuracy level must be 0..4, not {accuracy_level}")
    tag = f".partial-{os.getpid()}"
    tmp_graph, tmp_data = pkg.path / (ONNX_FILE + tag), pkg.path / (ONNX_DATA + tag)
    bar = tqdm(total=pkg.spec.num_layers, desc="onnx graph", unit="layer", disable=None if progress else True,
               leave=False, file=sys.stderr)
    try:
        level = 4 if accuracy_level is None else accuracy_level
        build_graph(pkg, tmp_graph, tmp_data, accuracy_level=level, fuse=fuse, progress=lambda i: bar.update(1),
                    data_location=tmp_data.name)
        bar.close()
        check = None
        if accuracy_level is None:
            check = check_int8_activations(pkg, tmp_graph)
            if check["kl"] > MAX_CHECK_KL:
                level = 1
                print(f"edgeinfer: int8 activations lose too much on this model (mean KL {check['kl']:.3f} > "
                      f"{MAX_CHECK_KL} on a test text): wrote the exact ONNX graph, which is slow; --backend auto runs "
                      f"it on MLX", file=sys.stderr)
        prompt_check = _check_prompts(pkg, progress)
        model = onnx.load(str(tmp_graph), load_external_data=False)
        _set_accuracy(model, level)
        _set_data_location(model, ONNX_DATA)
        onnx.save(model, str(tmp_graph))
        manifest = dict(pkg.manifest)
        files = dict(manifest.get("files", {}))
        for final, tmp in ((ONNX_FILE, tmp_graph), (ONNX_DATA, tmp_data)):
            files[final] = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
        manifest["files"] = dict(sorted(files.items()))
        manifest["onnx"] = {"file": ONNX_FILE, "data": ONNX_DATA, "opset": OPSET, "accuracy_level": level,
                            "fused_projections": fuse, "onnx_version": onnx.__version__}
        if check:
            manifest["onnx"]["int8_check"] = check
        if prompt_check:
            manifest["onnx"]["prompt_check"] = prompt_check
        tmp_manifest = pkg.path / (MANIFEST + tag)
        with open(tmp_manifest, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_data, pkg.path / ONNX_DATA)
        os.replace(tmp_graph, pkg.path / ONNX_FILE)
        os.replace(tmp_manifest, pkg.path / MANIFEST)
    except BaseException as e:
        bar.close()
        for p in pkg.path.glob(f"*{tag}*"):
            p.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise EdgeInferError(f"could not write the ONNX graph into {pkg.path}: {e.strerror or e}") from None
        raise
    return pkg.path / ONNX_FILE
