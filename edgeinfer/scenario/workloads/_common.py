"""What the ONNX workloads share: opening a session with a clear error, and reading the scenario."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ...errors import EdgeInferError


def open_session(path: str | Path, threads: int | None, what: str, providers: list[str] | None = None):
    """An ORT session on ``path``, or one ``EdgeInferError`` line saying why not."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise EdgeInferError(f"{what}: the ONNX file {p} does not exist")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    # one model per worker thread already runs beside the others: no inter-op pool on top
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(p), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgeInferError(f"{what}: {p} is not a loadable ONNX model ({first[:200]})") from None


def file_bytes(path: str | Path | None, default: int) -> int:
    try:
        return Path(path).stat().st_size if path else default
    except OSError:
        return default


def stream_args(model, scenario, kind: str, cls) -> dict[str, Any]:
    """The keyword arguments of input stream ``cls`` from the ``[inputs.NAME]`` table a model reads
    (none when it names no input), checked: the table's kind, known keys, and each value's type
    against the parameter's default (a number, a [low, high] pair, or a string); the stream itself
    checks what it needs beyond that (a frame's least size, say)."""
    if model.input is None:
        return {}
    table = dict(scenario.inputs[model.input])
    got = table.pop("kind", kind)
    where = f"{scenario.source}: inputs.{model.input}"
    if got != kind:
        raise EdgeInferError(f"{scenario.source}: models.{model.name}.input: {model.kind} reads a {kind!r} "
                             f"stream, but inputs.{model.input} is {got!r}")
    params = {k: p.default for k, p in inspect.signature(cls).parameters.items() if k not in ("seed", "rate")}
    for key, value in table.items():
        if key not in params:
            raise EdgeInferError(f"{where}.{key}: unknown key for a {kind!r} stream (it takes: "
                                 f"{', '.join(params)})")
        default = params[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, tuple):
            ok = isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] <= value[1]
            want = "a [low, high] pair of numbers"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            ok, want = number and value >= 0, "a number >= 0"
        if not ok:
            raise EdgeInferError(f"{where}.{key}: expected {want}, got {value!r}")
        table[key] = tuple(value) if isinstance(default, tuple) else value
    return table


def option(model, scenario, key: str, default, types: type | tuple[type, ...]):
    """``models.NAME.KEY`` from the scenario file, type-checked (TOML's true is not a number here)."""
    if key not in model.options:
        return default
    value = model.options[key]
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise EdgeInferError(f"{scenario.source}: models.{model.name}.{key}: expected {names}, got {value!r}")
    return value


def check_options(model, scenario, known: set[str]) -> None:
    unknown = sorted(set(model.options) - known)
    if unknown:
        raise EdgeInferError(f"{scenario.source}: models.{model.name}.{unknown[0]}: unknown key for kind "
                             f"{model.kind!r} (it takes: {', '.join(sorted(known)) or 'nothing more'})")
