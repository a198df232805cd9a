"""The scenario file: TOML, read into a validated ``Scenario``.

Layout (docs/SCENARIOS.md has the full reference)::

    name = "ar-reading"
    description = "camera -> text detection -> recognition -> LLM summary; VAD alongside"
    duration = 20          # seconds of arrivals
    seed = 0
    meter = "auto"         # default for --meter

    [inputs.camera]        # input streams, read by the workloads (keys are the workload kind's)
    kind = "text-frames"

    [models.det]           # one table per model; the table name is the model's name
    kind = "ocr-det"
    onnx = "..."           # or package = "...": where the weights are
    rate = 10              # Hz: periodic; frame i arrives at i/rate, deadline at (i+1)/rate
    input = "camera"

    [models.rec]
    kind = "ocr-rec"
    after = "det"          # cascaded: arrives when a det frame completes ...
    probability = 1.0      # ... with this probability (seeded)
    when = "any"           # or "trigger": only when det's FrameResult.trigger is true

    [models.llm]
    kind = "llm"
    package = "smollm2-135m-instruct"
    after = "rec"
    probability = 0.3
    ttft_ms = 1500         # streaming job: time-to-first-token deadline ...
    pace_tps = 6           # ... then tokens at least this fast (reading speed)
    max_tokens = 32

Keys a model table does not know go to ``ModelSpec.options`` for its workload kind. Every problem
is one ``EdgeInferError`` line naming the file and the key.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeInferError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport has the same API
    import tomli as tomllib

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
MAX_RATE_HZ = 1000.0  # a period under 1 ms is below the scheduler's timer resolution and RT's k = 15/ms scale
WHEN = ("any", "trigger")


@dataclass
class ModelSpec:
    """One ``[models.NAME]`` table."""

    name: str
    kind: str
    package: str | None = None  # an edgeinfer package folder, resolved to an absolute path
    onnx: str | None = None  # a plain ONNX file, resolved to an absolute path
    rate: float | None = None  # Hz; periodic models only
    input: str | None = None  # an [inputs.NAME] stream
    after: str | None = None  # upstream model; cascaded models only
    probability: float = 1.0  # chance that a completed upstream frame triggers this model
    when: str = "any"  # "trigger": fire only when the upstream FrameResult.trigger is True
    deadline_ms: float | None = None  # relative to arrival; default: next frame / the upstream's deadline
    ttft_ms: float | None = None  # streaming (LLM) jobs: first-token deadline, relative to arrival
    pace_tps: float | None = None  # streaming jobs: tokens per second the stream must keep up
    max_tokens: int | None = None  # streaming jobs: answer length the stream deadline is planned for
    threads: int | None = None  # intra-op threads for this model's runtime (None: its default)
    options: dict[str, Any] = field(default_factory=dict)  # the rest, for the workload kind

    @property
    def periodic(self) -> bool:
        return self.rate is not None

    @property
    def streaming(self) -> bool:
        """Scored as a token stream (TTFT + pace) instead of one inference per frame."""
        return self.ttft_ms is not None


@dataclass
class Scenario:
    name: str
    source: str  # the file it was read from (errors name it)
    models: list[ModelSpec]  # upstreams before their dependants
    duration_s: float = 10.0
    seed: int = 0
    meter: str = "auto"
    description: str = ""
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths in the file are resolved from here
    memory_budget: int | None = None  # bytes all models share; set by the runner before workloads are made

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def dependants(self, name: str) -> list[ModelSpec]:
        return [m for m in self.models if m.after == name]

    def resolve_path(self, value: str) -> Path:
        """A path from the file: absolute, or relative to the file's folder, else to the working
        directory (built-in scenarios name repo-relative paths)."""
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        for base in (self.base_dir, Path.cwd()):
            if (base / p).exists():
                return (base / p).resolve()
        return (self.base_dir / p).resolve()


_TOP_KEYS = {"name", "description", "duration", "seed", "meter", "inputs", "models"}
_MODEL_KEYS = {f for f in ModelSpec.__dataclass_fields__ if f not in ("name", "options")}


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def find_scenario(ref: str) -> Path:
    """NAME (a built-in) or FILE -> the file's path."""
    p = Path(ref).expanduser()
    if p.suffix == ".toml" or os.sep in ref or p.exists():
        if not p.is_file():
            raise EdgeInferError(f"scenario file {ref} does not exist")
        return p
    builtin = BUILTIN_DIR / f"{ref}.toml"
    if builtin.is_file():
        return builtin
    known = ", ".join(builtin_names()) or "none installed"
    raise EdgeInferError(f"unknown scenario {ref!r}: neither a file nor a built-in (built-ins: {known})")


