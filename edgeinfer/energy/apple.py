"""macOS meters: IOReport energy counters (through the maintained ``zeus-apple-silicon`` package, no
sudo), the battery's voltage x current from ``ioreg``, and ``powermetrics`` (root) as a cross-check.

The ``ioreg`` and ``powermetrics`` meters run a command and parse its text; the command can be
swapped for one that prints recorded output (``cat FILE``), which is how the tests drive them.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
import threading
import time

from .base import Meter, MeterUnavailable

# -- IOReport via zeus-apple-silicon -----------------------------------------------------------------


class AppleSocMeter(Meter):
    """Apple Silicon energy counters (CPU, GPU, GPU SRAM, ANE, DRAM) from IOReport, read through
    ``zeus_apple_silicon.AppleEnergyMonitor.get_cumulative_energy()`` (millijoules). No sudo. The
    figures are the SoC's own energy model, hence ``soc-estimate``: no display, SSD or board."""

    name = "apple"
    source = "soc-estimate"
    FIELDS = ("cpu_total_mj", "gpu_mj", "gpu_sram_mj", "ane_mj", "dram_mj")

    def __init__(self):
        super().__init__()
        if sys.platform != "darwin":
            raise MeterUnavailable("IOReport energy counters exist on macOS (Apple Silicon) only")
        try:
            from zeus_apple_silicon import AppleEnergyMonitor
        except ImportError:
            raise MeterUnavailable("zeus-apple-silicon is not installed: pip install 'edgeinfer[energy]'") from None
        try:
            self.monitor = AppleEnergyMonitor()
            self._e0 = self._total_mj()
        except Exception as e:  # an Intel Mac, or IOReport refused
            raise MeterUnavailable(f"IOReport energy counters are not readable: {e}") from None

    def _total_mj(self) -> float:
        m = self.monitor.get_cumulative_energy()
        return float(sum(getattr(m, f, None) or 0 for f in self.FIELDS))

    def describe(self) -> str:
        return "Apple IOReport energy counters (CPU + GPU + ANE + DRAM) via zeus-apple-silicon"

    def _read(self):
        return (self._total_mj() - self._e0) / 1e3, None


# -- ioreg AppleSmartBattery ---------------------------------------------------------------------------

_IOREG_LINE = re.compile(r'^\s*"(\w+)" = (.+?)\s*$')


def parse_ioreg(text: str) -> dict:
    """The top-level ``"Key" = value`` pairs of ``ioreg -rn AppleSmartBattery``: integers as ints
    (amperages as signed 64-bit), Yes/No as bools, the rest as text. Nested dictionaries (one line
    each in ioreg's output) stay text."""
    out: dict = {}
    for line in text.splitlines():
        m = _IOREG_LINE.match(line)
        if not m or m.group(1) in out:
            continue
        key, raw = m.groups()
        if re.fullmatch(r"-?\d+", raw):
            v = int(raw)
            if v >= 2**63:  # ioreg prints a negative current as an unsigned 64-bit number
                v -= 2**64
            out[key] = v
        elif raw in ("Yes", "No"):
            out[key] = raw == "Yes"
        else:
            out[key] = raw.strip('"')
    return out


