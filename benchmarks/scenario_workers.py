"""Threads or processes for the scenario runner's per-model workers: two ONNX Runtime sessions
(1 intra-op thread each), N inferences each, run one after the other, on two threads, on two processes."""
import multiprocessing as mp, sys, tempfile, threading, time, os
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper

def build(path, n=768, layers=6):
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32) * 0.03, f"w{i}")
        inits.append(w); nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"t{i}"])); cur = f"t{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, n])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [64, n])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)

def session(path):
    o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])

def work(path, n, post):
    s = session(path); x = np.ones((64, 768), np.float32); s.run(None, {"x": x}); lat = []
    for _ in range(n):
        t = time.perf_counter(); y = s.run(None, {"x": x})[0]
        if post:  # GIL-holding Python post-processing, like box decoding
            acc = 0.0
            for v in y[0, :post]: acc += float(v)
        lat.append(time.perf_counter() - t)
    return lat

def proc(path, n, post, q): q.put(work(path, n, post))

if __name__ == "__main__":
    n, post = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
    path = os.path.join(tempfile.mkdtemp(), "m.onnx"); build(path)
    t = time.perf_counter(); a = work(path, n, post) + work(path, n, post); seq = time.perf_counter() - t
    out = []
    ths = [threading.Thread(target=lambda: out.append(work(path, n, post))) for _ in range(2)]
    t = time.perf_counter(); [th.start() for th in ths]; [th.join() for th in ths]; thr = time.perf_counter() - t
    q = mp.get_context("spawn").Queue(); ps = [mp.get_context("spawn").Process(target=proc, args=(path, n, post, q)) for _ in range(2)]
    t = time.perf_counter(); [p.start() for p in ps]; res = [q.get(), q.get()]; [p.join() for p in ps]; pro = time.perf_counter() - t
    med = lambda l: sorted(l)[len(l) // 2] * 1000
    print(f"post={post}: sequential {seq:.2f} s (median {med(a):.1f} ms) | 2 threads {thr:.2f} s (median {med(out[0]+out[1]):.1f} ms) "
          f"| 2 processes {pro:.2f} s incl. start (median {med(res[0]+res[1]):.1f} ms)")
