"""Each built-in scenario runs end to end through the real CLI (`edgeinfer scenario run NAME`), on the
real models, for a few seconds, and writes its records, scores and report.

The built-ins name the catalog's models (models/NAME); here EDGEINFER_MODELS points at the packages
the session's fixtures converted, so the test needs nothing converted beforehand."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from edgeinfer.scenario.spec import builtin_names, load_scenario

from conftest import cli_env

BUILTINS = builtin_names()  # every built-in, whoever adds one
# Seconds of arrivals: long enough for each cascade to fire at least once (the first spoken question
# ends by about 5.5 s; a new page comes into view at 0 s), short enough for a 2-core test run.
DURATION = {"voice-assistant": 8, "ar-reading": 6, "two-assistants": 6}
# Models that must complete at least this many jobs in that time.
MIN_DONE = {
    "voice-assistant": {"vad": 200, "assistant": 1},
    "ar-reading": {"det": 20, "rec": 1, "vad": 150},
    "two-assistants": {"smollm2": 1, "gemma3": 1},
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, smollm2_package, gemma3_package) -> Path:
    d = tmp_path_factory.mktemp("models")
    (d / "smollm2-135m-instruct").symlink_to(smollm2_package, target_is_directory=True)
    (d / "gemma3-270m").symlink_to(gemma3_package, target_is_directory=True)
    return d


def edgeinfer(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeinfer.cli", *args], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def test_builtins_are_listed():
    assert {"ar-reading", "two-assistants", "voice-assistant"} <= set(BUILTINS)
    out = edgeinfer("scenario", "list")
    assert out.returncode == 0, out.stderr
    for name in BUILTINS:
        assert name in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_runs_end_to_end(name, models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_MODELS", str(models_dir))  # load_scenario below resolves the packages too
    env = cli_env() | {"EDGEINFER_MODELS": str(models_dir)}
    out = tmp_path / "out"
    r = edgeinfer("scenario", "run", name, "--duration", str(DURATION.get(name, 6)), "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("jobs.csv", "scores.json", "report.html", "timeline.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f

    sc = load_scenario(name)
    scores = json.loads((out / "scores.json").read_text())
    models = scores["scores"]["models"]
    assert set(models) == {m.name for m in sc.models}
    assert 0 <= scores["scores"]["score"] <= 100
    for model, least in MIN_DONE.get(name, {}).items():
        assert models[model]["completed"] >= least, (model, models[model])
    for m in sc.models:
        if m.periodic:  # every arrival of a periodic model is accounted for, done or dropped
            got = models[m.name]
            assert got["frames"] == math.ceil(m.rate * DURATION.get(name, 6) - 1e-9)  # arrivals before the end
            assert got["completed"] + got["dropped"] == got["frames"]

    rows = list(csv.DictReader((out / "jobs.csv").open()))
    assert {row["model"] for row in rows} >= set(MIN_DONE.get(name, {}))
    # the real workloads' quality reaches the records: VAD frame accuracy, OCR character accuracy,
    # LLM fluency
    done = [row for row in rows if row["dropped"] == "False" and row["quality"] != ""]
    by_model = {}
    for row in done:
        by_model.setdefault(row["model"], []).append(float(row["quality"]))
    if "vad" in by_model:
        assert sum(by_model["vad"]) / len(by_model["vad"]) >= 0.85
    if "rec" in by_model:
        assert max(by_model["rec"]) >= 0.9
    for m in sc.models:
        if m.kind == "llm" and m.name in by_model:
            assert set(by_model[m.name]) <= {0.0, 1.0}
            assert all(float(row["tokens"]) >= 1 for row in rows if row["model"] == m.name and row["dropped"] == "False")