class IoregBatteryMeter(Meter):
    """The Mac battery's discharge power: ``Voltage`` (mV) x ``InstantAmperage`` (mA, negative while
    discharging), from ``ioreg -rn AppleSmartBattery``. On the charger (amperage >= 0) the system
    is not running from the battery and the reading is 0 W (``warning`` says so)."""

    name = "ioreg-battery"
    source = "battery-discharge"
    fast = False  # one ioreg run takes tens of milliseconds
    interval = 0.5
    has_counter = False

    def __init__(self, command: list[str] | None = None):
        super().__init__()
        if command is None:
            if sys.platform != "darwin" or not shutil.which("ioreg"):
                raise MeterUnavailable("ioreg (macOS) is not here")
            command = ["ioreg", "-rn", "AppleSmartBattery"]
        self.command = command
        info = self.info()
        if "Voltage" not in info or not any(k in info for k in ("InstantAmperage", "Amperage")):
            raise MeterUnavailable("ioreg shows no AppleSmartBattery with Voltage and Amperage (a Mac without a battery)")
        if info.get("ExternalConnected") or self.amperage(info) >= 0:
            self.warning = "the Mac is on its charger: the battery is not discharging; unplug it to measure"

    def info(self) -> dict:
        try:
            out = subprocess.run(self.command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MeterUnavailable(f"{self.command[0]} failed: {e}") from None
        return parse_ioreg(out.stdout)

    @staticmethod
    def amperage(info: dict) -> int:
        return info.get("InstantAmperage", info.get("Amperage", 0))

    def discharging(self) -> bool:
        return self.amperage(self.info()) < 0

    def full_charge_joules(self) -> float | None:
        info = self.info()
        mah = info.get("AppleRawMaxCapacity") or info.get("NominalChargeCapacity") or info.get("DesignCapacity")
        mv = info.get("Voltage")
        return mah * 3.6 * mv / 1e3 if mah and mv else None  # mAh x V -> J

    def remaining_joules(self) -> float | None:
        info = self.info()
        mah, mv = info.get("AppleRawCurrentCapacity"), info.get("Voltage")
        return mah * 3.6 * mv / 1e3 if mah and mv else None

    def describe(self) -> str:
        return "Mac battery discharge: Voltage x InstantAmperage from " + " ".join(self.command)

    def _read(self):
        info = self.info()
        amps = self.amperage(info)
        return None, (info.get("Voltage", 0) * -amps / 1e6) if amps < 0 else 0.0


# -- powermetrics ---------------------------------------------------------------------------------------


def parse_powermetrics(chunk: bytes) -> float | None:
    """Watts in one plist sample of ``powermetrics -f plist``: ``processor.combined_power`` (mW), else
    the sum of the CPU, GPU and ANE powers."""
    chunk = chunk.strip(b"\0\n ")
    if not chunk:
        return None
    try:
        d = plistlib.loads(chunk)
    except Exception:
        return None
    proc = d.get("processor", {})
    if "combined_power" in proc:
        return proc["combined_power"] / 1e3
    parts = [proc.get("cpu_power"), proc.get("gpu_power") or d.get("gpu", {}).get("gpu_power"), proc.get("ane_power")]
    parts = [p for p in parts if p is not None]
    return sum(parts) / 1e3 if parts else None


class PowermetricsMeter(Meter):
    """``powermetrics --samplers cpu_power,gpu_power,ane_power -f plist`` (root only) streamed in the
    background; the latest sample's combined power. Apple's own estimate like IOReport's: use it as
    a cross-check of the ``apple`` meter."""

    name = "powermetrics"
    source = "soc-estimate"
    has_counter = False

    def __init__(self, interval_ms: int | str = 200, command: list[str] | None = None):
        super().__init__()
        self.interval = int(interval_ms) / 1e3
        if command is None:
            if sys.platform != "darwin" or not shutil.which("powermetrics"):
                raise MeterUnavailable("powermetrics (macOS) is not here")
            if os.geteuid() != 0:
                raise MeterUnavailable("powermetrics needs root: run with sudo (the apple meter needs no root)")
            command = ["powermetrics", "--samplers", "cpu_power,gpu_power,ane_power", "-i", str(int(interval_ms)), "-f", "plist"]
        self.command = command
        self.watts: float | None = None
        self.samples = 0
        self._got = threading.Event()
        self._ended = threading.Event()
        try:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError as e:
            raise MeterUnavailable(f"{command[0]} failed to start: {e}") from None
        threading.Thread(target=self._pump, name="edgeinfer-powermetrics", daemon=True).start()
        deadline = time.monotonic() + max(5.0, 10 * self.interval)
        while not self._got.wait(0.05) and not self._ended.is_set() and time.monotonic() < deadline:
            pass
        if not self._got.is_set():
            self.close()
            raise MeterUnavailable("powermetrics printed no power sample")

    def _pump(self) -> None:
        buf = b""
        for block in iter(lambda: self.proc.stdout.read1(65536), b""):
            buf += block
            *chunks, buf = buf.split(b"\0")
            for c in chunks:
                self._take(c)
        self._take(buf)
        self._ended.set()

    def _take(self, chunk: bytes) -> None:
        w = parse_powermetrics(chunk)
        if w is not None:
            self.watts = w
            self.samples += 1
            self._got.set()

    def describe(self) -> str:
        return "powermetrics combined CPU + GPU + ANE power (Apple's estimate; root)"

    def _read(self):
        return None, self.watts

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
