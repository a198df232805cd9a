"""Scenario inputs, made rather than downloaded, with their ground truth known by construction.

* ``SpeechStream``: 16 kHz audio of spoken questions (espeak-ng, or the committed clips in
  ``data/speech`` where espeak-ng is missing) between stretches of silence, all under background
  noise. Every utterance's position and text are known, so each 32 ms frame has a speech/silence
  label and each speech end has the question that was asked.
* ``TextFrames``: camera frames (RGB, uint8) with real sentences rendered in a few fonts and sizes,
  a tinted background and sensor noise; the rendered lines are the ground truth.

Everything is a function of the seed: a stream draws its segments in a fixed order from one
generator, and a camera frame from a generator seeded by (seed, frame), so the same scenario seed
gives the same inputs whichever frames are dropped.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeInferError

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # Silero VAD's window at 16 kHz: 32 ms, 31.25 frames a second
DATA_DIR = Path(__file__).resolve().parent / "data"

# What the user of the voice assistant asks; the VAD's speech end hands the LLM the question that
# was spoken, standing in for a speech recognizer's transcript.
QUESTIONS = [
    "What is the capital of France?",
    "How far away is the moon?",
    "Why is the sky blue?",
    "What should I cook for dinner tonight?",
    "How many legs does a spider have?",
    "Can you tell me a short joke?",
    "What is the tallest mountain in the world?",
    "How do plants make their food?",
    "What time does the sun set in winter?",
    "Which planet is closest to the sun?",
    "How do I boil an egg?",
    "What is the largest ocean on Earth?",
]

# Text the camera sees, one or two sentences a page.
SENTENCES = [
    "The museum opens at nine in the morning.",
    "Please keep your ticket until the end of the trip.",
    "Fresh bread is baked here every day.",
    "The next train to the airport leaves from platform four.",
    "Turn left at the bridge and follow the river.",
    "All visitors must sign in at the front desk.",
    "This path is closed for repairs until Friday.",
    "Water boils at one hundred degrees Celsius.",
    "The library has a quiet room on the second floor.",
    "Mix the flour and sugar before adding the eggs.",
    "Wear a helmet when riding a bike in the park.",
    "The concert starts at eight and ends near eleven.",
    "Store the medicine in a cool and dry place.",
    "Our store is open seven days a week.",
    "Charge the battery fully before the first use.",
    "The old castle was built more than six hundred years ago.",
]

ESPEAK_VOICES = ("en-us", "en-gb")


# ------------------------------------------------------------------------------------------ audio


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling by the FFT (no SciPy here): keep the spectrum up to the new Nyquist."""
    if src == dst:
        return x.astype(np.float32)
    n_out = int(round(len(x) * dst / src))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = n_out // 2 + 1
    spec = spec[:keep] if len(spec) >= keep else np.pad(spec, (0, keep - len(spec)))
    return (np.fft.irfft(spec, n_out) * (n_out / len(x))).astype(np.float32)


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2:
            raise EdgeInferError("expected 16-bit PCM audio")
        rate, ch = w.getframerate(), w.getnchannels()
        # espeak-ng writes a streaming header whose frame count is bogus: read to the end instead
        raw = w.readframes(1 << 31)
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return (x.reshape(-1, ch).mean(axis=1) if ch > 1 else x), rate


