"""TTFT per turn of `edgeinfer chat`, driven in a real terminal (tmux), then the TTFT of the last turn's
prompt prefilled from an empty cache: what a chat that does not keep its KV cache pays every turn.

    python benchmarks/chat_ttft.py [-m models/smollm2-135m-instruct] [--backend mlx|onnx|auto]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS = re.compile(r"\[(\d+) tok, ([\d.]+) tok/s, TTFT (\d+) ms\].*?ctx (\d+)/")
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 12 times 3?", "Give me a fruit.",
             "What is the tallest mountain?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    sock = f"ttft-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp())

    def tmux(*args):
        return subprocess.run(["tmux", "-u", "-L", sock, *args], capture_output=True, text=True).stdout

    def screen():
        return tmux("capture-pane", "-p", "-J", "-t", "0", "-S", "-5000")

    def wait(pattern, n):
        while len(re.findall(pattern, screen())) < n:
            time.sleep(0.05)

    exe = Path(sys.executable).parent / "edgeinfer"
    tmux("-f", "/dev/null", "new-session", "-d", "-x", "120", "-y", "50", "-c", str(ROOT),
         f"EDGEINFER_CHAT_HISTORY={tmp}/history {exe} chat -m {a.model} --backend {a.backend} "
         f"--max-tokens {a.max_tokens} --meter none")
    try:
        wait(r"(?m)^>>>", 1)
        for i, q in enumerate(QUESTIONS):
            tmux("send-keys", "-t", "0", "-l", q)
            tmux("send-keys", "-t", "0", "Enter")
            wait(STATUS, i + 1)
        for i, (tok, tps, ttft, ctx) in enumerate(STATUS.findall(screen()), 1):
            print(f"turn {i}: TTFT {ttft} ms, context {ctx} tokens, {tok} tokens at {tps} tok/s")
        tmux("send-keys", "-t", "0", "-l", f"/save {tmp}/conv.json")
        tmux("send-keys", "-t", "0", "Enter")
        wait(r"\(saved 5 turns", 1)
    finally:
        tmux("kill-server")
    import edgeinfer
    from edgeinfer.model import GenerationConfig

    m = edgeinfer.load(a.model, backend=a.backend)
    msgs = json.loads((tmp / "conv.json").read_text())["messages"][:-1]
    ids = m.tokenizer.encode_chat(msgs)
    for _ in range(3):
        m.reset()
        next(iter(m.stream_ids(ids, GenerationConfig(max_tokens=1))), None)
        print(f"turn 5's prompt ({len(ids)} tokens) from an empty cache ({m.backend_name}): TTFT {m.stats.ttft * 1000:.0f} ms")


if __name__ == "__main__":
    main()
