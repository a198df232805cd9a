"""One normalized description of a decoder-only transformer.

Every supported architecture (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3) is the same decoder with a
handful of switches. A Hugging Face ``config.json`` or GGUF metadata is normalized into an
``ArchSpec`` once, at conversion; the runtime reads only the spec from the package manifest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import EdgeInferError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# HF model_type -> our arch name.
_HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "olmoe": "olmoe",
}


@dataclass
class ArchSpec:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Sliding-window layers may use their own rope base (Gemma 3: 10k local, 1M global).
    rope_local_theta: float | None = None
    # None, or {"type": "linear"|"llama3"|"yarn", "factor": ..., ...} as in HF configs.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP (Gemma 3)
    mlp_act: str = "silu"  # "silu" or "gelu_tanh"
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)
    attn_scale: float = 0.0  # softmax scale; 0 means head_dim ** -0.5
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full" or "sliding" per layer
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); num_experts 0 is a dense model. Every
    # supported router takes the softmax over all experts, then the top k, renormalized over those k
    # when norm_topk_prob (Mixtral's top-k-then-softmax is the same thing).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_size: int = 0  # Qwen2-MoE: a dense expert every token takes, scaled by sigmoid(x . w)
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 and i is not in mlp_only_layers
    mlp_only_layers: list[int] = field(default_factory=list)
    qk_norm_full: bool = False  # OLMoE: q/k RMSNorm over the whole projection, not per head

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % max(1, self.decoder_sparse_step) == 0)

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise EdgeInferError(f"unknown architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        if not self.layer_types:
            kind = "sliding" if self.sliding_window else "full"
            self.layer_types = [kind] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise EdgeInferError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.attn_scale == 0.0:
            self.attn_scale = self.head_dim ** -0.5
        if self.num_heads % self.num_kv_heads:
            raise EdgeInferError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.mlp_act not in ("silu", "gelu_tanh"):
            raise EdgeInferError(f"unsupported MLP activation {self.mlp_act!r}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise EdgeInferError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EdgeInferError(f"architecture spec has unknown keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    # Derived sizes, used by the memory planner (edgeinfer/memory.py).
    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Keys and values of one token over every layer (before sliding-window rings)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def rope_base(self, layer: int) -> float:
        if self.layer_types[layer] == "sliding" and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    def rope_scaling_for(self, layer: int) -> dict | None:
        # Gemma 3 scales only the global layers' rope.
        if self.layer_types[layer] == "sliding" and self.rope_local_theta is not None:
            return None
        return self.rope_scaling


def rope_inv_freq(spec: ArchSpec, layer: int) -> np.ndarray:
    """Rotary inverse frequencies [head_dim / 2] of one layer, rope scaling applied (float64)."""
    base = spec.rope_base(layer)
    dims = spec.head_dim
    inv = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
    scaling = spec.rope_scaling_for(layer)
    if not scaling:
        return inv
    kind = scaling["type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    if kind == "yarn":
        old_ctx = float(scaling.get("original_max_position_embeddings", spec.max_position_embeddings))
        beta_fast = float(scaling.get("beta_fast", 32.0))
        beta_slow = float(scaling.get("beta_slow", 1.0))

        def dim_for(rot):
            return (dims * math.log(old_ctx / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo = max(math.floor(dim_for(beta_fast)), 0)
        hi = min(math.ceil(dim_for(beta_slow)), dims - 1)
        ramp = np.clip((np.arange(dims // 2) - lo) / max(hi - lo, 1e-3), 0, 1)
        extrapolation = 1 - ramp
        return (inv / factor) * (1 - extrapolation) + inv * extrapolation
    raise EdgeInferError(f"unsupported rope scaling type {kind!r}")


def yarn_mscale(spec: ArchSpec) -> float:
    """YaRN's attention factor, applied to q and k after rope (1 without YaRN)."""
    s = spec.rope_scaling
    if not s or s.get("type") != "yarn":
        return 1.0
    factor = float(s.get("factor", 1.0))
    return float(s.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0))


