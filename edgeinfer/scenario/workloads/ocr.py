"""PP-OCRv4 text detection (``ocr-det``) and recognition (``ocr-rec``), on ONNX Runtime directly.

The pre- and post-processing is ours, in numpy and Pillow (no OpenCV):

* detection: the frame, normalized to [-1, 1] in BGR order (PaddleOCR trains on OpenCV images),
  padded to a multiple of 32; the probability map thresholded (0.3), dilated by one pixel,
  its connected components labelled (runs per row, joined across rows with a union-find), each
  component's box kept when the mean probability inside it reaches ``box_thresh`` (0.5), then
  grown by DB's unclip distance (area * 1.6 / perimeter): DB learns shrunken text kernels.
  Boxes are axis-aligned, which is right for horizontal text and all these frames hold.
* recognition: each crop resized to height 48, padded to a common width, one batch; CTC greedy
  decoding (arg max per step, repeats merged, blanks dropped) with the dictionary the model
  carries in its ONNX metadata (``character``), plus PaddleOCR's trailing space class.

Quality: detection scores the F1 of its boxes against the rendered lines' boxes (IoU >= 0.5, the
ink boxes grown by a quarter of the line height, as annotators draw them);
recognition scores character accuracy, 1 - edit distance / max(len(read), len(truth)), of the
lines read (joined by spaces) against the rendered text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import EdgeInferError
from ..assets import asset_path
from ..inputs import TextFrames
from ..workload import FrameResult, register_workload
from ._common import check_options, file_bytes, open_session, option, stream_args

# ORT's allocations on top of the file, measured as the resident-set growth over load + 10 pages
# (384x256 frames; rec: 2-5 lines a batch) with another ORT session opened before: det 33 MiB for a
# 4.5 MiB file, rec 62 MiB for 10.4 MiB. (A process's first ORT session adds about 17 MiB more.)
_ARENA = {"ocr-det": 29 << 20, "ocr-rec": 52 << 20}


@dataclass
class Detection:
    """What ``ocr-det`` hands to ``ocr-rec``."""

    frame: int
    crops: list[np.ndarray]  # RGB uint8, one per text box, top to bottom then left to right
    boxes: list[tuple[int, int, int, int]]  # x0, y0, x1, y1 in frame pixels
    truth: list[str] = field(default_factory=list)  # the rendered lines (ground truth)


# -------------------------------------------------------------------------------- post-processing


def label_components(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Connected components (8-neighbour) of a boolean mask as (x0, y0, x1, y1, pixels), exclusive ends.

    Works on horizontal runs: each row's runs are joined to the runs of the row above that touch
    them (diagonals included), with a union-find over runs, so the Python loop is per run, not per
    pixel."""
    runs: list[tuple[int, int, int]] = []  # (row, start, end)
    prev: list[int] = []  # run ids of the previous row
    parent: list[int] = []

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for y in range(mask.shape[0]):
        row = mask[y].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row, [0]))))
        cur = []
        j = 0
        for s, e in zip(edges[::2].tolist(), edges[1::2].tolist()):
            rid = len(runs)
            runs.append((y, s, e))
            parent.append(rid)
            # runs above that overlap [s-1, e] (8-connectivity); prev is sorted by start
            while j < len(prev) and runs[prev[j]][2] < s:
                j += 1
            k = j
            while k < len(prev) and runs[prev[k]][1] <= e:
                a, b = find(rid), find(prev[k])
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
            cur.append(rid)
        prev = cur
    comps: dict[int, list[int]] = {}
    for rid, (y, s, e) in enumerate(runs):
        r = find(rid)
        box = comps.get(r)
        if box is None:
            comps[r] = [s, y, e, y + 1, e - s]
        else:
            box[0], box[1] = min(box[0], s), min(box[1], y)
            box[2], box[3] = max(box[2], e), max(box[3], y + 1)
            box[4] += e - s
    return [tuple(b) for b in comps.values()]


def db_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.5, unclip: float = 1.6,
             min_size: int = 3) -> list[tuple[float, float, float, float, float]]:
    """DB post-processing of one probability map [H, W] -> (x0, y0, x1, y1, score) in map pixels."""
    mask = prob > thresh
    # a one-pixel dilation (PaddleOCR's 2x2 kernel) closes hairline gaps inside a word
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:, 1:] |= mask[:, :-1]
    grown[1:, 1:] |= mask[:-1, :-1]
    out = []
    h, w = prob.shape
    for x0, y0, x1, y1, _ in label_components(grown):
        bw, bh = x1 - x0, y1 - y0
        if min(bw, bh) < min_size:
            continue
        score = float(prob[y0:y1, x0:x1].mean())
        if score < box_thresh:
            continue
        d = bw * bh * unclip / (2 * (bw + bh))
        bx0, by0 = max(0.0, x0 - d), max(0.0, y0 - d)
        bx1, by1 = min(float(w), x1 + d), min(float(h), y1 + d)
        if min(bx1 - bx0, by1 - by0) < min_size + 2:
            continue
        out.append((bx0, by0, bx1, by1, score))
    return out


