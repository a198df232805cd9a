"""Trains the tiny Qwen3-MoE (8 experts, top-2) and its dense Qwen3 draft on Python source, on one GPU.

Runs on the accelerator machine (one H100, PyTorch, transformers, tokenizers; no network), in one call,
because the machine starts bare each time: it tokenizes the machine's own Python source, trains the MoE,
then the draft, evaluates both on the held-out standard-library files (benchmarks/heldout_python.py), and
writes everything to $OUT (logs as it goes; the checkpoints as one tar split into parts below the 16 MiB
file limit). The exact commands and results are in README.md beside this file.

    python3 models/tiny-moe/train.py --probe            # versions, corpus size, tokenizer and step speed
    python3 models/tiny-moe/train.py --moe-steps N --draft-steps M [--balance per-layer|pooled]
    python3 models/tiny-moe/train.py --preset moe16 --moe-steps N --draft-steps 0   # 16 experts, no draft

The draft shares the MoE's trained embedding (frozen; tied to its output head): at most 64 MiB come back from
a call, which holds the MoE and the draft's own layers in fp16 but not a second 25 MB embedding.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import site
import sys
import sysconfig
import tarfile
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from heldout_python import HELDOUT, build_heldout  # noqa: E402

SEED = 20261124
SEQ_LEN = 1024
EVAL_WINDOW = 512  # edgeinfer's perplexity default, so the device figure and `edgeinfer eval ppl` agree
EOS = 0  # <|endoftext|>: ends every training file
MAX_FILE_BYTES = 1_000_000  # larger .py files are generated tables, not code worth the tokens
# Sized so that the MoE and the draft's own layers come back from one call in fp16 (64 MiB at most) and the
# MoE's 4-bit package stays near 15 MB: the 49152 x 256 embedding alone is 12.6M of the MoE's 26.8M parameters.

COMMON = dict(vocab_size=49152, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=SEQ_LEN, rms_norm_eps=1e-6, tie_word_embeddings=True,
              bos_token_id=None, eos_token_id=EOS, pad_token_id=None, initializer_range=0.02)
MOE = dict(COMMON, num_hidden_layers=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
           intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
           router_aux_loss_coef=0.01, output_router_logits=False)
DRAFT = dict(COMMON, num_hidden_layers=4, intermediate_size=768)
# --preset moe16: experts dominate what a verification pass reads (the expert-budget measurement, issue 9).
# The default model reads 8 MB of tied embedding/head per token against 0.11 MB per expert; here the
# embedding is halved (hidden 128) and the experts carry 79% of the parameters (16 x width 512, top-2).
# Sized to come back from one call in fp16 (31.9M parameters, 61 MiB of the 64 MiB) with no draft, every
# matrix dimension a multiple of the 4-bit package's group of 64.
MOE16 = dict(COMMON, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=8,
             num_experts=16, num_experts_per_tok=2, moe_intermediate_size=512, intermediate_size=512,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.01,
             output_router_logits=False)
PRESETS = {"default": MOE, "moe16": MOE16}

OUT = Path(os.environ.get("OUT", "/tmp/tiny-moe-out"))
OUT.mkdir(parents=True, exist_ok=True)
_LOG = open(OUT / "train.log", "a", buffering=1)
T0 = time.time()
DEV = torch.device("cuda")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    line = f"[{time.time() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    _LOG.write(line + "\n")


# ---------------------------------------------------------------- data

def source_roots() -> list[Path]:
    """The running Python's standard library and site-packages folders, each once."""
    cands = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    cands += site.getsitepackages()
    roots, seen = [], set()
    for c in cands:
        p = Path(c).resolve()
        if p.is_dir() and p not in seen:
            seen.add(p)
            roots.append(p)
    return roots


