"""Runs a scenario for real: one memory plan, the models loaded, the meter sampled, the energy split.

Energy split (one meter for the whole chip): the run is cut at every job's start and end; the
meter is read at each of those edges when it is fast (RAPL, the estimate), else its counter is
interpolated between periodic readings. Each piece's energy is split equally among the jobs running
throughout it, so each job's share of a meter slice is proportional to its active time in it. Energy
while no job runs is idle: reported, not attributed to any model.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import EdgeInferError
from .scheduler import FakeClock, Job, Progress, RealClock, Scheduler
from .scoring import scenario_scores
from .spec import Scenario
from .workload import make_workload


@dataclass
class RunResult:
    scenario: Scenario
    jobs: list[Job]
    scores: dict
    duration_s: float
    wall_s: float
    energy: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    meter: str | None = None
    threads: dict = field(default_factory=dict)
    started: str = ""  # local time the arrivals began, ISO 8601


def split_energy(joules: Callable[[float, float], float], jobs: list[Job]) -> float:
    """Sets each completed job's ``energy_j`` to its share (rule in the module docstring); returns the
    energy attributed. ``joules(t0, t1)`` is the meter's energy between two scenario times."""
    edges = []
    for j in jobs:
        if not j.dropped and j.end is not None:
            j.energy_j = 0.0
            if j.end > j.start:  # a zero-length job holds no time, so no energy
                edges.append((j.start, 1, j))
                edges.append((j.end, -1, j))
    edges.sort(key=lambda e: (e[0], e[1]))  # ends before starts at one instant
    active: set[int] = set()
    by_id = {}
    attributed = 0.0
    prev = None
    for t, kind, j in edges:
        if prev is not None and t > prev and active:
            e = joules(prev, t)
            for jid in active:
                by_id[jid].energy_j += e / len(active)
            attributed += e
        if kind == 1:
            active.add(id(j))
            by_id[id(j)] = j
        else:
            active.discard(id(j))
        prev = t
    return attributed


def check_memory(sc: Scenario, workloads: dict[str, Any], budget: int, why: str, baseline: int) -> dict:
    from ..memory import fmt_bytes

    per = {name: int(w.memory_bytes()) for name, w in workloads.items()}
    need = baseline + sum(per.values())
    plan = {"budget": budget, "budget_source": why, "process": baseline, "models": per, "total": need}
    if need > budget:
        parts = ", ".join(f"{n} {fmt_bytes(b)}" for n, b in per.items())
        raise EdgeInferError(f"{sc.name}: the models need {fmt_bytes(need)} (this process {fmt_bytes(baseline)}, {parts}) "
                             f"but the memory budget is {fmt_bytes(budget)} ({why}); nothing was loaded")
    return plan


def _live(sc: Scenario, duration: float, enabled: bool):
    """A rich live table of per-model counters on a terminal; a no-op callback otherwise."""
    if not enabled:
        return None, lambda p: None
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    state = {"last": 0.0}

    def render(p: Progress) -> Table:
        t = Table(title=f"scenario {sc.name}: {min(p.now, duration):5.1f} / {duration:g} s", title_justify="left")
        for col in ("model", "done", "late", "dropped"):
            t.add_column(col, justify="right" if col != "model" else "left")
        for m in sc.models:
            t.add_row(m.name, str(p.done[m.name]), str(p.late[m.name]), str(p.dropped[m.name]))
        return t

    live = Live(render(Progress(done={m.name: 0 for m in sc.models}, dropped={m.name: 0 for m in sc.models},
                                late={m.name: 0 for m in sc.models})),
                console=Console(stderr=True), refresh_per_second=4, transient=True)

    def update(p: Progress) -> None:
        now = time.monotonic()
        if now - state["last"] >= 0.25:
            state["last"] = now
            live.update(render(p))

    return live, update