@functools.lru_cache(maxsize=64)
def synthesize(text: str, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    """``text`` spoken by espeak-ng, 16 kHz float32, leading and trailing silence trimmed."""
    try:
        proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                              capture_output=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgeInferError(f"espeak-ng failed to run: {exc}") from None
    if proc.returncode != 0 or not proc.stdout:
        raise EdgeInferError(f"espeak-ng failed: {proc.stderr.decode(errors='replace').strip() or proc.returncode}")
    x, rate = _read_wav(proc.stdout)
    return _trim(resample(x, rate, SAMPLE_RATE))


def _trim(x: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
    return x[loud[0] : loud[-1] + 1] if len(loud) else x


@functools.lru_cache(maxsize=1)
def committed_clips() -> tuple[tuple[str, np.ndarray], ...]:
    """The clips in data/speech (made with espeak-ng by ``make_committed_clips``) with their text."""
    folder = DATA_DIR / "speech"
    index = folder / "index.tsv"
    if not index.is_file():
        raise EdgeInferError(f"neither espeak-ng nor the committed speech clips ({index}) are available; "
                             f"install espeak-ng (Debian: apt-get install espeak-ng)")
    clips = []
    for line in index.read_text(encoding="utf-8").splitlines():
        name, text = line.split("\t", 1)
        x, rate = _read_wav((folder / name).read_bytes())
        clips.append((text, resample(x, rate, SAMPLE_RATE)))
    return tuple(clips)


def make_committed_clips(folder: Path = DATA_DIR / "speech", count: int = 5) -> None:
    """Writes the fallback clips (the first ``count`` questions, 16-bit 16 kHz WAV) with espeak-ng."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, q in enumerate(QUESTIONS[:count]):
        x = synthesize(q, ESPEAK_VOICES[i % len(ESPEAK_VOICES)], 175)
        name = f"q{i:02d}.wav"
        with wave.open(str(folder / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
        rows.append(f"{name}\t{q}")
    (folder / "index.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def speech_mask(x: np.ndarray, bridge_s: float = 0.3) -> np.ndarray:
    """Per-sample speech label of a clean utterance: 10 ms windows within 26 dB of its loudest,
    with gaps shorter than ``bridge_s`` (the pauses between words) counted as speech."""
    win = SAMPLE_RATE // 100
    n = len(x) // win + (len(x) % win > 0)
    padded = np.pad(x, (0, n * win - len(x)))
    rms = np.sqrt((padded.reshape(n, win) ** 2).mean(axis=1))
    on = rms > 0.05 * rms.max()
    idx = np.flatnonzero(on)
    if len(idx):
        gaps = np.flatnonzero(np.diff(idx) > 1)
        for g in gaps:
            a, b = idx[g], idx[g + 1]
            if (b - a - 1) * win < bridge_s * SAMPLE_RATE:
                on[a:b] = True
    return np.repeat(on, win)[: len(x)]


@dataclass
class Utterance:
    start: int  # first labelled speech sample in the stream
    end: int  # one past the last labelled speech sample
    text: str


class SpeechStream:
    """An endless, seeded stream of spoken questions between silences, under background noise.

    ``source``: "espeak" (synthesize with espeak-ng, two voices, varied speed), "clips" (the
    committed clips), or "auto" (espeak-ng where installed)."""

    def __init__(self, seed: int = 0, source: str = "auto", silence_s: tuple[float, float] = (1.2, 2.8),
                 snr_db: tuple[float, float] = (15.0, 30.0)):
        if source == "auto":
            source = "espeak" if have_espeak() else "clips"
        if source not in ("espeak", "clips"):
            raise EdgeInferError(f"unknown speech source {source!r}; choose auto, espeak or clips")
        if source == "espeak" and not have_espeak():
            raise EdgeInferError("espeak-ng is not installed (Debian: apt-get install espeak-ng); "
                                 "the source 'clips' uses the committed clips instead")
        self.source = source
        self.seed = seed
        self.silence_s = silence_s
        self.snr_db = snr_db
        self._rng = np.random.default_rng([seed, 0x5EEC])
        self._chunks: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._len = 0
        self.utterances: list[Utterance] = []
        self._audio = np.zeros(0, np.float32)
        self._label = np.zeros(0, bool)

    def _next_utterance(self) -> tuple[str, np.ndarray]:
        rng = self._rng
        if self.source == "espeak":
            text = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
            voice = ESPEAK_VOICES[int(rng.integers(len(ESPEAK_VOICES)))]
            return text, synthesize(text, voice, int(rng.integers(140, 185)))
        clips = committed_clips()
        text, x = clips[int(rng.integers(len(clips)))]
        return text, x

    def _grow(self) -> None:
        """Appends one silence and one utterance, noise over both."""
        rng = self._rng
        silence = int(rng.uniform(*self.silence_s) * SAMPLE_RATE)
        text, clean = self._next_utterance()
        clean = clean * (rng.uniform(0.25, 0.8) / max(np.abs(clean).max(), 1e-6))
        seg = np.concatenate([np.zeros(silence, np.float32), clean.astype(np.float32)])
        label = np.concatenate([np.zeros(silence, bool), speech_mask(clean)])
        speech_rms = float(np.sqrt(np.mean(clean[label[silence:]] ** 2)))
        noise_rms = speech_rms * 10 ** (-rng.uniform(*self.snr_db) / 20)
        white = rng.standard_normal(len(seg))
        # half white, half a low rumble (white noise shaped by a one-pole low-pass at 50 Hz, done in the
        # frequency domain), scaled to the drawn level
        f = np.fft.rfftfreq(len(seg), 1 / SAMPLE_RATE)
        rumble = np.fft.irfft(np.fft.rfft(rng.standard_normal(len(seg))) / (1 + 1j * f / 50.0), len(seg))
        rumble /= max(rumble.std(), 1e-9)
        noise = (0.7 * white + 0.7 * rumble) * noise_rms
        lab = np.flatnonzero(label)
        self.utterances.append(Utterance(self._len + int(lab[0]), self._len + int(lab[-1]) + 1, text))
        self._chunks.append((seg + noise).astype(np.float32))
        self._labels.append(label)
        self._len += len(seg)
        self._audio = np.concatenate(self._chunks)
        self._label = np.concatenate(self._labels)

    def ensure(self, samples: int) -> None:
        while self._len < samples:
            self._grow()

    def samples(self, start: int, count: int) -> np.ndarray:
        self.ensure(start + count)
        return self._audio[start : start + count]

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i``: FRAME_SAMPLES float32 samples."""
        return self.samples(i * FRAME_SAMPLES, FRAME_SAMPLES)

    def label(self, i: int) -> bool:
        """Whether most of frame ``i`` is speech."""
        self.ensure((i + 1) * FRAME_SAMPLES)
        return bool(self._label[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].mean() >= 0.5)

    def utterance_in(self, start: int, end: int) -> Utterance | None:
        """The utterance that overlaps samples [start, end) the most (None: none does)."""
        best, most = None, 0
        for u in self.utterances:
            overlap = min(end, u.end) - max(start, u.start)
            if overlap > most:
                best, most = u, overlap
        return best


# ----------------------------------------------------------------------------------------- camera

# Fonts tried in order; Pillow's own (Aileron) is always there, the others where the system has them.
_FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "LiberationSans-Regular.ttf",
    "LiberationSerif-Regular.ttf", "Arial.ttf", "Georgia.ttf", "Verdana.ttf",
)
_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation", "/usr/share/fonts/TTF",
              "/Library/Fonts", "/System/Library/Fonts/Supplemental", "C:/Windows/Fonts")


