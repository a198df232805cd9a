"""Energy meters: parsing and integration against sysfs / ioreg / powermetrics content written into
temporary folders (the meters read whatever root they are given), counter wrap-around, missing and
root-only files, the sampler's integration, the registry and `edgeinfer meters`."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from edgeinfer.energy import (
    BatteryMeter, EstimateMeter, IoregBatteryMeter, JetsonMeter, MeterUnavailable, NvmlMeter, PowerSampler,
    PowermetricsMeter, RaplMeter, Reading, Series, WallFileMeter, list_meters, open_meter, parse_spec,
)
from edgeinfer.energy.apple import parse_ioreg, parse_powermetrics
from edgeinfer.errors import EdgeInferError

ROOT = Path(__file__).resolve().parents[1]


def put(path: Path, value) -> None:
    """Writes a sysfs-style file atomically (a reader never sees it half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def rapl_tree(root: Path, psys: bool = False, max_range: int = 262143328850) -> Path:
    """A powercap tree like a two-socket server's: packages with core and dram subzones, an mmio
    duplicate; optionally a laptop's psys zone."""
    for pkg in (0, 1):
        z = root / f"intel-rapl:{pkg}"
        put(z / "name", f"package-{pkg}")
        put(z / "energy_uj", 1_000_000)
        put(z / "max_energy_range_uj", max_range)
        for sub, name in ((0, "core"), (2, "dram")):
            s = root / f"intel-rapl:{pkg}:{sub}"
            put(s / "name", name)
            put(s / "energy_uj", 500_000)
            put(s / "max_energy_range_uj", max_range)
    put(root / "intel-rapl-mmio:0" / "name", "package-0")
    put(root / "intel-rapl-mmio:0" / "energy_uj", 7)
    if psys:
        put(root / "intel-rapl:2" / "name", "psys")
        put(root / "intel-rapl:2" / "energy_uj", 0)
        put(root / "intel-rapl:2" / "max_energy_range_uj", max_range)
    return root


# -- RAPL -------------------------------------------------------------------------------------------------


def test_rapl_packages_plus_dram_not_core(tmp_path):
    root = rapl_tree(tmp_path / "powercap")
    m = RaplMeter(root)
    assert sorted(z for z, _ in m.zones) == ["dram", "dram", "package-0", "package-1"]
    assert m.source == "package-rapl" and not m.is_estimate
    e0 = m.read().energy_j
    put(root / "intel-rapl:0" / "energy_uj", 3_000_000)  # +2 J
    put(root / "intel-rapl:1" / "energy_uj", 1_500_000)  # +0.5 J
    put(root / "intel-rapl:0:2" / "energy_uj", 750_000)  # +0.25 J
    put(root / "intel-rapl:0:0" / "energy_uj", 9_000_000)  # core: part of the package, not added
    assert m.read().energy_j - e0 == pytest.approx(2.75)


def test_rapl_wraparound(tmp_path):
    root = rapl_tree(tmp_path / "powercap", max_range=4_000_000)
    m = RaplMeter(root)
    mark = m.begin()
    put(root / "intel-rapl:0" / "energy_uj", 3_900_000)  # +2.9 J
    m.read()
    put(root / "intel-rapl:0" / "energy_uj", 400_000)  # wrapped: +0.1 J to the top, +0.4 J after
    assert m.end(mark) == pytest.approx(3.4)


def test_rapl_psys_alone(tmp_path):
    root = rapl_tree(tmp_path / "powercap", psys=True)
    m = RaplMeter(root)
    assert [z for z, _ in m.zones] == ["psys"]
    mark = m.begin()
    put(root / "intel-rapl:0" / "energy_uj", 9_000_000)  # a package: inside psys already
    put(root / "intel-rapl:2" / "energy_uj", 4_000_000)
    assert m.end(mark) == pytest.approx(4.0)


def test_rapl_missing(tmp_path):
    with pytest.raises(MeterUnavailable, match="no RAPL zones"):
        RaplMeter(tmp_path / "nothing")
    (tmp_path / "pc" / "intel-rapl:0").mkdir(parents=True)
    put(tmp_path / "pc" / "intel-rapl:0" / "name", "package-0")
    with pytest.raises(MeterUnavailable, match="energy_uj is missing"):
        RaplMeter(tmp_path / "pc")


def test_rapl_root_only_says_so():
    """energy_uj mode 0400 owned by root (Linux >= 5.10), read by an ordinary user."""
    base = Path(tempfile.mkdtemp(prefix="edgeinfer-rapl-"))
    try:
        os.chmod(base, 0o755)
        root = rapl_tree(base / "powercap")
        for p in root.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(root / "intel-rapl:0" / "energy_uj", 0o400 if os.geteuid() == 0 else 0o000)
        if os.geteuid() != 0:
            with pytest.raises(MeterUnavailable) as e:
                RaplMeter(root)
            msg = str(e.value)
        else:  # root reads anything: ask from a forked child that became nobody
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    RaplMeter(root)
                    os.write(wfd, b"no error")
                except BaseException as exc:  # noqa: BLE001
                    os.write(wfd, str(exc).encode()[:4000])
                os._exit(0)
            os.close(wfd)
            msg = os.read(rfd, 8192).decode()
            os.close(rfd)
            os.waitpid(pid, 0)
        assert "readable by root only" in msg and "chmod a+r" in msg, msg
    finally:
        subprocess.run(["rm", "-rf", str(base)])


# -- battery ---------------------------------------------------------------------------------------------


def battery_tree(root: Path, status="Discharging", power_uw=8_000_000, with_power=True) -> Path:
    b = root / "BAT0"
    put(b / "type", "Battery")
    put(b / "status", status)
    put(b / "present", 1)
    put(b / "voltage_now", 12_000_000)  # 12 V
    put(b / "current_now", 500_000)  # 0.5 A
    if with_power:
        put(b / "power_now", power_uw)
    put(b / "energy_now", 40_000_000)  # 40 Wh
    put(b / "energy_full", 50_000_000)  # 50 Wh
    ac = root / "AC"
    put(ac / "type", "Mains")
    put(ac / "online", 0)
    mouse = root / "hidpp_battery_0"
    put(mouse / "type", "Battery")
    put(mouse / "scope", "Device")
    put(mouse / "power_now", 99_000_000)
    return root


def test_battery_power_now_and_capacity(tmp_path):
    root = battery_tree(tmp_path / "ps")
    m = BatteryMeter(root)
    assert [d.name for d in m.batteries] == ["BAT0"]  # the mouse's battery is not the system's
    assert m.mode == "power_now" and not m.has_counter and m.warning == ""
    assert m.read().power_w == pytest.approx(8.0)
    assert m.full_charge_joules() == pytest.approx(50 * 3600)
    assert m.remaining_joules() == pytest.approx(40 * 3600)


def test_battery_current_times_voltage_and_charging_warning(tmp_path):
    root = battery_tree(tmp_path / "ps", status="Charging", with_power=False)
    put(root / "BAT0" / "current_now", -500_000)  # some drivers sign the current
    m = BatteryMeter(root)
    assert m.mode == "current_now x voltage_now"
    assert m.read().power_w == pytest.approx(6.0)
    assert "not discharging" in m.warning and not m.discharging()


def test_battery_integrates_power_over_a_window(tmp_path):
    root = battery_tree(tmp_path / "ps", power_uw=10_000_000)
    m = BatteryMeter(root)
    m.interval = 0.02
    t0 = time.perf_counter()
    mark = m.begin()
    time.sleep(0.3)
    t1 = time.perf_counter()
    put(root / "BAT0" / "power_now", 20_000_000)
    time.sleep(0.3)
    j = m.end(mark)
    t2 = time.perf_counter()
    # 10 W, then 20 W, give or take one sampling step (0.02 s at 20 W) around the change
    assert 10 * (t1 - t0) + 20 * (t2 - t1) - 0.6 < j < 10 * (t1 - t0) + 20 * (t2 - t1) + 0.2, j


def test_battery_energy_now_counter_and_missing(tmp_path):
    root = tmp_path / "ps"
    b = root / "BAT1"
    put(b / "type", "Battery")
    put(b / "status", "Discharging")
    put(b / "energy_now", 40_000_000)
    m = BatteryMeter(root)
    assert m.has_counter and "coarse" in m.warning
    mark = m.begin()
    put(b / "energy_now", 39_999_000)  # 1 mWh = 3.6 J discharged
    assert m.end(mark) == pytest.approx(3.6)
    with pytest.raises(MeterUnavailable, match="no system battery"):
        BatteryMeter(tmp_path / "empty")


# -- Jetson ----------------------------------------------------------------------------------------------


def jetson_tree(root: Path, with_input=True) -> Path:
    h = root / "hwmon3"
    put(h / "name", "ina3221")
    rails = [("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 400), ("VDD_SOC", 5000, 300)]
    if not with_input:
        rails = rails[1:]
    for k, (label, mv, ma) in enumerate(rails, 1):
        put(h / f"in{k}_label", label)
        put(h / f"in{k}_input", mv)
        put(h / f"curr{k}_input", ma)
    put(h / "in7_label", "sum of shunt voltages")  # no current: not a rail
    put(h / "in7_input", 40)
    other = root / "hwmon0"
    put(other / "name", "cpu_thermal")
    return root


def test_jetson_input_rail_alone(tmp_path):
    m = JetsonMeter(jetson_tree(tmp_path / "hwmon"))
    assert [r[0] for r in m.rails] == ["VDD_IN"] and m.source == "soc-rails"
    assert m.read().power_w == pytest.approx(6.0)  # 5 V x 1.2 A; the other rails are inside it


def test_jetson_sum_of_rails_without_input(tmp_path):
    m = JetsonMeter(jetson_tree(tmp_path / "hwmon", with_input=False))
    assert m.read().power_w == pytest.approx(3.5)
    assert "sum of rails" in m.describe()
    with pytest.raises(MeterUnavailable, match="no INA3221"):
        JetsonMeter(tmp_path / "none")


# -- macOS: ioreg and powermetrics, from recorded output ------------------------------------------------

IOREG = """+-o AppleSmartBattery  <class AppleSmartBattery, id 0x100000265, registered, matched, active, busy 0 (0 ms), retain 7>
    {
      "PostChargeWaitSeconds" = 120
      "ExternalConnected" = No
      "AppleRawCurrentCapacity" = 4123
      "AppleRawMaxCapacity" = 4380
      "DesignCapacity" = 4563
      "Voltage" = 12500
      "BatteryData" = {"Voltage"=11111,"DesignCapacity"=4563}
      "InstantAmperage" = 18446744073709550616
      "Amperage" = 18446744073709550600
      "IsCharging" = No
      "DeviceName" = "bq40z651"
    }
"""


def test_parse_ioreg_signed_current():
    d = parse_ioreg(IOREG)
    assert d["InstantAmperage"] == -1000 and d["Amperage"] == -1016
    assert d["Voltage"] == 12500  # the top-level one, not BatteryData's
    assert d["ExternalConnected"] is False and d["DeviceName"] == "bq40z651"


def test_ioreg_battery_meter(tmp_path):
    f = tmp_path / "ioreg.txt"
    f.write_text(IOREG)
    m = IoregBatteryMeter(command=["cat", str(f)])
    assert m.read().power_w == pytest.approx(12.5)  # 12.5 V x 1.0 A
    assert m.full_charge_joules() == pytest.approx(4380 * 3.6 * 12.5)
    assert m.warning == "" and m.discharging()
    f.write_text(IOREG.replace("18446744073709550616", "1500").replace('"ExternalConnected" = No', '"ExternalConnected" = Yes'))
    m2 = IoregBatteryMeter(command=["cat", str(f)])
    assert m2.read().power_w == 0.0 and "charger" in m2.warning
    f.write_text("+-o AppleSmartBattery\n")
    with pytest.raises(MeterUnavailable, match="no AppleSmartBattery"):
        IoregBatteryMeter(command=["cat", str(f)])


def _pm_sample(**processor) -> bytes:
    return plistlib.dumps({"elapsed_ns": 200_000_000, "processor": processor})


def test_parse_powermetrics():
    assert parse_powermetrics(_pm_sample(combined_power=4321.0, cpu_power=1.0)) == pytest.approx(4.321)
    assert parse_powermetrics(_pm_sample(cpu_power=1500.0, gpu_power=2500.0, ane_power=0.0)) == pytest.approx(4.0)
    assert parse_powermetrics(b"not a plist") is None


def test_powermetrics_meter_streams(tmp_path):
    f = tmp_path / "pm.plist"
    f.write_bytes(b"\0".join([_pm_sample(combined_power=3000.0), _pm_sample(combined_power=5000.0)]) + b"\0")
    m = PowermetricsMeter(command=["cat", str(f)])
    deadline = time.time() + 5
    while m.samples < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert m.samples == 2 and m.read().power_w == pytest.approx(5.0)
    m.close()
    f.write_bytes(b"garbage")
    with pytest.raises(MeterUnavailable, match="no power sample"):
        PowermetricsMeter(interval_ms=10, command=["cat", str(f)])


def test_apple_meters_say_why_not_here():
    if sys.platform == "darwin":
        pytest.skip("on a Mac these meters may work")
    for name in ("apple", "ioreg-battery", "powermetrics"):
        with pytest.raises(MeterUnavailable, match="macOS"):
            open_meter(name)


# -- NVML ------------------------------------------------------------------------------------------------


class RecordedNvml:
    """Replays NVML readings recorded as (energy mJ, power mW) per call: the meter's bookkeeping
    (sums over GPUs, counter resets) runs on it. The real library is checked on a GPU machine
    (benchmarks/energy_nvml_check.py, docs/ENERGY.md)."""

    kind = "recorded"

    def __init__(self, energy: list[list[int]], power_mw: int = 250_000, supported=True):
        self.energy = energy
        self.calls = [0] * len(energy)
        self.power = power_mw
        self.supported = supported

    def count(self):
        return len(self.energy)

    def name(self, i):
        return f"GPU{i}"

    def energy_mj(self, i):
        from edgeinfer.energy.nvml import NvmlNotSupported

        if not self.supported:
            raise NvmlNotSupported()
        v = self.energy[i][min(self.calls[i], len(self.energy[i]) - 1)]
        self.calls[i] += 1
        return v

    def power_mw(self, i):
        return self.power

    def close(self):
        pass


def test_nvml_meter_counter_sum_and_reset():
    lib = RecordedNvml([[1000, 3000, 500], [10_000, 10_500, 11_000]])
    m = NvmlMeter(lib=lib)
    assert m.devices == [0, 1] and m.has_counter
    r1 = m.read()
    assert r1.energy_j == pytest.approx(2.5) and r1.power_w == pytest.approx(500.0)
    r2 = m.read()  # GPU 0 reset (driver reload): its 500 mJ count from 0
    assert r2.energy_j == pytest.approx(2.5 + 0.5 + 0.5)
    one = NvmlMeter(index=1, lib=RecordedNvml([[0], [0, 4000]]))
    assert one.read().energy_j == pytest.approx(4.0)
    with pytest.raises(MeterUnavailable, match="no GPU 3"):
        NvmlMeter(index=3, lib=RecordedNvml([[0]]))


def test_nvml_without_counter_integrates_power():
    m = NvmlMeter(lib=RecordedNvml([[0]], power_mw=100_000, supported=False))
    assert not m.has_counter and "before Volta" in m.warning
    m.interval = 0.02
    t0 = time.perf_counter()
    mark = m.begin()
    time.sleep(0.2)
    j = m.end(mark)
    assert j == pytest.approx(100 * (time.perf_counter() - t0), rel=0.1)  # 100 W x the window


def test_nvml_here_says_no_driver():
    """This machine has no NVIDIA driver: both library paths say so in one line."""
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("an NVIDIA driver is present")
    with pytest.raises(MeterUnavailable, match="libnvidia-ml.so.1 is not loadable"):
        NvmlMeter(lib="ctypes")
    pytest.importorskip("pynvml")
    with pytest.raises(MeterUnavailable, match="NVML could not start"):
        NvmlMeter(lib="pynvml")


# -- the estimate and the wall meter ---------------------------------------------------------------------


def test_estimate_counts_cpu_time_not_sleep():
    m = EstimateMeter(core_watts=10)
    assert m.is_estimate and m.source == "model-estimate" and "ESTIMATE" in m.describe()
    mark = m.begin()
    c0 = time.process_time()
    time.sleep(0.3)
    slept = m.end(mark)
    assert slept < 0.1  # sleeping costs (nearly) no CPU time
    mark = m.begin()
    c0 = time.process_time()
    x, end = 0, time.perf_counter() + 0.3
    while time.perf_counter() < end:
        x += 1
    busy = m.end(mark)
    assert busy == pytest.approx(10 * (time.process_time() - c0), rel=0.1, abs=0.05)
    assert busy > 1.0  # at least ~0.15 s of CPU at 10 W even on a crowded machine
    with pytest.raises(MeterUnavailable, match="numbers"):
        EstimateMeter(core_watts="lots")


def test_wall_file_meter(tmp_path):
    f = tmp_path / "plug.log"
    f.write_text("2026-01-01T10:00:00,41.5\n2026-01-01T10:00:01,42.25\n")
    m = open_meter(f"wall:file={f}")
    assert m.source == "wall" and m.read().power_w == pytest.approx(42.25)
    f.write_text("")
    with pytest.raises(MeterUnavailable, match="no power reading"):
        WallFileMeter(str(f))


# -- sampler and series ----------------------------------------------------------------------------------


def test_series_integration_by_hand():
    power = Series([Reading(0.0, None, 10.0), Reading(1.0, None, 20.0), Reading(2.0, None, 20.0)])
    assert power.joules(0.0, 2.0) == pytest.approx(15 + 20)
    assert power.joules(0.5, 1.5) == pytest.approx((15 + 20) / 2 * 0.5 + 20 * 0.5)  # interpolated 15 W at 0.5 s
    assert power.peak_watts(0.0, 2.0) == 20.0
    counter = Series([Reading(0.0, 0.0, None), Reading(1.0, 10.0, None), Reading(1.5, 12.0, None, mark=True),
                      Reading(2.0, 30.0, None)])
    assert counter.joules(0.5, 1.5) == pytest.approx(7.0)  # 5 (interpolated) -> 12 (the mark)
    assert counter.power == [10.0, 20.0]  # periodic samples only: the mark makes no spike


class _FedClock:
    """The meters' clock in test_sampler_integral_matches_counter, standing in for RAPL's hardware: the
    counter file holds the energy at the very moment it is read, on the time stamp the reading gets.

    It was a writer thread putting 10 W x (now - t0) into the file every 5 ms; but the file then held the
    energy as of the writer's last write, while the reading was stamped when it was read. The counter
    over [a, b] came out 10 W x (b - a + stale(a) - stale(b)): under load the writer (sharing the GIL
    and 2 cores with the sampler, and not yet started at all when the first mark was read) was
    descheduled tens of ms, and 12.76 J came out for 11.998 (76 ms); a sampler descheduled past a
    0.5 s wrap would have lost 5 J. Here each Meter.read() is one step of virtual time: its first
    perf_counter() call (t0) writes the counter for the middle of the read, its second (t1) ends the
    step, so a reading's time and its energy agree exactly however the threads are scheduled, and a
    wrap (every 10 reads) can never be skipped."""

    def __init__(self, path: Path, watts: float, start_uj: int, range_uj: int, step: float):
        self.path, self.watts, self.start_uj, self.range_uj, self.step = path, watts, start_uj, range_uj, step
        self.calls = 0
        self.uj: list[int] = []  # every value written, in order
        put(path, start_uj)  # the value RaplMeter opens on: virtual time 0

    def perf_counter(self) -> float:
        # Only Meter.read() calls it, twice per read, under the meter's lock: t0 = k * step, t1 = t0 + step / 2.
        k, second = divmod(self.calls, 2)
        self.calls += 1
        t = k * self.step + (0.5 * self.step if second else 0.0)
        if not second:
            v = int(round(self.start_uj + self.watts * 1e6 * (t + 0.25 * self.step))) % self.range_uj
            put(self.path, v)
            self.uj.append(v)
        return t

    def __getattr__(self, name):  # the rest of the time module
        return getattr(time, name)


def test_sampler_integral_matches_counter(tmp_path, monkeypatch):
    """A RAPL tree at 10 W, with a small range so that it wraps every 0.5 s (every 10 reads on the meter's
    virtual clock, _FedClock): the counter and the sampled power agree, and both say 10 W, exactly."""
    from edgeinfer.energy import base

    root = rapl_tree(tmp_path / "powercap", max_range=5_000_000)
    for z in ("intel-rapl:1", "intel-rapl:0:2", "intel-rapl:1:2"):
        subprocess.run(["rm", "-rf", str(root / z)])
    clock = _FedClock(root / "intel-rapl:0" / "energy_uj", watts=10.0, start_uj=1_000_000, range_uj=5_000_000, step=0.05)
    m = RaplMeter(root)
    monkeypatch.setattr(base, "time", clock)
    with PowerSampler(m, interval=0.01) as s:
        a = s.mark()
        deadline = time.monotonic() + 60
        while sum(not r.mark for r in s.series().readings) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        b = s.mark()
    series = s.series()
    assert sum(not r.mark for r in series.readings) >= 40, "the sampler read fewer than 40 times in 60 s"
    assert sum(y < x for x, y in zip(clock.uj, clock.uj[1:])) >= 3  # the counter wrapped, more than once
    assert b - a >= 40 * clock.step
    assert series.counter_joules(a, b) == pytest.approx(10 * (b - a), abs=1e-5)
    assert series.power_joules(a, b) == pytest.approx(series.counter_joules(a, b), abs=1e-5)
    assert series.power == pytest.approx([10.0] * len(series.power), abs=1e-3)
    assert all(series.avg_watts(x.t, y.t) == pytest.approx(10.0, abs=1e-3) for x, y in zip(series.readings, series.readings[1:]) if y.t > x.t)


# -- registry and CLI ------------------------------------------------------------------------------------


def test_parse_spec_and_errors():
    assert parse_spec("rapl:root=/x") == ("rapl", {"root": "/x"})
    assert parse_spec("estimate:core_watts=6,base_watts=1") == ("estimate", {"core_watts": "6", "base_watts": "1"})
    with pytest.raises(EdgeInferError, match="unknown meter 'joulemeter'"):
        parse_spec("joulemeter")
    with pytest.raises(EdgeInferError, match="bad option 'volts=3'"):
        parse_spec("rapl:volts=3")
    assert open_meter("none") is None
    with pytest.raises(MeterUnavailable, match="meter rapl is not available here"):
        open_meter("rapl:root=/nonexistent")


def test_auto_on_this_machine_is_labelled():
    m = open_meter("auto")
    rows = {r["name"]: r for r in list_meters()}
    assert rows[m.name]["available"]
    if m.name == "estimate":
        assert m.is_estimate and rows["rapl"]["available"] is False and rows["rapl"]["detail"]


def test_cli_meters_lists_and_picks(tmp_path, monkeypatch, capsys):
    from edgeinfer.cli import main

    sysfs = tmp_path / "sys"
    rapl_tree(sysfs / "class" / "powercap")
    battery_tree(sysfs / "class" / "power_supply")
    monkeypatch.setenv("EDGEINFER_SYSFS", str(sysfs))
    assert main(["meters"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "available" in lines["rapl"] and "package-0" in lines["rapl"]
    assert "available" in lines["battery"] and "not here" in lines["jetson"]
    assert out.strip().endswith("auto picks: rapl (package-rapl)")
    assert main(["meters", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["auto"] == "rapl"
