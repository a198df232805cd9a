"""Meters with no counter of their own: the model estimate, and an external wall meter's log file."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .base import Meter, MeterUnavailable

DEFAULT_CORE_WATTS = 5.0


class EstimateMeter(Meter):
    """NOT A MEASUREMENT. Energy = this process's CPU time (all threads, user + system, from
    ``time.process_time``) x a stated power per busy core, plus an optional stated base power x wall
    time. For machines with no power counter (a VM without RAPL or battery). The default 5 W per core
    is a round figure for a laptop performance core at full load; set ``core_watts`` (or
    ``EDGEINFER_CORE_WATTS``) for your CPU. It counts only this process, so other load on the machine
    does not enter, and neither does anything a real meter would see (memory, uncore, display)."""

    name = "estimate"
    source = "model-estimate"
    is_estimate = True
    interval = 0.2

    def __init__(self, core_watts: float | str | None = None, base_watts: float | str = 0.0):
        super().__init__()
        try:
            self.core_watts = float(core_watts if core_watts is not None else os.environ.get("EDGEINFER_CORE_WATTS") or DEFAULT_CORE_WATTS)
            self.base_watts = float(base_watts)
        except ValueError:
            raise MeterUnavailable(f"estimate: core_watts and base_watts must be numbers, not {core_watts!r}, {base_watts!r}") from None
        if self.core_watts <= 0 or self.base_watts < 0:
            raise MeterUnavailable("estimate: core_watts must be > 0 and base_watts >= 0")
        self._cpu0 = time.process_time()
        self._t0 = time.perf_counter()

    def describe(self) -> str:
        base = f" + {self.base_watts:g} W base x wall time" if self.base_watts else ""
        return (f"ESTIMATE, not a measurement: {self.core_watts:g} W per busy core x this process's CPU time{base} "
                "(no power counter on this machine)")

    def _read(self):
        cpu = time.process_time() - self._cpu0
        return cpu * self.core_watts + self.base_watts * (time.perf_counter() - self._t0), None


class WallFileMeter(Meter):
    """An external wall-socket meter (a smart plug, a USB power meter) whose logger writes readings to
    a file: the last number of the file's last line is the current power in watts."""

    name = "wall"
    source = "wall"
    has_counter = False
    interval = 0.5

    def __init__(self, file: str | None = None):
        super().__init__()
        file = file or os.environ.get("EDGEINFER_WALL_FILE")
        if not file:
            raise MeterUnavailable("wall: give the meter's log file as wall:file=PATH (or EDGEINFER_WALL_FILE)")
        self.path = Path(file)
        if self._watts() is None:
            raise MeterUnavailable(f"wall: {self.path} holds no power reading (its last line should end with watts)")

    def _watts(self) -> float | None:
        try:
            lines = self.path.read_text().strip().splitlines()
        except OSError:
            return None
        if not lines:
            return None
        try:
            return float(lines[-1].replace(",", " ").split()[-1])
        except (ValueError, IndexError):
            return None

    def describe(self) -> str:
        return f"external wall meter, last reading in {self.path}"

    def _read(self):
        return None, self._watts()
