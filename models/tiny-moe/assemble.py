"""Turns what train.py returned from the accelerator machine into two complete Hugging Face checkpoints here,
and checks them on CPU with transformers against the figures the device logged.

    python models/tiny-moe/assemble.py /work/.device/N            # folder holding bundle.tar.part00.. (+ logs)
        [--moe-out models/tiny-moe-hf] [--draft-out models/tiny-draft-hf] [--logs models/tiny-moe/logs]
    python models/tiny-moe/assemble.py --verify-only                # re-check existing checkpoints
    python models/tiny-moe/assemble.py /work/.device/N --moe-out models/tiny-moe16-hf --log-prefix moe16-
                                                                    # a --preset moe16 run (no draft)

The draft came back without its embedding (it is the MoE's, frozen during its training: train.py says why);
it is put back here from the MoE's weights and checked against the SHA-256 the device logged. The check loads
both folders with AutoModelForCausalLM / AutoTokenizer, decodes greedily from "def fibonacci(n):", and
computes held-out perplexity over the first 8 windows of 512 tokens of the exact held-out text the device
used, which must match the device's fp32 figure (same fp16 weights, fp32 arithmetic both sides).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_CONFIG = {  # a base model on raw Python: no BOS, files end in <|endoftext|>
    "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
    "pad_token": None, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
    "model_max_length": 1024, "clean_up_tokenization_spaces": False,
}
PROMPT = "def fibonacci(n):"


def fail(msg: str) -> None:
    print(f"edgeinfer: {msg}", file=sys.stderr)
    raise SystemExit(2)


def read_bundle(parts_dir: Path) -> tarfile.TarFile:
    parts = sorted(parts_dir.glob("bundle.tar.part*"))
    if not parts:
        fail(f"{parts_dir} has no bundle.tar.part* files (the $OUT of a train.py run)")
    data = b"".join(p.read_bytes() for p in parts)
    log = parts_dir / "train.log"
    if log.exists():
        m = re.search(r"bundle: (\d+) bytes in \d+ parts, sha256 ([0-9a-f]{64})", log.read_text())
        if m and (len(data) != int(m.group(1)) or hashlib.sha256(data).hexdigest() != m.group(2)):
            fail(f"the parts in {parts_dir} do not add up to the bundle train.log describes (missing or damaged part)")
    return tarfile.open(fileobj=io.BytesIO(data))


def assemble(a) -> None:
    if not a.parts.is_dir():
        fail(f"{a.parts} is not a folder (name the one that holds bundle.tar.part*)")
    if a.moe_out.exists() and not a.force:
        fail(f"{a.moe_out} exists (pass --force to replace it)")
    if not a.tokenizer.is_file():
        fail(f"{a.tokenizer} is missing: it is SmolLM2's tokenizer.json (models/smollm2-135m-instruct)")
    with tempfile.TemporaryDirectory(dir=REPO / "models") as tmp:
        tmp = Path(tmp)
        read_bundle(a.parts).extractall(tmp, filter="data")
        src = tmp / "tiny-moe-bundle"
        metrics = json.loads((src / "metrics.json").read_text())
        moe, draft = tmp / "moe-out", tmp / "draft-out"
        shutil.copytree(src / "moe", moe)
        with_draft = (src / "draft").is_dir()  # train.py --draft-steps 0 returns the MoE alone
        if with_draft and a.draft_out.exists() and not a.force:
            fail(f"{a.draft_out} exists (pass --force to replace it)")
        if with_draft:
            draft.mkdir()
        for d in (moe, draft) if with_draft else (moe,):
            shutil.copy(a.tokenizer, d / "tokenizer.json")
            (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        if with_draft:
            add_draft(src, moe, draft, metrics)
        a.logs.mkdir(parents=True, exist_ok=True)
        for name in ("train.log", "metrics.json", "heldout.txt"):
            f = a.parts / name if (a.parts / name).exists() else src / name
            shared = a.logs / name
            if name == "heldout.txt" and a.log_prefix and shared.exists() and shared.read_bytes() == f.read_bytes():
                continue  # the same held-out text as the other runs': kept once
            shutil.copy(f, a.logs / f"{a.log_prefix}{name}")
        pairs = ((moe, a.moe_out), (draft, a.draft_out)) if with_draft else ((moe, a.moe_out),)
        for d, out in pairs:
            if out.exists():
                shutil.rmtree(out)
            d.rename(out)
    print(f"wrote {', '.join(str(o) for _, o in pairs)} and {a.logs}")


def log_path(a, name: str) -> Path:
    """A run's log under its prefix; its held-out text is the shared heldout.txt when it was the same text."""
    own = a.logs / f"{a.log_prefix}{name}"
    return a.logs / name if name == "heldout.txt" and not own.exists() else own


