"""One MoE layer on ORT CPU: the contrib QMoE kernel vs edgeinfer's graph (TopK + per-expert MatMulNBits)."""
import numpy as np, onnx, onnxruntime as ort, time, sys
from onnx import helper, TensorProto as TP, numpy_helper as nh
E, K, H, I, BLK = 8, 2, 512, 1024, 64
rng = np.random.default_rng(0)
Wg = rng.standard_normal((E, I, H)).astype(np.float32) * 0.05
Wu = rng.standard_normal((E, I, H)).astype(np.float32) * 0.05
Wd = rng.standard_normal((E, H, I)).astype(np.float32) * 0.05
R = rng.standard_normal((E, H)).astype(np.float32)

def q4(w):  # symmetric-ish int4 per block with uint8 zero point 8: w ~ scale*(q-8)
    e, o, i = w.shape
    g = w.reshape(e, o, i // BLK, BLK)
    s = np.abs(g).max(-1) / 7 + 1e-8
    q = np.clip(np.rint(g / s[..., None]) + 8, 0, 15).astype(np.uint8).reshape(e, o, i)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    deq = ((q.reshape(e, o, i // BLK, BLK).astype(np.float32) - 8) * s[..., None]).reshape(e, o, i)
    return packed, s.astype(np.float32), deq
pg, sg, dg = q4(Wg); pu, su, du = q4(Wu); pd, sd, dd = q4(Wd)

def ref(x):
    p = np.exp(x @ R.T); p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, -1)[:, :K]; out = np.zeros_like(x)
    for t in range(x.shape[0]):
        w = p[t, idx[t]]; w = w / w.sum()
        for e, ww in zip(idx[t], w):
            a = dg[e] @ x[t]; a = a / (1 + np.exp(-a)) * (du[e] @ x[t]); out[t] += ww * (dd[e] @ a)
    return out

def qmoe_model(fused, gate_first):
    inits = [nh.from_array(R.T.copy(), "RT")]
    if fused:
        inter = np.stack([pg, pu], 2).reshape(E, 2 * I, H // 2) if fused == 1 else np.concatenate([pg, pu], 1)
        sc = np.stack([sg, su], 2).reshape(E, 2 * I, -1) if fused == 1 else np.concatenate([sg, su], 1)
        inits += [nh.from_array(inter, "w1"), nh.from_array(sc, "s1")]
        ins = ["x", "logits", "w1", "s1", "", "w2", "s2", ""]
    else:
        a, b = ((pg, sg), (pu, su)) if gate_first else ((pu, su), (pg, sg))
        inits += [nh.from_array(a[0], "w1"), nh.from_array(a[1], "s1"), nh.from_array(b[0], "w3"), nh.from_array(b[1], "s3")]
        ins = ["x", "logits", "w1", "s1", "", "w2", "s2", "", "w3", "s3", ""]
    inits += [nh.from_array(pd, "w2"), nh.from_array(sd, "s2")]
    nodes = [helper.make_node("MatMul", ["x", "RT"], ["logits"]),
             helper.make_node("QMoE", ins, ["y"], domain="com.microsoft", k=K, activation_type="swiglu", swiglu_fusion=fused,
                              normalize_routing_weights=1, expert_weight_bits=4, block_size=BLK, accuracy_level=int(sys.argv[1]) if len(sys.argv) > 1 else 4, activation_alpha=1.0, activation_beta=0.0)]
    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TP.FLOAT, ["T", H])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["T", H])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])

def ours_model():
    # The same graph edgeinfer writes (converters/onnx_export._moe_block's shape), built directly: router, TopK,
    # per-expert NonZero/Gather/MatMulNBits/ScatterND; zero points 8 as in the QMoE weights.
    inits, nodes = [nh.from_array(R.T.copy(), "RT")], []
    c = lambda n, a: (inits.append(nh.from_array(np.asarray(a), n)), n)[1]
    def node(op, ins, n_out=1, **kw):
        node.i += 1; outs = [f"t{node.i}_{j}" for j in range(n_out)]
        nodes.append(helper.make_node(op, ins, outs, domain="com.microsoft" if op == "MatMulNBits" else None, **kw)); return outs[0] if n_out == 1 else outs
    node.i = 0
    probs = node("Softmax", [node("MatMul", ["x", "RT"])], axis=-1)
    w, idx = node("TopK", [probs, c("k", np.array([K], np.int64))], 2, axis=-1)
    w = node("Div", [w, node("ReduceSum", [w, c("ax", np.array([-1], np.int64))], keepdims=1)])
    zero = c("zero", np.array(0, np.float32))
    route = node("ScatterElements", [node("Mul", [probs, zero]), idx, w], axis=1, reduction="add")
    out = node("Mul", ["x", zero])
    def mm(x, p, s, e, N, Kd):
        zp = np.full((N, Kd // BLK // 2), 0x88, np.uint8)
        return node("MatMulNBits", [x, c(f"B{node.i}", p[e].reshape(N, Kd // BLK, BLK // 2)), c(f"S{node.i}", s[e].reshape(-1)), c(f"Z{node.i}", zp.reshape(-1))],
                    K=Kd, N=N, bits=4, block_size=BLK, accuracy_level=int(sys.argv[1]) if len(sys.argv) > 1 else 4)
    for e in range(E):
        col = node("Reshape", [node("Gather", [route, c(f"e{e}", np.array([e], np.int64))], axis=1), c("m1", np.array([-1], np.int64))])
        rows = node("Reshape", [node("NonZero", [node("Greater", [col, zero])]), "m1"])
        xe = node("Gather", ["x", rows], axis=0)
        gt = mm(xe, pg, sg, e, I, H); up = mm(xe, pu, su, e, I, H)
        a = node("Mul", [node("Mul", [gt, node("Sigmoid", [gt])]), up])
        ye = node("Mul", [mm(a, pd, sd, e, H, I), node("Unsqueeze", [node("Gather", [col, rows], axis=0), "m1"])])
        out = node("ScatterND", [out, node("Unsqueeze", [rows, "m1"]), ye], reduction="add")
    nodes.append(helper.make_node("Identity", [out], ["y"]))
    g = helper.make_graph(nodes, "o", [helper.make_tensor_value_info("x", TP.FLOAT, ["T", H])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["T", H])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])

so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
def bench(model, name):
    try:
        s = ort.InferenceSession(model.SerializeToString(), so)
    except Exception as e:
        print(name, "load failed:", str(e).splitlines()[0][:200]); return
    for T in (1, 16):
        x = rng.standard_normal((T, H)).astype(np.float32)
        try:
            y = s.run(None, {"x": x})[0]
        except Exception as e:
            print(name, "run failed:", str(e).splitlines()[0][:200]); return
        err = np.abs(y - ref(x)).max() / np.abs(ref(x)).max()
        n = 200 if T == 1 else 50
        t0 = time.perf_counter()
        for _ in range(n): s.run(None, {"x": x})
        dt = (time.perf_counter() - t0) / n
        print(f"{name:28s} T={T:2d}  {dt * 1e3:7.3f} ms/call  rel err {err:.2e}")
for fused, gf in ((1, True),):
    bench(qmoe_model(fused, gf), f"QMoE swiglu_fusion={fused}{'' if fused else (' fc1=gate' if gf else ' fc1=up')}")
bench(ours_model(), "edgeinfer graph")
