"""Background power sampling and integration over windows.

``PowerSampler`` reads a meter every ``interval`` seconds in a thread; ``mark()`` adds a reading at a
phase boundary (prefill start, first token, end) so that windows begin and end on a reading. The
``Series`` it produces answers: joules, average and peak watts between two times.

Energy over a window comes from the meter's counter where it has one (cumulative joules, linearly
interpolated at the window's edges); otherwise from the trapezoidal integral of the power readings.
The power series is the meter's own power reading where it has one (NVML), else the counter's
derivative between periodic samples (marks excluded, so that two readings a few microseconds apart
do not make a spike).
"""

from __future__ import annotations

import bisect
import threading
import time

from .base import Meter, Reading


class PowerSampler:
    def __init__(self, meter: Meter, interval: float | None = None):
        self.meter = meter
        self.interval = interval or meter.interval
        self.readings: list[Reading] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _add(self, r: Reading) -> None:
        with self._lock:
            if not self.readings or r.t >= self.readings[-1].t:
                self.readings.append(r)
            else:
                bisect.insort(self.readings, r, key=lambda x: x.t)

    def _run(self) -> None:
        nxt = time.perf_counter()
        while True:
            nxt += self.interval
            if self._stop.wait(max(0.0, nxt - time.perf_counter())):
                break
            self._add(self.meter.read())

    def start(self) -> "PowerSampler":
        self._add(self.meter.read())
        self._thread = threading.Thread(target=self._run, name="edgeinfer-power-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "Series":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._add(self.meter.read())
        return self.series()

    def mark(self) -> float:
        """Now, as a time on the series' clock; with a fast meter a reading is taken right here."""
        if self.meter.fast:
            r = self.meter.read(mark=True)
            self._add(r)
            return r.t
        return time.perf_counter()

    def series(self) -> "Series":
        with self._lock:
            return Series(list(self.readings))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if not self._stop.is_set():
            self.stop()


def _interp(ts: list[float], vs: list[float], t: float) -> float:
    if t <= ts[0]:
        return vs[0]
    if t >= ts[-1]:
        return vs[-1]
    i = bisect.bisect_right(ts, t)
    t0, t1 = ts[i - 1], ts[i]
    return vs[i - 1] if t1 == t0 else vs[i - 1] + (vs[i] - vs[i - 1]) * (t - t0) / (t1 - t0)


class Series:
    def __init__(self, readings: list[Reading]):
        self.readings = readings
        self.t = [r.t for r in readings]
        self.has_counter = bool(readings) and all(r.energy_j is not None for r in readings)
        self.energy = [r.energy_j for r in readings] if self.has_counter else []
        # power series: (time, watts)
        if readings and all(r.power_w is not None for r in readings):
            self.power_t = [r.t for r in readings if not r.mark] or self.t
            self.power = [r.power_w for r in readings if not r.mark] or [r.power_w for r in readings]
        elif self.has_counter:
            periodic = [r for r in readings if not r.mark] or readings
            self.power_t, self.power = [], []
            for a, b in zip(periodic, periodic[1:]):
                if b.t > a.t:
                    self.power_t.append((a.t + b.t) / 2)
                    self.power.append((b.energy_j - a.energy_j) / (b.t - a.t))
        else:
            self.power_t, self.power = [], []

    @property
    def start(self) -> float:
        return self.t[0]

    @property
    def end(self) -> float:
        return self.t[-1]

    def counter_joules(self, t0: float, t1: float) -> float:
        return _interp(self.t, self.energy, t1) - _interp(self.t, self.energy, t0)

    def power_joules(self, t0: float, t1: float) -> float:
        """Trapezoidal integral of the power readings over [t0, t1] (held constant past the ends)."""
        ts, ps = self.power_t, self.power
        if not ts or t1 <= t0:
            return 0.0
        pts = [t0] + [t for t in ts if t0 < t < t1] + [t1]
        vals = [_interp(ts, ps, t) for t in pts]
        return sum((pts[i + 1] - pts[i]) * (vals[i] + vals[i + 1]) / 2 for i in range(len(pts) - 1))

    def joules(self, t0: float, t1: float) -> float:
        return self.counter_joules(t0, t1) if self.has_counter else self.power_joules(t0, t1)

    def avg_watts(self, t0: float, t1: float) -> float:
        return self.joules(t0, t1) / (t1 - t0) if t1 > t0 else 0.0

    def peak_watts(self, t0: float, t1: float) -> float:
        inside = [p for t, p in zip(self.power_t, self.power) if t0 <= t <= t1]
        return max(inside) if inside else self.avg_watts(t0, t1)
