"""Arrivals, deadlines, drops and cascades: one event loop, driven by a fake or the real clock.

The rules (XRBench's runtime, plus streaming jobs):

- Frame i of a periodic model arrives at i / rate; its deadline is the next frame's arrival,
  (i + 1) / rate, unless the file sets ``deadline_ms`` (then arrival + deadline_ms).
- A cascaded model's job arrives when its upstream job completes, if the upstream job succeeded
  (``FrameResult.ok``), was not vetoed by its trigger (``trigger`` False; with ``when = "trigger"`` it
  must be True) and a draw from the cascade's seeded generator falls under ``probability``. The draw
  depends only on (seed, model, frame), so a run's cascades do not depend on timing.
  The job shares its upstream's deadline, unless the file sets ``deadline_ms`` (arrival + it).
- Streaming (LLM) jobs have a TTFT deadline, arrival + ttft_ms, and a stream deadline,
  TTFT deadline + max_tokens / pace_tps, which is the job's ``deadline``; the workload may stop there.
- Each model runs one job at a time, oldest first. A job is DROPPED when it has not started by its
  deadline (by its TTFT deadline for a streaming job): the model was still busy with earlier frames,
  or its upstream completed too late. A job that started runs to completion, and a late finish is
  scored by RT. (XRBench's ``DropLateFrames``: a queued request past its deadline is dropped.)
- When an upstream job is dropped, the dependant jobs it would have triggered (the same seeded draw,
  cascades with ``when = "any"``, from an upstream whose results carry no trigger) are recorded as
  dropped too, so that they count in QoE.
- Arrivals stop at the scenario's duration; jobs already arrived run or drop, and so do their cascades.

The fake clock runs workloads that can say their latency (``simulate``): virtual time, each model on
its own processor as in XRBench's simulator, deterministic. The real clock runs each model's jobs on
its own worker thread (ONNX Runtime and MLX release the GIL while they compute).
"""

from __future__ import annotations

import heapq
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import EdgeInferError
from .spec import ModelSpec, Scenario
from .workload import FrameResult, Workload


@dataclass(eq=False)
class Job:
    model: str
    frame: int  # the periodic frame it descends from
    arrival: float  # seconds since the scenario started
    deadline: float  # the job's (stream) deadline
    ttft_deadline: float | None = None  # streaming jobs only
    pace_tps: float | None = None
    planned_tokens: int = 0
    upstream: "Job | None" = None
    start: float | None = None
    end: float | None = None
    dropped: bool = False
    drop_reason: str = ""  # "late": not started by its deadline; "upstream": its upstream was dropped
    result: FrameResult | None = None
    energy_j: float | None = None  # its share of the metered energy

    @property
    def start_deadline(self) -> float:
        """The latest time the job may start."""
        return self.ttft_deadline if self.ttft_deadline is not None else self.deadline


def cascade_fires(seed: int, model: ModelSpec, frame: int) -> bool:
    """The seeded draw for ``model``'s job on upstream frame ``frame`` (string seeds hash the same in
    every process, unlike hash())."""
    if model.probability >= 1.0:
        return True
    return random.Random(f"{seed}:{model.name}:{frame}").random() < model.probability


class FakeClock:
    """Virtual time. ``start`` asks the workload for its latency (``simulate``) and schedules the
    completion; ``wait`` jumps to the earliest completion or to ``until``."""

    def __init__(self) -> None:
        self.t = 0.0
        self._running: list[tuple[float, int, Job, FrameResult, float]] = []
        self._seq = 0

    def now(self) -> float:
        return self.t

    def start(self, job: Job, workload: Any, upstream_output: Any) -> None:
        if not hasattr(workload, "simulate"):
            raise TypeError(f"the fake clock runs only workloads with simulate(); {workload.kind} has none")
        inp = workload.input(job.frame, upstream_output)
        latency, res = workload.simulate(inp, job.deadline - self.t)
        self._seq += 1
        heapq.heappush(self._running, (self.t + latency, self._seq, job, res, self.t))

    def wait(self, until: float) -> list[tuple[Job, FrameResult, float, float]]:
        if self._running and self._running[0][0] <= until:
            t_end = self._running[0][0]
            self.t = max(self.t, t_end)
            done = []
            while self._running and self._running[0][0] <= t_end:
                end, _, job, res, start = heapq.heappop(self._running)
                done.append((job, res, start, end))
            return done
        if until != float("inf"):
            self.t = max(self.t, until)
        return []

    def close(self) -> None:
        pass