def same_layout(a: list[tuple[int, int, int, int]], b: list[tuple[int, int, int, int]] | None) -> bool:
    """Whether two frames' boxes are the same text in view: as many boxes, each within a quarter of
    its height of the other's (sensor noise moves a box by a pixel or two)."""
    if b is None or len(a) != len(b):
        return False
    return all(max(abs(p - q) for p, q in zip(x, y)) <= max(2, (x[3] - x[1]) // 4) for x, y in zip(a, b))


def reading_order(boxes: list[tuple[int, int, int, int]]) -> list[int]:
    """Indices of boxes top to bottom; boxes whose vertical centres fall within half a line of each
    other form one row, read left to right."""
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1] + boxes[i][3]) / 2)
    rows: list[list[int]] = []
    for i in order:
        cy = (boxes[i][1] + boxes[i][3]) / 2
        if rows:
            last = boxes[rows[-1][0]]
            if abs(cy - (last[1] + last[3]) / 2) < 0.5 * (last[3] - last[1]):
                rows[-1].append(i)
                continue
        rows.append([i])
    return [i for row in rows for i in sorted(row, key=lambda k: boxes[k][0])]


def box_f1(found: list[tuple[int, int, int, int]], truth: list[tuple[int, int, int, int]], iou_min: float = 0.5,
           margin: float = 0.25) -> float:
    """F1 of detected boxes against true boxes, a true box matched at most once at IoU >= iou_min.

    The true boxes are the ink's tight boxes; they are first grown by ``margin`` of their height on
    every side, the margin an annotator leaves (ICDAR-style boxes), so that a correct box around a
    short word is not failed for the detector's own padding."""
    truth = [(x0 - margin * (y1 - y0), y0 - margin * (y1 - y0), x1 + margin * (y1 - y0), y1 + margin * (y1 - y0))
             for x0, y0, x1, y1 in truth]
    if not found and not truth:
        return 1.0
    if not found or not truth:
        return 0.0

    def iou(a, b) -> float:
        ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    used: set[int] = set()
    hits = 0
    for f in found:
        best, bi = 0.0, -1
        for i, t in enumerate(truth):
            if i not in used and (v := iou(f, t)) > best:
                best, bi = v, i
        if best >= iou_min:
            used.add(bi)
            hits += 1
    p, r = hits / len(found), hits / len(truth)
    return 2 * p * r / (p + r) if hits else 0.0


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def char_accuracy(read: str, truth: str) -> float:
    """1 - normalized edit distance (PaddleOCR's norm_edit_dis), spaces collapsed on both sides."""
    read, truth = " ".join(read.split()), " ".join(truth.split())
    n = max(len(read), len(truth))
    return 1.0 - edit_distance(read, truth) / n if n else 1.0


def ctc_greedy(probs: np.ndarray, charset: list[str]) -> list[str]:
    """probs [N, T, C] -> N strings: arg max per step, repeats merged, class 0 (blank) dropped."""
    out = []
    for seq in probs.argmax(axis=2):
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        keep &= seq != 0
        out.append("".join(charset[i] for i in seq[keep].tolist()))
    return out