def list_sources(roots: list[Path]) -> list[tuple[Path, str]]:
    """(root, relative path) of every .py file, in a fixed order; a root nested in another is walked once."""
    out, root_set = [], set(roots)
    for root in roots:
        for d, dirs, files in os.walk(root):
            dp = Path(d)
            dirs[:] = sorted(x for x in dirs if x != "__pycache__" and (dp / x).resolve() not in root_set)
            for f in sorted(files):
                if f.endswith(".py"):
                    out.append((root, (dp / f).relative_to(root).as_posix()))
    return out


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


def encode_many(tok, texts: list[str]) -> list[list[int]]:
    fast = getattr(tok, "encode_batch_fast", None)  # skips offsets: about twice as fast where it exists
    encs = (fast or tok.encode_batch)(texts, add_special_tokens=False)
    return [e.ids for e in encs]


def build_corpus(tok, stdlib: Path, heldout_hashes: set[str], limit_files: int | None = None):
    """Training tokens: every unique source file but the held-out ones, each followed by EOS."""
    roots = source_roots()
    files = list_sources(roots)
    if limit_files:
        files = files[:limit_files]
    stats = dict(roots=[str(r) for r in roots], listed=len(files), too_big=0, not_utf8=0, duplicate=0,
                 heldout_by_path=0, heldout_by_content=0)
    seen, texts, nbytes = set(), [], 0
    held = set(HELDOUT)
    for root, rel in files:
        p = root / rel
        try:
            raw = p.read_bytes()
        except OSError:
            continue
        if len(raw) > MAX_FILE_BYTES:
            stats["too_big"] += 1
            continue
        h = hashlib.sha256(raw).hexdigest()
        if root == stdlib and rel in held:
            stats["heldout_by_path"] += 1
            continue
        if h in heldout_hashes:
            stats["heldout_by_content"] += 1
            continue
        if h in seen:
            stats["duplicate"] += 1
            continue
        seen.add(h)
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            stats["not_utf8"] += 1
            continue
        nbytes += len(raw)
    stats["files"] = len(texts)
    stats["bytes"] = nbytes
    t = time.time()
    chunks, B = [], 2048
    for i in range(0, len(texts), B):
        for ids in encode_many(tok, texts[i:i + B]):
            chunks.append(np.asarray(ids + [EOS], dtype=np.int32))
    flat = np.concatenate(chunks)
    stats["tokens"] = int(flat.size)
    stats["tokenize_s"] = round(time.time() - t, 1)
    return flat, stats


# ---------------------------------------------------------------- models

EXPERT_DTYPE = torch.bfloat16  # float32 only to check the arithmetic against transformers on CPU


def _grouped_mm():
    return getattr(F, "grouped_mm", None) or torch._grouped_mm


