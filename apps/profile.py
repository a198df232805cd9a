"""``edgeinfer profile``: energy profiling runs.

Measures idle power first, then runs a workload on each setting (package x backend x threads) while a
background thread samples the meter; every request's prefill and decode phases start and end on a
reading. Writes profile.json, requests.csv, power.csv and profile.png (power over time with the
phases shaded, tokens per joule per setting), and prints a table: joules per token, tokens per joule
(total and above idle), and with an accuracy task, accuracy per watt and per joule (IPW / IPJ).
Power and performance come from the same run (MLPerf Power's rule); ``--duration`` makes the windows
long enough for slow counters.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeinfer.cliargs import real, whole
from edgeinfer.errors import EdgeInferError

_CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is 17 times 3?",
    "Suggest a name for a small bakery.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
]

_PASSAGE = (
    "The history of timekeeping begins with the sun. Early people marked noon by the shortest shadow, and "
    "sundials divided daylight into hours that changed length with the seasons. Water clocks kept time at "
    "night and on cloudy days, dripping at a steady rate from one vessel into another. Mechanical clocks "
    "appeared in European towers in the thirteenth century, driven by falling weights and regulated by an "
    "escapement that let the gears advance one tooth at a time. The pendulum, studied by Galileo and put "
    "into a clock by Huygens, made clocks accurate to seconds a day. Sailors needed even better clocks to "
    "find their longitude at sea, and John Harrison's marine chronometers solved that problem. Quartz "
    "crystals and then atomic transitions took accuracy further still. "
)

WORKLOADS = {
    "chat": dict(help="short chat questions, answers up to 96 tokens", chat=True, max_tokens=96, ignore_eos=False),
    "long-prefill": dict(help="a ~1000-token passage (capped by the context), 32 tokens out", chat=False, max_tokens=32,
                         ignore_eos=False, prompt_tokens=1024),
    "long-decode": dict(help="a short prompt, 256 tokens out (EOS ignored)", chat=True, max_tokens=256, ignore_eos=True),
}

# A small built-in accuracy task: one-word facts that a small instruct model can get right.
FACTS = [
    ("What is the capital of France? Answer with one word.", ["Paris"]),
    ("What is the capital of Japan? Answer with one word.", ["Tokyo"]),
    ("What is the capital of Italy? Answer with one word.", ["Rome"]),
    ("What is the capital of Germany? Answer with one word.", ["Berlin"]),
    ("What is the capital of Spain? Answer with one word.", ["Madrid"]),
    ("How many days are there in a week? Answer with a number.", ["7", "seven"]),
    ("What is 2 plus 2? Answer with a number.", ["4", "four"]),
    ("What color is the sky on a clear day? Answer with one word.", ["blue"]),
    ("What is the largest planet in the solar system? Answer with one word.", ["Jupiter"]),
    ("What is the chemical symbol for water?", ["H2O", "H₂O"]),
]

SWEEP_AXES = {
    "backend": "runtime backend passed to edgeinfer.load: auto, mlx, onnx",
    "threads": "CPU threads of backends that take a count (ONNX Runtime); MLX has no thread control",
}
NOT_YET = {
    "sparsity": "activation sparsity",
    "experts": "a mixture-of-experts expert budget",
    "expert-budget": "a mixture-of-experts expert budget",
}

EPILOG = """sweeps (--sweep AXIS=V1,V2, repeatable; settings are every combination):
  backend=mlx,onnx     the runtime backend (edgeinfer.load(pkg, backend=...))
  threads=1,2,4        CPU threads, for backends that take a count (ONNX Runtime); MLX has no thread control
  bits                 through packages: give each with -m (-m pkg-4bit -m pkg-8bit, or -m a,b)
  sparsity, experts    not sweepable: edgeinfer has no such control yet

meters (--meter auto|NAME[:key=value,...]; `edgeinfer meters` lists them):
  auto picks the best one here, the model estimate (labelled ESTIMATE everywhere) when nothing else is.
  e.g. --meter rapl, --meter nvml:index=0, --meter estimate:core_watts=6, --meter wall:file=plug.log

battery: --battery runs on the battery meter and estimates answers per full charge from the measured
discharge (unplug the charger); --battery-wh WH states the capacity instead (any meter).

