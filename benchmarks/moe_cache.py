"""MoE expert cache: hit rate and bytes read per token against the cache's capacity, on a trained MoE.

    python benchmarks/moe_cache.py [-m models/tiny-moe-q4] [--prompt-file models/tiny-moe/logs/heldout.txt]
                                   [--prompt-tokens 256] [-n 64] [--caps 2,4,6,8] [--expert-budget B]
                                   [--json] [--write-docs]

One greedy generation per decoding mode from a held-out Python prompt (the model never trained on it):
plain decoding, speculative n-gram decoding (prompt lookup, chains of 4), and the same with an expert
budget B on verification (at most B distinct experts per layer per verification, edgeinfer/moe.py). Each
run records which experts every layer needed in every forward; the cache's accounting (SlotPolicy, the
runtime's own code) is then replayed on that routing for every capacity, per layer and as one pool over
all layers of the same total size, with LRU and LFU eviction. Routing does not depend on the cache (its
forward equals the all-resident one bit for bit), so one run per mode serves every capacity; a real run
with the smallest capacity checks that the replay reproduces the runtime's counters exactly.

Reported per row: hit rate and bytes read from model.safetensors per generated token, over the decode
phase (the prefill's misses are reported apart: a cold cache reads each expert the prompt routes to once).
--write-docs writes the table into docs/BENCHMARKS.md between the moe-cache markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- moe-cache:start -->", "<!-- moe-cache:end -->"
DOC = ROOT / "docs" / "BENCHMARKS.md"


def prompt_ids(tok, path: Path, n: int) -> list[int]:
    """The first ``n`` tokens of the held-out text, starting at its first top-level ``def``: code that the
    continuation can look back into (prompt lookup has something to find)."""
    text = path.read_text(errors="replace")
    i = text.find("\ndef ")
    ids = tok.encode(text[i + 1 if i >= 0 else 0:])
    return ids[:n]


def record(path: str, ids: list[int], n: int, mode: str, budget: int | None, cap: int | None = None):
    """One greedy generation; returns (trace, generated tokens, seconds, the cache's counters)."""
    import edgeinfer
    from edgeinfer.model import GenerationConfig
    from edgeinfer.moe import ExpertBudget
    from edgeinfer.speculative import make_speculator

    m = edgeinfer.load(path, backend="mlx", expert_cache=cap or m_experts(path))
    ec = m.backend.expert_cache
    ec.trace = []
    spec = False
    if mode != "plain":
        spec = make_speculator(m, "ngram", 4, None, expert_budget=ExpertBudget(budget=budget) if mode == "ngram+budget" else None)
    t = time.perf_counter()
    out = list(m.stream_ids(ids, GenerationConfig(max_tokens=n, ignore_eos=True, speculative=spec)))
    return ec.trace, out, time.perf_counter() - t, ec.stats()


def m_experts(path: str) -> int:
    from edgeinfer.package import open_package

    return int(open_package(path).spec.num_experts)


def replay(trace, cap: int, layers: int, policy: str, scope: str):
    """Hits and misses of the prefill (the first forward) and of the rest, under one cache configuration."""
    from edgeinfer.backends.expert_cache import SlotPolicy

    pools = {}
    one = SlotPolicy(cap * layers, policy) if scope == "global" else None
    counts = {"prefill": [0, 0], "decode": [0, 0]}
    for n, (layer, _tokens, needed) in enumerate(trace):
        pol = one if one is not None else pools.setdefault(layer, SlotPolicy(cap, policy))
        phase = "prefill" if n < layers else "decode"
        h0, m0 = pol.hits, pol.misses
        group = needed if one is None else [(layer, e) for e in needed]
        size = cap  # a forward needing more experts than a layer's slots runs in rounds, as the runtime does
        resident = [k for k in group if k in pol.slot]
        group = resident + [k for k in group if k not in pol.slot]
        for r in range(0, len(group), size):
            pol.admit(group[r : r + size])
        counts[phase][0] += pol.hits - h0
        counts[phase][1] += pol.misses - m0
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "tiny-moe-q4"))
    ap.add_argument("--prompt-file", default=str(ROOT / "models" / "tiny-moe" / "logs" / "heldout.txt"))
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("-n", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--caps", default="2,4,6,8", help="experts per layer kept resident (default 2,4,6,8)")
    ap.add_argument("--expert-budget", type=int, default=None, help="B for the budgeted n-gram row (default: top-k)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    a = ap.parse_args()

    import edgeinfer  # noqa: F401  (first: it preloads OpenBLAS before MLX)
    from edgeinfer.errors import EdgeInferError
    from edgeinfer.package import open_package
    from edgeinfer.tokenizer import Tokenizer

    try:
        pkg = open_package(a.model)
        spec = pkg.spec
        if not spec.num_experts:
            raise EdgeInferError(f"{a.model} is not a Mixture-of-Experts model")
        caps = [int(c) for c in a.caps.split(",")]
        if any(not spec.num_experts_per_tok <= c <= spec.num_experts for c in caps):
            raise EdgeInferError(f"--caps must lie between the top-k {spec.num_experts_per_tok} and {spec.num_experts}")
        ids = prompt_ids(Tokenizer(pkg.path, pkg.tokenizer_info), Path(a.prompt_file), a.prompt_tokens)
    except (EdgeInferError, OSError, ValueError) as e:
        print(f"edgeinfer: {e}", file=sys.stderr)
        return 2
    B = a.expert_budget or spec.num_experts_per_tok
    L = sum(1 for i in range(spec.num_layers) if spec.is_moe_layer(i))
    rows, checks = [], []
    for mode in ("plain", "ngram", "ngram+budget"):
        trace, out, secs, _ = record(a.model, ids, a.n, mode, B)
        # the check: a real run at the smallest capacity, its counters against the replay's
        _, out2, _, real = record(a.model, ids, a.n, mode, B, cap=caps[0])
        assert out2 == out, "the cached generation differs from the all-resident one"
        sim = replay(trace, caps[0], L, "lru", "layer")
        checks.append((mode, (real["hits"], real["misses"]), tuple(map(sum, zip(*sim.values())))))
        expert = real["expert_bytes"]
        touched = max(len(needed) for _, _, needed in trace[L:]) if len(trace) > L else 0
        for cap in caps:
            for scope in ("layer", "global"):
                for policy in ("lru", "lfu"):
                    c = replay(trace, cap, L, policy, scope)
                    h, mi = c["decode"]
                    rows.append(dict(mode=mode if mode != "ngram+budget" else f"ngram, budget {B}", cap=cap, scope=scope,
                                     policy=policy, hit_rate=h / (h + mi) if h + mi else 0.0,
                                     bytes_per_token=mi * expert / len(out), prefill_misses=c["prefill"][1],
                                     max_touched=touched, generated=len(out), forwards=(len(trace) - L) // L))
        print(f"{mode}: {len(out)} tokens in {secs:.1f} s, {(len(trace) - L) // L} decode forwards, "
              f"at most {touched} experts a layer in one decode forward", file=sys.stderr)
    for mode, real, sim in checks:
        if real != sim:
            print(f"edgeinfer: the replay disagrees with the runtime for {mode}: {real} vs {sim}", file=sys.stderr)
            return 1
    if a.json:
        print(json.dumps(dict(rows=rows, checks=checks, prompt_tokens=len(ids), expert_bytes=expert), indent=1))
    else:
        print(table(rows))
    if a.write_docs:
        write_section(DOC, section(rows, len(ids), a, expert, L))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| decoding | experts/layer | cache | decode hit rate | read per generated token | prefill misses | max experts/layer/step |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['cap']} | {'per layer' if r['scope'] == 'layer' else 'one pool'} {r['policy'].upper()} | "
                     f"{r['hit_rate']:.1%} | {r['bytes_per_token'] / 1024:.0f} KiB | {r['prefill_misses']} | {r['max_touched']} |")
    return "\n".join(lines)


def section(rows, prompt_tokens, a, expert, layers) -> str:
    return "\n".join([
        START, "## MoE expert cache", "",
        f"`python benchmarks/moe_cache.py` on `{Path(a.model).name}` ({layers} MoE layers, one expert "
        f"{expert / 1024:.0f} KiB stored): a {prompt_tokens}-token held-out Python prompt, {a.n} greedy tokens; "
        "hit rate and bytes read from model.safetensors per generated token in the decode phase, by experts "
        "kept resident per layer (\"one pool\": the same total shared by all layers). Counters replayed from the "
        "recorded routing with the runtime's own accounting, checked against a real run at the smallest capacity. "
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores.", "",
        table(rows), "",
        "The runtime's cache is per layer (its slots are the operand of one gathered matmul per projection) with "
        "LRU eviction; a forward needing more experts than a layer's slots (a prefill chunk, an unbudgeted "
        "verification) runs in rounds. \"max experts/layer/step\" is what bounds a step's misses: the top-k "
        "in plain decoding, up to all experts when verifying n-gram drafts, and B under an expert budget.",
        "", END])


def write_section(doc: Path, text: str) -> None:
    """Replaces the text between the moe-cache markers of ``doc`` (markers included), or appends the section;
    written to a temporary name and renamed, so an interrupted run leaves the old file."""
    old = doc.read_text() if doc.exists() else ""
    i, j = old.find(START), old.find(END)
    new = old[:i] + text + old[j + len(END):] if i >= 0 and j > i else old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)


if __name__ == "__main__":
    sys.exit(main())
