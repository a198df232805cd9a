"""The HTML report, opened in a real browser (headless Chromium): the timeline is drawn where the jobs
were, and the score table is there.

A synthetic scenario on the virtual clock gives known jobs: bars at known times on known lanes, a
late job, drops. The timeline PNG is checked pixel by pixel at those positions, then found again,
pixel for pixel, in the browser's screenshot of report.html; the score table's text is read from the
browser's DOM.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeinfer.cli import main
from edgeinfer.scenario.report import MISS

SCENARIO = """
name = "report-check"
description = "three lanes: a periodic model with one slow frame, a cascade, a streaming job"
duration = 2.0
seed = 3
[models.camera]
kind = "synthetic"
rate = 5
latency_ms = [120, 420, 120, 120, 120, 120, 120, 120, 120, 120]
[models.reader]
kind = "synthetic"
after = "camera"
latency_ms = 40
[models.summary]
kind = "synthetic"
after = "reader"
probability = 0.5
ttft_ms = 300
pace_tps = 20
max_tokens = 6
first_token_ms = 60
token_ms = 30
"""


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


BROWSER = browser()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium here (apt-get install chromium; make setup-test "
                                                         "installs it as root)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1"]


def hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=int)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    (d / "s.toml").write_text(textwrap.dedent(SCENARIO))
    assert main(["scenario", "run", str(d / "s.toml"), "--virtual", "--out", str(d / "out"), "-q"]) == 0
    return d / "out"


def to_px(geom: dict, t: float, lane: float) -> tuple[int, int]:
    (x0, x1), (t0, t1) = geom["x_px"], geom["t"]
    (y0, y1), (v0, v1) = geom["y_px"], geom["lane_value"]
    return int(round(x0 + (t - t0) / (t1 - t0) * (x1 - x0))), int(round(y0 + (lane - v0) / (v1 - v0) * (y1 - y0)))


def jobs(out: Path) -> list[dict]:
    with open(out / "jobs.csv") as f:
        return list(csv.DictReader(f))


def check_timeline(img: np.ndarray, geom: dict, rows: list[dict], origin=(0, 0)) -> None:
    """Each completed job's bar centre has its lane's colour; each drop has a red cross; the lane is
    blank (white or a faint grid line) between bars."""
    ox, oy = origin
    assert {r["model"] for r in rows} == set(geom["lanes"])
    # lanes top to bottom in the file's order
    ys = [to_px(geom, 0.0, geom["lanes"][m]["value"])[1] for m in ("camera", "reader", "summary")]
    assert ys == sorted(ys) and ys[0] < ys[-1]
    for r in rows:
        lane = geom["lanes"][r["model"]]
        if r["dropped"] == "False":
            x, y = to_px(geom, (float(r["start"]) + float(r["end"])) / 2, lane["value"])
            got = img[oy + y, ox + x, :3].astype(int)
            assert np.abs(got - hex_rgb(lane["color"])).max() <= 12, (r, got)
        else:
            x, y = to_px(geom, float(r["arrival"]), lane["value"])
            patch = img[oy + y - 3:oy + y + 4, ox + x - 3:ox + x + 4, :3].astype(int)
            assert (np.abs(patch - hex_rgb(MISS)).max(axis=2) <= 40).any(), r
    # the camera lane is empty between the on-time job's end at 1.72 s and the next arrival at 1.8 s
    x, y = to_px(geom, 1.77, geom["lanes"]["camera"]["value"])
    assert img[oy + y, ox + x, :3].min() >= 200


def test_timeline_png_has_the_jobs(report):
    geom = json.loads((report / "timeline.json").read_text())
    img = np.asarray(Image.open(report / "timeline.png").convert("RGB"))
    assert img.shape[:2] == (geom["height"], geom["width"])
    rows = jobs(report)
    # the known schedule: camera frame 1 (420 ms at 5 Hz) ends late; frame 2 cannot start by 0.6 s
    cam = {int(r["frame"]): r for r in rows if r["model"] == "camera"}
    assert cam[1]["late"] == "True" and cam[2]["dropped"] == "True"
    assert sum(r["dropped"] == "True" for r in rows) >= 3  # camera 2, and its reader and (maybe) summary
    check_timeline(img, geom, rows)


def test_report_in_chromium(report, tmp_path):
    geom = json.loads((report / "timeline.json").read_text())
    png = np.asarray(Image.open(report / "timeline.png").convert("RGB")).astype(int)
    shot = tmp_path / "shot.png"
    url = (report / "report.html").resolve().as_uri()
    r = subprocess.run([BROWSER, *FLAGS, "--window-size=1400,1600", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    # find the timeline in the screenshot: the first pixel of the legend's red, then the whole image
    def first_red(a):
        ys, xs = np.nonzero(np.abs(a - hex_rgb(MISS)).max(axis=2) <= 2)
        i = np.lexsort((xs, ys))[0]
        return ys[i], xs[i]

    (py, px), (sy, sx) = first_red(png), first_red(img)
    oy, ox = sy - py, sx - px
    assert oy > 0 and ox >= 0
    crop = img[oy:oy + png.shape[0], ox:ox + png.shape[1]]
    assert crop.shape == png.shape, "the timeline is cut off in the screenshot"
    assert np.abs(crop - png).mean() < 1.0  # shown at its own size, pixel for pixel
    check_timeline(img, geom, jobs(report), origin=(ox, oy))

    # the score table sits above the timeline, its colour swatches in the lanes' colours
    above = img[:oy]
    for lane in geom["lanes"].values():
        assert (np.abs(above - hex_rgb(lane["color"])).max(axis=2) <= 3).sum() >= 50, lane

    dom = subprocess.run([BROWSER, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    scores = json.loads((report / "scores.json").read_text())["scores"]
    assert f'id="scenario-score">{scores["score"]:.2f}<' in dom
    table = dom[dom.index('<table id="scores"'):dom.index("</table>")]
    for name, v in scores["models"].items():
        row = table[table.index(name):]
        row = row[:row.index("</tr>")]
        assert f"<td>{v['frames']}</td><td>{v['completed']}</td><td>{v['dropped']}</td>" in row
        assert f"<td>{v['score']:.3f}</td>" in row
