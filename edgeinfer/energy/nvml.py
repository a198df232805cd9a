"""NVIDIA GPUs through NVML: the board's total energy counter (mJ since the driver loaded; Volta and
newer) and its power reading (mW). Uses the ``nvidia-ml-py`` bindings (``pynvml``) when installed,
otherwise calls ``libnvidia-ml.so.1`` through ctypes: the driver ships that library, so a machine
with a driver and no Python bindings still measures.
"""

from __future__ import annotations

import ctypes
import sys

from .base import Meter, MeterUnavailable

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3


class NvmlNotSupported(Exception):
    pass


class PynvmlLib:
    """The official bindings."""

    kind = "nvidia-ml-py"

    def __init__(self):
        try:
            import pynvml
        except ImportError as e:
            raise MeterUnavailable("nvidia-ml-py is not installed") from e
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise MeterUnavailable(f"NVML could not start: {e} (no NVIDIA driver or GPU here)") from None
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def count(self) -> int:
        return len(self.handles)

    def name(self, i: int) -> str:
        n = self.nv.nvmlDeviceGetName(self.handles[i])
        return n.decode() if isinstance(n, bytes) else n

    def energy_mj(self, i: int) -> int:
        try:
            return int(self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handles[i]))
        except self.nv.NVMLError_NotSupported:
            raise NvmlNotSupported() from None

    def power_mw(self, i: int) -> int:
        return int(self.nv.nvmlDeviceGetPowerUsage(self.handles[i]))

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:
            pass


class CtypesLib:
    """The same five calls, straight into the driver's library."""

    kind = "ctypes"

    def __init__(self, library: str = "libnvidia-ml.so.1"):
        if sys.platform == "win32":
            library = "nvml.dll"
        try:
            self.lib = ctypes.CDLL(library)
        except OSError:
            raise MeterUnavailable(f"{library} is not loadable: no NVIDIA driver here") from None
        L = self.lib
        L.nvmlErrorString.restype = ctypes.c_char_p
        self._check(L.nvmlInit_v2(), "nvmlInit_v2")
        n = ctypes.c_uint(0)
        self._check(L.nvmlDeviceGetCount_v2(ctypes.byref(n)), "nvmlDeviceGetCount_v2")
        self.handles = []
        for i in range(n.value):
            h = ctypes.c_void_p()
            self._check(L.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(h)), "nvmlDeviceGetHandleByIndex_v2")
            self.handles.append(h)

    def _check(self, rc: int, what: str) -> None:
        if rc == NVML_ERROR_NOT_SUPPORTED:
            raise NvmlNotSupported()
        if rc != NVML_SUCCESS:
            msg = self.lib.nvmlErrorString(rc)
            raise MeterUnavailable(f"NVML {what} failed: {msg.decode() if msg else rc}")

    def count(self) -> int:
        return len(self.handles)

    def name(self, i: int) -> str:
        buf = ctypes.create_string_buffer(96)
        self._check(self.lib.nvmlDeviceGetName(self.handles[i], buf, ctypes.c_uint(96)), "nvmlDeviceGetName")
        return buf.value.decode()

    def energy_mj(self, i: int) -> int:
        v = ctypes.c_ulonglong(0)
        self._check(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handles[i], ctypes.byref(v)), "nvmlDeviceGetTotalEnergyConsumption")
        return v.value

    def power_mw(self, i: int) -> int:
        v = ctypes.c_uint(0)
        self._check(self.lib.nvmlDeviceGetPowerUsage(self.handles[i], ctypes.byref(v)), "nvmlDeviceGetPowerUsage")
        return v.value

    def close(self) -> None:
        self.lib.nvmlShutdown()


def open_nvml_lib(lib: str = "auto"):
    """``auto``: nvidia-ml-py when installed, else ctypes; or ``pynvml`` / ``ctypes`` explicitly."""
    if lib == "pynvml":
        return PynvmlLib()
    if lib == "ctypes":
        return CtypesLib()
    if lib != "auto":
        raise MeterUnavailable(f"nvml lib must be auto, pynvml or ctypes, not {lib!r}")
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return CtypesLib()
    return PynvmlLib()


class NvmlMeter(Meter):
    """Energy of the chosen GPUs (default: all), from the energy counter; power from
    ``nvmlDeviceGetPowerUsage`` (on recent GPUs an average over the last second), an independent
    reading used for the power series. GPUs without the counter (before Volta) fall back to
    integrating power."""

    name = "nvml"
    source = "gpu-nvml"
    interval = 0.1

    def __init__(self, index: str | int | None = None, lib="auto"):
        super().__init__()
        self.lib = open_nvml_lib(lib) if isinstance(lib, str) else lib
        n = self.lib.count()
        if n == 0:
            raise MeterUnavailable("NVML sees no GPU")
        if index in (None, "", "all"):
            self.devices = list(range(n))
        else:
            try:
                self.devices = [int(x) for x in str(index).split("+")]
            except ValueError:
                raise MeterUnavailable(f"nvml index must be a GPU number (or 0+1), not {index!r}") from None
            bad = [i for i in self.devices if not 0 <= i < n]
            if bad:
                raise MeterUnavailable(f"no GPU {bad[0]}: NVML sees {n}")
        self.names = [self.lib.name(i) for i in self.devices]
        try:
            self._last = [self.lib.energy_mj(i) for i in self.devices]
            self.has_counter = True
        except NvmlNotSupported:
            self.has_counter = False
            self.warning = "this GPU has no NVML energy counter (before Volta): energy integrates the power reading"
        self._acc_mj = 0.0

    def describe(self) -> str:
        what = "energy counter + power reading" if self.has_counter else "power reading (no energy counter)"
        gpus = ", ".join(f"{i}: {n}" for i, n in zip(self.devices, self.names))
        return f"NVML {what} via {self.lib.kind}; GPU {gpus}"

    def _read(self):
        watts = sum(self.lib.power_mw(i) for i in self.devices) / 1e3
        if not self.has_counter:
            return None, watts
        for k, i in enumerate(self.devices):
            v = self.lib.energy_mj(i)
            delta = v - self._last[k]
            self._acc_mj += delta if delta >= 0 else v  # a reset (driver reload) restarts at 0
            self._last[k] = v
        return self._acc_mj / 1e3, watts

    def close(self) -> None:
        self.lib.close()
