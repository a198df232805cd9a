"""Speculative decoding against plain decoding, side by side in one run: decode tok/s, speed-up,
acceptance length (tokens per verification) and accepted/drafted drafts, greedy, per prompt and drafter.

    python benchmarks/speculative.py [-m models/smollm2-135m-instruct] [--draft PKG] [--backend auto]
                                     [-n 128] [-r 3] [--moe PKG --moe-draft PKG [--no-dense]] [--json] [--quick]

    e.g. python benchmarks/speculative.py --draft models/tiny-draft-q4 --moe models/tiny-moe-q4 \
             --moe-draft models/tiny-draft-q4

Prompts: an edit of a code snippet (the answer repeats most of the prompt: prompt lookup shines) and an
open chat question (it does not). Drafters: n-gram chains of 2, 4 and 8 and a 3x4 n-gram tree; with
--draft, a draft model (same tokenizer) as chains of 2, 4, 8 and a 2x4 tree. Every greedy speculative
output is checked against plain decoding's, token for token.

With --moe (a trained MoE package) and --moe-draft (its draft): plain decoding, speculative decoding
without a budget, and with expert budgets B in {top_k, 2 top_k, 4 top_k, all experts} on verification
(prefill is never capped): tok/s, acceptance length, distinct experts per layer per verification
(requested, kept), and greedy agreement with the unbudgeted output.

Every repetition runs every configuration in turn (plain included) and the median is reported, so drift
on a busy machine does not favour one row. --quick: one repetition, 48 tokens, chains of 2 and 8 only
(to show it works; its figures are rough).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CODE = '''def moving_average(values, window):
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result


def moving_sum(values, window):
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total)
    return result
'''
PROMPTS = {
    "code edit": "Rename the variable `total` to `running` in this Python code and print the whole code again:\n\n" + CODE,
    "chat": "Tell me about the history of the Roman Empire, from its founding to its fall.",
}


def _run(model, ids, n, spec):
    from edgeinfer.model import GenerationConfig

    cfg = GenerationConfig(max_tokens=n, ignore_eos=True, speculative=spec)
    model.reset()  # every run prefills the same prompt from an empty cache
    out = list(model.stream_ids(ids, cfg))
    return out, model.stats.decode_tps, model.stats.speculative


def measure(model, ids, n, reps, specs: dict, desc: str = "") -> dict:
    """name -> (output, median decode tok/s, SpecStats). Every repetition runs every configuration in turn,
    so that a busy machine's drift spreads over all of them rather than favouring one."""
    from tqdm import tqdm

    runs: dict = {name: [] for name in specs}
    with tqdm(total=reps * len(specs), desc=desc, unit="run", disable=None, leave=False, file=sys.stderr) as bar:
        for _ in range(reps):
            for name, spec in specs.items():
                runs[name].append(_run(model, ids, n, spec))
                bar.update(1)
    return {name: (r[-1][0], statistics.median(x[1] for x in r), r[-1][2]) for name, r in runs.items()}


def drafters(a) -> list[tuple[str, dict]]:
    chains = (2, 8) if a.quick else (2, 4, 8)
    rows = [(f"ngram chain {k}", dict(draft="ngram", num_draft=k)) for k in chains]
    rows.append(("ngram tree 3x4", dict(draft="ngram", tree="3x4")))
    if a.draft:
        rows += [(f"draft chain {k}", dict(draft=a.draft, num_draft=k)) for k in chains]
        rows.append(("draft tree 2x4", dict(draft=a.draft, tree="2x4")))
    return rows


def dense_rows(a) -> list[dict]:
    import edgeinfer
    from edgeinfer.errors import EdgeInferError
    from edgeinfer.speculative import Speculator

    m = edgeinfer.load(a.model, backend=a.backend)
    rows, specs = [], {"plain": False}
    for name, opts in drafters(a):
        try:
            specs[name] = Speculator(m, **opts)
        except EdgeInferError as e:
            rows.append(dict(prompt="all", drafter=name, error=str(e)))
    for pname, text in PROMPTS.items():
        ids = m.tokenizer.encode_chat([{"role": "user", "content": text}])
        _run(m, ids, 8, False)  # warm-up
        rows += _rows(pname, measure(m, ids, a.n, a.reps, specs, desc=pname))
    return rows


