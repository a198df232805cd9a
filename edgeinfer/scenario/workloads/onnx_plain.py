"""Any ONNX file as a scenario model (``onnx``): random inputs of its declared shapes, for users' own models.

Dimensions the file leaves symbolic take 1, or the value given in the scenario's ``shapes`` table
(``shapes = { x = [1, 3, 224, 224] }``). Inputs are drawn per frame from a generator seeded by
(seed, frame): standard normal for floats, 0..9 for integers, coin flips for booleans. There is
no quality score: the numbers mean nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import EdgeInferError
from ..workload import FrameResult, register_workload
from ._common import check_options, file_bytes, open_session, option

_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


@register_workload("onnx")
class PlainONNX:
    kind = "onnx"

    def __init__(self, model, scenario):
        self.name, self.kind, self.source = model.name, model.kind, scenario.source
        check_options(model, scenario, {"shapes", "providers"})
        if not model.onnx:
            raise EdgeInferError(f"{scenario.source}: models.{model.name}.onnx: missing (the ONNX file to run)")
        self.path = model.onnx
        self.shapes = option(model, scenario, "shapes", {}, dict)
        self.providers = option(model, scenario, "providers", None, list)
        self.seed = scenario.seed
        self.session = None
        self.specs: list[tuple[str, tuple[int, ...], Any]] = []

    def memory_bytes(self) -> int:
        # ORT keeps the initializers plus an arena for activations, which depends on the model and its
        # input shapes, unknown here: twice the file plus 32 MiB. For the OCR models that gives 41 and
        # 53 MiB against 33 (det) and 62 MiB (rec) measured once run.
        return 2 * file_bytes(self.path, 0) + (32 << 20)

    def load(self, threads: int | None) -> None:
        self.session = open_session(self.path, threads, f"models.{self.name} (onnx)", self.providers)
        declared = {i.name for i in self.session.get_inputs()}
        unknown = sorted(set(self.shapes) - declared)
        if unknown:
            raise EdgeInferError(f"{self.source}: models.{self.name}.shapes: {self.path} has no input {unknown[0]!r} "
                                 f"(its inputs: {', '.join(sorted(declared))})")
        self.specs = []
        for i in self.session.get_inputs():
            if i.type not in _DTYPES:
                raise EdgeInferError(f"models.{self.name}: input {i.name} of {self.path} is {i.type}, which random "
                                     f"inputs do not cover")
            given = self.shapes.get(i.name)
            if given is not None:
                if (not isinstance(given, list) or len(given) != len(i.shape)
                        or not all(isinstance(d, int) and d > 0 for d in given)):
                    raise EdgeInferError(f"{self.source}: models.{self.name}.shapes.{i.name}: expected "
                                         f"{len(i.shape)} positive integers (declared {i.shape}), got {given!r}")
                shape = tuple(given)
            else:
                shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in i.shape)
            self.specs.append((i.name, shape, _DTYPES[i.type]))
        self.run(self.input(0, None), 1.0)  # warm-up

    def input(self, frame: int, upstream: Any) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0x0A77, frame])
        feed = {}
        for name, shape, dtype in self.specs:
            if np.issubdtype(dtype, np.floating):
                feed[name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[name] = rng.random(shape) < 0.5
            else:
                feed[name] = rng.integers(0, 10, size=shape).astype(dtype)
        return feed

    def run(self, inp: dict[str, np.ndarray], deadline_s: float) -> FrameResult:
        try:
            outs = self.session.run(None, inp)
        except Exception as exc:  # a shape the graph rejects at run time
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EdgeInferError(f"models.{self.name}: {self.path} failed on inputs "
                                 f"{ {n: s for n, s, _ in self.specs} } ({first[:200]})") from None
        return FrameResult(output=outs)

    def close(self) -> None:
        self.session = None
