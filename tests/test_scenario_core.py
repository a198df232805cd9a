"""The scenario runner's core: scheduler, cascades, scores, energy split and validation.

The scheduler runs on the fake clock with synthetic models of known latency, so every arrival, start,
end, drop and score below is computed by hand from the rules in edgeinfer/scenario/scheduler.py and
scoring.py. One test runs the real clock (threads, a real meter) for a second.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeinfer.cli import main
from edgeinfer.energy.base import Reading
from edgeinfer.energy.sampler import Series
from edgeinfer.errors import EdgeInferError
from edgeinfer.scenario.runner import run_scenario, split_energy
from edgeinfer.scenario.scheduler import FakeClock, Job, Scheduler
from edgeinfer.scenario.scoring import model_scores, rt_score, scenario_scores
from edgeinfer.scenario.spec import load_scenario
from edgeinfer.scenario.workload import FrameResult, make_workload

from conftest import cli_env


def write(tmp_path: Path, body: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def run_fake(path: Path, duration: float | None = None) -> list[Job]:
    sc = load_scenario(path)
    wl = {m.name: make_workload(m, sc) for m in sc.models}
    return Scheduler(sc, wl, FakeClock(), duration_s=duration).run()


def rows(jobs, model):
    return [(j.frame, round(j.arrival, 6), None if j.start is None else round(j.start, 6),
             None if j.end is None else round(j.end, 6), round(j.deadline, 6), j.drop_reason or None)
            for j in sorted((j for j in jobs if j.model == model), key=lambda j: j.frame)]


# -- scheduler ---------------------------------------------------------------------------------------------


def test_periodic_deadlines_and_drops(tmp_path):
    """10 Hz, frame 0 takes 250 ms: it runs late to completion; frame 1 (deadline 0.2 s) cannot start
    before 0.25 s and is dropped; frame 2 starts late at 0.25 s and ends exactly at its deadline."""
    p = write(tmp_path, """
        duration = 0.5
        [models.cam]
        kind = "synthetic"
        rate = 10
        latency_ms = [250, 50, 50, 50, 50]
    """)
    jobs = run_fake(p)
    assert rows(jobs, "cam") == [
        (0, 0.0, 0.0, 0.25, 0.1, None),
        (1, 0.1, None, None, 0.2, "late"),
        (2, 0.2, 0.25, 0.3, 0.3, None),
        (3, 0.3, 0.3, 0.35, 0.4, None),
        (4, 0.4, 0.4, 0.45, 0.5, None),
    ]
    s = model_scores(jobs)
    assert (s["frames"], s["completed"], s["dropped"], s["late"]) == (5, 4, 1, 1)
    # RT: frame 0 is 150 ms late (0), frame 2 on the deadline (0.5), frames 3-4 50 ms early (1)
    assert s["score"] == pytest.approx((0.0 + 0.5 + 1.0 + 1.0) / 5 * (4 / 5), abs=1e-9)


def test_cascade_shares_deadline_and_dependants_drop_with_upstream(tmp_path):
    p = write(tmp_path, """
        duration = 0.4
        [models.det]
        kind = "synthetic"
        rate = 10
        latency_ms = [60, 150, 60, 60]
        [models.rec]
        kind = "synthetic"
        after = "det"
        latency_ms = 30
        [models.llm]
        kind = "synthetic"
        after = "rec"
        ttft_ms = 100
        pace_tps = 50
        max_tokens = 3
        first_token_ms = 20
        token_ms = 10
    """)
    jobs = run_fake(p)
    assert rows(jobs, "det") == [
        (0, 0.0, 0.0, 0.06, 0.1, None),
        (1, 0.1, 0.1, 0.25, 0.2, None),  # late: its dependants arrive after the shared deadline
        (2, 0.2, 0.25, 0.31, 0.3, None),
        (3, 0.3, 0.31, 0.37, 0.4, None),
    ]
    # rec arrives when det completes and keeps det's deadline
    assert rows(jobs, "rec") == [
        (0, 0.06, 0.06, 0.09, 0.1, None),
        (1, 0.25, None, None, 0.2, "late"),
        (2, 0.31, None, None, 0.3, "late"),
        (3, 0.37, 0.37, 0.4, 0.4, None),
    ]
    # llm: its own TTFT deadline (arrival + 100 ms) and stream deadline (+ 3 tokens / 50 tok/s = 60 ms);
    # the jobs of dropped rec frames are recorded as dropped with reason "upstream"
    assert rows(jobs, "llm") == [
        (0, 0.09, 0.09, 0.13, 0.25, None),
        (1, 0.25, None, None, 0.41, "upstream"),
        (2, 0.31, None, None, 0.47, "upstream"),
        (3, 0.4, 0.4, 0.44, 0.56, None),
    ]
    llm0 = next(j for j in jobs if j.model == "llm" and j.frame == 0)
    assert llm0.ttft_deadline == pytest.approx(0.19) and llm0.result.token_times == pytest.approx([0.02, 0.03, 0.04])


def test_cascade_probability_is_seeded_and_close_to_p(tmp_path):
    body = """
        duration = 200
        seed = {seed}
        [models.vad]
        kind = "synthetic"
        rate = 10
        latency_ms = 1
        [models.asr]
        kind = "synthetic"
        after = "vad"
        probability = 0.3
        latency_ms = 1
    """
    fired = {}
    for seed, name in ((7, "a.toml"), (7, "b.toml"), (8, "c.toml")):
        jobs = run_fake(write(tmp_path, body.format(seed=seed), name))
        fired[name] = [j.frame for j in jobs if j.model == "asr"]
    assert fired["a.toml"] == fired["b.toml"]  # same seed, same cascades
    assert fired["a.toml"] != fired["c.toml"]
    share = len(fired["a.toml"]) / 2000
    assert abs(share - 0.3) < 0.03  # 2000 draws: sd 0.010


def test_trigger_condition_and_failed_frames(tmp_path):
    """when = "trigger": only frames whose FrameResult.trigger is True fire (every 4th here); a frame
    that failed its task (ok False) fires nothing and scores quality 0."""
    p = write(tmp_path, """
        duration = 1.6
        [models.vad]
        kind = "synthetic"
        rate = 10
        latency_ms = 5
        trigger_every = 4
        fail_every = 8
        quality = 0.9
        [models.llm]
        kind = "synthetic"
        after = "vad"
        when = "trigger"
        ttft_ms = 500
        max_tokens = 2
    """)
    jobs = run_fake(p)
    assert [j.frame for j in jobs if j.model == "llm"] == [3, 11]  # 7 and 15 failed (every 8th)
    vad = model_scores([j for j in jobs if j.model == "vad"])
    assert vad["quality"] == pytest.approx((14 * 0.9 + 2 * 0.0) / 16)


# -- scores ------------------------------------------------------------------------------------------------


def _job(model, end, deadline, energy_mj, dropped=False):
    j = Job(model, 0, 0.0, deadline, dropped=dropped)
    if not dropped:
        j.start, j.end, j.result = 0.0, end, FrameResult()
        j.energy_j = energy_mj / 1000.0
    return j


def test_xrbench_scores_hand_computed():
    """RT with k = 15/ms: 0.1 ms early -> 1/(1+e^-1.5) = 0.817574, on time -> 0.5, 0.1 ms late ->
    0.182426; EN with E_max 1500 mJ: 150 mJ -> 0.9, 750 -> 0.5, 0 -> 1. One of four frames dropped:
    model score = (0.817574*0.9 + 0.5*0.5 + 0.182426*1) / 4 * 0.75 = 0.219045."""
    a = [_job("a", 0.0999, 0.1, 150), _job("a", 0.1, 0.1, 750), _job("a", 0.1001, 0.1, 0), _job("a", 0, 0.1, 0, dropped=True)]
    b = [_job("b", 0.0, 1.0, 0)]
    assert rt_score(0.0999, 0.1) == pytest.approx(0.817574, abs=1e-6)
    assert rt_score(0.1001, 0.1) == pytest.approx(0.182426, abs=1e-6)
    s = scenario_scores(a + b, ["a", "b"])
    assert s["models"]["a"]["qoe"] == 0.75
    assert s["models"]["a"]["score"] == pytest.approx(0.219045, abs=1e-6)
    assert s["models"]["b"]["score"] == pytest.approx(1.0)
    assert s["score"] == pytest.approx(100 * (0.219045 + 1.0) / 2, abs=1e-4)
    # energy beyond E_max: EN clamps at 0 instead of going negative
    assert model_scores([_job("c", 0.0, 1.0, 3000)])["score"] == 0.0


def test_streaming_score_hand_computed():
    """TTFT 40 ms after a 100 ms deadline -> RT_ttft = 1/(1+e^(50*0.04)) = 0.119203; tokens at 0.14,
    0.30, 0.35, 0.70 s after start with pace 5 tok/s: token j is due at 0.14 + j*0.2 -> 0.34 (0.30 on
    pace), 0.54 (0.35 on pace), 0.74 (0.70 on pace): share 1. Energy 600 mJ for 4 tokens, E_max 2000:
    EN 0.7."""
    j = Job("llm", 0, 0.0, 10.0, ttft_deadline=0.1, pace_tps=5.0, planned_tokens=4)
    j.start, j.end = 0.0, 0.70
    j.result = FrameResult(ttft=0.14, tokens=4, token_times=[0.14, 0.30, 0.35, 0.70])
    j.energy_j = 0.6
    s = model_scores([j])
    assert s["rt_mean"] == pytest.approx(1 / (1 + math.exp(2.0)), abs=1e-9)
    assert s["en_mean"] == pytest.approx(0.7)
    # the last token at 0.80 misses its slot (0.74): 2 of 3 on pace
    j.result = FrameResult(ttft=0.14, tokens=4, token_times=[0.14, 0.30, 0.35, 0.80])
    j.end = 0.80
    assert model_scores([j])["rt_mean"] == pytest.approx(1 / (1 + math.exp(2.0)) * 2 / 3, abs=1e-9)
    # cut at the stream deadline after 2 of 4 planned tokens: the 2 missing ones count as late
    j.result = FrameResult(ttft=0.14, tokens=2, token_times=[0.14, 0.30])
    j.end = j.deadline = 0.30
    assert model_scores([j])["rt_mean"] == pytest.approx(1 / (1 + math.exp(2.0)) * 1 / 3, abs=1e-9)


def test_energy_split_hand_computed():
    """Counter readings 0 J at t=0, 10 J at t=1, 14 J at t=2, 14.5 J at t=3. Jobs A [0, 1.5],
    B [0.5, 2], C [2.5, 3]: [0, 0.5] A alone 5 J; [0.5, 1] both 5 J -> 2.5 each; [1, 1.5] both
    2 J -> 1 each; [1.5, 2] B alone 2 J; [2, 2.5] idle 0.25 J; [2.5, 3] C 0.25 J."""
    series = Series([Reading(0.0, 0.0, None), Reading(1.0, 10.0, None), Reading(2.0, 14.0, None), Reading(3.0, 14.5, None)])
    jobs = []
    for name, a, b in (("A", 0.0, 1.5), ("B", 0.5, 2.0), ("C", 2.5, 3.0)):
        j = Job(name, 0, a, b)
        j.start, j.end, j.result = a, b, FrameResult()
        jobs.append(j)
    dropped = Job("D", 0, 0.0, 1.0, dropped=True)
    instant = Job("E", 0, 1.0, 2.0)
    instant.start = instant.end = 1.0  # zero length: no share, and it must not stay "running"
    instant.result = FrameResult()
    attributed = split_energy(series.joules, jobs + [dropped, instant])
    assert [j.energy_j for j in jobs] == pytest.approx([8.5, 5.5, 0.25])
    assert instant.energy_j == 0.0
    assert dropped.energy_j is None
    assert attributed == pytest.approx(14.25)  # 14.5 J total less 0.25 J idle


def test_fake_clock_energy_from_stated_watts(tmp_path):
    p = write(tmp_path, """
        duration = 0.3
        [models.m]
        kind = "synthetic"
        rate = 10
        latency_ms = 20
        watts = 30
    """)
    r = run_scenario(load_scenario(p), fake_clock=True, progress=False)
    v = r.scores["models"]["m"]
    assert v["energy_mj_per_frame"] == pytest.approx(600.0)  # 30 W x 20 ms
    assert v["en_mean"] == pytest.approx(0.6)  # (1500 - 600) / 1500
    assert v["score"] == pytest.approx(0.6)


# -- the real clock ----------------------------------------------------------------------------------------


def test_real_clock_run_writes_records(tmp_path):
    """One second on worker threads with the estimate meter: the latencies are the stated ones, an
    overloaded model drops frames, and the job records, scores and report are written."""
    p = write(tmp_path, """
        duration = 1.0
        meter = "estimate"
        [models.fast]
        kind = "synthetic"
        rate = 20
        latency_ms = 10
        spin = true
        [models.slow]
        kind = "synthetic"
        rate = 10
        latency_ms = 250
    """)
    out = tmp_path / "out"
    assert main(["scenario", "run", str(p), "--out", str(out), "-q"]) == 0
    doc = json.loads((out / "scores.json").read_text())
    fast, slow = doc["scores"]["models"]["fast"], doc["scores"]["models"]["slow"]
    assert fast["frames"] == 20 and 9.5 <= fast["latency_ms_median"] <= 60  # spins 10 ms of wall time
    # slow: 250 ms jobs at 10 Hz: at most one frame in 2.5 starts in time
    assert slow["frames"] == 10 and slow["dropped"] >= 5 and slow["completed"] >= 3
    assert doc["energy"]["source"] == "model-estimate" and doc["energy"]["attributed_j"] <= doc["energy"]["total_j"] + 1e-9
    lines = (out / "jobs.csv").read_text().splitlines()
    assert lines[0].startswith("model,frame,arrival,start,end,deadline") and len(lines) == 1 + 30
    assert fast["energy_j"] > 0  # the spinning model burns CPU time, which the estimate meter counts
    assert sorted(x.name for x in out.iterdir()) == ["jobs.csv", "report.html", "scores.json", "timeline.json", "timeline.png"]
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]  # no temporary folder left


# -- validation: one line, exit status 2 -------------------------------------------------------------------

GOOD = """
duration = 1
[inputs.mic]
kind = "speech"
[models.vad]
kind = "synthetic"
rate = 10
input = "mic"
[models.llm]
kind = "synthetic"
after = "vad"
probability = 0.5
ttft_ms = 500
"""

BAD = {
    "kind": (GOOD.replace('kind = "synthetic"\nrate', 'kind = "warp-drive"\nrate'), "models.vad.kind", "unknown kind 'warp-drive'"),
    "target": (GOOD.replace('after = "vad"', 'after = "asr"'), "models.llm.after", "unknown model 'asr'"),
    "cycle": (GOOD.replace('rate = 10\n', 'after = "llm"\n'), "models.", "cascade cycle"),
    "rate0": (GOOD.replace("rate = 10", "rate = 0"), "models.vad.rate", "must be > 0"),
    "rate_huge": (GOOD.replace("rate = 10", "rate = 5000"), "models.vad.rate", "under 1 ms"),
    "rate_no_frame": (GOOD.replace("rate = 10", "rate = 0.5"), "models.vad.rate", "no frame in 1 s"),
    "duplicate": (GOOD + '[models.vad]\nkind = "synthetic"\nrate = 5\n', "not valid TOML", "vad"),
    "missing_kind": (GOOD.replace('kind = "synthetic"\nafter', 'after'), "models.llm.kind", "missing"),
    "no_schedule": (GOOD.replace("rate = 10\n", ""), "models.vad", "missing rate"),
    "probability": (GOOD.replace("probability = 0.5", "probability = 1.5"), "models.llm.probability", "[0, 1]"),
    "input": (GOOD.replace('input = "mic"', 'input = "camera"'), "models.vad.input", "unknown input stream"),
    "package": (GOOD.replace('input = "mic"', 'package = "no/such/pkg"'), "models.vad.package", "does not exist"),
    "top_key": ("durration = 3\n" + GOOD, "durration", "unknown key"),
    "no_models": ("duration = 1\n", "models", "missing"),
    "synthetic_option": (GOOD.replace("rate = 10", 'rate = 10\nlatency_ms = "fast"'), "models.vad.latency_ms", "a number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors_one_line(case, tmp_path, capsys):
    body, key, words = BAD[case]
    p = tmp_path / f"{case}.toml"
    p.write_text(body)
    out = tmp_path / "out"
    assert main(["scenario", "run", str(p), "--virtual", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"edgeinfer: {p}: ")
    assert key in err and words in err
    assert not out.exists()


def test_good_file_passes_and_cli_exit_status(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert [m.name for m in load_scenario(good).models] == ["vad", "llm"]
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD["cycle"][0])
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "scenario", "run", str(bad), "--virtual"],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cascade cycle" in r.stderr


def test_memory_budget_refused_before_loading(tmp_path, capsys):
    p = write(tmp_path, GOOD.replace('input = "mic"', "memory_mb = 300"))
    out = tmp_path / "out"
    assert main(["scenario", "run", str(p), "--virtual", "--memory-budget", "200MB", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the memory budget is" in err and "vad 300.0 MiB" in err and "nothing was loaded" in err
    assert not out.exists()
    with pytest.raises(EdgeInferError, match="not an empty folder"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        from edgeinfer.scenario.report import write_outputs

        write_outputs(run_scenario(load_scenario(write(tmp_path, GOOD, "g.toml")), fake_clock=True, progress=False),
                      tmp_path / "full", "test")


def test_unknown_builtin_and_list(capsys):
    assert main(["scenario", "run", "no-such-scenario", "--virtual"]) == 2
    assert "unknown scenario 'no-such-scenario'" in capsys.readouterr().err
    assert main(["scenario", "list"]) == 0


def test_model_without_jobs_is_left_out(tmp_path, capsys):
    """A cascade that never fires had nothing to do: XRBench's logger never lists it, so it is left
    out of the mean instead of scoring 0."""
    p = write(tmp_path, """
        duration = 0.5
        [models.vad]
        kind = "synthetic"
        rate = 10
        latency_ms = 10
        trigger_every = 100
        [models.llm]
        kind = "synthetic"
        after = "vad"
        when = "trigger"
        latency_ms = 10
    """)
    assert main(["scenario", "run", str(p), "--virtual", "--out", str(tmp_path / "o")]) == 0
    s = json.loads((tmp_path / "o" / "scores.json").read_text())["scores"]
    assert s["models"]["llm"]["frames"] == 0 and s["models"]["llm"]["score"] is None
    assert s["score"] == pytest.approx(100.0)
    assert "llm            no jobs" in capsys.readouterr().out
    # --duration too short for one frame, and --virtual on a model that cannot state its latency
    assert main(["scenario", "run", str(p), "--virtual", "--duration", "0.01"]) == 2
    assert "holds no frame of vad at 10 Hz" in capsys.readouterr().err


def test_dropped_frame_of_a_deciding_upstream_records_no_dependant(tmp_path):
    """A VAD-like upstream decides by content (its results carry a trigger): what it would have decided
    on a frame it never ran is unknown, so its dropped frame 1 adds no dropped dependant; a model that
    decides nothing (the det in the cascade test) does."""
    p = write(tmp_path, """
        duration = 0.8
        [models.vad]
        kind = "synthetic"
        rate = 10
        latency_ms = [250, 5, 5, 5, 5, 5, 5, 5]
        trigger_every = 2
        [models.llm]
        kind = "synthetic"
        after = "vad"
        latency_ms = 5
    """)
    jobs = run_fake(p)
    assert [(j.frame, j.drop_reason or None) for j in jobs if j.model == "vad" and j.dropped] == [(1, "late")]
    assert [(j.frame, j.dropped) for j in jobs if j.model == "llm"] == [(3, False), (5, False), (7, False)]


class _Crashes:
    """A workload whose model raises on frame 2, as a broken model file or a shape bug would."""

    kind = "test-crashes"

    def __init__(self, spec, scenario):
        self.name, self.closed = spec.name, False

    def memory_bytes(self):
        return 0

    def load(self, threads):
        pass

    def input(self, frame, upstream):
        return frame

    def run(self, inp, deadline_s):
        if inp == 2:
            raise ValueError("shape mismatch")
        return FrameResult()

    def close(self):
        _Crashes.closed_names.append(self.name)


_Crashes.closed_names = []


def test_a_crashing_model_stops_the_run_with_one_line(tmp_path, capsys):
    from edgeinfer.scenario.workload import WORKLOAD_KINDS, register_workload

    if "test-crashes" not in WORKLOAD_KINDS:
        register_workload("test-crashes")(_Crashes)
    p = write(tmp_path, """
        duration = 1
        meter = "estimate"
        [models.bad]
        kind = "test-crashes"
        rate = 20
    """)
    out = tmp_path / "out"
    assert main(["scenario", "run", str(p), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "edgeinfer: model bad failed on frame 2: ValueError: shape mismatch"
    assert _Crashes.closed_names == ["bad"] and not out.exists()
