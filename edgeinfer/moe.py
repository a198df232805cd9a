"""Expert budgets for Mixture-of-Experts forwards (MoE-Spec), and the run-time top-k override.

An expert budget caps how many distinct experts one multi-token forward (the verification of a
speculative draft) may touch per MoE layer. Per layer: the router probabilities of all the forward's
tokens are summed per expert; the top-``budget`` experts are kept (``mass`` mode: the fewest experts whose
share of the summed routing mass reaches ``mass``, never fewer than top_k); then each token

- ``substitute``: re-picks its top-k among the kept experts, with their original router probabilities,
  renormalized over the k only where the model normalizes top-k (Mixtral, norm_topk_prob models);
- ``truncate``: keeps its original top-k but drops the experts that were not kept (the survivors keep their
  weights, renormalized over the survivors where the model normalizes top-k; a token left with none gets no
  expert output).

Prefill is never capped: the option is per forward and defaults to None. Both backends take the budget as
data inside their compiled graph (MLX: arrays passed to the compiled MoE function; ONNX: graph inputs), so
one graph serves every budget, and none. A one-token forward is unaffected by any budget (its own top-k
holds the most mass), so decoding needs none.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EdgeInferError

POLICIES = ("substitute", "truncate")


@dataclass(frozen=True)
class ExpertBudget:
    budget: int | None = None  # experts kept per layer (>= top_k)
    mass: float | None = None  # or: the share of routing mass to keep, in (0, 1]
    policy: str = "substitute"

    def __post_init__(self):
        if (self.budget is None) == (self.mass is None):
            raise EdgeInferError("an expert budget takes exactly one of a count (--expert-budget) or a mass share (--expert-mass)")
        if self.policy not in POLICIES:
            raise EdgeInferError(f"--budget-policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.mass is not None and not 0.0 < float(self.mass) <= 1.0:
            raise EdgeInferError(f"--expert-mass must be in (0, 1], not {self.mass}")
        if self.budget is not None and int(self.budget) < 1:
            raise EdgeInferError(f"--expert-budget must be at least 1, not {self.budget}")

    def controls(self, spec, top_k: int) -> tuple[int, float, int]:
        """(experts kept, mass share or 0, 1 for truncate) as the backends' graphs take them; validates
        against the model."""
        check_moe(spec, self, None)
        if self.budget is not None:
            if int(self.budget) < top_k:
                raise EdgeInferError(f"--expert-budget {self.budget} is below the top-k of {top_k}: each token needs "
                                     f"{top_k} experts to choose from")
            return min(int(self.budget), spec.num_experts), 0.0, int(self.policy == "truncate")
        return spec.num_experts, float(self.mass), int(self.policy == "truncate")


def no_budget(spec) -> tuple[int, float, int]:
    """The controls meaning "every expert": the budgeted graph then computes the model's own routing exactly."""
    return max(1, spec.num_experts), 0.0, 0


def check_moe(spec, budget: ExpertBudget | None, top_k: int | None) -> None:
    """Errors for MoE options on a dense model or a top-k outside 1..num_experts."""
    if (budget is not None or top_k is not None) and not spec.num_experts:
        flag = "--expert-budget/--expert-mass" if budget is not None else "--moe-top-k"
        raise EdgeInferError(f"{flag} applies to Mixture-of-Experts models; this {spec.arch} model has no experts")
    if top_k is not None and not 1 <= int(top_k) <= spec.num_experts:
        raise EdgeInferError(f"--moe-top-k must be in 1..{spec.num_experts} (this model's experts), not {top_k}")


def stats_line(stats: list[dict]) -> str:
    """A short summary of per-layer MoE statistics (``backend.moe_stats``) for the stats line."""
    if not stats:
        return ""
    req = sum(s["requested"] for s in stats) / len(stats)
    kept = sum(s["kept"] for s in stats) / len(stats)
    mass = sum(s["mass_kept"] for s in stats) / len(stats)
    return f"experts/layer {req:.1f} requested, {kept:.1f} kept, {mass * 100:.1f}% routing mass kept"


def weight_bytes_read(package, stats: list[dict]) -> int:
    """Package weight bytes one forward reads, as stored: everything but the experts (the embedding table
    counted whole, as the bench's roofline does), plus each MoE layer's distinct experts run (``kept`` of
    ``backend.moe_stats``) at one expert's share of that layer's stacked tensors."""
    from .memory import safetensors_index

    index = safetensors_index(package.weights_path)
    n = package.spec.num_experts
    per_layer: dict[int, int] = {}
    dense = 0
    for name, t in index.items():
        size = t["end"] - t["start"]
        if ".moe.experts." in name:
            layer = int(name.split(".")[1])
            per_layer[layer] = per_layer.get(layer, 0) + size // n
        else:
            dense += size
    return dense + sum(per_layer.get(s["layer"], 0) * s["kept"] for s in stats)
