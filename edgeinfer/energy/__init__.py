"""Energy measurement: meters with labelled sources, a background power sampler, integration.

``open_meter("auto")`` picks the best meter this machine offers; ``open_meter("rapl:root=DIR")``
opens a named one with options. ``list_meters()`` says which exist here and why the others don't.
Any meter can be attached to a model (``model.meter = open_meter("auto")``): each answer's joules
then land in ``model.stats.energy_joules``.
"""

from __future__ import annotations

import sys

from ..errors import EdgeInferError
from .apple import AppleSocMeter, IoregBatteryMeter, PowermetricsMeter
from .base import SOURCES, Meter, MeterUnavailable, Reading
from .estimate import EstimateMeter, WallFileMeter
from .nvml import NvmlMeter
from .sampler import PowerSampler, Series
from .sysfs import BatteryMeter, JetsonMeter, RaplMeter

# name -> (class, options it takes, one-line help)
METERS = {
    "apple": (AppleSocMeter, (), "Apple Silicon IOReport energy counters via zeus-apple-silicon (no sudo)"),
    "rapl": (RaplMeter, ("root",), "Linux RAPL powercap counters (CPU package, DRAM or psys)"),
    "jetson": (JetsonMeter, ("root",), "Jetson INA3221 power rails through hwmon"),
    "nvml": (NvmlMeter, ("index", "lib"), "NVIDIA GPU energy counter (nvidia-ml-py, or the driver's library via ctypes)"),
    "battery": (BatteryMeter, ("root",), "Linux battery power_now / current_now x voltage_now / energy_now"),
    "ioreg-battery": (IoregBatteryMeter, (), "Mac battery Voltage x InstantAmperage from ioreg"),
    "powermetrics": (PowermetricsMeter, ("interval_ms",), "macOS powermetrics (root), a cross-check for apple"),
    "wall": (WallFileMeter, ("file",), "an external wall meter's log file (wall:file=PATH)"),
    "estimate": (EstimateMeter, ("core_watts", "base_watts"), "ESTIMATE: CPU time x a stated per-core power"),
}

# Tried in this order by "auto". nvml is left out: edgeinfer's backends run on the CPU (MLX on Linux)
# or the SoC (a Mac), so a discrete GPU's energy is not the answer's; name it to measure a GPU.
# powermetrics needs root and is a cross-check; wall needs its file.
AUTO_ORDER = ("apple", "rapl", "jetson", "battery", "ioreg-battery", "estimate")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``NAME[:key=value,...]`` -> (name, options)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in METERS:
        raise EdgeInferError(f"unknown meter {name!r}; known: auto, none, {', '.join(METERS)}")
    opts = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in METERS[name][1]:
            takes = ", ".join(METERS[name][1]) or "no options"
            raise EdgeInferError(f"meter {name}: bad option {part!r} (it takes {takes})")
        opts[key] = value
    return name, opts


def open_meter(spec: str = "auto") -> Meter | None:
    """A meter for ``spec``: ``auto`` (the best one here; the estimate when nothing else is),
    ``none`` (None), or ``NAME[:key=value,...]``; raises ``MeterUnavailable`` with the reason."""
    spec = (spec or "auto").strip()
    if spec == "none":
        return None
    if spec == "auto":
        for name in AUTO_ORDER:
            try:
                return METERS[name][0]()
            except MeterUnavailable:
                continue
        return EstimateMeter()
    name, opts = parse_spec(spec)
    try:
        return METERS[name][0](**opts)
    except MeterUnavailable as e:
        raise MeterUnavailable(f"meter {name} is not available here: {e}") from None


def list_meters() -> list[dict]:
    """Every meter: name, source, whether it works here, and what it measures or why not."""
    out = []
    for name, (cls, _, help_) in METERS.items():
        row = {"name": name, "source": cls.source, "help": help_}
        try:
            m = cls()
        except MeterUnavailable as e:
            row.update(available=False, detail=str(e))
        except Exception as e:  # a broken driver must not break the listing
            row.update(available=False, detail=f"{type(e).__name__}: {e}")
        else:
            row.update(available=True, detail=m.describe(), estimate=m.is_estimate, warning=m.warning)
            m.close()
        out.append(row)
    return out


def print_meters(json_out: bool = False, file=None) -> None:
    import json

    file = file or sys.stdout
    rows = list_meters()
    auto = open_meter("auto")
    auto_name = auto.name
    auto.close()
    if json_out:
        print(json.dumps({"meters": rows, "auto": auto_name, "sources": SOURCES}, indent=2), file=file)
        return
    for r in rows:
        state = "available" if r["available"] else "not here"
        print(f"{r['name']:<14} {r['source']:<18} {state:<10} {r['detail']}", file=file)
        if r.get("warning"):
            print(f"{'':<44} note: {r['warning']}", file=file)
    pick = next(r for r in rows if r["name"] == auto_name)
    est = " -- an ESTIMATE: this machine has no power counter edgeinfer can read" if pick.get("estimate") else ""
    print(f"auto picks: {auto_name} ({pick['source']}){est}", file=file)


__all__ = [
    "AUTO_ORDER", "METERS", "SOURCES", "AppleSocMeter", "BatteryMeter", "EstimateMeter", "IoregBatteryMeter",
    "JetsonMeter", "Meter", "MeterUnavailable", "NvmlMeter", "PowerSampler", "PowermetricsMeter", "RaplMeter",
    "Reading", "Series", "WallFileMeter", "list_meters", "open_meter", "parse_spec", "print_meters",
]
