"""R-Sparse plans: what ``edgeinfer sparsify`` writes into a package and what the backends read.

One sparse linear, for a projection with weight W [m out, n in] and input x [n]:

    score_j = |x_j| * c_j        (c_j = 1 when rho == 1, else ||W[:, j]||_2)
    S = {j : score_j > t}
    y = W[:, S] x_S + B (A x_notS)   with A = V_r^T [r, n], B = U_r Sigma_r [m, r] (truncated SVD of W)

A plan holds, per layer and projection, the threshold t, the column norms c (only when rho < 1) and the
low-rank factors A, B (only when r > 0), in ``PKG/sparse/plan-<level>.safetensors``; the manifest's
``sparsity.levels`` entry describes it (docs/PACKAGE.md). The runtime only reads plans: making them is
``converters/sparsify.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..decode_tables import PROJECTIONS
from ..errors import EdgeInferError
from ..package import WEIGHTS, Package, open_package, sha256_file
from ..spec import ArchSpec

PLAN_DIR = "sparse"


def level_key(level: float) -> str:
    """0.5 -> "0.50": the manifest key and the file name's suffix."""
    return f"{float(level):.2f}"


def plan_file_name(level: float) -> str:
    return f"{PLAN_DIR}/plan-{level_key(level)}.safetensors"


def projection_shapes(spec: ArchSpec) -> dict[str, tuple[int, int]]:
    """(m out, n in) of each of the seven projections: the same in every layer."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}


def budget(s: float, rho: float, m: int, n: int) -> tuple[int, int]:
    """Kept channels k and rank r for sparsity s and sparse share rho, so that the weights read per token,
    k*m (sparse columns) + r*(m+n) (low-rank factors), are about (1-s)*m*n."""
    k = min(n, max(0, int(round(rho * (1.0 - s) * n))))
    r = math.floor(((1.0 - s) * m * n - k * m) / (m + n))
    return k, max(0, min(r, m, n))


@dataclass
class ModulePlan:
    name: str  # "layers.{i}.{p}"
    m: int
    n: int
    s: float
    rho: float
    k: int
    r: int
    t: float
    c: np.ndarray | None = None  # fp32 [n], only when rho < 1
    a: np.ndarray | None = None  # fp16 [r, n], only when r > 0
    b: np.ndarray | None = None  # fp16 [m, r], only when r > 0


@dataclass
class SparsePlan:
    level: float
    info: dict[str, Any]  # the manifest's entry for this level
    modules: dict[str, ModulePlan] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.info.get("method", "")

    def module(self, layer: int, proj: str) -> ModulePlan:
        return self.modules[f"layers.{layer}.{proj}"]


def _package(package: Package | str | Path) -> Package:
    return package if isinstance(package, Package) else open_package(package)


def _levels(pkg: Package) -> dict[str, Any]:
    return (pkg.manifest.get("sparsity") or {}).get("levels") or {}


def available_levels(package: Package | str | Path) -> list[float]:
    """The sparsity levels for which the package holds a plan, ascending."""
    return sorted(float(k) for k in _levels(_package(package)))


def load_plan(package: Package | str | Path, level: float) -> SparsePlan:
    """Reads and checks the plan of one level: made for this package's weights, file intact, shapes right."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    pkg = _package(package)
    levels = _levels(pkg)
    key = level_key(level)
    if key not in levels:
        have = ", ".join(level_key(x) for x in available_levels(pkg)) or "none (make one: edgeinfer sparsify PKG --sparsity 0.5)"
        raise EdgeInferError(f"{pkg.path} has no sparsity plan for level {key}; its levels: {have}")
    info = levels[key]
    weights_sha = pkg.manifest["files"].get(WEIGHTS, {}).get("sha256")
    if info.get("package_sha256") != weights_sha:
        raise EdgeInferError(
            f"the sparsity plan {key} of {pkg.path} was made for other weights (its package_sha256 does not match "
            f"{WEIGHTS}); make it again: edgeinfer sparsify {pkg.path} --sparsity {key}"
        )
    path = pkg.path / info["file"]
    if not path.is_file():
        raise EdgeInferError(f"the sparsity plan file {path} is missing")
    if sha256_file(path) != info.get("sha256"):
        raise EdgeInferError(f"the sparsity plan file {path} is corrupted: its SHA-256 does not match the manifest")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgeInferError(f"the sparsity plan file {path} cannot be read ({e})") from None

    shapes = projection_shapes(pkg.spec)
    plan = SparsePlan(level=float(key), info=info)
    recorded = info.get("modules") or {}
    for i in range(pkg.spec.num_layers):
        for p in PROJECTIONS:
            name = f"layers.{i}.{p}"
            m, n = shapes[p]
            meta = recorded.get(name)
            if meta is None:
                raise EdgeInferError(f"the sparsity plan {key} of {pkg.path} has no entry for {name} in the manifest")

            def get(suffix: str, shape: tuple[int, ...] | None, dtype) -> np.ndarray | None:
                t = tensors.get(f"{name}.{suffix}")
                if shape is None:
                    if t is not None:
                        raise EdgeInferError(f"the sparsity plan file {path} has an unexpected tensor {name}.{suffix}")
                    return None
                if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                    got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
                    raise EdgeInferError(
                        f"the sparsity plan file {path} is damaged: {name}.{suffix} is {got}, expected {np.dtype(dtype)} {list(shape)}"
                    )
                return t

            rho, r = float(meta["rho"]), int(meta["r"])
            t = get("t", (1,), np.float32)
            plan.modules[name] = ModulePlan(
                name=name, m=m, n=n, s=float(meta["s"]), rho=rho, k=int(meta["k"]), r=r, t=float(t[0]),
                c=get("c", (n,) if rho < 1 else None, np.float32),
                a=get("a", (r, n) if r > 0 else None, np.float16),
                b=get("b", (m, r) if r > 0 else None, np.float16),
            )
    return plan