def run_scenario(sc: Scenario, *, duration: float | None = None, meter: str | None = None,
                 memory_budget: str | None = None, fake_clock: bool = False, progress: bool | None = None) -> RunResult:
    """Loads the scenario's models within one memory plan and runs it (``fake_clock``: virtual time,
    synthetic workloads only, no meter)."""
    from ..memory import default_budget, parse_budget, process_rss

    duration = sc.duration_s if duration is None else float(duration)
    if duration <= 0:
        raise EdgeInferError(f"--duration must be > 0 seconds, not {duration:g}")
    for m in sc.models:
        if m.periodic and m.rate * duration < 1:
            raise EdgeInferError(f"--duration {duration:g} s holds no frame of {m.name} at {m.rate:g} Hz")
    if progress is None:
        progress = sys.stderr.isatty()
    baseline = process_rss()
    if memory_budget is not None:
        budget, why = parse_budget(memory_budget), f"--memory-budget {memory_budget}"
    else:
        budget, why = default_budget(baseline)
    sc.memory_budget = budget
    sc.duration_s = duration  # workloads size their input streams from it
    workloads = {m.name: make_workload(m, sc) for m in sc.models}
    mem = check_memory(sc, workloads, budget, why, baseline)
    if fake_clock:
        real = [f"{n} ({w.kind})" for n, w in workloads.items() if not hasattr(w, "simulate")]
        if real:
            raise EdgeInferError(f"--virtual runs synthetic models only (their latency is stated); not: {', '.join(real)}")

    cores = os.cpu_count() or 1
    # without a per-model setting, the cores are shared out so the models' thread pools do not fight
    threads = {m.name: m.threads or max(1, cores // len(sc.models)) for m in sc.models}
    loaded = []
    sampler = meter_obj = series = None
    try:
        from tqdm import tqdm

        for m in tqdm(sc.models, desc="loading models", unit="model", disable=not progress, leave=False):
            workloads[m.name].load(threads[m.name])
            loaded.append(m.name)
        if fake_clock:
            clock = FakeClock()
        else:
            meter_obj, sampler = _open_meter(meter or sc.meter)
            mark = sampler.mark if sampler is not None and meter_obj.fast else time.perf_counter
            clock = RealClock(workloads, on_edge=mark)
        live, update = _live(sc, duration, progress and not fake_clock)
        t_wall = time.perf_counter()
        started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        try:
            if isinstance(clock, RealClock):
                clock.begin()
            if live is not None:
                live.start()
            jobs = Scheduler(sc, workloads, clock, duration_s=duration, on_progress=update).run()
        finally:
            if live is not None:
                live.stop()
            clock.close()
        wall = time.perf_counter() - t_wall
        energy = {}
        if sampler is not None:
            series = sampler.stop()
            off = clock.t0
            span_end = max([duration] + [j.end for j in jobs if j.end is not None])
            total = series.joules(off, off + span_end)
            attributed = split_energy(lambda a, b: series.joules(off + a, off + b), jobs)
            energy = {"meter": meter_obj.label(), "source": meter_obj.source, "estimate": meter_obj.is_estimate,
                      "total_j": total, "attributed_j": attributed, "idle_j": max(0.0, total - attributed),
                      "span_s": span_end}
        elif any(j.energy_j is not None for j in jobs):
            energy = {"meter": "synthetic (the workloads' stated watts)", "source": "synthetic", "estimate": True,
                      "total_j": sum(j.energy_j or 0.0 for j in jobs), "attributed_j": sum(j.energy_j or 0.0 for j in jobs),
                      "idle_j": 0.0, "span_s": max([duration] + [j.end for j in jobs if j.end is not None])}
    finally:
        if sampler is not None and series is None:  # the run failed: stop sampling all the same
            sampler.stop()
        if meter_obj is not None:
            meter_obj.close()
        for name in loaded:
            workloads[name].close()
    scores = scenario_scores(jobs, [m.name for m in sc.models])
    for name, v in scores["models"].items():
        v["threads"] = threads[name]
    return RunResult(sc, jobs, scores, duration, wall, energy, mem, energy.get("meter"), threads, started)


def _open_meter(spec: str):
    from ..energy import MeterUnavailable, PowerSampler, open_meter

    try:
        m = open_meter(spec)
    except MeterUnavailable as e:
        raise EdgeInferError(str(e)) from None
    if m is None:
        return None, None
    return m, PowerSampler(m).start()
