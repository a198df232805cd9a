"""Real-counter check of edgeinfer's NVML meter and power sampler on an NVIDIA GPU.

Runs a PyTorch matmul workload with idle, full-load and on/off phases while ``PowerSampler`` samples
``NvmlMeter`` every 0.1 s, then compares the trapezoidal integral of the sampled power readings
(``nvmlDeviceGetPowerUsage``) with the NVML energy counter (``nvmlDeviceGetTotalEnergyConsumption``)
over the whole run and over each phase. Two independent NVML readings, so agreement tests the sampler
and the integration, not a tautology. Also reads the counter through the ctypes fallback (no
nvidia-ml-py) and through ``begin()/end()`` (the ``Model.meter`` contract) for the same window.

    python3 benchmarks/energy_nvml_check.py [--out DIR] [--idle 5] [--load 15] [--duty 12]

Exit status 1 when the whole-run integral and the counter differ by 5% or more.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeinfer.energy import NvmlMeter, PowerSampler  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for nvml_check.json and nvml_power.csv")
    ap.add_argument("--idle", type=float, default=5.0, help="idle seconds before and after (default 5)")
    ap.add_argument("--load", type=float, default=15.0, help="seconds of back-to-back matmuls (default 15)")
    ap.add_argument("--duty", type=float, default=12.0, help="seconds of 0.5 s on / 0.5 s off (default 12)")
    ap.add_argument("--n", type=int, default=8192, help="matrix size (default 8192)")
    a = ap.parse_args()

    import torch

    dev = torch.device("cuda")
    x = torch.randn(a.n, a.n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(a.n, a.n, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()

    def busy(seconds: float) -> int:
        """Matmuls until ``seconds`` pass; returns how many."""
        k, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(20):
                z = x @ y
            torch.cuda.synchronize()
            k += 20
        del z
        return k

    meter = NvmlMeter(index=0, lib="pynvml")
    ctypes_meter = NvmlMeter(index=0, lib="ctypes")
    print(f"meter: {meter.label()}: {meter.describe()}")
    print(f"cross-check meter: {ctypes_meter.describe()}")
    sampler = PowerSampler(meter, interval=0.1).start()
    phases = []
    t_start = sampler.mark()
    c0 = ctypes_meter.read()
    window = meter.begin()

    def phase(name, fn):
        t0 = sampler.mark()
        info = fn()
        t1 = sampler.mark()
        phases.append({"phase": name, "t0": t0, "t1": t1, **(info or {})})

    phase("idle-before", lambda: time.sleep(a.idle))
    phase("full-load", lambda: {"matmuls": busy(a.load)})

    def duty():
        k, end = 0, time.perf_counter() + a.duty
        while time.perf_counter() < end:
            k += busy(0.5)
            time.sleep(0.5)
        return {"matmuls": k}

    phase("on-off-0.5s", duty)
    phase("idle-after", lambda: time.sleep(a.idle))
    window_j = meter.end(window)
    c1 = ctypes_meter.read()
    t_end = sampler.mark()
    s = sampler.stop()

    def cmp(t0, t1):
        counter = s.counter_joules(t0, t1)
        power = s.power_joules(t0, t1)
        return counter, power, 100 * (power - counter) / counter if counter else float("nan")

    rows = []
    for p in phases:
        counter, power, d = cmp(p["t0"], p["t1"])
        rows.append({**p, "seconds": p["t1"] - p["t0"], "counter_j": counter, "integrated_power_j": power, "diff_pct": d,
                     "avg_w": counter / (p["t1"] - p["t0"]), "peak_w": s.peak_watts(p["t0"], p["t1"])})
    counter, power, diff = cmp(t_start, t_end)
    ctypes_j = c1.energy_j - c0.energy_j
    flops = 2 * a.n**3 * sum(p.get("matmuls", 0) for p in phases)

    print(f"\n{'phase':<13} {'s':>6} {'counter J':>10} {'sum P dt J':>10} {'diff':>7} {'avg W':>7} {'peak W':>7}")
    for r in rows:
        print(f"{r['phase']:<13} {r['seconds']:6.2f} {r['counter_j']:10.1f} {r['integrated_power_j']:10.1f} "
              f"{r['diff_pct']:+6.2f}% {r['avg_w']:7.1f} {r['peak_w']:7.1f}")
    print(f"{'whole run':<13} {t_end - t_start:6.2f} {counter:10.1f} {power:10.1f} {diff:+6.2f}%")
    print(f"\nsamples: {len(s.readings)} readings ({len(s.power)} power readings) over {t_end - t_start:.1f} s")
    print(f"NVML energy counter via nvidia-ml-py (sampler): {counter:.1f} J")
    print(f"NVML energy counter via ctypes (no bindings):   {ctypes_j:.1f} J  (read just outside the window)")
    print(f"meter.begin()/end() (the Model.meter contract):  {window_j:.1f} J")
    print(f"integrated power series (trapezoids, 0.1 s):    {power:.1f} J  -> {diff:+.2f}% vs the counter")
    print(f"work: {flops / 1e15:.0f} PFLOP bf16 matmul -> {flops / 1e12 / counter:.2f} TFLOP per joule of GPU energy")
    ok = abs(diff) < 5.0
    print(f"\nagreement within 5%: {'PASS' if ok else 'FAIL'} ({diff:+.2f}%)")

    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "nvml_power.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_s", "energy_j", "power_w", "mark"])
            for r in s.readings:
                w.writerow([f"{r.t - t_start:.4f}", f"{r.energy_j:.3f}", f"{r.power_w:.2f}", int(r.mark)])
        summary = {"meter": meter.describe(), "source": meter.source, "phases": [{k: v for k, v in r.items() if k not in ("t0", "t1")} | {"start_s": r["t0"] - t_start, "end_s": r["t1"] - t_start} for r in rows],
                   "whole_run": {"seconds": t_end - t_start, "counter_j": counter, "integrated_power_j": power, "diff_pct": diff,
                                 "ctypes_counter_j": ctypes_j, "begin_end_j": window_j},
                   "gpu": meter.names, "torch": torch.__version__, "pass": ok}
        (out / "nvml_check.json").write_text(json.dumps(summary, indent=2))
    meter.close()
    ctypes_meter.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