def to_input(img: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1], BGR channel order."""
    return (img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 127.5) - 1.0


# ------------------------------------------------------------------------------------- workloads


class _OCRBase:
    asset_file = ""
    known_options: set[str] = set()

    def __init__(self, model, scenario):
        self.name, self.kind = model.name, model.kind
        self.spec, self.scenario = model, scenario
        check_options(model, scenario, self.known_options)
        self.path = model.onnx
        self.session = None

    def memory_bytes(self) -> int:
        return file_bytes(self.path, {"det.onnx": 4_745_517, "rec.onnx": 10_857_958}[self.asset_file]) + _ARENA[self.kind]

    def _open(self, threads: int | None):
        if self.path is None:
            self.path = str(asset_path("pp-ocrv4", self.asset_file))
        self.session = open_session(self.path, threads, f"models.{self.name} ({self.kind})")
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 4 or shape[1] != 3:
            raise EdgeInferError(f"models.{self.name}: {self.path} takes {shape}, not an image batch [N, 3, H, W]")

    def close(self) -> None:
        self.session = None


@register_workload("ocr-det")
class TextDetector(_OCRBase):
    asset_file = "det.onnx"
    known_options = {"thresh", "box_thresh", "unclip", "max_side", "trigger"}

    def __init__(self, model, scenario):
        super().__init__(model, scenario)
        cam = stream_args(model, scenario, "text-frames", TextFrames)
        self.frames = TextFrames(seed=scenario.seed, rate=model.rate or 10.0, **cam)
        self.thresh = float(option(model, scenario, "thresh", 0.3, (int, float)))
        self.box_thresh = float(option(model, scenario, "box_thresh", 0.5, (int, float)))
        self.unclip = float(option(model, scenario, "unclip", 1.6, (int, float)))
        self.max_side = int(option(model, scenario, "max_side", 960, int))
        # "text": trigger the cascade on every frame with text; "change": only when the text layout
        # differs from the last triggering frame (a new page in view), so unchanged text is read once
        self.trigger = option(model, scenario, "trigger", "change", str)
        if self.trigger not in ("text", "change"):
            raise EdgeInferError(f"{scenario.source}: models.{model.name}.trigger: must be text or change, "
                                 f"got {self.trigger!r}")
        self._last: list[tuple[int, int, int, int]] | None = None

    def load(self, threads: int | None) -> None:
        self._open(threads)
        self.run(self.input(0, None), 1.0)  # warm-up: ORT plans its memory on the first run
        self._last = None

    def input(self, frame: int, upstream: Any):
        return self.frames.frame(frame)

    def run(self, inp, deadline_s: float) -> FrameResult:
        from PIL import Image

        img = inp.image
        h, w = img.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        th, tw = (max(32, int(round(h * scale / 32)) * 32), max(32, int(round(w * scale / 32)) * 32))
        x = img if (th, tw) == (h, w) else np.asarray(Image.fromarray(img).resize((tw, th), Image.BILINEAR))
        prob = self.session.run(None, {self.session.get_inputs()[0].name: to_input(x)[None]})[0][0, 0]
        sx, sy = w / tw, h / th
        boxes = []
        for x0, y0, x1, y1, _ in db_boxes(prob, self.thresh, self.box_thresh, self.unclip):
            boxes.append((int(x0 * sx), int(y0 * sy), int(math.ceil(x1 * sx)), int(math.ceil(y1 * sy))))
        boxes = [boxes[i] for i in reading_order(boxes)]
        crops = [img[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]
        det = Detection(frame=inp.index, crops=crops, boxes=boxes, truth=list(inp.lines))
        fire = bool(boxes) and (self.trigger == "text" or not same_layout(boxes, self._last))
        if fire:
            self._last = boxes
        return FrameResult(ok=bool(boxes), output=det, trigger=fire, quality=box_f1(boxes, inp.boxes))


@register_workload("ocr-rec")
class TextRecognizer(_OCRBase):
    asset_file = "rec.onnx"
    known_options = {"height", "min_width"}

    def __init__(self, model, scenario):
        super().__init__(model, scenario)
        if model.after is None or scenario.model(model.after).kind != "ocr-det":
            raise EdgeInferError(f"{scenario.source}: models.{model.name}: ocr-rec reads the crops of an ocr-det "
                                 f"model: set after = \"<the ocr-det model>\"")
        self.height = int(option(model, scenario, "height", 48, int))
        self.min_width = int(option(model, scenario, "min_width", 320, int))
        self.charset: list[str] = []

    def load(self, threads: int | None) -> None:
        self._open(threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise EdgeInferError(f"models.{self.name}: {self.path} carries no character dictionary "
                                 f"(ONNX metadata key 'character'); it is not a PP-OCR recognition model")
        self.charset = ["<blank>"] + meta["character"].splitlines() + [" "]
        classes = self.session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.charset):
            raise EdgeInferError(f"models.{self.name}: the dictionary has {len(self.charset)} classes, the model "
                                 f"{classes}")
        # warm-up on a page-sized batch (three lines of ten heights): the first run of a shape is slow
        warm = np.full((self.height, self.height * 10, 3), 255, np.uint8)
        self.run(Detection(frame=-1, crops=[warm] * 3, boxes=[(0, 0, 1, 1)] * 3), 1.0)

    def input(self, frame: int, upstream: Any) -> Detection:
        if not isinstance(upstream, Detection):
            raise EdgeInferError(f"models.{self.name}: ocr-rec must follow an ocr-det model, got "
                                 f"{type(upstream).__name__} from upstream")
        return upstream

    def _batch(self, crops: list[np.ndarray]) -> np.ndarray:
        from PIL import Image

        widths = [max(1, int(math.ceil(self.height * c.shape[1] / max(c.shape[0], 1)))) for c in crops]
        width = max(self.min_width, max(widths))
        batch = np.zeros((len(crops), 3, self.height, width), np.float32)  # 0 is mid-grey after scaling
        for k, (c, cw) in enumerate(zip(crops, widths)):
            resized = np.asarray(Image.fromarray(c).resize((cw, self.height), Image.BILINEAR))
            batch[k, :, :, :cw] = to_input(resized)
        return batch

    def run(self, inp: Detection, deadline_s: float) -> FrameResult:
        truth = " ".join(inp.truth)
        crops = [c for c in inp.crops if c.size]
        if not crops:
            return FrameResult(ok=False, output={"text": "", "lines": []}, trigger=False,
                               quality=char_accuracy("", truth) if inp.truth else None)
        probs = self.session.run(None, {self.session.get_inputs()[0].name: self._batch(crops)})[0]
        lines = [s.strip() for s in ctc_greedy(probs, self.charset)]
        text = " ".join(s for s in lines if s)
        return FrameResult(ok=bool(text), output={"text": text, "lines": lines}, trigger=bool(text),
                           quality=char_accuracy(text, truth) if inp.truth else None)