class RealClock:
    """Wall time since ``begin``; one worker thread per model runs its jobs in order. ``on_edge`` is
    called at each job's start and end (the runner marks the power meter there)."""

    def __init__(self, workloads: dict[str, Workload], on_edge: Callable[[], float] | None = None) -> None:
        self.workloads = workloads
        self.on_edge = on_edge or time.perf_counter
        self.t0 = time.perf_counter()
        self._done: queue.Queue = queue.Queue()
        self._inbox = {name: queue.Queue() for name in workloads}
        self._threads = [threading.Thread(target=self._worker, args=(name,), name=f"edgeinfer-scenario-{name}",
                                          daemon=True) for name in workloads]
        for th in self._threads:
            th.start()

    def begin(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _worker(self, name: str) -> None:
        wl = self.workloads[name]
        inbox = self._inbox[name]
        while True:
            item = inbox.get()
            if item is None:
                return
            job, upstream_output = item
            try:
                inp = wl.input(job.frame, upstream_output)
                start = self.on_edge() - self.t0
                res = wl.run(inp, max(0.0, job.deadline - start))
                end = self.on_edge() - self.t0
                if not isinstance(res, FrameResult):
                    raise TypeError(f"run() returned {type(res).__name__}, not FrameResult")
                self._done.put((job, res, start, end, None))
            except Exception as e:  # reported on the scheduler's thread, which stops the run
                self._done.put((job, None, 0.0, 0.0, e))

    def start(self, job: Job, workload: Any, upstream_output: Any) -> None:
        self._inbox[job.model].put((job, upstream_output))

    def wait(self, until: float) -> list[tuple[Job, FrameResult, float, float]]:
        timeout = None if until == float("inf") else max(0.0, until - self.now())
        out = []
        try:
            out.append(self._done.get(timeout=timeout))
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        done = []
        for job, res, start, end, err in out:
            if err is not None:
                raise EdgeInferError(f"model {job.model} failed on frame {job.frame}: {type(err).__name__}: {err}") from err
            done.append((job, res, start, end))
        return done

    def close(self) -> None:
        for q in self._inbox.values():
            q.put(None)
        for th in self._threads:
            th.join(timeout=30)


@dataclass
class Progress:
    """Counters the live display reads (updated on the scheduler's thread)."""

    now: float = 0.0
    done: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    late: dict[str, int] = field(default_factory=dict)


class Scheduler:
    def __init__(self, scenario: Scenario, workloads: dict[str, Any], clock, duration_s: float | None = None,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        self.sc = scenario
        self.workloads = workloads
        self.clock = clock
        self.duration = scenario.duration_s if duration_s is None else duration_s
        self.on_progress = on_progress
        self.jobs: list[Job] = []
        self.progress = Progress(done={m.name: 0 for m in scenario.models},
                                 dropped={m.name: 0 for m in scenario.models},
                                 late={m.name: 0 for m in scenario.models})

    # -- job creation ---------------------------------------------------------------------------------
    def _new_job(self, m: ModelSpec, frame: int, arrival: float, upstream: Job | None) -> Job:
        if m.streaming:
            ttft = arrival + m.ttft_ms / 1000.0
            job = Job(m.name, frame, arrival, ttft + m.max_tokens / m.pace_tps, ttft_deadline=ttft,
                      pace_tps=m.pace_tps, planned_tokens=m.max_tokens, upstream=upstream)
        elif m.deadline_ms is not None:
            job = Job(m.name, frame, arrival, arrival + m.deadline_ms / 1000.0, upstream=upstream)
        elif m.periodic:
            job = Job(m.name, frame, arrival, (frame + 1) / m.rate, upstream=upstream)
        else:
            job = Job(m.name, frame, arrival, upstream.deadline, upstream=upstream)
        self.jobs.append(job)
        return job

    def _drop(self, job: Job, reason: str) -> None:
        job.dropped, job.drop_reason = True, reason
        self.progress.dropped[job.model] += 1

    def _drop_dependants(self) -> None:
        """After the run: the dependants each dropped job would have triggered are lost with it, and
        recorded as dropped. Only where the upstream's outcome would not have mattered: cascades with
        ``when = "any"`` from a model that decides nothing (none of its results carried a trigger);
        what a VAD would have decided on a frame it never ran is unknown, so nothing is recorded."""
        deciding = {j.model for j in self.jobs if j.result is not None and j.result.trigger is not None}
        todo = [j for j in self.jobs if j.dropped]
        while todo:
            job = todo.pop(0)
            if job.model in deciding:
                continue
            for dep in self.sc.dependants(job.model):
                if dep.when == "any" and cascade_fires(self.sc.seed, dep, job.frame):
                    child = self._new_job(dep, job.frame, job.arrival, job)
                    self._drop(child, "upstream")
                    todo.append(child)

    def _complete(self, job: Job, res: FrameResult, start: float, end: float) -> list[Job]:
        job.result, job.start, job.end = res, start, end
        if res.energy_j is not None:
            job.energy_j = res.energy_j
        self.progress.done[job.model] += 1
        if end > job.deadline:
            self.progress.late[job.model] += 1
        fired = []
        if not res.ok or res.trigger is False:
            return fired
        for dep in self.sc.dependants(job.model):
            if dep.when == "trigger" and res.trigger is not True:
                continue
            if cascade_fires(self.sc.seed, dep, job.frame):
                fired.append(self._new_job(dep, job.frame, end, job))
        return fired

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> list[Job]:
        periodic = [m for m in self.sc.models if m.periodic]
        next_frame = {m.name: 0 for m in periodic}
        queues: dict[str, deque[Job]] = {m.name: deque() for m in self.sc.models}
        busy: dict[str, Job | None] = {m.name: None for m in self.sc.models}

        def next_arrival() -> tuple[float, ModelSpec | None]:
            best, who = float("inf"), None
            for m in periodic:
                t = next_frame[m.name] / m.rate
                if t < self.duration - 1e-12 and t < best:
                    best, who = t, m
            return best, who

        while True:
            now = self.clock.now()
            self.progress.now = now
            # arrivals due by now, in time order
            while True:
                t, m = next_arrival()
                if m is None or t > now:
                    break
                queues[m.name].append(self._new_job(m, next_frame[m.name], t, None))
                next_frame[m.name] += 1
            # dispatch the oldest job of each idle model; drop those whose start deadline has passed
            for name, q in queues.items():
                while busy[name] is None and q:
                    job = q.popleft()
                    if now >= job.start_deadline:
                        self._drop(job, "late")
                        continue
                    busy[name] = job
                    up = job.upstream.result.output if job.upstream is not None and job.upstream.result else None
                    self.clock.start(job, self.workloads[name], up)
            if self.on_progress is not None:
                self.on_progress(self.progress)
            t_next, _ = next_arrival()
            if t_next == float("inf") and not any(busy.values()) and not any(queues.values()):
                break
            for job, res, start, end in self.clock.wait(t_next):
                busy[job.model] = None
                # a model has one upstream, which completes its jobs in order: queues stay in arrival order
                for child in self._complete(job, res, start, end):
                    queues[child.model].append(child)
        self._drop_dependants()
        return self.jobs
