"""Plots the power series of benchmarks/energy_nvml_check.py (nvml_power.csv + nvml_check.json):
the NVML power readings, the energy counter's derivative, and the phases shaded.

    python benchmarks/energy_nvml_plot.py docs/energy/nvml_power_h100.csv docs/energy/nvml_check_h100.json docs/energy/nvml_h100.png
"""

from __future__ import annotations

import csv
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(csv_path: str, json_path: str, png: str) -> None:
    rows = [r for r in csv.DictReader(open(csv_path)) if r["mark"] == "0"]
    t = [float(r["t_s"]) for r in rows]
    p = [float(r["power_w"]) for r in rows]
    e = [float(r["energy_j"]) for r in rows]
    d = [(e[i + 1] - e[i]) / (t[i + 1] - t[i]) for i in range(len(t) - 1)]
    info = json.load(open(json_path))
    fig, ax = plt.subplots(figsize=(10, 4))
    colors = {"idle-before": "grey", "full-load": "tab:red", "on-off-0.5s": "tab:orange", "idle-after": "grey"}
    for ph in info["phases"]:
        ax.axvspan(ph["start_s"], ph["end_s"], color=colors.get(ph["phase"], "tab:blue"), alpha=0.12, lw=0)
        ax.text((ph["start_s"] + ph["end_s"]) / 2, 1.0, f"{ph['phase']}\n{ph['diff_pct']:+.1f}%", ha="center", va="top",
                fontsize=7, transform=ax.get_xaxis_transform())
    ax.plot([(t[i] + t[i + 1]) / 2 for i in range(len(d))], d, color="tab:blue", lw=0.7, label="energy counter, d/dt")
    ax.plot(t, p, color="black", lw=1.0, label="nvmlDeviceGetPowerUsage (sampled, 0.1 s)")
    w = info["whole_run"]
    ax.set_title(f"{info['gpu'][0]}: integrated power {w['integrated_power_j']:.0f} J vs energy counter "
                 f"{w['counter_j']:.0f} J ({w['diff_pct']:+.2f}%)", fontsize=9)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("watts")
    ax.legend(loc="center right", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:4])