examples:
  edgeinfer profile -m smollm2-135m-instruct --workload chat --duration 60
  edgeinfer profile -m models/q4 -m models/q8 --task facts --out prof/bits
  edgeinfer profile -m models/smollm2 --sweep backend=mlx,onnx
  edgeinfer profile -m models/smollm2 --backend onnx --sweep threads=1,2"""


def add_profile_parser(sub) -> None:
    p = sub.add_parser(
        "profile", help="energy profile: joules per token, tokens per joule, IPW, answers per charge",
        description="Run a workload under an energy meter: idle power first, then per request prefill and decode time, "
                    "tokens, joules, average and peak watts (total and above idle); JSON, CSV and a PNG plot.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-m", "--model", action="append", default=None, metavar="PKG",
                   help="package folder or catalog name; repeat it (or separate by commas) to compare packages, "
                        "e.g. 4- and 8-bit (default: the catalog's default model)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workload", choices=list(WORKLOADS), default=None,
                   help="built-in workload: " + "; ".join(f"{k}: {v['help']}" for k, v in WORKLOADS.items()) + " (default chat)")
    g.add_argument("--prompts", metavar="FILE", default=None,
                   help="prompts: one per line, or JSON lines with 'prompt' (and 'answer' to score accuracy)")
    g.add_argument("--task", metavar="FILE|facts", default=None,
                   help="accuracy task: JSON lines {prompt, answer} (answer: a string or a list of accepted strings; "
                        "correct when the answer contains one) or the built-in 'facts'; adds accuracy, IPW and IPJ")
    p.add_argument("--meter", default="auto", metavar="auto|NAME", help="energy meter (default auto)")
    p.add_argument("--duration", type=real(0, lo_open=True), default=None, metavar="S",
                   help="measure at least S seconds per setting, repeating the prompts (default: one pass; "
                        "MLPerf Power asks for 60 s or more)")
    p.add_argument("--idle", type=real(0), default=5.0, metavar="S", help="seconds of idle power measured first (default 5)")
    p.add_argument("--max-tokens", type=whole(1), default=None, help="tokens per answer at most (default: the workload's)")
    p.add_argument("--backend", default="auto", help="backend when not swept (default auto)")
    p.add_argument("--threads", type=whole(1), default=None, help="CPU threads when not swept (ONNX backend)")
    p.add_argument("--sparsity", type=real(0, 1, hi_open=True), default=0.0, metavar="LEVEL",
                   help="R-Sparse level the package holds a plan for (edgeinfer sparsify); default 0: dense")
    p.add_argument("--sweep", action="append", default=[], metavar="AXIS=V1,V2",
                   help="compare settings along an axis: backend or threads (see below)")
    p.add_argument("--battery", action="store_true", help="estimate answers per full charge from the battery's discharge")
    p.add_argument("--battery-wh", type=real(0, lo_open=True), default=None, metavar="WH",
                   help="battery capacity in watt-hours for the answers-per-charge figure (default: the battery's own)")
    p.add_argument("--interval", type=real(0, lo_open=True), default=None, metavar="S", help="sampling interval (default: the meter's)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: profile-YYYYMMDD-HHMMSS)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


# -- inputs -------------------------------------------------------------------------------------------


@dataclass
class Item:
    prompt: str
    answers: list[str] = field(default_factory=list)


def _read_items(path: str) -> list[Item]:
    p = Path(path)
    if not p.is_file():
        raise EdgeInferError(f"{path}: no such file")
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise EdgeInferError(f"{path} is not UTF-8 text") from None
    items = []
    for n, ln in enumerate(lines, 1):
        if ln.lstrip().startswith("{"):
            try:
                d = json.loads(ln)
            except json.JSONDecodeError as e:
                raise EdgeInferError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(d.get("prompt"), str):
                raise EdgeInferError(f"{path}:{n}: a JSON line needs a 'prompt' string")
            ans = d.get("answer", [])
            items.append(Item(d["prompt"], [ans] if isinstance(ans, str) else [str(a) for a in ans]))
        else:
            items.append(Item(ln))
    if not items:
        raise EdgeInferError(f"{path} has no prompts")
    return items


def workload_items(a) -> tuple[str, list[Item], dict]:
    """(name, items, options) of the run's workload."""
    if a.task:
        items = [Item(q, ans) for q, ans in FACTS] if a.task == "facts" else _read_items(a.task)
        if not all(i.answers for i in items):
            raise EdgeInferError(f"{a.task}: every line of an accuracy task needs an 'answer'")
        return f"task:{a.task}", items, dict(chat=True, max_tokens=24, ignore_eos=False)
    if a.prompts:
        return f"prompts:{a.prompts}", _read_items(a.prompts), dict(chat=True, max_tokens=128, ignore_eos=False)
    name = a.workload or "chat"
    opts = dict(WORKLOADS[name])
    if name == "long-prefill":
        return name, [Item(_PASSAGE * 12)], opts
    if name == "long-decode":
        return name, [Item("Write a long story about a lighthouse keeper and a storm.")], opts
    return name, [Item(p) for p in _CHAT_PROMPTS], opts


