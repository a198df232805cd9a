"""Hugging Face checkpoint folders (config.json + safetensors + tokenizer) as a conversion source."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeinfer.errors import EdgeInferError
from edgeinfer.spec import spec_from_hf_config

from .safetensors_io import SafetensorsFile

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

# HF name (after the model prefix) -> package name. Gemma 3's post_attention_layernorm is a real
# post-attention norm, while in the Llama family it is the pre-MLP norm.
_LAYER_COMMON = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
_LAYER_LLAMA = {"post_attention_layernorm": "mlp_norm"}
_LAYER_GEMMA = {
    "post_attention_layernorm": "post_attn_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
}
# MoE blocks: the router and Qwen2-MoE's shared expert; experts are stacked (see HFSource.tensors).
_LAYER_MOE = {
    "mlp.gate": "moe.router",
    "block_sparse_moe.gate": "moe.router",
    "mlp.shared_expert.gate_proj": "moe.shared.gate_proj",
    "mlp.shared_expert.up_proj": "moe.shared.up_proj",
    "mlp.shared_expert.down_proj": "moe.shared.down_proj",
    "mlp.shared_expert_gate": "moe.shared_gate",
}
# One expert's projection: Qwen/OLMoE names, and Mixtral's w1 (gate), w2 (down), w3 (up).
_EXPERT = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight")
# transformers 5's in-memory layout, [E, 2I, H] (gate then up) and [E, H, I], should a checkpoint be saved so.
_STACKED = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_MIXTRAL_W = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_SKIP = re.compile(r"(vision_tower|multi_modal_projector|rotary_emb\.inv_freq)")


class HFSource:
    kind = "hf"

    def __init__(self, path: Path):
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise EdgeInferError(f"{path} has no config.json: not a Hugging Face model folder")
        try:
            self.config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgeInferError(f"{cfg_path} is not valid JSON ({e})") from None
        self.spec = spec_from_hf_config(self.config, where=str(cfg_path))
        self.name = path.name
        self.notes: list[str] = []
        self.files = self._weight_files()
        self._load_tokenizer()

    def _weight_files(self) -> list[SafetensorsFile]:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for pat in _PICKLES for p in self.path.glob(pat)]
            if pickles:
                raise EdgeInferError(
                    f"{self.path / pickles[0]} is a pickled PyTorch checkpoint; edgeinfer never unpickles "
                    "(it can run arbitrary code): convert it to safetensors first"
                )
            raise EdgeInferError(f"{self.path} has no .safetensors weights")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise EdgeInferError(f"{index} is not a valid safetensors index ({e})") from None
            missing = [n for n in names if not (self.path / n).exists()]
            if missing:
                raise EdgeInferError(f"{self.path / missing[0]} is missing (named in {index.name})")
            files = [self.path / n for n in names]
        return [SafetensorsFile(f) for f in files]

    def _load_tokenizer(self) -> None:
        p = self.path
        tj, tm = p / "tokenizer.json", p / "tokenizer.model"
        if tj.exists():
            self.tokenizer_file, self.tokenizer_kind = tj, "tokenizers"
        elif tm.exists():
            self.tokenizer_file, self.tokenizer_kind = tm, "sentencepiece"
        else:
            raise EdgeInferError(f"{p} has neither tokenizer.json nor tokenizer.model")
        tcfg = {}
        if (p / "tokenizer_config.json").exists():
            try:
                tcfg = json.loads((p / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as e:
                raise EdgeInferError(f"{p / 'tokenizer_config.json'} is not valid JSON ({e})") from None
        gen = {}
        if (p / "generation_config.json").exists():
            gen = json.loads((p / "generation_config.json").read_text())
        self.chat_template = None
        if (p / "chat_template.jinja").exists():
            self.chat_template = (p / "chat_template.jinja").read_text()
        elif isinstance(tcfg.get("chat_template"), str):
            self.chat_template = tcfg["chat_template"]
        elif isinstance(tcfg.get("chat_template"), list):
            named = {t.get("name"): t.get("template") for t in tcfg["chat_template"]}
            self.chat_template = named.get("default") or next(iter(named.values()), None)

        vocab = self._token_ids(tcfg)

        def tok_id(t):
            if isinstance(t, dict):
                t = t.get("content")
            return vocab.get(t) if isinstance(t, str) else None

        self.bos_token_id = tok_id(tcfg.get("bos_token"))
        if self.bos_token_id is None:
            self.bos_token_id = self.config.get("bos_token_id")
        eos = []
        for src in (gen.get("eos_token_id"), self.config.get("eos_token_id")):
            for e in src if isinstance(src, list) else [src]:
                if isinstance(e, int) and e not in eos:
                    eos.append(e)
        e = tok_id(tcfg.get("eos_token"))
        if e is not None and e not in eos:
            eos.insert(0, e)
        self.eos_token_ids = eos
        if "add_bos_token" in tcfg:
            self.add_bos = bool(tcfg["add_bos_token"])
        else:
            self.add_bos = self._post_processor_adds_bos()

    def _token_ids(self, tcfg: dict) -> dict[str, int]:
        vocab: dict[str, int] = {}
        if self.tokenizer_kind == "tokenizers":
            data = json.loads(self.tokenizer_file.read_text())
            model_vocab = data.get("model", {}).get("vocab", {})
            if isinstance(model_vocab, dict):
                vocab.update(model_vocab)
            elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
                vocab.update({piece: i for i, (piece, _) in enumerate(model_vocab)})
            for t in data.get("added_tokens", []):
                vocab[t["content"]] = t["id"]
        else:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(self.tokenizer_file))
            vocab.update({sp.id_to_piece(i): i for i in range(sp.get_piece_size())})
        for i, t in (tcfg.get("added_tokens_decoder") or {}).items():
            vocab[t["content"]] = int(i)
        return vocab

    def _post_processor_adds_bos(self) -> bool:
        if self.tokenizer_kind != "tokenizers" or self.bos_token_id is None:
            return self.tokenizer_kind == "sentencepiece"
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.tokenizer_file))
        ids = tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    def tensor_names(self) -> Iterator[tuple[SafetensorsFile, str]]:
        for f in self.files:
            for k in f.keys():
                yield f, k

    def _map_name(self, name: str) -> str | None:
        if _SKIP.search(name):
            return None
        if name == "lm_head.weight":
            return None if self.spec.tie_embeddings else "lm_head.weight"
        for pre in _PREFIXES:
            if name.startswith(pre):
                name = name[len(pre) :]
                break
        if name == "embed_tokens.weight":
            return "embed.weight"
        if name == "norm.weight":
            return "norm.weight"
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m:
            i, mod, kind = m.groups()
            table = {**_LAYER_COMMON, **(_LAYER_GEMMA if self.spec.arch == "gemma3" else _LAYER_LLAMA),
                     **(_LAYER_MOE if self.spec.num_experts else {})}
            if mod in table:
                return f"layers.{i}.{table[mod]}.{kind}"
        raise EdgeInferError(f"{self.path}: tensor {name!r} does not belong to a {self.spec.arch} model as edgeinfer knows it")

    def _strip(self, name: str) -> str:
        for pre in _PREFIXES:
            if name.startswith(pre):
                return name[len(pre) :]
        return name

    def _experts(self) -> Iterator[tuple[str, np.ndarray]]:
        """Each MoE layer's experts stacked into [E, out, in] per projection, one projection at a time
        (the runtime's gather matmuls index the expert on the leading axis)."""
        found: dict[tuple[int, str], dict[int, tuple]] = {}
        for f, name in self.tensor_names():
            short = self._strip(name)
            m = _EXPERT.fullmatch(short)
            if m:
                i, e, proj = int(m.group(1)), int(m.group(2)), _MIXTRAL_W.get(m.group(3), m.group(3))
                found.setdefault((i, proj), {})[e] = (f, name)
            elif _STACKED.fullmatch(short):
                i, kind = _STACKED.fullmatch(short).groups()
                arr = f.get(name)
                if kind == "gate_up_proj":
                    half = arr.shape[1] // 2
                    yield f"layers.{i}.moe.experts.gate_proj.weight", arr[:, :half]
                    yield f"layers.{i}.moe.experts.up_proj.weight", arr[:, half:]
                else:
                    yield f"layers.{i}.moe.experts.down_proj.weight", arr
        n = self.spec.num_experts
        for (i, proj), by_expert in sorted(found.items()):
            if sorted(by_expert) != list(range(n)):
                raise EdgeInferError(f"{self.path}: layer {i} has {proj} for experts {sorted(by_expert)}, not all {n}")
            yield f"layers.{i}.moe.experts.{proj}.weight", np.stack([f.get(nm) for f, nm in (by_expert[e] for e in range(n))])

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (package name, float32 or float16 array), one tensor at a time."""
        if self.spec.num_experts:
            yield from self._experts()
        for f, name in self.tensor_names():
            if self.spec.num_experts and (_EXPERT.fullmatch(self._strip(name)) or _STACKED.fullmatch(self._strip(name))):
                continue
            out = self._map_name(name)
            if out is None:
                continue
            arr = f.get(name)
            if self.spec.arch == "gemma3" and out.endswith("norm.weight"):
                arr = arr.astype(np.float32) + 1.0  # Gemma's RMSNorm scales by (1 + w)
            yield out, arr


def open_hf(path: Path) -> HFSource:
    return HFSource(Path(path))
