"""Per-job latency of each scenario workload alone: ``python -m edgeinfer.scenario.workloads``.

Loads one model at a time on its generated inputs (untimed), runs it frame after frame, and prints a
Markdown table of the median and 90th percentile latency of ``run()``. The LLMs answer questions from
the fixed list (32 tokens at most) and also report TTFT and decode tokens/s. Numbers for
docs/SCENARIOS.md; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ...errors import EdgeInferError


def _scenario(tables: dict, seed: int):
    from ..spec import _models_dir, parse_scenario
    from ..workload import load_kinds

    raw = {"name": "latency", "duration": 60, "seed": seed, "inputs": {"mic": {"kind": "speech"},
           "camera": {"kind": "text-frames"}}, "models": tables}
    return parse_scenario(raw, "latency", base_dir=_models_dir(), check_files=True, kinds=load_kinds())


def _measure(sc, name: str, upstream_name: str | None, frames: list[int], threads: int | None, bar):
    from ..workload import make_workload

    up = make_workload(sc.model(upstream_name), sc) if upstream_name else None
    w = make_workload(sc.model(name), sc)
    if up is not None:
        up.load(threads)
    w.load(threads)
    times, extra = [], []
    for i in frames:
        feed = up.run(up.input(i, None), 1e9).output if up is not None else None
        inp = w.input(i, feed)
        t = time.perf_counter()
        r = w.run(inp, 1e9)
        times.append(time.perf_counter() - t)
        if r.token_times:
            decode = (r.tokens - 1) / (r.token_times[-1] - r.token_times[0]) if r.tokens > 1 else float("nan")
            extra.append((r.ttft, decode))
        bar.update(1)
    w.close()
    if up is not None:
        up.close()
    return np.array(times), extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeinfer.scenario.workloads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per model (default 1)")
    p.add_argument("--frames", type=int, default=200, help="frames for the VAD; det and rec run frames/10 pages "
                   "and the LLMs frames/25 answers (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated subset: vad,det,rec,smollm2,gemma3")
    a = p.parse_args(argv)
    from tqdm.auto import tqdm

    n = a.frames
    pages = [20 * k for k in range(max(1, n // 10))]  # one frame per page (a page holds 20 frames)
    answers = list(range(max(1, n // 25)))
    cases = {
        "vad": ("silero-vad, 32 ms of 16 kHz audio", {"vad": {"kind": "silero-vad", "rate": 31.25, "input": "mic"}},
                "vad", None, list(range(n))),
        "det": ("ocr-det, a 384x256 frame", {"det": {"kind": "ocr-det", "rate": 10, "input": "camera"}},
                "det", None, pages),
        "rec": ("ocr-rec, one page (its lines in one batch)", {
            "det": {"kind": "ocr-det", "rate": 10, "input": "camera"},
            "rec": {"kind": "ocr-rec", "after": "det"}}, "rec", "det", pages),
        "smollm2": ("llm smollm2-135m-instruct, an answer of <= 32 tokens", {
            "smollm2": {"kind": "llm", "package": "smollm2-135m-instruct", "rate": 1, "ttft_ms": 1000,
                        "max_tokens": 32}}, "smollm2", None, answers),
        "gemma3": ("llm gemma3-270m, an answer of <= 32 tokens", {
            "gemma3": {"kind": "llm", "package": "gemma3-270m", "rate": 1, "ttft_ms": 1000,
                       "max_tokens": 32}}, "gemma3", None, answers),
    }
    chosen = [c for c in a.only.split(",") if c] or list(cases)
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        print(f"edgeinfer: unknown workload {unknown[0]!r}; choose from {', '.join(cases)}", file=sys.stderr)
        return 2
    rows = []
    try:
        with tqdm(total=sum(len(cases[c][4]) for c in chosen), disable=not sys.stderr.isatty(), leave=False) as bar:
            for c in chosen:
                what, tables, name, up, frames = cases[c]
                times, extra = _measure(_scenario(tables, a.seed), name, up, frames, a.threads, bar)
                note = ""
                if extra:
                    ttft = np.median([e[0] for e in extra]) * 1000
                    tps = np.nanmedian([e[1] for e in extra])
                    note = f"TTFT {ttft:.0f} ms, decode {tps:.1f} tok/s"
                rows.append((what, len(times), np.median(times) * 1000, np.percentile(times, 90) * 1000, note))
    except EdgeInferError as e:
        print(f"edgeinfer: {e}", file=sys.stderr)
        return 2
    print(f"threads per model: {a.threads}")
    print("| workload | jobs | median ms | p90 ms | notes |")
    print("| --- | --- | --- | --- | --- |")
    for what, k, med, p90, note in rows:
        print(f"| {what} | {k} | {med:.2f} | {p90:.2f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