def experts_forward_bf16(self, hidden_states, top_k_index, top_k_weights):
    """Qwen3MoeExperts.forward as one grouped matmul per projection, in bf16.

    transformers' own grouped_mm path multiplies in the weights' dtype (fp32 master weights here: autocast
    does not reach grouped_mm), and its default path loops over experts; this is the same arithmetic as the
    default path (act(gate) * up, then down, weighted by the routing weights), checked against it in --probe."""
    gmm = _grouped_mm()
    n_tok, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat)
    # histc, not bincount: bincount's output size waits on the GPU; histc takes int on CUDA, float on CPU
    counts = torch.histc(flat.int() if flat.is_cuda else flat.float(), bins=self.num_experts, min=0,
                         max=self.num_experts - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = hidden_states[order // k].to(EXPERT_DTYPE)
    h = gmm(x, self.gate_up_proj.to(EXPERT_DTYPE).transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = gmm(self.act_fn(gate) * up, self.down_proj.to(EXPERT_DTYPE).transpose(1, 2), offs=offs)
    y = y.float() * top_k_weights.reshape(-1)[order].unsqueeze(-1).float()
    out = torch.empty_like(y).index_copy_(0, order, y)
    return out.view(n_tok, k, -1).sum(1).to(hidden_states.dtype)


def use_fast_experts(model, on: bool) -> None:
    for m in model.modules():
        if type(m).__name__ == "Qwen3MoeExperts":
            if on:
                m.forward = types.MethodType(experts_forward_bf16, m)
            elif "forward" in m.__dict__:
                del m.forward


def make_model(kind: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(SEED + (0 if kind == "moe" else 1))
    if kind == "moe":
        cfg = Qwen3MoeConfig(**MOE)  # MOE is the chosen preset's config (main)
        model = Qwen3MoeForCausalLM(cfg)
    else:
        cfg = Qwen3Config(**DRAFT)
        model = Qwen3ForCausalLM(cfg)
    cfg._attn_implementation = "sdpa"
    return model


def n_params(model, skip_embed=False) -> int:
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (skip_embed and "embed_tokens" in name):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_eval(model, windows: torch.Tensor, is_moe: bool, fp32: bool = False, batch: int = 32):
    """Perplexity over non-overlapping windows (every token but each window's first predicted) and, for the
    MoE, the top-k assignments per expert per layer."""
    model.eval()
    nll, count, loads = 0.0, 0, None
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch]
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=not fp32):
            out = model(input_ids=x, output_router_logits=is_moe, use_cache=False)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
        if is_moe:
            k = model.config.num_experts_per_tok
            per = torch.stack([torch.bincount(torch.topk(r.float(), k, -1).indices.reshape(-1),
                                              minlength=model.config.num_experts) for r in out.router_logits])
            loads = per if loads is None else loads + per
    model.train()
    return math.exp(nll / count), count, (loads.cpu().tolist() if loads is not None else None)


def balance_summary(loads: list[list[int]]) -> dict:
    arr = np.asarray(loads, dtype=np.float64)
    frac = arr / arr.sum(1, keepdims=True)
    ent = -(frac * np.log(np.where(frac > 0, frac, 1))).sum(1) / math.log(arr.shape[1])
    return {"tokens_per_expert_per_layer": loads, "fraction_min": float(frac.min()), "fraction_max": float(frac.max()),
            "max_over_min_per_layer": [round(float(r.max() / max(r.min(), 1)), 2) for r in arr],
            "normalized_entropy_per_layer": [round(float(e), 4) for e in ent]}


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int = 48) -> str:
    model.eval()
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids], device=DEV)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    model.train()
    return tok.decode(out[0].tolist())


# ---------------------------------------------------------------- training

