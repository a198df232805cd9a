"""``edgeinfer scenario run|list``: XRBench-style multi-model scenarios (edgeinfer/scenario)."""

from __future__ import annotations

import argparse
import shlex
import sys

from edgeinfer.cliargs import real, size, whole
from edgeinfer.errors import EdgeInferError

EPILOG = """examples:
  edgeinfer scenario list                                  the built-in scenarios
  edgeinfer scenario run voice-assistant --duration 20     run a built-in for 20 s of arrivals
  edgeinfer scenario run my.toml --meter rapl --out runs/a  a scenario file, RAPL energy, outputs in runs/a
  edgeinfer scenario run my.toml --memory-budget 1.5GB     refuse before loading if the models do not fit

Writes jobs.csv (one row per job: arrival, start, end, deadline, dropped, RT, EN, energy share, quality),
scores.json, timeline.png and report.html (opens offline) into --out. The scoring follows XRBench v0.1
for per-frame models; docs/SCENARIOS.md has the file format, the rules and the LLM streaming score.
Errors print one line and exit with status 2."""


def add_scenario_parser(sub) -> None:
    p = sub.add_parser("scenario", help="run several models at once on real time, energy and quality (XRBench-style)",
                       description="Multi-model scenarios: periodic models at their rates, cascades with probabilities, "
                                   "LLM jobs with TTFT and pace deadlines, all sharing this machine; scored like XRBench.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = p.add_subparsers(dest="scenario_cmd", metavar="ACTION")
    ssub.required = True
    r = ssub.add_parser("run", help="run a scenario (a built-in's name or a TOML file) and write its report",
                        description="Load every model of the scenario within one memory plan, run them concurrently (one "
                                    "worker thread per model) for --duration seconds of arrivals, meter the energy, and "
                                    "write the job records, scores, timeline and HTML report.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("scenario", metavar="NAME|FILE", help="a built-in scenario (see `edgeinfer scenario list`) or a .toml file")
    r.add_argument("--duration", type=real(0, lo_open=True), default=None, metavar="S",
                   help="seconds of arrivals (default: the file's `duration`); jobs already arrived then finish or drop")
    r.add_argument("--seed", type=whole(0), default=None, help="seed of the cascades' draws and the inputs (default: the file's)")
    r.add_argument("--meter", default=None, metavar="auto|none|NAME",
                   help="energy meter for the whole chip, split among jobs by active time (see `edgeinfer meters`; "
                        "default: the file's `meter`, else auto)")
    r.add_argument("--memory-budget", type=size, default=None, metavar="SIZE",
                   help="memory all models share, e.g. 1.5GB, 800MiB or 60%%; the run is refused before loading if "
                        "their sum does not fit (default: what the device has available, less headroom)")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="new (or empty) folder for the outputs (default: scenario-runs/NAME-YYYYMMDD-HHMMSS)")
    r.add_argument("--virtual", action="store_true",
                   help="virtual time: no real inference, each job takes its stated latency (synthetic models only); "
                        "checks a scenario's timing and scores instantly")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    ls = ssub.add_parser("list", help="list the built-in scenarios",
                         description="List the built-in scenarios: name, models, duration, description.")
    ls.add_argument("--check", action="store_true", help="also validate each one fully (kinds and model files)")


def cmd_scenario(a) -> int:
    if a.scenario_cmd == "list":
        return _list(a)
    from edgeinfer.scenario.report import write_outputs
    from edgeinfer.scenario.runner import run_scenario
    from edgeinfer.scenario.spec import load_scenario

    sc = load_scenario(a.scenario)
    if a.seed is not None:
        sc.seed = a.seed
    command = "edgeinfer " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    progress = not a.quiet and sys.stderr.isatty()
    result = run_scenario(sc, duration=a.duration, meter=a.meter, memory_budget=a.memory_budget,
                          fake_clock=a.virtual, progress=progress)
    out = write_outputs(result, a.out, command)
    s = result.scores
    print(f"scenario {sc.name}: score {s['score']:.2f} / 100"
          + ("" if s["quality"] is None else f", quality {s['quality']:.3f}")
          + (f", energy {result.energy['total_j']:.2f} J ({result.energy['meter']})" if result.energy else ""))
    for name, v in s["models"].items():
        q = "" if v["quality"] is None else f", quality {v['quality']:.3f}"
        lat = "" if v["latency_ms_median"] is None else f", median {v['latency_ms_median']:.1f} ms"
        if not v["frames"]:
            print(f"  {name:<14} no jobs (its cascade never fired); left out of the score")
            continue
        print(f"  {name:<14} score {v['score']:.3f}: {v['completed']}/{v['frames']} done, {v['dropped']} dropped, "
              f"{v['late']} late{lat}{q}")
    print(f"report: {out / 'report.html'}")
    return 0


def _list(a) -> int:
    from edgeinfer.scenario.spec import builtin_names, load_scenario

    names = builtin_names()
    if not names:
        print("no built-in scenarios installed", file=sys.stderr)
        return 0
    for name in names:
        try:
            sc = load_scenario(name, check_files=a.check)
        except EdgeInferError as e:
            if a.check:
                raise
            print(f"{name}\n    (invalid: {e})")
            continue
        models = ", ".join(f"{m.name} ({m.kind}{f' {m.rate:g} Hz' if m.periodic else f' after {m.after}'})"
                           for m in sc.models)
        print(f"{name}  [{sc.duration_s:g} s]\n    {sc.description}\n    models: {models}")
    return 0
