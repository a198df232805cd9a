"""The meter interface: energy over a window, a power reading, and a label saying what is measured.

Two kinds of meter:

* counter meters (RAPL, NVML, IOReport, the model estimate) keep a cumulative energy counter; ``read()``
  returns it in joules since the meter was opened, corrected for wrap-around and resets. Some also
  give an independent power reading (NVML).
* power meters (battery ``power_now``, ``ioreg`` voltage x current, Jetson INA3221 rails, powermetrics)
  give only watts now; energy over a window is the integral of sampled power.

Every meter fits ``edgeinfer.Model.meter``: ``begin() -> mark``, ``end(mark) -> joules`` and ``source``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeInferError

# What a meter measures and how (its ``source``). Every figure edgeinfer prints carries one.
SOURCES = {
    "soc-estimate": "the SoC's own energy model (Apple IOReport / powermetrics): CPU, GPU, ANE and DRAM, no display or board",
    "package-rapl": "RAPL energy counters of the CPU package(s) (plus DRAM where exposed, or psys for the whole platform)",
    "gpu-nvml": "the NVIDIA driver's board energy counter and power reading (NVML)",
    "soc-rails": "shunt monitors on the module's power rails (Jetson INA3221), voltage x current",
    "battery-discharge": "the battery's reported discharge power (whole system on battery, display included)",
    "wall": "an external meter at the wall socket (whole system, charger losses included)",
    "model-estimate": "NOT A MEASUREMENT: CPU time x a stated per-core power figure",
}


class MeterUnavailable(EdgeInferError):
    """This meter cannot measure on this machine; the message says why."""


def sysfs_root() -> Path:
    """Where sysfs lies (``EDGEINFER_SYSFS`` overrides ``/sys``: recorded trees in tests)."""
    return Path(os.environ.get("EDGEINFER_SYSFS") or "/sys")


@dataclass(frozen=True)
class Reading:
    t: float  # time.perf_counter() seconds
    energy_j: float | None  # cumulative joules since the meter opened (counter meters)
    power_w: float | None  # watts now (meters with a power reading)
    mark: bool = False  # taken at a phase boundary, not by the periodic sampler


class Meter:
    name = ""  # registry name: "rapl", "nvml", ...
    source = ""  # one of SOURCES
    is_estimate = False
    has_counter = True  # read() gives cumulative energy
    fast = True  # read() takes well under a millisecond: fine at every phase boundary
    interval = 0.1  # default sampling interval, seconds
    warning = ""  # something the user should know (battery charging, coarse counter, ...)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # -- subclasses ---------------------------------------------------------------------------------
    def _read(self) -> tuple[float | None, float | None]:
        """(cumulative joules or None, watts or None)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What it measures and how, in one line."""
        return SOURCES.get(self.source, self.source)

    def close(self) -> None:
        pass

    # -- public -------------------------------------------------------------------------------------
    def read(self, mark: bool = False) -> Reading:
        with self._lock:
            t0 = time.perf_counter()
            e, p = self._read()
            t1 = time.perf_counter()
        return Reading((t0 + t1) / 2, e, p, mark)

    def label(self) -> str:
        """``name (source)``, with ESTIMATE spelled out where it is one."""
        return f"{self.name} ({self.source}{', an ESTIMATE, not a measurement' if self.is_estimate else ''})"

    def begin(self):
        """Starts a window (``Model.meter`` contract); returns a mark for ``end``."""
        if self.has_counter:
            return self.read()
        return _Integrator(self).start()

    def end(self, mark) -> float:
        """Joules since ``begin`` returned ``mark``."""
        if isinstance(mark, _Integrator):
            return mark.stop()
        r = self.read()
        return max(0.0, r.energy_j - mark.energy_j)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Integrator:
    """Integrates a power meter's readings over one window in a background thread (trapezoids)."""

    def __init__(self, meter: Meter):
        self.meter = meter
        self.joules = 0.0
        self._last: Reading | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeinfer-energy-window", daemon=True)

    def _add(self, r: Reading) -> None:
        if r.power_w is None:
            return
        if self._last is not None:
            self.joules += (r.t - self._last.t) * (r.power_w + self._last.power_w) / 2
        self._last = r

    def _run(self) -> None:
        while not self._stop.wait(self.meter.interval):
            self._add(self.meter.read())

    def start(self) -> "_Integrator":
        self._add(self.meter.read())
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._add(self.meter.read())
        return self.joules


def read_number(path: Path) -> float | None:
    """A sysfs number file: its value, or None when the file is missing or empty. Permission
    errors propagate (the caller says who may read it)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        if isinstance(e, PermissionError):
            raise
        return None  # e.g. ENODATA from a battery driver between updates
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
