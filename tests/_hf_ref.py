"""A transformers reference for the real GGUF models (Qwen2.5-Coder, Gemma 3), built from the package's own
weights dequantized to fp32 rather than through transformers' GGUF loader (which dequantizes the whole file
in Python: over a minute for Gemma 3 270M on this CPU, most of its test).

Two halves that together stand for the GGUF loader:

- ``assert_gguf_dequantizes_to(gguf, sd, arch, notes)``: every tensor of the GGUF file, named the way
  transformers' GGUF loader names it (a table of this module, not the package's own mapping), dequantized by
  ``gguf.quants.dequantize`` (the function that loader uses), equals the reference's state dict: exactly
  up to fp32 rounding for the types the package imports losslessly, within the manifest's recorded error
  for Q6_K (re-quantized to 8 bits);
- ``build_hf(...)``: transformers' model on that state dict, fp32, eager attention, with the config given
  by the test (the upstream config.json values, so that a wrong spec in the package shows up as logits).
"""

from __future__ import annotations

import itertools
import re

import numpy as np

# package name -> transformers name; per arch where the layer norms differ (Gemma 3's post_attention_layernorm
# is a real post-attention norm, Qwen2's is the pre-MLP norm)
_COMMON = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.(\w+_proj)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
    (r"layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight", r"model.layers.\1.self_attn.\2.weight"),
    (r"layers\.(\d+)\.mlp\.(\w+_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
]
HF_NAMES = {
    "qwen2": _COMMON + [(r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight")],
    "gemma3": _COMMON + [
        (r"layers\.(\d+)\.post_attn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.pre_feedforward_layernorm.weight"),
        (r"layers\.(\d+)\.post_mlp_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
    ],
}

# GGUF name -> transformers name, as llama.cpp writes them and transformers' GGUF loader reads them
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_ARCH_LAYER = {
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def gguf_to_hf_name(name: str, arch: str) -> str:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    table = {**_GGUF_LAYER, **_GGUF_ARCH_LAYER[arch]}
    assert m and m.group(2) in table, f"no transformers name for the GGUF tensor {name}"
    return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"


def package_weights(pkg) -> dict[str, np.ndarray]:
    """The package's tensors as fp32 (w = scale * q + bias per group), read with numpy only."""
    from edgeinfer.converters.quantize import unpack_bits
    from edgeinfer.safetensors_map import map_safetensors

    raw = map_safetensors(pkg.weights_path)
    q = pkg.quantization
    out = {}
    for name in raw:
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is None or f"{base}.scales" not in raw:
            out[name] = np.array(raw[name], np.float32)  # a writable copy (torch shares it)
            continue
        qp = q.get("tensors", {}).get(base, q)
        bits, g = qp["bits"], qp["group_size"]
        w = unpack_bits(raw[name], bits).astype(np.float32)
        rows, n = w.shape
        grouped = w.reshape(rows, n // g, g)  # in place: the 262k-row embeddings are 0.4-0.6 GB in fp32
        grouped *= np.asarray(raw[f"{base}.scales"], np.float32)[..., None]
        grouped += np.asarray(raw[f"{base}.biases"], np.float32)[..., None]
        out[name] = w
    return out


def hf_state_dict(weights: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """The package's fp32 tensors under transformers' names. Gemma's RMSNorm scales by (1 + w) and the
    package (like the GGUF) stores 1 + w, so its norm weights are shifted back by 1 here."""
    sd = {}
    for name, w in weights.items():
        for pat, repl in HF_NAMES[arch]:
            if re.fullmatch(pat, name):
                hf = re.sub(pat, repl, name)
                sd[hf] = w - np.float32(1.0) if arch == "gemma3" and hf.endswith("norm.weight") else w
                break
        else:
            raise AssertionError(f"no transformers name for {name}")
    return sd


def build_hf(model_cls, cfg, sd: dict[str, np.ndarray], threads: int = 2):
    """transformers' model_cls(cfg) on the given fp32 state dict, eval mode, without random init: built on
    the meta device, the tensors assigned, the buffers that were made on meta (rope frequencies, Gemma's
    embedding scale) made again for real."""
    import torch

    torch.set_grad_enabled(False)
    with torch.device("meta"):
        m = model_cls(cfg)
    missing, unexpected = m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        m.lm_head.weight = m.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    m.model.rotary_emb = type(m.model.rotary_emb)(config=cfg)
    emb = m.model.embed_tokens
    if hasattr(emb, "scalar_embed_scale"):  # Gemma3TextScaledWordEmbedding
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale)
    left = [n for n, t in itertools.chain(m.named_parameters(), m.named_buffers()) if t.is_meta]
    assert not left, left
    torch.set_num_threads(threads)
    return m.eval()


def assert_gguf_dequantizes_to(gguf_path, sd: dict[str, np.ndarray], arch: str, notes: list[str]) -> None:
    """Every tensor of the GGUF file against ``sd`` (see the module's doc), on every 8th row (every 64th of
    the embedding and the head, 100k+ rows each), to keep it quick; and every tensor of ``sd`` is one of them."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    recorded = {n.split(":", 1)[0]: float(re.search(r"max abs error ([0-9.e+-]+)", n).group(1))
                for n in notes if "Q6_K re-quantized" in n}
    seen = set()
    for t in GGUFReader(str(gguf_path)).tensors:
        name = gguf_to_hf_name(t.name, arch)
        kind = t.tensor_type.name
        data = np.asarray(t.data)
        mine = sd[name]
        step = 64 if name in ("model.embed_tokens.weight", "lm_head.weight") else 8 if data.ndim == 2 else 1
        data, mine = data[::step], mine[::step]
        ref = np.asarray(dequantize(data, t.tensor_type), np.float32).reshape(mine.shape)
        if arch == "gemma3" and name.endswith("norm.weight"):
            ref = ref - np.float32(1.0)  # llama.cpp stores Gemma's 1 + w; transformers' loader subtracts the 1
        err = np.abs(mine - ref).max()
        scale = np.abs(ref).max()
        if kind == "Q6_K":
            assert err <= recorded[t.name] * 1.01 and err < 0.02 * scale, (t.name, err, recorded.get(t.name))
        else:
            assert err <= 1e-6 * scale, (t.name, kind, err)
        seen.add(name)
    assert seen == set(sd), set(sd) ^ seen
