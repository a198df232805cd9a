"""A run's outputs: job records (CSV), scores (JSON), the timeline (PNG) and an offline HTML report.

Everything is written into a temporary folder next to ``--out`` and renamed into place at the end,
so an interrupted run leaves no half-written report.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import EdgeInferError
from .scoring import job_quality, job_score

# lane colours, in model order (matplotlib's tab10); late bars get a red edge, drops a red cross
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
MISS = "#d62728"
FIELDS = ["model", "frame", "arrival", "start", "end", "deadline", "ttft_deadline", "dropped", "drop_reason", "late",
          "ok", "rt", "en", "score", "energy_j", "quality", "tokens", "ttft"]


def default_out_dir(name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("scenario-runs") / f"{name}-{stamp}"


def job_rows(jobs) -> list[dict]:
    rows = []
    for j in jobs:
        s = job_score(j)
        r = j.result
        rows.append({
            "model": j.model, "frame": j.frame, "arrival": round(j.arrival, 6),
            "start": None if j.start is None else round(j.start, 6), "end": None if j.end is None else round(j.end, 6),
            "deadline": round(j.deadline, 6),
            "ttft_deadline": None if j.ttft_deadline is None else round(j.ttft_deadline, 6),
            "dropped": j.dropped, "drop_reason": j.drop_reason or None,
            "late": (not j.dropped and j.end is not None and j.end > j.deadline),
            "ok": None if r is None else r.ok,
            "rt": None if s is None else s.rt, "en": None if s is None else s.en, "score": None if s is None else s.value,
            "energy_j": j.energy_j, "quality": job_quality(j),
            "tokens": None if r is None or j.ttft_deadline is None else r.tokens,
            "ttft": None if r is None or r.ttft is None else r.ttft,
        })
    return rows


def draw_timeline(result, path: Path) -> dict:
    """One lane per model (top to bottom in the file's order): completed jobs as bars in the lane's
    colour (a red edge when late), drops as red crosses at their arrival, deadlines as ticks above the
    lane. Returns the axes' pixel geometry so a reader can find a job's bar in the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    models = [m.name for m in result.scenario.models]
    n = len(models)
    span = max([result.duration_s] + [j.end for j in result.jobs if j.end is not None])
    dpi = 100
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.7 * n), dpi=dpi)
    lane_y = {name: n - 1 - i for i, name in enumerate(models)}
    # a 0.5 ms VAD job on a minute-long axis is far below a pixel: every bar is at least 2 px wide
    min_w = 2.0 * span * 1.01 / (fig.get_size_inches()[0] * dpi * 0.85)
    for i, name in enumerate(models):
        y = lane_y[name]
        color = PALETTE[i % len(PALETTE)]
        mine = [j for j in result.jobs if j.model == name]
        done = [j for j in mine if not j.dropped and j.end is not None]
        on_time = [(j.start, max(j.end - j.start, min_w)) for j in done if j.end <= j.deadline]
        late = [(j.start, max(j.end - j.start, min_w)) for j in done if j.end > j.deadline]
        ax.broken_barh(on_time, (y - 0.3, 0.6), facecolors=color, linewidth=0)
        if late:
            ax.broken_barh(late, (y - 0.3, 0.6), facecolors=color, edgecolors=MISS, linewidth=1.5)
        # deadline ticks above the lane; a streaming job's TTFT deadline too, and its first token
        # as a dark line inside its bar
        ticks = [j.deadline for j in mine] + [j.ttft_deadline for j in mine if j.ttft_deadline is not None]
        ax.vlines(ticks, y + 0.32, y + 0.45, colors="black", linewidth=0.6)
        firsts = [j.start + j.result.ttft for j in done if j.ttft_deadline is not None and j.result.ttft is not None]
        if firsts:
            ax.vlines(firsts, y - 0.3, y + 0.3, colors="black", linewidth=1.2)
        drops = [j.arrival for j in mine if j.dropped]
        if drops:
            ax.plot(drops, [y] * len(drops), linestyle="none", marker="x", color=MISS, markersize=7, mew=1.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(models)))
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, span * 1.01)
    ax.set_xlabel("seconds since the scenario started")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Patch(facecolor="white", edgecolor=MISS, linewidth=1.5, label="finished late"),
                       Line2D([], [], color=MISS, marker="x", linestyle="none", label="dropped"),
                       Line2D([], [], color="black", linewidth=0.8, label="deadline (streaming: TTFT and stream)"),
                       Line2D([], [], color="black", linewidth=1.6, label="first token")],
              loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False,
              bbox_transform=fig.transFigure)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=dpi)
    # pixel geometry: data (t, lane) -> PNG pixel (x, y from the top)
    fig.canvas.draw()
    (x0, y0), (x1, y1) = ax.transData.transform([(0, -0.6), (span * 1.01, n - 0.4)])
    height = fig.get_size_inches()[1] * dpi
    plt.close(fig)
    return {"png": path.name, "width": int(round(fig.get_size_inches()[0] * dpi)), "height": int(round(height)),
            "x_px": [x0, x1], "t": [0.0, span * 1.01], "y_px": [height - y0, height - y1], "lane_value": [-0.6, n - 0.4],
            "lanes": {name: {"value": lane_y[name], "color": PALETTE[i % len(PALETTE)]} for i, name in enumerate(models)}}


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_html(result, summary: dict, png: bytes) -> str:
    sc = result.scenario
    s = result.scores
    e = result.energy
    rows = []
    for i, m in enumerate(sc.models):
        v = s["models"][m.name]
        how = f"{m.rate:g} Hz" if m.periodic else f"after {m.after} (p={m.probability:g}{', on trigger' if m.when == 'trigger' else ''})"
        if m.streaming:
            how += f"; TTFT {m.ttft_ms:g} ms, {m.pace_tps:g} tok/s"
        cells = [f'<span class="sw" style="background:{PALETTE[i % len(PALETTE)]}"></span>{html.escape(m.name)}',
                 html.escape(m.kind), html.escape(how), v["frames"], v["completed"], v["dropped"], v["late"],
                 _fmt(v["qoe"]), _fmt(v["rt_mean"]), _fmt(v["en_mean"]), _fmt(v["score"]), _fmt(v["quality"]),
                 _fmt(v["latency_ms_median"], 1), _fmt(v["energy_mj_per_frame"], 1), _fmt(v["energy_j"], 2)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["model", "kind", "schedule", "frames", "completed", "dropped", "late", "QoE", "RT mean", "EN mean",
            "model score", "quality", "median latency ms", "energy mJ/frame", "energy J"]
    energy = ("<p>No energy meter (<code>--meter none</code>): EN is 1 for every job.</p>" if not e else
              f"<p>Meter: {html.escape(str(e['meter']))}. Total {e['total_j']:.2f} J over {e['span_s']:.1f} s; "
              f"attributed to jobs {e['attributed_j']:.2f} J; idle {e['idle_j']:.2f} J. "
              "Each piece of time between job edges has its energy split equally among the jobs running in it.</p>")
    mem = result.memory
    from ..memory import fmt_bytes

    mem_line = (f"<p>Memory plan: {fmt_bytes(mem['total'])} of a {fmt_bytes(mem['budget'])} budget "
                f"({html.escape(mem['budget_source'])}): this process {fmt_bytes(mem['process'])}, "
                + ", ".join(f"{html.escape(k)} {fmt_bytes(b)}" for k, b in mem["models"].items()) + ".</p>") if mem else ""
    img = base64.b64encode(png).decode()
    quality = "" if s["quality"] is None else f' &middot; quality <b id="quality">{s["quality"]:.3f}</b>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgeinfer scenario {html.escape(sc.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1300px; }}
table {{ border-collapse: collapse; margin: 12px 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f2f2f2; }} td:nth-child(-n+3), th:nth-child(-n+3) {{ text-align: left; }}
.sw {{ display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: middle; }}
.score {{ font-size: 28px; }} code {{ background: #f4f4f4; padding: 1px 4px; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} .small {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>Scenario {html.escape(sc.name)}</h1>
<p>{html.escape(sc.description)}</p>
<p class="score">Scenario score <b id="scenario-score">{s['score']:.2f}</b> / 100{quality}</p>
<p class="small">Command: <code>{html.escape(summary['command'])}</code><br>
Started {html.escape(summary['started'])}; {result.duration_s:g} s of arrivals, seed {sc.seed}, ran {result.wall_s:.1f} s.<br>
Machine: {html.escape(summary['machine_line'])}</p>
<h2>Scores</h2>
<table id="scores"><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead><tbody>
{''.join(rows)}
</tbody></table>
<p class="small">Per-frame models: XRBench v0.1 (RT = 1/(1+exp(k(t_done - t_deadline))), k = {s['constants']['k_per_ms']:g}/ms;
EN = (E_max - E)/E_max, E_max = {s['constants']['e_max_mj']:g} mJ; QoE = 1 - dropped/total; model score = sum(RT&middot;EN)/frames &middot; QoE;
scenario score = 100 &middot; mean). Streaming (LLM) jobs: RT = sigmoid on TTFT (k = {s['constants']['k_ttft_per_s']:g}/s) &times; share of
tokens on pace; E_max = {s['constants']['e_max_token_mj']:g} mJ per token. See docs/SCENARIOS.md.</p>
<h2>Timeline</h2>
<img id="timeline" alt="timeline: one lane per model" src="data:image/png;base64,{img}">
<h2>Energy and memory</h2>
{energy}
{mem_line}
</body></html>
"""


def write_outputs(result, out_dir: str | Path | None, command: str) -> Path:
    """Writes jobs.csv, scores.json, timeline.png (+ timeline.json) and report.html; returns the folder."""
    from .. import sysinfo

    out = Path(out_dir) if out_dir else default_out_dir(result.scenario.name)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EdgeInferError(f"--out {out} exists and is not an empty folder; give a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the report is for sharing
    try:
        rows = job_rows(result.jobs)
        with open(tmp / "jobs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: "" if v is None else v for k, v in r.items()})
        geom = draw_timeline(result, tmp / "timeline.png")
        (tmp / "timeline.json").write_text(json.dumps(geom, indent=1))
        m = sysinfo.machine()
        summary = {
            "scenario": result.scenario.name, "source": result.scenario.source, "command": command,
            "started": result.started or _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "duration_s": result.duration_s, "wall_s": result.wall_s, "seed": result.scenario.seed,
            "machine": m, "machine_line": sysinfo.describe(m),
        }
        doc = dict(summary, scores=result.scores, energy=result.energy, memory=result.memory, threads=result.threads)
        (tmp / "scores.json").write_text(json.dumps(doc, indent=1, default=str))
        (tmp / "report.html").write_text(render_html(result, summary, (tmp / "timeline.png").read_bytes()), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
