"""Linux meters read from sysfs: RAPL powercap counters, battery discharge, Jetson INA3221 rails.

Each takes the folder it reads (``root``), so that recorded or synthetic trees in a temporary folder
go through exactly the parsing and integration that the real files do.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import Meter, MeterUnavailable, read_number, read_text, sysfs_root

# -- RAPL ---------------------------------------------------------------------------------------------

_TOP_ZONE = re.compile(r"^intel-rapl:(\d+)$")
_SUB_ZONE = re.compile(r"^intel-rapl:(\d+):(\d+)$")


class RaplMeter(Meter):
    """RAPL energy counters under ``/sys/class/powercap``: the package zones (``package-N``), plus
    their ``dram`` subzones where present; or the ``psys`` zone alone (the whole platform, on laptops
    that have it), which already contains the packages. The core/uncore subzones are parts of the
    package and are not added again. ``intel-rapl-mmio`` zones duplicate the package and are skipped.

    ``energy_uj`` wraps at ``max_energy_range_uj``; a read that goes down is counted as one wrap
    (the counters take minutes to wrap even at full load; the sampler reads every 0.1 s)."""

    name = "rapl"
    source = "package-rapl"

    def __init__(self, root: str | Path | None = None):
        super().__init__()
        self.root = Path(root) if root else sysfs_root() / "class" / "powercap"
        tops, subs = {}, {}
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if _TOP_ZONE.match(d.name):
                    tops[d.name] = d
                elif _SUB_ZONE.match(d.name):
                    subs[d.name] = d
        if not tops:
            raise MeterUnavailable(
                f"no RAPL zones under {self.root} (no intel-rapl powercap driver: a VM, a non-x86 CPU, "
                "or the intel_rapl_common module is not loaded)"
            )
        names = {k: (read_text(d / "name") or "") for k, d in {**tops, **subs}.items()}
        psys = [d for k, d in tops.items() if names[k] == "psys"]
        if psys:
            zones = psys
        else:
            zones = [d for k, d in tops.items() if names[k] != "psys"]
            zones += [d for k, d in subs.items() if names[k] == "dram"]
        self.zones = [(names.get(d.name) or d.name, d) for d in zones]
        self._range: list[float] = []
        self._last: list[float] = []
        for zname, d in self.zones:
            f = d / "energy_uj"
            if not f.exists():
                raise MeterUnavailable(f"{f} is missing: this RAPL zone has no energy counter")
            try:
                v = read_number(f)
            except PermissionError:
                raise MeterUnavailable(
                    f"RAPL counters are readable by root only ({f} is mode "
                    f"{oct(f.stat().st_mode & 0o777)}, since Linux 5.10): run as root, or let users read them with "
                    f"sudo chmod a+r {self.root}/intel-rapl:*/energy_uj"
                ) from None
            if v is None:
                raise MeterUnavailable(f"{f} holds no number")
            rng = read_number(d / "max_energy_range_uj")
            self._range.append(rng if rng else float(2**32))
            self._last.append(v)
        self._acc_uj = 0.0

    def describe(self) -> str:
        return "RAPL energy counters: " + " + ".join(z for z, _ in self.zones) + f" ({self.root})"

    def _read(self):
        for i, (_, d) in enumerate(self.zones):
            v = read_number(d / "energy_uj")
            if v is None:
                continue
            delta = v - self._last[i]
            if delta < 0:  # wrapped around max_energy_range_uj
                delta += self._range[i]
            self._acc_uj += delta
            self._last[i] = v
        return self._acc_uj / 1e6, None


# -- battery --------------------------------------------------------------------------------------------


class BatteryMeter(Meter):
    """System batteries under ``/sys/class/power_supply`` (``type`` Battery, not a device's own
    battery such as a mouse's, ``scope`` Device). Power from ``power_now`` (µW), else ``current_now``
    (µA) x ``voltage_now`` (µV); both batteries of a two-battery laptop are added. When neither is
    there, ``energy_now`` (µWh) deltas serve as a coarse counter. Only a discharging battery
    measures the system: on the charger the figure is the charge, not the draw (``warning`` says so)."""

    name = "battery"
    source = "battery-discharge"
    interval = 0.25

    def __init__(self, root: str | Path | None = None):
        super().__init__()
        self.root = Path(root) if root else sysfs_root() / "class" / "power_supply"
        bats = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if read_text(d / "type") == "Battery" and read_text(d / "scope") != "Device" and read_text(d / "present") != "0":
                    bats.append(d)
        if not bats:
            raise MeterUnavailable(f"no system battery under {self.root}")
        self.batteries = bats
        self.mode = None
        if all((d / "power_now").exists() for d in bats):
            self.mode = "power_now"
        elif all((d / "current_now").exists() and (d / "voltage_now").exists() for d in bats):
            self.mode = "current_now x voltage_now"
        elif all((d / "energy_now").exists() for d in bats):
            self.mode = "energy_now"
        else:
            raise MeterUnavailable(f"battery {bats[0].name} reports neither power_now, current_now and voltage_now, nor energy_now")
        self.has_counter = self.mode == "energy_now"
        if self.has_counter:
            self._e0 = self._energy_now_j()
            self.warning = "the battery reports only energy_now: a coarse counter, updated every few seconds; use long windows"
        self.status = ", ".join(f"{d.name}: {read_text(d / 'status') or 'Unknown'}" for d in bats)
        if not self.discharging():
            self.warning = (f"the battery is not discharging ({self.status}): on the charger it reports the charge, "
                            "not the system's draw; unplug the charger to measure")

    def discharging(self) -> bool:
        return all(read_text(d / "status") == "Discharging" for d in self.batteries)

    def describe(self) -> str:
        return f"battery discharge from {self.mode} of " + ", ".join(d.name for d in self.batteries) + f" ({self.root})"

    def _energy_now_j(self) -> float:
        total = 0.0
        for d in self.batteries:
            e = read_number(d / "energy_now")
            if e is None:
                c, v = read_number(d / "charge_now"), read_number(d / "voltage_now")
                e = c * v / 1e6 if c is not None and v is not None else 0.0
            total += e * 3.6e-3  # µWh -> J
        return total

    def full_charge_joules(self) -> float | None:
        """The batteries' full-charge energy (``energy_full``, else ``charge_full`` x design voltage)."""
        total = 0.0
        for d in self.batteries:
            e = read_number(d / "energy_full")
            if e is None:
                c = read_number(d / "charge_full")
                v = read_number(d / "voltage_min_design") or read_number(d / "voltage_now")
                if c is None or v is None:
                    return None
                e = c * v / 1e6
            total += e * 3.6e-3
        return total or None

    def remaining_joules(self) -> float | None:
        return self._energy_now_j() if all((d / "energy_now").exists() or (d / "charge_now").exists() for d in self.batteries) else None

    def _read(self):
        if self.has_counter:
            return max(0.0, self._e0 - self._energy_now_j()), None
        watts = 0.0
        for d in self.batteries:
            if self.mode == "power_now":
                p = read_number(d / "power_now")
                watts += abs(p) / 1e6 if p is not None else 0.0
            else:
                c, v = read_number(d / "current_now"), read_number(d / "voltage_now")
                watts += abs(c) * v / 1e12 if c is not None and v is not None else 0.0
        return None, watts


# -- Jetson INA3221 -----------------------------------------------------------------------------------

# Labels of a module's input rail: its power includes every other rail, so it is used alone.
JETSON_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


class JetsonMeter(Meter):
    """NVIDIA Jetson power rails, measured by INA3221 shunt monitors, through hwmon sysfs
    (``/sys/class/hwmon/hwmonN`` whose ``name`` is ``ina3221``): ``inK_input`` (mV) x ``currK_input``
    (mA), rail names in ``inK_label``. The module input rail (VDD_IN, POM_5V_IN) is used alone when
    present; otherwise the labelled rails are added."""

    name = "jetson"
    source = "soc-rails"
    interval = 0.1

    def __init__(self, root: str | Path | None = None):
        super().__init__()
        self.root = Path(root) if root else sysfs_root() / "class" / "hwmon"
        rails = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if (read_text(d / "name") or "") not in ("ina3221", "ina3221x"):
                    continue
                for k in range(1, 9):
                    label = read_text(d / f"in{k}_label")
                    if not label or not (d / f"curr{k}_input").exists() or not (d / f"in{k}_input").exists():
                        continue
                    if read_text(d / f"in{k}_enable") == "0":
                        continue
                    rails.append((label, d / f"in{k}_input", d / f"curr{k}_input"))
        if not rails:
            raise MeterUnavailable(f"no INA3221 power rails under {self.root} (not a Jetson, or the ina3221 hwmon driver is not loaded)")
        inputs = [r for r in rails if r[0] in JETSON_INPUT_RAILS]
        self.rails = inputs or rails
        self.all_rails = [r[0] for r in rails]
        self.has_counter = False

    def describe(self) -> str:
        how = "module input rail" if self.rails[0][0] in JETSON_INPUT_RAILS else "sum of rails (no input rail found)"
        return f"Jetson INA3221 {how}: " + " + ".join(r[0] for r in self.rails) + f" ({self.root})"

    def _read(self):
        watts = 0.0
        for _, vf, cf in self.rails:
            v, c = read_number(vf), read_number(cf)
            if v is not None and c is not None:
                watts += v * c / 1e6  # mV x mA -> W
        return None, watts