def parse_sweep(a) -> tuple[list[str], list]:
    """(backends, threads) to combine; errors for axes that do not exist (yet)."""
    axes: dict[str, list[str]] = {}
    for s in a.sweep:
        axis, eq, vals = s.partition("=")
        axis = axis.strip().lower()
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if axis == "bits":
            raise EdgeInferError("bits are swept through packages: give each one with -m (e.g. -m pkg-4bit -m pkg-8bit)")
        if axis in NOT_YET:
            raise EdgeInferError(f"--sweep {axis}: edgeinfer has no {NOT_YET[axis]} control yet; sweepable now: "
                                 "backend, threads, and packages (-m)")
        if axis not in SWEEP_AXES:
            raise EdgeInferError(f"--sweep {s!r}: unknown axis; sweepable: {', '.join(SWEEP_AXES)}, and packages (-m)")
        if not eq or not values:
            raise EdgeInferError(f"--sweep {s!r}: give values, e.g. {axis}=" + ("mlx,onnx" if axis == "backend" else "1,2,4"))
        if axis in axes:
            raise EdgeInferError(f"--sweep {axis} given twice")
        axes[axis] = values
    backends = axes.get("backend", [a.backend])
    threads: list = [a.threads]
    if "threads" in axes:
        try:
            threads = [int(v) for v in axes["threads"]]
        except ValueError:
            raise EdgeInferError(f"--sweep threads: values must be whole numbers, not {axes['threads']}") from None
        if any(t < 1 for t in threads):
            raise EdgeInferError("--sweep threads: values must be at least 1")
        if "mlx" in backends:
            raise EdgeInferError("--sweep threads: MLX has no thread-count control; sweep threads with --backend onnx")
    return backends, threads


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Request:
    setting: str
    index: int
    prompt_tokens: int
    generated_tokens: int
    t_start: float
    t_first: float
    t_end: float
    correct: bool | None = None
    text: str = ""
    # filled from the power series
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_j: float = 0.0
    decode_j: float = 0.0
    joules: float = 0.0
    joules_above_idle: float = 0.0
    avg_w: float = 0.0
    peak_w: float = 0.0


def _encode(model, item: Item, opts: dict, room: int) -> list[int]:
    from edgeinfer.tokenizer import ChatTemplateError

    tok = model.tokenizer
    if not opts["chat"]:
        ids = tok.encode(item.prompt)
        cap = min(opts.get("prompt_tokens", len(ids)), room)
        return ids[:cap]
    msgs = [{"role": "user", "content": item.prompt}]
    try:
        ids = tok.encode_chat(msgs)
    except ChatTemplateError:
        tok.chat_template = None
        ids = tok.encode_chat(msgs)
    return ids[-room:] if len(ids) > room else ids


def _correct(text: str, answers: list[str]) -> bool:
    low = text.lower()
    return any(ans.lower() in low for ans in answers)


def _run_request(model, sampler, ids, cfg) -> tuple[float, float, float, list[int]]:
    t0 = sampler.mark()
    t1 = None
    out: list[int] = []
    for tok in model.stream_ids(ids, cfg):
        if t1 is None:
            t1 = sampler.mark()
        out.append(tok)
    t2 = sampler.mark()
    return t0, t1 if t1 is not None else t2, t2, out


def _package_label(model) -> tuple[str, object]:
    q = model.package.quantization
    bits = q.get("bits")
    return model.package.name, bits


