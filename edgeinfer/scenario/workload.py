"""The contract between the scenario runner and the models it runs.

A scenario names models by ``kind``; each kind is a factory registered with ``register_workload``
that turns the scenario file's model entry (a ``ModelSpec``) into a ``Workload``. The runner only
ever talks to the ``Workload`` protocol, so a kind (Silero VAD, PP-OCR, an LLM package, a plain
ONNX model, the synthetic test kind) adds nothing to the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from ..errors import EdgeInferError

if TYPE_CHECKING:  # spec.py imports this module for the kind registry
    from .spec import ModelSpec, Scenario


@dataclass
class FrameResult:
    """What one job of a model produced."""

    ok: bool = True  # False: the model ran but failed its task (a quality miss, not a drop)
    output: Any = None  # passed to cascaded models as their upstream input
    trigger: bool | None = None  # cascades: whether dependants fire (None: the cascade's probability alone)
    quality: float | None = None  # per-frame quality in [0, 1] where the task has one
    ttft: float | None = None  # LLM jobs: seconds from the job's start to its first token
    tokens: int = 0  # LLM jobs: tokens generated
    token_times: list[float] = field(default_factory=list)  # LLM jobs: seconds from start to each token
    energy_j: float | None = None  # synthetic workloads only: a known energy (the fake-clock tests' meter)


@runtime_checkable
class Workload(Protocol):
    """One model of a scenario. ``run`` is called from that model's own worker thread."""

    name: str  # the model's name in the scenario
    kind: str  # "silero-vad", "ocr-det", "ocr-rec", "llm", "onnx", "synthetic", ...

    def memory_bytes(self) -> int:
        """Resident bytes once loaded (an estimate for the memory plan, asked before loading)."""
        ...

    def load(self, threads: int | None) -> None:
        """Load weights and warm up; ``threads`` is the intra-op thread count (None: the runtime's default)."""
        ...

    def input(self, frame: int, upstream: Any) -> Any:
        """Frame ``frame``'s input: from the model's own input stream, or built from ``upstream``
        (the upstream job's ``FrameResult.output``) for a cascaded model. Not timed."""
        ...

    def run(self, inp: Any, deadline_s: float) -> FrameResult:
        """Run one job, blocking. ``deadline_s`` is seconds left until the job's deadline when it
        starts; LLM jobs may stop generating there."""
        ...

    def close(self) -> None: ...


WorkloadFactory = Callable[["ModelSpec", "Scenario"], Workload]

# kind -> factory; filled by register_workload at import time of the modules that define kinds.
WORKLOAD_KINDS: dict[str, WorkloadFactory] = {}


def register_workload(kind: str) -> Callable[[WorkloadFactory], WorkloadFactory]:
    """Decorator: ``@register_workload("silero-vad")`` on a ``factory(model_spec, scenario)``."""

    def deco(factory: WorkloadFactory) -> WorkloadFactory:
        if kind in WORKLOAD_KINDS and WORKLOAD_KINDS[kind] is not factory:
            raise ValueError(f"workload kind {kind!r} registered twice")
        WORKLOAD_KINDS[kind] = factory
        return factory

    return deco


def make_workload(model: "ModelSpec", scenario: "Scenario") -> Workload:
    """The workload for one model entry (the kind was checked when the file was read)."""
    try:
        factory = WORKLOAD_KINDS[model.kind]
    except KeyError:
        raise EdgeInferError(
            f"{scenario.source}: models.{model.name}.kind: unknown kind {model.kind!r}; "
            f"known: {', '.join(sorted(WORKLOAD_KINDS))}{unknown_kind_hint()}") from None
    return factory(model, scenario)


# Modules whose import registers workload kinds: the synthetic kind (tests, dry runs) and the real
# models' package (edgeinfer/scenario/workloads/, whose __init__ imports each of its modules).
KIND_MODULES = ("edgeinfer.scenario.synthetic", "edgeinfer.scenario.workloads")


KIND_IMPORT_ERRORS: dict[str, str] = {}  # module -> why it could not be imported


def load_kinds() -> dict[str, WorkloadFactory]:
    """Imports the modules that register kinds (once) and returns the registry. A module that fails
    to import (a missing optional dependency) does not stop scenarios that do not use its kinds; the
    error is kept and shown when a scenario names a kind that is then missing (``unknown_kind_hint``)."""
    import importlib

    for mod in KIND_MODULES:
        if mod in KIND_IMPORT_ERRORS:
            continue
        try:
            importlib.import_module(mod)
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and e.name == mod:
                continue  # not part of this build
            KIND_IMPORT_ERRORS[mod] = f"{type(e).__name__}: {e}"
    return WORKLOAD_KINDS


def unknown_kind_hint() -> str:
    """Why some kinds may be missing, for the unknown-kind error; empty when every module loaded."""
    if not KIND_IMPORT_ERRORS:
        return ""
    return " (not loaded: " + "; ".join(f"{m}: {e}" for m, e in KIND_IMPORT_ERRORS.items()) + ")"
