"""The ``synthetic`` workload kind: a model of known latency (and, optionally, known power).

For the scheduler's fake-clock tests and for trying a scenario's timing without its models. Options
(in the model's table):

- ``latency_ms``: one number, or a list cycled by frame index;
- ``watts``: power while it runs, so each job's energy is known (watts x latency);
- ``trigger_every = N``: FrameResult.trigger is True on every N-th frame (frame % N == N - 1), else False;
- ``fail_every = N``: FrameResult.ok is False on every N-th frame;
- ``quality``: the per-frame quality it reports;
- ``spin = true``: busy-wait in real runs (it holds a core and the GIL, like a model that does not
  release it) instead of sleeping;
- streaming models (``ttft_ms`` set) produce ``max_tokens`` tokens: the first after ``first_token_ms``,
  then one every ``token_ms``, stopping at the deadline.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import EdgeInferError
from .workload import FrameResult, register_workload

_OPTIONS = {"latency_ms", "watts", "trigger_every", "fail_every", "quality", "spin", "first_token_ms", "token_ms",
            "memory_mb"}


class SyntheticWorkload:
    kind = "synthetic"

    def __init__(self, spec, scenario) -> None:
        self.name = spec.name
        o = spec.options
        unknown = set(o) - _OPTIONS
        if unknown:
            raise EdgeInferError(f"{scenario.source}: models.{spec.name}.{sorted(unknown)[0]}: unknown option of kind "
                                 f"synthetic (it takes {', '.join(sorted(_OPTIONS))})")
        lat = o.get("latency_ms", 1.0)
        lat = lat if isinstance(lat, list) else [lat]
        for k, v in [("latency_ms", x) for x in lat] + [(k, o[k]) for k in ("watts", "first_token_ms", "token_ms",
                                                                              "memory_mb", "quality") if k in o]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise EdgeInferError(f"{scenario.source}: models.{spec.name}.{k}: must be a number >= 0, got {v!r}")
        for k in ("trigger_every", "fail_every"):
            if k in o and (isinstance(o[k], bool) or not isinstance(o[k], int) or o[k] < 1):
                raise EdgeInferError(f"{scenario.source}: models.{spec.name}.{k}: must be an integer >= 1, got {o[k]!r}")
        if not lat:
            raise EdgeInferError(f"{scenario.source}: models.{spec.name}.latency_ms: an empty list")
        self.latencies = [float(x) / 1000.0 for x in lat]
        self.watts = o.get("watts")
        self.trigger_every = o.get("trigger_every")
        self.fail_every = o.get("fail_every")
        self.quality = o.get("quality")
        self.spin = bool(o.get("spin", False))
        self.streaming = spec.streaming
        self.max_tokens = spec.max_tokens or 0
        self.first_token = float(o.get("first_token_ms", 10.0)) / 1000.0
        self.token_gap = float(o.get("token_ms", 10.0)) / 1000.0
        self.memory = int(float(o.get("memory_mb", 1)) * (1 << 20))
        self.loaded = False

    def memory_bytes(self) -> int:
        return self.memory

    def load(self, threads: int | None) -> None:
        self.loaded = True

    def input(self, frame: int, upstream: Any) -> Any:
        return frame

    def _plan(self, frame: int, deadline_s: float) -> tuple[float, FrameResult]:
        """(latency, result) of a frame: the same numbers in virtual and in real time."""
        every = lambda n: bool(n) and frame % n == n - 1  # noqa: E731
        res = FrameResult(ok=not every(self.fail_every), output=frame, quality=self.quality,
                          trigger=None if not self.trigger_every else every(self.trigger_every))
        if self.streaming:
            times = [self.first_token + i * self.token_gap for i in range(self.max_tokens)]
            kept = [t for t in times if t <= deadline_s] or times[:1]  # stops at the deadline
            res.ttft, res.tokens, res.token_times = kept[0], len(kept), kept
            latency = kept[-1]
        else:
            latency = self.latencies[frame % len(self.latencies)]
        if self.watts is not None:
            res.energy_j = float(self.watts) * latency
        return latency, res

    def simulate(self, inp: int, deadline_s: float) -> tuple[float, FrameResult]:
        return self._plan(inp, deadline_s)

    def run(self, inp: int, deadline_s: float) -> FrameResult:
        latency, res = self._plan(inp, deadline_s)
        t0 = time.perf_counter()
        marks = res.token_times if self.streaming else [latency]
        measured = []
        for t in marks:  # streaming: the token times reported are the measured ones
            while time.perf_counter() - t0 < t:
                if not self.spin:
                    time.sleep(max(0.0, t - (time.perf_counter() - t0)))
            measured.append(time.perf_counter() - t0)
        if self.streaming:
            res.token_times, res.ttft = measured, measured[0]
        return res

    def close(self) -> None:
        self.loaded = False


@register_workload("synthetic")
def _factory(spec, scenario) -> SyntheticWorkload:
    return SyntheticWorkload(spec, scenario)
