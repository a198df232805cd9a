"""The runtime's levers on a built-in scenario, in one run: each variant edits the LLM model's table
(package, sparsity, backend) or adds a memory budget, runs the scenario for real, and reports its
scores side by side (a markdown table; --write-docs puts it in docs/SCENARIOS.md, "Levers").

    python benchmarks/scenario_levers.py voice-assistant --duration 30 --write-docs

A variant is LABEL:EDIT[,EDIT...] where EDIT is MODEL.KEY=VALUE (a key of that model's table) or
budget=SIZE (--memory-budget); VALUE is read as TOML (0.5, "models/x", true).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = [
    "4-bit (baseline):",
    "8-bit:{llm}.package=\"models/smollm2-135m-instruct-q8\"",
    "R-Sparse 0.5:{llm}.sparsity=0.5",
    "MLX backend:{llm}.backend=\"mlx\"",
    "budget 600 MB:budget=600MB",
]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"cannot write {v!r} as TOML here")


def dump_toml(d: dict) -> str:
    """The scenario files' shape only: top-level scalars, then tables of scalars one level down
    ([inputs.X], [models.X])."""
    out = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for section, tables in d.items():
        if isinstance(tables, dict):
            for name, table in tables.items():
                out.append(f"\n[{section}.{name}]")
                out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def parse_variant(text: str, llm: str) -> tuple[str, dict, str | None]:
    import tomllib

    label, _, edits = text.partition(":")
    changes: dict = {}
    budget = None
    for e in filter(None, (x.strip() for x in edits.format(llm=llm).split(","))):
        key, _, value = e.partition("=")
        if key == "budget":
            budget = value
            continue
        model, _, k = key.partition(".")
        changes.setdefault(model, {})[k] = tomllib.loads(f"v = {value}")["v"]
    return label, changes, budget


def main() -> int:
    import tomllib

    from edgeinfer.scenario.spec import load_scenario

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", help="a built-in scenario's name")
    ap.add_argument("--variant", action="append", default=None, metavar="LABEL:EDITS",
                    help="repeatable; default: 4-bit, 8-bit, R-Sparse 0.5, MLX, a 600 MB budget ({llm} = the first LLM model)")
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--meter", default="auto")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/SCENARIOS.md")
    a = ap.parse_args()

    sc = load_scenario(a.scenario)
    raw = tomllib.loads(Path(sc.source).read_text())
    llm = next(m.name for m in sc.models if m.kind == "llm")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(a.variant or DEFAULT_VARIANTS):
            label, changes, budget = parse_variant(v, llm)
            d = json.loads(json.dumps(raw))
            for model, kv in changes.items():
                d["models"][model].update(kv)
            f = Path(tmp) / f"v{i}.toml"
            f.write_text(dump_toml(d))
            out = Path(tmp) / f"out{i}"
            cmd = [sys.executable, "-m", "edgeinfer.cli", "scenario", "run", str(f), "--out", str(out), "-q", "--meter", a.meter]
            if a.duration:
                cmd += ["--duration", str(a.duration)]
            if budget:
                cmd += ["--memory-budget", budget]
            print(f"[{i + 1}] {label}", file=sys.stderr, flush=True)
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                rows.append((label, None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"))
                continue
            rows.append((label, json.loads((out / "scores.json").read_text()), None))

    names = [m.name for m in sc.models]
    head = ["lever", "score"] + [f"{n} score" for n in names] + [f"{llm} median latency", f"{llm} quality", "energy J", "memory plan MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, s, err in rows:
        if s is None:
            lines.append(f"| {label} | refused: {err} |" + " |" * (len(head) - 2))
            continue
        m = s["scores"]["models"]
        lines.append("| " + " | ".join(
            [label, _fmt(s["scores"]["score"], "{:.2f}")] + [_fmt(m[n]["score"], "{:.3f}") for n in names]
            + [_fmt(m[llm]["latency_ms_median"], "{:.0f} ms"), _fmt(m[llm].get("quality"), "{:.2f}"),
               _fmt(s.get("energy", {}).get("total_j"), "{:.1f}"), _fmt(s["memory"]["total"] / 1e6, "{:.0f}")]) + " |")
    dur = a.duration or sc.duration_s
    command = "python benchmarks/scenario_levers.py " + shlex.join(x for x in sys.argv[1:] if x != "--write-docs")
    text = (f"`{command}` ({a.scenario}, {dur:g} s each, meter {a.meter}):\n\n" + "\n".join(lines) + "\n")
    print(text)
    if a.write_docs:
        from edgeinfer.sysinfo import describe, machine

        doc = ROOT / "docs" / "SCENARIOS.md"
        body = doc.read_text()
        section = f"## Levers\n\nMachine: {describe(machine())}.\n\n{text}"
        if re.search(r"^## Levers\n", body, re.M):
            body = re.sub(r"^## Levers\n.*?(?=^## |\Z)", section + "\n", body, flags=re.M | re.S)
        else:
            body = body.rstrip("\n") + "\n\n" + section
        doc.write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