def _rows(prompt: str, got: dict) -> list[dict]:
    plain, base, _ = got["plain"]
    rows = [dict(prompt=prompt, drafter="plain", tps=base, speedup=1.0)]
    for name, (out, tps, st) in got.items():
        if name != "plain":
            rows.append(dict(prompt=prompt, drafter=name, tps=tps, speedup=tps / base, identical=out == plain,
                             **st.to_dict()))
    return rows


def moe_rows(a) -> list[dict]:
    import edgeinfer
    from edgeinfer.moe import ExpertBudget
    from edgeinfer.speculative import Speculator

    m = edgeinfer.load(a.moe, backend=a.backend)
    k, e = m.spec.num_experts_per_tok, m.spec.num_experts
    ids = m.tokenizer.encode(CODE[: len(CODE) // 2])
    _run(m, ids, 8, False)
    specs = {"plain": False}
    for b in [None] + sorted({min(b, e) for b in (k, 2 * k, 4 * k, e)}):
        spec = Speculator(m, draft=a.moe_draft, tree=a.moe_tree, num_draft=a.moe_num_draft,
                          expert_budget=None if b is None else ExpertBudget(budget=b))
        specs[f"{spec.describe()}, budget {b if b is not None else 'none'}"] = spec
    got = measure(m, ids, a.n, a.reps, specs, desc="moe")
    rows = _rows("moe", got)
    unbudgeted = next(out for name, (out, _, _) in got.items() if name.endswith("budget none"))
    for r in rows[1:]:
        out = got[r["drafter"]][0]
        r["agreement_with_unbudgeted"] = sum(x == y for x, y in zip(out, unbudgeted)) / len(unbudgeted)
    return rows


def table(rows: list[dict]) -> str:
    head = "| prompt | drafter | decode tok/s | speed-up | tok/verification | accepted/drafted | = plain |"
    out = [head, "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['prompt']} | {r['drafter']} | {r['error']} | | | | |")
            continue
        extra = ""
        if "experts_per_layer_requested" in r:
            extra = f" (experts/layer {r['experts_per_layer_requested']:.1f} requested, {r['experts_per_layer_kept']:.1f} kept)"
        if "agreement_with_unbudgeted" in r:
            extra += f", {100 * r['agreement_with_unbudgeted']:.0f}% tokens as unbudgeted"
        spec = r.get("verifications")
        out.append(f"| {r['prompt']} | {r['drafter']}{extra} | {r['tps']:.1f} | {r['speedup']:.2f}x | "
                   f"{r['acceptance_length']:.2f} | {r['accepted']}/{r['drafted']} | {'yes' if r['identical'] else 'NO'} |"
                   if spec else f"| {r['prompt']} | {r['drafter']} | {r['tps']:.1f} | 1.00x | | | |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--draft", default=None, help="a draft package with the target's tokenizer")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("-n", type=int, default=128, help="tokens generated per run (default 128)")
    ap.add_argument("-r", "--reps", type=int, default=None, help="runs per row; the median tok/s is reported (default 3)")
    ap.add_argument("--moe", default=None, help="a (trained) MoE package for the expert-budget rows")
    ap.add_argument("--moe-draft", default=None, help="the MoE's draft package")
    ap.add_argument("--moe-tree", default=None, help="draft tree for the MoE rows, e.g. 2x4 (default: a chain)")
    ap.add_argument("--moe-num-draft", type=int, default=4, help="chain length for the MoE rows (default 4)")
    ap.add_argument("--no-dense", action="store_true", help="only the MoE rows")
    ap.add_argument("--quick", action="store_true", help="1 repetition, 48 tokens, fewer rows")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.n = 48
    a.reps = a.reps or (1 if a.quick else 3)
    rows = [] if a.no_dense else dense_rows(a)
    if a.moe:
        if not a.moe_draft:
            ap.error("--moe needs --moe-draft")
        rows += moe_rows(a)
    if a.json:
        print(json.dumps(dict(model=a.model, backend=a.backend, n=a.n, reps=a.reps, rows=rows), indent=1))
    else:
        print(f"{a.moe if a.no_dense else a.model} on {a.backend}, {a.n} tokens greedy, median of {a.reps}\n")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