def rope_tables(spec: ArchSpec, layer: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim / 2] of one layer's rotary embedding, YaRN's factor included."""
    t = np.arange(positions, dtype=np.float64)[:, None] * rope_inv_freq(spec, layer)[None, :]
    m = yarn_mscale(spec)
    return (np.cos(t) * m).astype(np.float32), (np.sin(t) * m).astype(np.float32)


def _require(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise EdgeInferError(f"{where} is missing the required key {key!r}")
    return cfg[key]


def _rope_from_hf(cfg: dict, arch: str) -> tuple[float, float | None, dict | None]:
    """Returns (theta, local_theta, scaling) from either the old (rope_theta/rope_scaling) or the
    transformers 5 (rope_parameters) form of a config."""
    params = cfg.get("rope_parameters")
    local_theta = cfg.get("rope_local_base_freq")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        theta = float(full.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if local:
            local_theta = float(local.get("rope_theta", local_theta or theta))
        scaling = full
    elif isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = params
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or {}
    scaling = dict(scaling or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("rope_theta", None)
    if kind == "default":
        return theta, (float(local_theta) if local_theta else None), None
    if kind not in ("linear", "llama3", "yarn"):
        raise EdgeInferError(f"unsupported rope scaling type {kind!r}")
    scaling["type"] = kind
    return theta, (float(local_theta) if local_theta else None), scaling


def spec_from_hf_config(cfg: dict, where: str = "config.json") -> ArchSpec:
    """Normalizes a Hugging Face config.json (as a dict) into an ArchSpec."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise EdgeInferError(f"{where} is missing the required key 'model_type'")
    if model_type == "gemma3" and "text_config" in cfg:
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
    arch = _HF_MODEL_TYPES.get(model_type)
    if arch is None:
        raise EdgeInferError(
            f"{where}: unknown architecture {model_type!r}; supported: {', '.join(sorted(_HF_MODEL_TYPES))}"
        )
    hidden = int(_require(cfg, "hidden_size", where))
    heads = int(_require(cfg, "num_attention_heads", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    n_layers = int(_require(cfg, "num_hidden_layers", where))
    theta, local_theta, scaling = _rope_from_hf(cfg, arch)
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = arch == "gemma3"
    spec = dict(
        arch=arch,
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(tie),
    )
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    spec["mlp_act"] = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(
        act, act
    )
    if arch == "qwen2":
        spec["attention_bias"] = True
    elif arch == "qwen2_moe":
        spec["attention_bias"] = bool(cfg.get("qkv_bias", True))
    elif arch in ("llama", "mistral", "qwen3", "mixtral", "qwen3_moe", "olmoe"):
        spec["attention_bias"] = bool(cfg.get("attention_bias", False))
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        _moe_from_hf(cfg, arch, spec, where)
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        # Qwen configs carry a sliding_window that is off unless use_sliding_window is set.
        if not cfg.get("use_sliding_window", False):
            window = None
        elif cfg.get("max_window_layers") is not None:
            mwl = int(cfg["max_window_layers"])
            spec["layer_types"] = ["full" if i < mwl else "sliding" for i in range(n_layers)]
    if arch in ("qwen3", "qwen3_moe", "olmoe"):
        spec["qk_norm"] = True
        spec["qk_norm_full"] = arch == "olmoe"
    if arch == "gemma3":
        spec["qk_norm"] = True
        spec["sandwich_norm"] = True
        spec["embed_scale"] = math.sqrt(hidden)
        spec["attn_scale"] = float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5
        spec["final_logit_softcap"] = cfg.get("final_logit_softcapping")
        spec["attn_logit_softcap"] = cfg.get("attn_logit_softcapping")
        if spec["rope_local_theta"] is None:
            spec["rope_local_theta"] = 10000.0
    layer_types = cfg.get("layer_types")
    if layer_types:
        spec["layer_types"] = ["sliding" if t == "sliding_attention" else "full" for t in layer_types]
    elif arch == "gemma3":
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        spec["layer_types"] = ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers)]
    spec["sliding_window"] = int(window) if window else None
    if spec["sliding_window"] is None and "sliding" in spec.get("layer_types", []):
        spec["layer_types"] = ["full"] * n_layers
    return ArchSpec(**spec)


def _moe_from_hf(cfg: dict, arch: str, spec: dict, where: str) -> None:
    experts = cfg.get("num_local_experts") if arch == "mixtral" else cfg.get("num_experts")
    spec["num_experts"] = int(experts or cfg.get("num_local_experts") or 0)
    if spec["num_experts"] < 1:
        raise EdgeInferError(f"{where}: a {arch} model needs num_experts >= 1")
    spec["num_experts_per_tok"] = int(_require(cfg, "num_experts_per_tok", where))
    # Mixtral's experts are as wide as its intermediate_size; the others name their width.
    spec["moe_intermediate_size"] = int(cfg.get("moe_intermediate_size") or spec["intermediate_size"])
    spec["norm_topk_prob"] = True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False))
    if arch == "qwen2_moe":
        spec["shared_expert_size"] = int(cfg.get("shared_expert_intermediate_size") or 0)
    if arch in ("qwen2_moe", "qwen3_moe"):
        spec["decoder_sparse_step"] = int(cfg.get("decoder_sparse_step") or 1)
        spec["mlp_only_layers"] = [int(i) for i in cfg.get("mlp_only_layers") or []]
