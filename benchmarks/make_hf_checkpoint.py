"""Writes a Hugging Face checkpoint folder (config.json, safetensors, tokenizer) from an edgeinfer
package of the Llama family or Qwen2, with its weights dequantized: a real-size HF source for measuring the HF
conversion path (time, peak memory) where the hub cannot be reached.

    python benchmarks/make_hf_checkpoint.py models/smollm2-135m-instruct /tmp/hf-smollm2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters.quantize import QuantizedTensor  # noqa: E402
from converters.safetensors_io import SafetensorsFile  # noqa: E402
from edgeinfer.package import open_package  # noqa: E402

_NAMES = {
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def hf_name(name: str) -> str:
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    _, i, rest = name.split(".", 2)
    mod, kind = rest.rsplit(".", 1)
    return f"model.layers.{i}.{_NAMES[mod]}.{kind}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    a = ap.parse_args()
    pkg = open_package(a.package)
    s = pkg.spec
    if s.arch not in ("llama", "mistral", "qwen2"):
        raise SystemExit("only Llama-family and Qwen2 packages are supported by this script")
    f = SafetensorsFile(pkg.weights_path)
    quant = pkg.quantization
    tensors = {}
    for name in f.keys():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        if f"{base}.scales" in f.header:
            q = quant.get("tensors", {}).get(base, quant)
            w = QuantizedTensor(f.get(name), f.get(f"{base}.scales"), f.get(f"{base}.biases"), q["bits"], q["group_size"]).dequantize()
        else:
            w = f.get(name).astype(np.float32)
        tensors[hf_name(name)] = w
    import torch
    from safetensors.torch import save_file

    dt = getattr(torch, a.dtype)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(dt) for k, v in tensors.items()}, str(a.out / "model.safetensors"),
              metadata={"format": "pt"})
    tok = pkg.tokenizer_info
    config = {
        "model_type": s.arch, "architectures": [{"qwen2": "Qwen2ForCausalLM"}.get(s.arch, "LlamaForCausalLM")],
        "vocab_size": s.vocab_size, "use_sliding_window": False,
        "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size, "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim,
        "rms_norm_eps": s.rms_norm_eps, "rope_theta": s.rope_theta, "max_position_embeddings": s.max_position_embeddings,
        "tie_word_embeddings": s.tie_embeddings, "hidden_act": "silu", "torch_dtype": a.dtype,
        "bos_token_id": tok.get("bos_token_id"), "eos_token_id": (tok.get("eos_token_ids") or [None])[0],
    }
    (a.out / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copyfile(pkg.path / tok["file"], a.out / tok["file"])
    tcfg = {"add_bos_token": tok.get("add_bos", False)}
    if tok.get("chat_template_file"):
        tcfg["chat_template"] = (pkg.path / tok["chat_template_file"]).read_text()
    (a.out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
