"""Silero VAD (``silero-vad``): speech probability per 32 ms frame of 16 kHz audio, and speech events.

The ONNX model is recurrent: each call takes the frame (512 samples) after the last 64 samples of
the previous frame (its context), the LSTM state [2, 1, 128] and the sample rate, and returns the
speech probability and the next state, which this workload carries from frame to frame.

Events, with hysteresis (Silero's own defaults, ``threshold`` 0.5, off below ``threshold - 0.15``):
speech starts at the first frame at or above ``threshold``; it ends once the probability has stayed
below the lower threshold for ``min_silence_ms``; a segment shorter than ``min_speech_ms`` is
dropped as a click. The frame where speech ends is the ``trigger`` (the voice assistant answers
then), and its output carries the question that was spoken, standing in for a transcript.

Quality per frame: 1 when the frame's decision (probability >= ``threshold``) matches the frame's
label (most of its samples inside a spoken question), else 0; the mean is the frame accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import EdgeInferError
from ..assets import asset_path
from ..inputs import FRAME_SAMPLES, SAMPLE_RATE, SpeechStream
from ..workload import FrameResult, register_workload
from ._common import check_options, file_bytes, open_session, option, stream_args

FRAME_RATE = SAMPLE_RATE / FRAME_SAMPLES  # 31.25 Hz
CONTEXT = 64  # samples of the previous frame the 16 kHz model sees before each frame
# ORT's allocations beside the 2.3 MB file: the resident set grew 3.6 MiB over load + 10 frames with
# another ORT session opened before (a process's first ORT session adds about 17 MiB more)
_ARENA = 4 << 20


@register_workload("silero-vad")
class SileroVAD:
    kind = "silero-vad"

    def __init__(self, model, scenario):
        self.name, self.kind = model.name, model.kind
        check_options(model, scenario, {"threshold", "min_silence_ms", "min_speech_ms"})
        if model.rate is not None and abs(model.rate - FRAME_RATE) > 1e-6:
            raise EdgeInferError(f"{scenario.source}: models.{model.name}.rate: Silero VAD reads 512-sample frames "
                                 f"of 16 kHz audio, so its rate is {FRAME_RATE:g} Hz, not {model.rate:g}")
        if model.after is not None:
            raise EdgeInferError(f"{scenario.source}: models.{model.name}: Silero VAD listens to its own audio "
                                 f"stream (rate = {FRAME_RATE:g}, input = a speech stream), not to another model")
        # audio for the scenario's duration is made at load, not while the scheduler waits on input()
        self.prepare_s = min(float(scenario.duration_s), 120.0) + 5.0
        self.stream = SpeechStream(seed=scenario.seed, **stream_args(model, scenario, "speech", SpeechStream))
        self.threshold = float(option(model, scenario, "threshold", 0.5, (int, float)))
        if not 0 < self.threshold < 1:
            raise EdgeInferError(f"{scenario.source}: models.{model.name}.threshold: must lie in (0, 1)")
        self.off = max(self.threshold - 0.15, 0.01)
        self.min_silence = int(np.ceil(option(model, scenario, "min_silence_ms", 160, (int, float)) / 1000 * FRAME_RATE))
        self.min_speech = int(np.ceil(option(model, scenario, "min_speech_ms", 96, (int, float)) / 1000 * FRAME_RATE))
        self.path = model.onnx
        self.session = None
        self._reset()

    def _reset(self) -> None:
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros(CONTEXT, np.float32)
        self.in_speech = False
        self.speech_frames = 0
        self.quiet_frames = 0
        self.start_frame = -1

    def memory_bytes(self) -> int:
        return file_bytes(self.path, 2_327_524) + _ARENA

    def load(self, threads: int | None) -> None:
        if self.path is None:
            self.path = str(asset_path("silero-vad", "silero_vad.onnx"))
        # one 32 ms frame is far too small to split across threads
        self.session = open_session(self.path, threads or 1, f"models.{self.name} (silero-vad)")
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise EdgeInferError(f"models.{self.name}: {self.path} takes inputs {sorted(names)}, not Silero VAD's "
                                 f"input, state and sr")
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.stream.ensure(int(self.prepare_s * SAMPLE_RATE))
        for i in range(3):  # warm-up, then start from silence
            self._prob(self.stream.frame(i))
        self._reset()

    def input(self, frame: int, upstream: Any) -> tuple[int, np.ndarray, bool]:
        return frame, self.stream.frame(frame), self.stream.label(frame)

    def _prob(self, x: np.ndarray) -> float:
        inp = np.concatenate([self.context, x])[None, :]
        out, self.state = self.session.run(None, {"input": inp, "state": self.state, "sr": self._sr})
        self.context = x[-CONTEXT:]
        return float(out[0, 0])

    def run(self, inp: tuple[int, np.ndarray, bool], deadline_s: float) -> FrameResult:
        frame, x, label = inp
        p = self._prob(x)
        event = None
        if p >= self.threshold:
            self.quiet_frames = 0
            if not self.in_speech:
                self.in_speech, self.start_frame, self.speech_frames = True, frame, 0
        elif self.in_speech and p < self.off:
            self.quiet_frames += 1
            if self.quiet_frames >= self.min_silence:
                self.in_speech = False
                voiced = frame - self.quiet_frames - self.start_frame + 1
                event = "end" if voiced >= self.min_speech else None
        if self.in_speech:
            self.speech_frames += 1
            if self.speech_frames == self.min_speech:
                event = "start"
        text = None
        if event == "end":
            said = self.stream.utterance_in(self.start_frame * FRAME_SAMPLES, (frame + 1) * FRAME_SAMPLES)
            text = said.text if said is not None else ""
        out = {"prob": p, "speech": self.in_speech, "event": event, "text": text}
        return FrameResult(output=out, trigger=event == "end", quality=float((p >= self.threshold) == label))

    def close(self) -> None:
        self.session = None
