"""edgeinfer serve next to llama-server (llama-cpp-python's ``python -m llama_cpp.server``) on the same GGUF:
C concurrent clients, each sending chat requests one after another, streaming at temperature 0.

    python benchmarks/serve_bench.py [--package models/smollm2-135m-instruct] [--clients 1,4,8] [--requests 4]
                                     [--max-tokens 64] [--threads 2] [-r 2] [--json FILE]

The two servers never run at the same time (two cores): for each repetition and client count, one server
is started, warmed up (one request), measured, and stopped, then the other, in an order that alternates
between repetitions. llama-server runs with --interrupt_requests False: by default a new request cuts off
the answer being streamed (4 clients got one token each). Every client sends its own prompts (tests/data/chat_prompts.txt, distinct across
clients) so that neither server's prompt cache helps more than the other's.

Reported per server and client count (medians over repetitions):
  aggregate tok/s   completion tokens of all requests / wall time from the first request to the last answer
  TTFT p50 / p95    request sent -> first content delta, at the client, over all requests
Completion tokens come from each answer's ``usage`` (requested with stream_options.include_usage; where a
server sends none, the content deltas are counted, one a token).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeinfer.apps.resolve import resolve_package  # noqa: E402
from edgeinfer.converters.fetch import cache_dir  # noqa: E402
from edgeinfer.package import open_package  # noqa: E402
from edgeinfer.sysinfo import describe, machine  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, pkg: Path, gguf: Path, threads: int, context: int) -> tuple[subprocess.Popen, str, str]:
    """Starts one server; returns the process, its base URL and the model id to send."""
    port = free_port()
    if kind == "edgeinfer":
        cmd = [sys.executable, "-m", "edgeinfer.cli", "serve", "-m", str(pkg), "--port", str(port), "-q", "--threads", str(threads),
               "--context", str(context), "--max-queue", "64", "--meter", "none"]
        model = pkg.name
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--n_ctx", str(context), "--verbose", "False",
               "--interrupt_requests", "False"]  # its default cuts a streaming answer off at the next request
        model = gguf.name
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} did not start: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url, model
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{kind} did not answer within 180 s")


def request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, deltas, usage = None, 0, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    deltas += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "tokens": usage["completion_tokens"] if usage else deltas, "seconds": time.perf_counter() - t0}


def run_clients(url: str, model: str, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    results, errors = [], []

    def client(i: int):
        try:
            for k in range(per_client):
                results.append(request(url, model, prompts[(i * per_client + k) % len(prompts)], max_tokens))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    ttfts = sorted(r["ttft"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    return {"aggregate_tps": sum(r["tokens"] for r in results) / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": p95,
            "requests": len(results), "tokens": sum(r["tokens"] for r in results), "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="models/smollm2-135m-instruct")
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF for llama-server (default: the package's source)")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("-r", "--reps", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    pkg = Path(resolve_package(a.package))
    src = open_package(pkg).manifest.get("source", {})
    gguf = a.gguf or Path(src.get("path", ""))
    if not gguf.is_file():
        gguf = cache_dir() / "gguf" / Path(str(src.get("path", ""))).name
    if not gguf.is_file():
        raise SystemExit(f"no GGUF for {pkg} (pass --gguf)")
    prompts = [x for x in (ROOT / "tests" / "data" / "chat_prompts.txt").read_text().splitlines() if x.strip()]
    counts = [int(c) for c in a.clients.split(",")]
    rows: dict = {}
    host = describe(machine(("llama-cpp-python", "uvicorn", "starlette")))
    for rep in range(a.reps):
        order = ["edgeinfer", "llama-server"] if rep % 2 == 0 else ["llama-server", "edgeinfer"]
        for kind in order:
            proc, url, model = start(kind, pkg, gguf, a.threads, a.context)
            try:
                request(url, model, "Hello!", 8)  # warm-up, not counted
                for c in counts:
                    r = run_clients(url, model, prompts, c, a.requests, a.max_tokens)
                    rows.setdefault((kind, c), []).append(r)
                    print(f"rep {rep + 1}/{a.reps} {kind} {c} clients: {r['aggregate_tps']:.1f} tok/s aggregate, "
                          f"TTFT p50 {1000 * r['ttft_p50']:.0f} ms, p95 {1000 * r['ttft_p95']:.0f} ms ({r['tokens']} tokens)",
                          file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("aggregate_tps", "ttft_p50", "ttft_p95")} for k, v in rows.items()}
    print(f"\n{host}; {a.threads} threads; {a.requests} requests per client, {a.max_tokens} tokens each, medians of {a.reps}\n")
    print("| clients | edgeinfer tok/s | llama-server tok/s | ratio | edgeinfer TTFT p50 / p95 ms | llama-server TTFT p50 / p95 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in counts:
        e, l = med[("edgeinfer", c)], med[("llama-server", c)]
        print(f"| {c} | {e['aggregate_tps']:.1f} | {l['aggregate_tps']:.1f} | {e['aggregate_tps'] / l['aggregate_tps']:.2f}x | "
              f"{1000 * e['ttft_p50']:.0f} / {1000 * e['ttft_p95']:.0f} | {1000 * l['ttft_p50']:.0f} / {1000 * l['ttft_p95']:.0f} |")
    if a.json:
        a.json.write_text(json.dumps({"package": str(pkg), "gguf": str(gguf), "args": vars(a) | {"json": str(a.json), "gguf": str(gguf)},
                                      "runs": {f"{k}|{c}": v for (k, c), v in rows.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