def _models_dir() -> Path:
    return Path(os.environ.get("EDGEINFER_MODELS") or REPO_ROOT / "models")


def load_scenario(ref: str | Path, *, check_files: bool = True, kinds: dict | None = None) -> Scenario:
    """Reads and validates a scenario (a built-in's name or a file). ``check_files`` also checks that
    packages and ONNX files exist; ``kinds`` is the workload registry to check kinds against
    (default: every registered kind)."""
    path = find_scenario(str(ref))
    src = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EdgeInferError(f"{src}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        # duplicate model names land here too: TOML refuses a table declared twice
        raise EdgeInferError(f"{src}: not valid TOML: {e}") from None
    if kinds is None:
        from .workload import WORKLOAD_KINDS, load_kinds

        load_kinds()
        kinds = WORKLOAD_KINDS
    return parse_scenario(raw, src, base_dir=path.resolve().parent, check_files=check_files, kinds=kinds)


def _err(src: str, key: str, msg: str) -> EdgeInferError:
    return EdgeInferError(f"{src}: {key}: {msg}")


def _number(src: str, key: str, value: Any, *, integer: bool = False, positive: bool = True) -> float:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value):
        raise _err(src, key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if positive and value <= 0:
        raise _err(src, key, f"must be > 0, got {value!r}")
    return value


def parse_scenario(raw: dict, src: str, *, base_dir: Path, check_files: bool, kinds: dict) -> Scenario:
    for key in raw:
        if key not in _TOP_KEYS:
            raise _err(src, key, f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    duration = _number(src, "duration", raw.get("duration", 10.0))
    seed = int(_number(src, "seed", raw.get("seed", 0), integer=True, positive=False))
    inputs = raw.get("inputs", {})
    if not isinstance(inputs, dict) or not all(isinstance(v, dict) for v in inputs.values()):
        raise _err(src, "inputs", "must be tables: [inputs.NAME]")
    models_raw = raw.get("models")
    if not models_raw:
        raise _err(src, "models", "missing: a scenario needs at least one [models.NAME] table")
    if not isinstance(models_raw, dict) or not all(isinstance(v, dict) for v in models_raw.values()):
        raise _err(src, "models", "must be tables: [models.NAME]")
    sc = Scenario(name=str(raw.get("name") or Path(src).stem), source=src, models=[], duration_s=float(duration),
                  seed=seed, meter=str(raw.get("meter", "auto")), description=str(raw.get("description", "")),
                  inputs=inputs, base_dir=base_dir)

    specs: dict[str, ModelSpec] = {}
    for name, t in models_raw.items():
        specs[name] = _parse_model(src, sc, name, t, kinds, check_files)

    for m in specs.values():
        key = f"models.{m.name}"
        if m.after is not None and m.after not in specs:
            raise _err(src, f"{key}.after", f"unknown model {m.after!r} (models: {', '.join(specs)})")
        if m.after == m.name:
            raise _err(src, f"{key}.after", "a model cannot cascade from itself")
    sc.models = _topological(src, specs)
    for m in sc.models:
        if m.periodic and m.rate * sc.duration_s < 1:
            raise _err(src, f"models.{m.name}.rate",
                       f"{m.rate:g} Hz gives no frame in {sc.duration_s:g} s (duration); raise the rate or the duration")
    return sc


def _parse_model(src: str, sc: Scenario, name: str, t: dict, kinds: dict, check_files: bool) -> ModelSpec:
    key = f"models.{name}"
    if "kind" not in t:
        raise _err(src, f"{key}.kind", "missing (the workload kind, e.g. " + ", ".join(sorted(kinds)[:4]) + ")")
    kind = t["kind"]
    if not isinstance(kind, str) or kind not in kinds:
        from .workload import unknown_kind_hint

        raise _err(src, f"{key}.kind", f"unknown kind {kind!r}; known: {', '.join(sorted(kinds))}{unknown_kind_hint()}")
    m = ModelSpec(name=name, kind=kind)
    for k, v in t.items():
        if k == "kind":
            continue
        if k in _MODEL_KEYS:
            setattr(m, k, v)
        else:
            m.options[k] = v

    if m.rate is not None and m.after is not None:
        raise _err(src, f"{key}.rate", "a model is either periodic (rate) or cascaded (after), not both")
    if m.rate is None and m.after is None:
        raise _err(src, key, "missing rate (Hz, a periodic model) or after (the upstream model of a cascade)")
    if m.rate is not None:
        _number(src, f"{key}.rate", m.rate)
        if m.rate > MAX_RATE_HZ:
            raise _err(src, f"{key}.rate", f"{m.rate:g} Hz: a frame period under 1 ms cannot hold an inference")
        m.rate = float(m.rate)
    if m.after is not None and not isinstance(m.after, str):
        raise _err(src, f"{key}.after", f"must be a model name, got {m.after!r}")
    if isinstance(m.probability, bool) or not isinstance(m.probability, (int, float)) or not 0 <= m.probability <= 1:
        raise _err(src, f"{key}.probability", f"must be a number in [0, 1], got {m.probability!r}")
    if "probability" in t and m.after is None:
        raise _err(src, f"{key}.probability", "only a cascaded model (after = ...) has a trigger probability")
    for k in ("deadline_ms", "ttft_ms", "pace_tps"):
        if getattr(m, k) is not None:
            setattr(m, k, float(_number(src, f"{key}.{k}", getattr(m, k))))
    for k in ("max_tokens", "threads"):
        if getattr(m, k) is not None:
            _number(src, f"{key}.{k}", getattr(m, k), integer=True)
    if (m.pace_tps is not None or m.max_tokens is not None) and m.ttft_ms is None:
        raise _err(src, f"{key}.ttft_ms", "missing: pace_tps/max_tokens make a streaming job, which needs a TTFT deadline")
    if m.streaming and m.deadline_ms is not None:
        raise _err(src, f"{key}.deadline_ms", "a streaming job's deadline is ttft_ms + max_tokens/pace_tps; drop deadline_ms")
    if m.streaming:
        m.pace_tps = m.pace_tps or DEFAULT_PACE_TPS
        m.max_tokens = m.max_tokens or DEFAULT_MAX_TOKENS
    for k in ("input", "when"):
        if getattr(m, k) is not None and not isinstance(getattr(m, k), str):
            raise _err(src, f"{key}.{k}", f"must be a string, got {getattr(m, k)!r}")
    if m.when not in WHEN:
        raise _err(src, f"{key}.when", f"must be one of {', '.join(WHEN)}, got {m.when!r}")
    if m.input is not None and m.input not in sc.inputs:
        raise _err(src, f"{key}.input", f"unknown input stream {m.input!r} (inputs: {', '.join(sc.inputs) or 'none'})")
    for k in ("package", "onnx"):
        v = getattr(m, k)
        if v is None:
            continue
        if not isinstance(v, str):
            raise _err(src, f"{key}.{k}", f"must be a path, got {v!r}")
        p = sc.resolve_path(v)
        if k == "package" and not p.exists() and os.sep not in v and (_models_dir() / v).exists():
            p = _models_dir() / v  # a catalog name already converted into models/
        if check_files and not p.exists():
            raise _err(src, f"{key}.{k}", f"{v} does not exist" + (
                " (a package folder, or a catalog name converted into models/ by `edgeinfer convert`)" if k == "package" else ""))
        setattr(m, k, str(p))
    return m


# Streaming (LLM) defaults: see scoring.py for where they come from.
DEFAULT_PACE_TPS = 6.0
DEFAULT_MAX_TOKENS = 32


def _topological(src: str, specs: dict[str, ModelSpec]) -> list[ModelSpec]:
    """Upstreams first; a cycle (every model in it has an upstream, so none is periodic) is an error."""
    order: list[ModelSpec] = []
    done: set[str] = set()
    for m in specs.values():
        chain, cur = [], m
        while cur.name not in done:
            if cur.name in chain:
                cyc = chain[chain.index(cur.name):] + [cur.name]
                raise _err(src, f"models.{cur.name}.after", "cascade cycle: " + " -> ".join(reversed(cyc)))
            chain.append(cur.name)
            if cur.after is None:
                break
            cur = specs[cur.after]
        for n in reversed(chain):
            if n not in done:
                done.add(n)
                order.append(specs[n])
    return order