def router_aux_loss(model, out, balance: str) -> torch.Tensor:
    """The architecture's load-balancing loss (transformers' load_balancing_loss_func), pooled over all layers
    as transformers computes it, or applied to each layer's router and averaged.

    Pooled, one layer may leave an expert unused as long as another layer uses it more: the first training
    run did exactly that (README.md); per layer, every layer's router is pushed towards balance."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    e, k = model.config.num_experts, model.config.num_experts_per_tok
    if balance == "pooled":
        return load_balancing_loss_func(tuple(out.router_logits), e, k)
    return torch.stack([load_balancing_loss_func((r,), e, k) for r in out.router_logits]).mean()


def train(model, name: str, seqs: torch.Tensor, steps: int, batch: int, lr: float, heldout: torch.Tensor,
          time_limit: float, is_moe: bool, balance: str = "per-layer", evals: int = 6) -> dict:
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=DEV.type == "cuda")
    warmup = max(1, steps // 50)

    def lr_at(s):  # linear warmup, then cosine to a tenth of the peak
        if s < warmup:
            return lr * (s + 1) / warmup
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))

    g = torch.Generator(device="cpu").manual_seed(SEED + (0 if is_moe else 1))
    perm = torch.randperm(seqs.shape[0], generator=g).to(DEV)
    log(f"{name}: {n_params(model)} parameters ({n_params(model, skip_embed=True)} without the embedding), "
        f"{sum(p.numel() for p in params)} trained; {steps} steps x {batch} x {SEQ_LEN} tokens, peak lr {lr}, "
        f"warmup {warmup}; {seqs.shape[0]} sequences available")
    if is_moe:
        model.router_aux_loss_coef = 0.0  # out.loss is then the cross-entropy alone; the aux loss is added here
    model.train()
    hist, t_train, tokens, s = [], 0.0, 0, 0
    eval_at = {round(steps * (i + 1) / evals) for i in range(evals - 1)}
    t_last, tok_last = time.time(), 0
    sync()
    for s in range(steps):
        t = time.time()
        for grp in opt.param_groups:
            grp["lr"] = lr_at(s)
        j = (s * batch) % (seqs.shape[0] - batch)
        x = seqs[perm[j:j + batch]].long()
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x, output_router_logits=is_moe, use_cache=False)
        loss, aux = out.loss, None
        if is_moe:
            aux = router_aux_loss(model, out, balance)
            loss = loss + model.config.router_aux_loss_coef * aux
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
        if s % 50 == 0 or s == steps - 1:
            ce = out.loss.item()
            aux = aux.item() if is_moe else 0.0
            sync()
        t_train += time.time() - t
        if s % 50 == 0 or s == steps - 1:
            rate = (tokens - tok_last) / max(1e-9, t_train - t_last) if s else 0.0
            t_last, tok_last = t_train, tokens
            rec = {"step": s, "tokens": tokens, "ce": round(ce, 4), "aux": round(aux, 4), "grad_norm": round(float(gn), 3),
                   "lr": round(lr_at(s), 6), "tok_s": round(rate), "train_s": round(t_train, 1)}
            hist.append(rec)
            log(f"{name} " + json.dumps(rec))
        if s + 1 in eval_at:
            ppl, n, loads = heldout_eval(model, heldout[:64], is_moe)
            rec = {"step": s + 1, "heldout_ppl_64win_bf16": round(ppl, 3)}
            if loads:
                rec["expert_fraction_min"] = round(balance_summary(loads)["fraction_min"], 4)
            hist.append(rec)
            log(f"{name} step {s + 1}: held-out perplexity {ppl:.3f} (first 64 windows, bf16)"
                + (f", least-used expert's share {rec['expert_fraction_min']}" if loads else ""))
        if t_train > time_limit:
            log(f"{name}: STOPPED EARLY at step {s + 1}/{steps}: over the {time_limit:.0f} s limit")
            break
    sync()
    return {"steps_done": s + 1, "steps_planned": steps, "tokens": tokens, "train_s": round(t_train, 1),
            "tok_s": round(tokens / t_train), "final_ce": [h for h in hist if "ce" in h][-1]["ce"], "history": hist}


def finish(model, name: str, tok, heldout: torch.Tensor, is_moe: bool) -> dict:
    """Round to fp16 (what is saved), then evaluate in fp32 exactly as a CPU check with transformers would."""
    use_fast_experts(model, False)
    model.half().float()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ppl, n, loads = heldout_eval(model, heldout, is_moe, fp32=True)
    ppl8, n8, _ = heldout_eval(model, heldout[:8], is_moe, fp32=True)
    res = {"heldout_ppl_fp32": round(ppl, 4), "heldout_predicted_tokens": n, "heldout_ppl_first8_fp32": round(ppl8, 4),
           "heldout_predicted_tokens_first8": n8, "sample_def_fibonacci": greedy(model, tok, "def fibonacci(n):")}
    if is_moe:
        res["expert_load_heldout"] = balance_summary(loads)
    log(f"{name} final: " + json.dumps({k: v for k, v in res.items() if k != "expert_load_heldout"}))
    if is_moe:
        b = res["expert_load_heldout"]
        log(f"{name} expert load: fraction min {b['fraction_min']:.4f} max {b['fraction_max']:.4f} "
            f"(uniform {1 / model.config.num_experts:.4f}); "
            f"normalized entropy per layer {b['normalized_entropy_per_layer']}")
    return res


# ---------------------------------------------------------------- main

def env_report() -> dict:
    import tokenizers
    import transformers
    info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "gpu": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "none", "cpus": os.cpu_count(),
            "stdlib": sysconfig.get_paths()["stdlib"], "grouped_mm": hasattr(F, "grouped_mm")}
    log("env " + json.dumps(info))
    return info


def prepare(tok, args):
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    held_text, used, missing = build_heldout(stdlib)
    held_hashes = {hashlib.sha256((stdlib / r).read_bytes()).hexdigest() for r in used}
    held_ids = tok.encode(held_text, add_special_tokens=False).ids
    n_win = len(held_ids) // EVAL_WINDOW
    if args.max_eval_windows:
        n_win = min(n_win, args.max_eval_windows)
    windows = torch.tensor(held_ids[:n_win * EVAL_WINDOW], dtype=torch.long).view(n_win, EVAL_WINDOW).to(DEV)
    held = {"files": len(used), "missing": missing, "characters": len(held_text), "tokens": len(held_ids),
            "windows_of_512": n_win, "sha256": hashlib.sha256(held_text.encode("utf-8")).hexdigest()}
    log("held-out " + json.dumps(held))
    t = time.time()
    flat, stats = build_corpus(tok, stdlib, held_hashes, limit_files=args.limit_files)
    log(f"corpus {json.dumps(stats)} (read + tokenize {time.time() - t:.1f}s)")
    return held_text, held, windows, flat, stats


def probe(args, tok):
    env_report()
    held_text, held, windows, flat, stats = prepare(tok, args)
    n = flat.size // SEQ_LEN
    seqs = torch.from_numpy(flat[:n * SEQ_LEN].reshape(n, SEQ_LEN)).to(DEV)
    # the bf16 grouped path against transformers' default expert loop, on the same weights
    model = make_model("moe").to(DEV)
    x = seqs[:4].long()
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        ref = model(input_ids=x, use_cache=False).logits.float()
        use_fast_experts(model, True)
        got = model(input_ids=x, use_cache=False).logits.float()
    log(f"experts check: max |fast - default| logits {float((got - ref).abs().max()):.4g} "
        f"(logit scale {float(ref.abs().max()):.3g})")
    for kind, batch in (("moe", 32), ("moe", 64), ("draft", 32)):
        model = make_model(kind).to(DEV)
        if kind == "moe":
            use_fast_experts(model, True)
        r = train(model, f"probe-{kind}-b{batch}", seqs, steps=10**6, batch=batch, lr=1e-3, heldout=windows,
                  time_limit=args.probe_seconds, is_moe=kind == "moe", evals=1)
        mem = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else 0.0
        log(f"probe {kind} batch {batch}: {r['tok_s']} tok/s over {r['steps_done']} steps, peak memory {mem:.1f} GiB")
        del model
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def full(args, tok):
    info = env_report()
    held_text, held, windows, flat, stats = prepare(tok, args)
    n = flat.size // SEQ_LEN
    seqs = torch.from_numpy(flat[:n * SEQ_LEN].reshape(n, SEQ_LEN)).to(DEV)
    del flat
    bundle = Path(tempfile.mkdtemp(prefix="tiny-moe-"))
    (bundle / "moe").mkdir(parents=True, exist_ok=True)
    if args.draft_steps > 0:
        (bundle / "draft").mkdir(parents=True, exist_ok=True)
    (bundle / "heldout.txt").write_text(held_text, encoding="utf-8")
    metrics = {"env": info, "seed": SEED, "seq_len": SEQ_LEN, "eval_window": EVAL_WINDOW, "heldout": held,
               "corpus": stats, "moe_config": MOE, "draft_config": DRAFT if args.draft_steps > 0 else None,
               "args": vars(args)}

    def dump():
        (OUT / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))

    moe = make_model("moe").to(DEV)
    use_fast_experts(moe, True)
    metrics["moe_params"] = n_params(moe)
    metrics["moe_train"] = train(moe, "moe", seqs, args.moe_steps, args.batch, args.moe_lr, windows,
                                 args.moe_seconds, True, balance=args.balance)
    dump()
    metrics["moe_final"] = finish(moe, "moe", tok, windows, True)
    dump()
    moe.half()
    moe.router_aux_loss_coef = moe.config.router_aux_loss_coef
    moe.config.output_router_logits = False
    moe.save_pretrained(bundle / "moe", max_shard_size="500MB")
    emb = moe.get_input_embeddings().weight.detach().clone()
    metrics["embedding_fp16_sha256"] = hashlib.sha256(emb.cpu().numpy().tobytes()).hexdigest()
    del moe
    if args.draft_steps > 0:
        train_draft(args, tok, seqs, windows, emb, bundle, metrics, dump)
    metrics["total_s"] = round(time.time() - T0, 1)
    dump()
    for f in ("metrics.json", "train.log"):
        (bundle / f).write_bytes((OUT / f).read_bytes())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(bundle, arcname="tiny-moe-bundle")
    data, part = buf.getvalue(), 15 * 2**20
    for i in range(0, len(data), part):
        (OUT / f"bundle.tar.part{i // part:02d}").write_bytes(data[i:i + part])
    log(f"bundle: {len(data)} bytes in {math.ceil(len(data) / part)} parts, sha256 "
        f"{hashlib.sha256(data).hexdigest()}; total {time.time() - T0:.1f}s")


def train_draft(args, tok, seqs, windows, emb, bundle, metrics, dump):
    draft = make_model("draft").to(DEV)
    with torch.no_grad():
        draft.get_input_embeddings().weight.copy_(emb.float())
    draft.get_input_embeddings().weight.requires_grad_(False)
    metrics["draft_params"] = n_params(draft)
    metrics["draft_train"] = train(draft, "draft", seqs, args.draft_steps, args.batch, args.draft_lr, windows,
                                   args.draft_seconds, False)
    dump()
    metrics["draft_final"] = finish(draft, "draft", tok, windows, False)
    dump()
    draft.half()
    draft.config.save_pretrained(bundle / "draft")
    draft.generation_config.save_pretrained(bundle / "draft")
    from safetensors.torch import save_file
    body = {k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items()
            if "embed_tokens" not in k and k != "lm_head.weight"}
    save_file(body, str(bundle / "draft" / "body.safetensors"), metadata={"format": "pt"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, default=REPO / "models/smollm2-135m-instruct/tokenizer.json")
    ap.add_argument("--probe", action="store_true", help="measure only: versions, corpus, step speed")
    ap.add_argument("--probe-seconds", type=float, default=12.0)
    ap.add_argument("--limit-files", type=int, default=None, help="read only the first N source files")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="MoE config: default (8 experts, hidden 256, the committed tiny-moe) or moe16 (16 "
                         "experts of width 512, hidden 128: experts are most of the bytes a verification reads)")
    ap.add_argument("--batch", type=int, default=32, help="sequences of 1024 tokens per step")
    ap.add_argument("--moe-steps", type=int, default=3000)
    ap.add_argument("--moe-lr", type=float, default=2e-3)
    ap.add_argument("--moe-seconds", type=float, default=360.0, help="stop the MoE early past this training time")
    ap.add_argument("--balance", choices=["per-layer", "pooled"], default="per-layer",
                    help="load-balancing loss per layer (default) or pooled over layers as transformers does")
    ap.add_argument("--draft-steps", type=int, default=1500, help="0: no draft (nothing of it is returned)")
    ap.add_argument("--draft-lr", type=float, default=2e-3)
    ap.add_argument("--draft-seconds", type=float, default=90.0)
    ap.add_argument("--max-eval-windows", type=int, default=None, help="smoke tests: fewer held-out windows")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    args = ap.parse_args()
    global DEV, MOE
    DEV = torch.device(args.device)
    MOE = PRESETS[args.preset]
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    tok = load_tokenizer(args.tokenizer)
    log(f"args {json.dumps({k: str(v) for k, v in vars(args).items()})}")
    (probe if args.probe else full)(args, tok)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