def add_draft(src: Path, moe: Path, draft: Path, metrics: dict) -> None:
    """The draft as a checkpoint: its returned layers plus the MoE's embedding it was trained with."""
    from safetensors.numpy import load_file, save_file
    cfg = json.loads((src / "draft" / "config.json").read_text())
    cfg = {"architectures": ["Qwen3ForCausalLM"], **cfg}  # saved from the config alone, which omits it
    (draft / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copy(src / "draft" / "generation_config.json", draft / "generation_config.json")
    emb = load_file(str(moe / "model.safetensors"))["model.embed_tokens.weight"]
    if hashlib.sha256(emb.tobytes()).hexdigest() != metrics["embedding_fp16_sha256"]:
        fail("the MoE's embedding differs from the one the draft was trained with (embedding_fp16_sha256)")
    body = load_file(str(src / "draft" / "body.safetensors"))
    save_file({"model.embed_tokens.weight": emb, **body}, str(draft / "model.safetensors"),
              metadata={"format": "pt"})


def verify(a) -> bool:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    metrics = json.loads(log_path(a, "metrics.json").read_text())
    text = log_path(a, "heldout.txt").read_text(encoding="utf-8")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != metrics["heldout"]["sha256"]:
        fail(f"{log_path(a, 'heldout.txt')} is not the held-out text the device evaluated on")
    ok = True
    models = (("moe", a.moe_out), ("draft", a.draft_out)) if "draft_final" in metrics else (("moe", a.moe_out),)
    for name, path in models:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        w = 512
        x = torch.tensor(ids[: 8 * w]).view(8, w)
        logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[:, :-1].float(), -1)
        ppl = math.exp(-logp.gather(-1, x[:, 1:, None]).mean().item())
        dev = metrics[f"{name}_final"]["heldout_ppl_first8_fp32"]
        p = tok(PROMPT, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**p, max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
        good = abs(ppl - dev) / dev < 1e-3
        ok &= good
        print(f"{name}: {type(model).__name__}, {sum(t.numel() for t in model.parameters())} parameters; held-out "
              f"perplexity, first 8 windows of {w}: {ppl:.4f} here vs {dev:.4f} on the device "
              f"({'match' if good else 'MISMATCH'})")
        print(f"{name} greedy: {tok.decode(out[0])!r}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", type=Path, nargs="?", help="folder with bundle.tar.part* (and train.log)")
    ap.add_argument("--moe-out", type=Path, default=REPO / "models/tiny-moe-hf")
    ap.add_argument("--draft-out", type=Path, default=REPO / "models/tiny-draft-hf")
    ap.add_argument("--logs", type=Path, default=REPO / "models/tiny-moe/logs",
                    help="where the run's train.log, metrics.json and held-out text go")
    ap.add_argument("--log-prefix", default="", help="name the run's logs PREFIXtrain.log, PREFIXmetrics.json "
                    "(e.g. moe16-); the held-out text stays heldout.txt")
    ap.add_argument("--tokenizer", type=Path, default=REPO / "models/smollm2-135m-instruct/tokenizer.json")
    ap.add_argument("--force", action="store_true", help="replace existing checkpoint folders")
    ap.add_argument("--verify-only", action="store_true", help="only check the existing checkpoints")
    a = ap.parse_args()
    if not a.verify_only:
        if a.parts is None:
            fail("name the folder that holds bundle.tar.part* (or pass --verify-only)")
        assemble(a)
    return 0 if verify(a) else 1


if __name__ == "__main__":
    raise SystemExit(main())
