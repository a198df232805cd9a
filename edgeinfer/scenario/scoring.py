"""Scores: XRBench v0.1 for per-frame models, and a streaming score for LLM jobs.

Per-frame models (XRBench, MLSys 2023; its scoring module, v0.1 defaults; times in ms, energy in mJ):

- real-time score of a completed inference: RT = 1 / (1 + exp(k (t_done - t_deadline))), k = 15 per ms:
  0.5 at the deadline, 0.99 when 0.3 ms early, 0.01 when 0.3 ms late;
- energy score: EN = (E_max - E) / E_max, E_max = 1500 mJ (E: the inference's energy share);
- QoE = 1 - dropped / total frames;
- model score = (sum over completed frames of RT x EN) / (all frames, dropped included) x QoE;
- scenario score = 100 x the mean of the model scores.

One change: EN is clamped to [0, 1]. XRBench's simulated accelerators never exceed E_max; a real chip's
share of a long job can, and a negative EN would let one slow model cancel another's score.

Streaming (LLM) jobs, ours: a reader waits for the first token, then reads at a steady pace.

- RT_ttft = 1 / (1 + exp(k_ttft (t_first - t_ttft_deadline))), k_ttft = 50 per second: TTFT deadlines
  are seconds, not a frame's milliseconds, and people notice about 100 ms in a response: 100 ms early
  gives 0.993, 20 ms late 0.27, 100 ms late 0.0067 (XRBench's 15 per ms would make a 1 ms jitter of a
  1 s TTFT matter);
- pace share: token j (j >= 1) is on pace when it arrives by t_first + j / pace_tps, the time a reader
  starting at the first token reaches it; the share is over the tokens after the first, and when the
  job was cut at its stream deadline, the tokens it never produced count as late;
- RT = RT_ttft x pace share;
- EN as above with E_max = 500 mJ per generated token (SmolLM2-135M decodes at about 100 tokens/s on a
  laptop core pair at 10-15 W, 100-150 mJ a token; a budget of 500 mJ leaves room for larger models);
- QoE and the model score aggregate as for per-frame models.

The default pace, 6 tokens/s, is a fast reader (about 250 words a minute at about 1.4 tokens a word).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

K_PER_MS = 15.0  # XRBench v0.1
E_MAX_MJ = 1500.0  # XRBench v0.1
K_TTFT_PER_S = 50.0
E_MAX_TOKEN_MJ = 500.0


def sigmoid_rt(delay: float, k: float) -> float:
    """1 / (1 + exp(k * delay)), without overflow for very late jobs."""
    x = k * delay
    if x > 700:
        return 0.0
    if x < -700:
        return 1.0
    return 1.0 / (1.0 + math.exp(x))


def rt_score(t_done: float, t_deadline: float, k_per_ms: float = K_PER_MS) -> float:
    """XRBench's real-time score; times in seconds, k per millisecond."""
    return sigmoid_rt((t_done - t_deadline) * 1000.0, k_per_ms)


def en_score(energy_mj: float | None, e_max_mj: float = E_MAX_MJ) -> float:
    """XRBench's energy score, clamped to [0, 1]; 1 when no meter measured the job."""
    if energy_mj is None:
        return 1.0
    return min(1.0, max(0.0, (e_max_mj - energy_mj) / e_max_mj))


def pace_share(start: float, ttft: float, token_times: list[float], pace_tps: float,
               planned_tokens: int, cut: bool) -> float:
    """Share of the tokens after the first that arrive by t_first + j / pace (times relative to start)."""
    if not token_times:
        return 0.0
    first = token_times[0]
    rest = token_times[1:]
    on_pace = sum(1 for j, t in enumerate(rest, start=1) if t <= first + j / pace_tps + 1e-9)
    total = max(len(rest), planned_tokens - 1) if cut else len(rest)
    return 1.0 if total == 0 else on_pace / total


@dataclass
class Score:
    rt: float
    en: float

    @property
    def value(self) -> float:
        return self.rt * self.en


def job_score(job) -> Score | None:
    """RT and EN of one job record (``scheduler.Job``); None for a dropped job."""
    if job.dropped or job.end is None:
        return None
    e_mj = None if job.energy_j is None else job.energy_j * 1000.0
    if job.ttft_deadline is None:
        return Score(rt_score(job.end, job.deadline), en_score(e_mj))
    res = job.result
    times = list(res.token_times or []) if res is not None else []
    ttft = res.ttft if res is not None and res.ttft is not None else (times[0] if times else None)
    if ttft is None:  # no token at all: the reader never saw an answer
        return Score(0.0, en_score(e_mj, E_MAX_TOKEN_MJ))
    rt = sigmoid_rt(job.start + ttft - job.ttft_deadline, K_TTFT_PER_S)
    cut = job.end >= job.deadline - 1e-9
    rt *= pace_share(job.start, ttft, times or [ttft], job.pace_tps, job.planned_tokens, cut)
    tokens = max(1, res.tokens or len(times))
    return Score(rt, en_score(e_mj, E_MAX_TOKEN_MJ * tokens))


def job_quality(job) -> float | None:
    """A completed job's quality: 0 when the model failed its task, else its FrameResult.quality."""
    if job.dropped or job.result is None:
        return None
    if not job.result.ok:
        return 0.0
    return job.result.quality


def model_scores(jobs: list) -> dict:
    """XRBench's per-model aggregation over all of one model's jobs (dropped included)."""
    total = len(jobs)
    done = [j for j in jobs if not j.dropped]
    scores = [job_score(j) for j in done]
    dropped = total - len(done)
    qoe = 1.0 - dropped / total if total else 0.0
    score = (sum(s.value for s in scores) / total) * qoe if total else 0.0
    quals = [q for q in (job_quality(j) for j in done) if q is not None]
    energies = [j.energy_j for j in done if j.energy_j is not None]
    lat = sorted(j.end - j.start for j in done)
    return {
        "frames": total,
        "completed": len(done),
        "dropped": dropped,
        "late": sum(1 for j in done if j.end > j.deadline),
        "qoe": qoe,
        "rt_mean": sum(s.rt for s in scores) / len(scores) if scores else None,
        "en_mean": sum(s.en for s in scores) / len(scores) if scores else None,
        "score": score,
        "quality": sum(quals) / len(quals) if quals else None,
        "latency_ms_median": lat[len(lat) // 2] * 1000.0 if lat else None,
        "energy_j": sum(energies) if energies else None,
        "energy_mj_per_frame": sum(energies) * 1000.0 / len(energies) if energies else None,
    }


def scenario_scores(jobs: list, model_names: list[str]) -> dict:
    """Per-model scores and the scenario score (100 x the mean over models with at least one job)."""
    per_model = {m: model_scores([j for j in jobs if j.model == m]) for m in model_names}
    # as XRBench, whose logger lists only models that had a request: a cascade that never fired
    # had nothing to do and is left out of the mean (its score is None)
    active = [v for v in per_model.values() if v["frames"]]
    for v in per_model.values():
        if not v["frames"]:
            v["score"] = v["qoe"] = None
    overall = 100.0 * sum(v["score"] for v in active) / len(active) if active else 0.0
    quals = [v["quality"] for v in per_model.values() if v["quality"] is not None]
    return {
        "score": overall,
        "quality": sum(quals) / len(quals) if quals else None,
        "models": per_model,
        "constants": {"k_per_ms": K_PER_MS, "e_max_mj": E_MAX_MJ, "k_ttft_per_s": K_TTFT_PER_S,
                      "e_max_token_mj": E_MAX_TOKEN_MJ},
    }