@functools.lru_cache(maxsize=1)
def font_files() -> tuple[str | None, ...]:
    """None stands for Pillow's bundled font; then each system font found."""
    found: list[str | None] = [None]
    for name in _FONT_FILES:
        for d in _FONT_DIRS:
            if (Path(d) / name).is_file():
                found.append(str(Path(d) / name))
                break
    return tuple(found)


@functools.lru_cache(maxsize=32)
def _font(path: str | None, size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


@dataclass
class TextFrame:
    index: int
    image: np.ndarray  # H x W x 3 uint8, RGB
    lines: list[str]  # the rendered lines, top to bottom
    boxes: list[tuple[int, int, int, int]]  # each line's ink box: x0, y0, x1, y1 (exclusive)
    font: str

    @property
    def text(self) -> str:
        return " ".join(self.lines)


def _wrap(text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


class TextFrames:
    """A camera looking at printed notices: a new page every ``hold_s`` seconds at ``rate`` Hz,
    each frame with its own sensor noise."""

    def __init__(self, seed: int = 0, width: int = 384, height: int = 256, rate: float = 10.0, hold_s: float = 2.0,
                 sizes: tuple[int, int] = (20, 30), noise: float = 6.0):
        if width < 96 or height < 64:
            raise EdgeInferError(f"text frames must be at least 96x64 pixels, not {width}x{height}")
        self.seed, self.width, self.height = seed, int(width), int(height)
        self.hold = max(1, int(round(hold_s * rate)))
        self.sizes, self.noise = (int(sizes[0]), int(sizes[1])), float(noise)
        self._page_cache: dict[int, tuple[np.ndarray, list[str], list, str]] = {}

    def _page(self, page: int):
        if page in self._page_cache:
            return self._page_cache[page]
        from PIL import Image, ImageDraw

        rng = np.random.default_rng([self.seed, 0x7E47, page])
        fonts = font_files()
        font_path = fonts[int(rng.integers(len(fonts)))]
        margin = int(self.width * 0.06)
        size = int(rng.integers(self.sizes[0], self.sizes[1] + 1))
        n = int(rng.integers(1, 3))
        picks = rng.choice(len(SENTENCES), size=n, replace=False)
        text = " ".join(SENTENCES[int(i)] for i in picks)
        # shrink the drawn size until the wrapped text fits the page
        while True:
            font = _font(font_path, size)
            lines = _wrap(text, font, self.width - 2 * margin)
            line_h = int(size * 1.5)
            if len(lines) * line_h + 2 * margin <= self.height or size <= 12:
                break
            size -= 2
        paper = np.array([rng.integers(200, 256) for _ in range(3)], dtype=np.float32)
        ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
        # paper with a gentle light gradient across the frame
        ramp = np.linspace(1.0, rng.uniform(0.85, 1.0), self.width, dtype=np.float32)
        bg = (paper[None, None, :] * ramp[None, :, None]).repeat(self.height, axis=0)
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        top = int(rng.integers(margin // 2, max(margin // 2 + 1, self.height - len(lines) * line_h - margin // 2)))
        left = int(rng.integers(margin // 2, margin + 1))
        boxes = []
        for k, line in enumerate(lines):
            y = top + k * line_h
            draw.text((left, y), line, font=font, fill=ink)
            x0, y0, x1, y1 = draw.textbbox((left, y), line, font=font)
            boxes.append((int(x0), int(y0), int(x1), int(y1)))
        name = "Pillow default (Aileron)" if font_path is None else Path(font_path).stem
        out = (np.asarray(img), lines, boxes, f"{name} {size}px")
        if len(self._page_cache) > 8:
            self._page_cache.clear()
        self._page_cache[page] = out
        return out

    def frame(self, i: int) -> TextFrame:
        base, lines, boxes, font = self._page(i // self.hold)
        rng = np.random.default_rng([self.seed, 0xF7A3, i])
        noisy = base.astype(np.float32) + rng.normal(0.0, self.noise, size=base.shape).astype(np.float32)
        return TextFrame(i, np.clip(noisy, 0, 255).astype(np.uint8), list(lines), list(boxes), font)