def run_profile(a) -> int:
    import edgeinfer
    from edgeinfer.apps.resolve import resolve_package
    from edgeinfer.energy import PowerSampler, open_meter
    from edgeinfer.model import GenerationConfig
    from edgeinfer.sampling import SamplingParams

    specs: list = []
    for m in a.model or [None]:
        specs += [None] if m is None else [x.strip() for x in m.split(",") if x.strip()]
    backends, threads = parse_sweep(a)
    wl_name, items, opts = workload_items(a)
    if a.max_tokens is not None:
        if a.max_tokens < 1:
            raise EdgeInferError("--max-tokens must be at least 1")
        opts["max_tokens"] = a.max_tokens
    if a.duration is not None and a.duration <= 0:
        raise EdgeInferError("--duration must be more than 0 seconds")
    if a.idle < 0:
        raise EdgeInferError("--idle must be 0 or more seconds")
    if a.battery_wh is not None and a.battery_wh <= 0:
        raise EdgeInferError("--battery-wh must be more than 0")
    if a.meter == "none":
        raise EdgeInferError("profile needs a meter: --meter auto, or a name from `edgeinfer meters`")
    meter_spec = a.meter
    if a.battery and meter_spec == "auto":
        meter_spec = _battery_meter_spec(a)
    meter = open_meter(meter_spec)
    battery_meter = meter.source == "battery-discharge"
    if a.battery and not battery_meter and a.battery_wh is None:
        raise EdgeInferError(f"--battery needs a battery meter (this run's is {meter.name}) or a stated capacity (--battery-wh)")
    if a.battery and battery_meter and hasattr(meter, "discharging") and not meter.discharging():
        raise EdgeInferError("--battery: the battery is not discharging; unplug the charger and run again")
    packages = [resolve_package(s) for s in specs]
    out_dir = Path(a.out or time.strftime("profile-%Y%m%d-%H%M%S"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeInferError(f"cannot create {out_dir}: {e.strerror}") from None

    print(f"meter: {meter.name} ({meter.source}): {meter.describe()}", file=sys.stderr)
    if meter.warning:
        print(f"meter note: {meter.warning}", file=sys.stderr)
    sampler = PowerSampler(meter, a.interval)
    sampler.start()
    battery_start = meter.remaining_joules() if a.battery and hasattr(meter, "remaining_joules") else None
    capacity_j = meter.full_charge_joules() if a.battery and a.battery_wh is None and hasattr(meter, "full_charge_joules") else None
    t_run0 = time.perf_counter()
    idle = None
    if a.idle > 0:
        print(f"measuring idle power for {a.idle:g} s ...", file=sys.stderr)
        i0 = sampler.mark()
        time.sleep(a.idle)
        i1 = sampler.mark()
        idle = (i0, i1)

    settings, requests = [], []
    try:
        for pkg, backend, nthreads in itertools.product(packages, backends, threads):
            load_opts = {"threads": nthreads} if nthreads is not None else {}
            if getattr(a, "sparsity", 0.0):
                load_opts["sparsity"] = a.sparsity
            model = edgeinfer.load(pkg, backend=backend, **load_opts)
            used = getattr(model, "backend_name", backend)
            if nthreads is not None and used == "mlx":
                raise EdgeInferError("--threads/--sweep threads: MLX has no thread-count control (this package runs on MLX)")
            name, bits = _package_label(model)
            label = f"{name} {bits}-bit {used}" + (f" {nthreads}t" if nthreads is not None else "") \
                + (f" sparsity {a.sparsity:.2f}" if getattr(a, "sparsity", 0.0) else "")
            room = model.cache.max_tokens - opts["max_tokens"] - 8
            if room < 8:
                raise EdgeInferError(f"{pkg}: its context ({model.cache.max_tokens}) leaves no room for {opts['max_tokens']} tokens")
            encoded = [(it, _encode(model, it, opts, room)) for it in items]
            cfg = GenerationConfig(max_tokens=opts["max_tokens"], sampling=SamplingParams(), ignore_eos=opts["ignore_eos"])
            warm = GenerationConfig(max_tokens=4, sampling=SamplingParams())
            for _ in model.stream_ids(encoded[0][1], warm):  # compile and warm caches; not measured
                pass
            print(f"setting {len(settings) + 1}: {label} ({wl_name}, {len(items)} prompts"
                  + (f", at least {a.duration:g} s" if a.duration else "") + ")", file=sys.stderr)
            s0 = sampler.mark()
            k = 0
            while True:
                it, ids = encoded[k % len(encoded)]
                model.reset()  # each request prefills its whole prompt
                t0, t1, t2, out = _run_request(model, sampler, ids, cfg)
                text = model.tokenizer.decode(out)
                requests.append(Request(label, k, len(ids), len(out), t0, t1, t2,
                                        _correct(text, it.answers) if it.answers else None, text))
                k += 1
                if k % len(encoded) == 0 and (a.duration is None or time.perf_counter() - s0 >= a.duration):
                    break
            s1 = sampler.mark()
            settings.append(dict(label=label, package=str(pkg), name=name, bits=bits, backend=used, threads=nthreads,
                                 t_start=s0, t_end=s1))
            del model
    finally:
        series = sampler.stop()
        meter_desc, meter_label = meter.describe(), meter.label()
        battery_end = meter.remaining_joules() if battery_start is not None else None
        meter.close()

    idle_w = series.avg_watts(*idle) if idle else 0.0
    for r in requests:
        r.prefill_s, r.decode_s = r.t_first - r.t_start, r.t_end - r.t_first
        r.prefill_j, r.decode_j = series.joules(r.t_start, r.t_first), series.joules(r.t_first, r.t_end)
        r.joules = r.prefill_j + r.decode_j
        r.joules_above_idle = r.joules - idle_w * (r.t_end - r.t_start)
        r.avg_w = r.joules / (r.t_end - r.t_start) if r.t_end > r.t_start else 0.0
        r.peak_w = series.peak_watts(r.t_start, r.t_end)
    for s in settings:
        rs = [r for r in requests if r.setting == s["label"]]
        s.update(_summary(rs, series, s["t_start"], s["t_end"], idle_w))
    battery = _battery_summary(a, meter.source, meter_label, settings, capacity_j, battery_start, battery_end, series) if a.battery else None

    result = {
        "command": "edgeinfer " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"system": platform.system(), "machine": platform.machine(), "processor": platform.processor(),
                    "python": platform.python_version()},
        "meter": {"name": meter.name, "source": meter.source, "estimate": meter.is_estimate, "method": meter_desc,
                  "warning": meter.warning, "interval_s": sampler.interval},
        "workload": {"name": wl_name, "prompts": len(items), **{k: v for k, v in opts.items() if k != "help"}},
        "idle": {"seconds": (idle[1] - idle[0]) if idle else 0.0, "watts": idle_w, "measured": bool(idle)},
        "settings": [{k: v for k, v in s.items() if k not in ("t_start", "t_end")} for s in settings],
        "battery": battery,
        "requests": [_request_row(r, t_run0) for r in requests],
    }
    (out_dir / "profile.json").write_text(json.dumps(result, indent=2))
    _write_csvs(out_dir, requests, series, t_run0)
    plot_note = "" if a.no_plot else write_plot(out_dir / "profile.png", series, requests, settings, idle, idle_w, meter_label,
                                                meter.is_estimate, t_run0, bool(a.task))
    print_report(result, sys.stdout)
    files = ["profile.json", "requests.csv", "power.csv"] + ([] if a.no_plot or plot_note else ["profile.png"])
    print(f"wrote {', '.join(str(out_dir / f) for f in files)}", file=sys.stderr)
    if plot_note:
        print(f"edgeinfer: no plot: {plot_note}", file=sys.stderr)
    return 0


def _battery_meter_spec(a) -> str:
    from edgeinfer.energy import MeterUnavailable, open_meter

    reasons = []
    for name in ("battery", "ioreg-battery"):
        try:
            open_meter(name).close()
            return name
        except MeterUnavailable as e:
            reasons.append(str(e))
    if a.battery_wh is not None:
        return "auto"
    raise EdgeInferError("--battery: no battery meter here (" + "; ".join(reasons) + "); give --battery-wh WH to use "
                         "a stated capacity with another meter")


def _summary(rs: list[Request], series, t0: float, t1: float, idle_w: float) -> dict:
    n = len(rs)
    gen = sum(r.generated_tokens for r in rs)
    prompt = sum(r.prompt_tokens for r in rs)
    j = sum(r.joules for r in rs)
    j_idle = sum(r.joules_above_idle for r in rs)
    secs = sum(r.t_end - r.t_start for r in rs)
    decode_s = sum(r.decode_s for r in rs)
    out = dict(
        requests=n, prompt_tokens=prompt, generated_tokens=gen, seconds=secs, joules=j, joules_above_idle=j_idle,
        joules_per_token=j / gen if gen else None, tokens_per_joule=gen / j if j > 0 else None,
        joules_per_token_above_idle=j_idle / gen if gen else None,
        tokens_per_joule_above_idle=gen / j_idle if j_idle > 0 else None,
        joules_per_answer=j / n if n else None, avg_w=j / secs if secs > 0 else 0.0,
        peak_w=series.peak_watts(t0, t1),
        prefill_j=sum(r.prefill_j for r in rs), decode_j=sum(r.decode_j for r in rs),
        prefill_tokens_per_joule=prompt / s if (s := sum(r.prefill_j for r in rs)) > 0 else None,
        decode_tps=sum(max(r.generated_tokens - 1, 0) for r in rs) / decode_s if decode_s > 0 else 0.0,
    )
    scored = [r for r in rs if r.correct is not None]
    if scored:
        acc = sum(r.correct for r in scored) / len(scored)
        out.update(accuracy=acc, ipw=acc / out["avg_w"] if out["avg_w"] > 0 else None,
                   ipj=acc / out["joules_per_answer"] if out["joules_per_answer"] else None,
                   ipj_above_idle=acc / (j_idle / n) if j_idle > 0 else None)
    return out


def _battery_summary(a, source, meter_label, settings, capacity_j, start, end, series) -> dict:
    if a.battery_wh is not None:
        capacity_j, how = a.battery_wh * 3600, f"stated: {a.battery_wh:g} Wh"
    else:
        how = "the battery's full-charge capacity"
    if not capacity_j:
        raise EdgeInferError("--battery: the battery reports no full-charge capacity; give --battery-wh WH")
    per_setting = []
    for s in settings:
        jpa = s.get("joules_per_answer")
        per_setting.append({"setting": s["label"], "joules_per_answer": jpa,
                            "answers_per_charge": capacity_j / jpa if jpa else None})
    out = {"capacity_j": capacity_j, "capacity_wh": capacity_j / 3600, "capacity_from": how, "meter": meter_label,
           "settings": per_setting,
           "note": ("from the battery's measured discharge (the whole system, display included)" if source == "battery-discharge"
                    else f"energy from {meter_label}, which does not see the whole system: answers per charge is an upper bound")}
    if start is not None and end is not None:
        out["fuel_gauge_discharge_j"] = start - end
        out["integrated_discharge_j"] = series.joules(series.start, series.end)
    return out


def _request_row(r: Request, t0: float) -> dict:
    d = asdict(r)
    for k in ("t_start", "t_first", "t_end"):
        d[k] = round(d[k] - t0, 6)
    return d


def _write_csvs(out_dir: Path, requests: list[Request], series, t0: float) -> None:
    cols = ["setting", "index", "prompt_tokens", "generated_tokens", "prefill_s", "decode_s", "prefill_j", "decode_j",
            "joules", "joules_above_idle", "avg_w", "peak_w", "correct", "t_start", "t_end"]
    with open(out_dir / "requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in requests:
            d = _request_row(r, t0)
            w.writerow([f"{d[c]:.6g}" if isinstance(d[c], float) else ("" if d[c] is None else d[c]) for c in cols])
    with open(out_dir / "power.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "watts"])
        for t, p in zip(series.power_t, series.power):
            w.writerow([f"{t - t0:.4f}", f"{p:.4f}"])


def _fmt(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def print_report(res: dict, file) -> None:
    m = res["meter"]
    print(f"meter: {m['name']} ({m['source']}): {m['method']}", file=file)
    idle = res["idle"]
    print(f"idle: {idle['watts']:.3g} W over {idle['seconds']:.1f} s" if idle["measured"] else "idle: not measured (--idle 0)", file=file)
    scored = any("accuracy" in s for s in res["settings"])
    head = f"{'setting':<34} {'req':>4} {'gen tok':>7} {'J':>9} {'J/tok':>8} {'tok/J':>8} {'J/tok>idle':>10} {'tok/J>idle':>10} {'avg W':>7} {'peak W':>7}"
    if scored:
        head += f" {'acc':>5} {'IPW':>8} {'IPJ':>8}"
    print(head, file=file)
    for s in res["settings"]:
        line = (f"{s['label'][:34]:<34} {s['requests']:>4} {s['generated_tokens']:>7} {s['joules']:>9.3g} "
                f"{_fmt(s['joules_per_token']):>8} {_fmt(s['tokens_per_joule']):>8} {_fmt(s['joules_per_token_above_idle']):>10} "
                f"{_fmt(s['tokens_per_joule_above_idle']):>10} {s['avg_w']:>7.3g} {s['peak_w']:>7.3g}")
        if scored:
            line += f" {_fmt(s.get('accuracy'), '.2f'):>5} {_fmt(s.get('ipw')):>8} {_fmt(s.get('ipj')):>8}"
        print(line, file=file)
    if scored:
        print("IPW = accuracy / average watts; IPJ = accuracy / joules per answer (Intelligence per Watt)", file=file)
    b = res.get("battery")
    if b:
        for s in b["settings"]:
            print(f"battery: {s['setting']}: {_fmt(s['joules_per_answer'])} J per answer -> about "
                  f"{_fmt(s['answers_per_charge'], ',.0f')} answers per full charge ({b['capacity_wh']:.1f} Wh, {b['capacity_from']})", file=file)
        print(f"battery: {b['note']}", file=file)
        if "fuel_gauge_discharge_j" in b:
            print(f"battery: fuel gauge saw {b['fuel_gauge_discharge_j']:.1f} J discharged, the integrated power "
                  f"{b['integrated_discharge_j']:.1f} J", file=file)
    if m["estimate"]:
        print(f"all energy figures above are ESTIMATES ({m['source']}): this machine has no power counter edgeinfer can read", file=file)


# -- the plot -----------------------------------------------------------------------------------------


def write_plot(path: Path, series, requests, settings, idle, idle_w, meter_label, estimate, t0, scored) -> str:
    """Writes the PNG; returns '' or why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'edgeinfer[energy]')"
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 7), gridspec_kw={"height_ratios": [2, 1]})
    ts = [t - t0 for t in series.power_t]
    ax.plot(ts, series.power, color="black", lw=0.9, label="power")
    if idle:
        ax.axvspan(idle[0] - t0, idle[1] - t0, color="grey", alpha=0.2, lw=0, label="idle")
        ax.axhline(idle_w, color="grey", ls="--", lw=0.8, label=f"idle {idle_w:.3g} W")
    for i, r in enumerate(requests[:2000]):
        ax.axvspan(r.t_start - t0, r.t_first - t0, color="tab:orange", alpha=0.35, lw=0, label="prefill" if i == 0 else None)
        ax.axvspan(r.t_first - t0, r.t_end - t0, color="tab:blue", alpha=0.18, lw=0, label="decode" if i == 0 else None)
    for s in settings:
        ax.axvline(s["t_start"] - t0, color="tab:green", lw=0.8)
        ax.text(s["t_start"] - t0, 1.0, " " + s["label"], transform=ax.get_xaxis_transform(), fontsize=7, va="top", rotation=0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("watts" + (" (ESTIMATE)" if estimate else ""))
    ax.set_title(("ESTIMATE - " if estimate else "") + f"power over time: {meter_label}", color="tab:red" if estimate else "black", fontsize=10)
    ax.legend(loc="upper right", fontsize=7)
    labels = [s["label"] for s in settings]
    tpj = [s["tokens_per_joule"] or 0 for s in settings]
    tpj_idle = [s["tokens_per_joule_above_idle"] or 0 for s in settings]
    y = range(len(labels))
    bx.barh([i + 0.2 for i in y], tpj, height=0.4, color="tab:blue", label="tokens per joule (total)")
    bx.barh([i - 0.2 for i in y], tpj_idle, height=0.4, color="tab:cyan", label="tokens per joule (above idle)")
    for i, s in enumerate(settings):
        note = f" {tpj[i]:.3g}"
        if scored and s.get("ipj") is not None:
            note += f"  (acc {s['accuracy']:.2f}, IPJ {s['ipj']:.3g}, IPW {s['ipw']:.3g})"
        bx.text(tpj[i], i + 0.2, note, va="center", fontsize=7)
    bx.set_yticks(list(y), labels, fontsize=7)
    bx.set_xlabel("generated tokens per joule" + (" (ESTIMATE)" if estimate else ""))
    bx.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""
