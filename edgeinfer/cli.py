"""The ``edgeinfer`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from . import __version__
from .cliargs import Parser, real, size, whole
from .errors import EdgeInferError

EPILOG = """examples:
  edgeinfer chat                                     chat with the default model (SmolLM2-135M-Instruct)
  edgeinfer convert HuggingFaceTB/SmolLM2-135M-Instruct -o models/smollm2 --bits 4
  edgeinfer convert model.Q4_1.gguf -o models/mine   GGUF weights keep their quantization, losslessly
  edgeinfer generate -m models/smollm2 -p "Once upon a time" --max-tokens 64
  edgeinfer eval -m models/smollm2 ppl --data wiki.test.raw --window 512 --max-windows 8
  edgeinfer bench -m models/smollm2 -p 512 -n 128 -r 5 --threads 2   prefill/decode t/s, like llama-bench
  edgeinfer sparsify models/smollm2 --sparsity 0.4 0.5   add R-Sparse plans; then generate/chat/eval --sparsity 0.5

-m accepts a package folder or a catalog name (smollm2-135m-instruct, gemma3-270m), which is fetched and
converted into models/ on first use. Errors print one line and exit with status 2."""


def _add_model(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("-m", "--model", required=required, default=None,
                   help="package folder or catalog name" + ("" if required else " (default: the catalog's default model)"))
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "onnx"],
                   help="runtime backend: auto (MLX on Apple Silicon, ONNX Runtime elsewhere when the package has a graph), "
                        "mlx or onnx (default: auto)")
    p.add_argument("--threads", type=whole(1), default=None, help="CPU threads of the ONNX backend (default: one per core)")


def _add_memory(p: argparse.ArgumentParser) -> None:
    """--memory-budget, --context and --kv-overflow: the memory planner's inputs (edgeinfer.memory)."""
    g = p.add_argument_group("memory")
    g.add_argument("--memory-budget", type=size, default=None, metavar="SIZE",
                   help="memory the model may use, e.g. 1.5GB, 800MiB or 60%% (of the machine's memory); default: what the "
                        "device has available, less headroom for the OS")
    g.add_argument("--context", type=whole(2), default=None, metavar="N",
                   help="context tokens to plan for (default: the model's maximum, shortened when it does not fit)")
    g.add_argument("--kv-overflow", choices=["refuse", "rotate"], default="refuse",
                   help="when the context is full: refuse (stop, with a clear message; default) or rotate (forget the oldest tokens)")


def _memory(a) -> dict:
    return dict(memory_budget=getattr(a, "memory_budget", None), context=getattr(a, "context", None),
                kv_overflow=getattr(a, "kv_overflow", None) or "refuse")


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=whole(1), default=max_tokens, help=f"tokens to generate at most (default {max_tokens})")
    g.add_argument("--temp", type=real(0), default=0.0, help="temperature; 0 is greedy (default 0)")
    g.add_argument("--top-p", type=real(0, 1, lo_open=True), default=1.0, help="nucleus sampling mass (default 1: off)")
    g.add_argument("--top-k", type=whole(0), default=0, help="keep the k most likely tokens (default 0: off)")
    g.add_argument("--min-p", type=real(0, 1, hi_open=True), default=0.0, help="drop tokens below min-p times the top probability (default 0)")
    g.add_argument("--repetition-penalty", type=real(0, lo_open=True), default=1.0, help="penalty for recently seen tokens (default 1: off)")
    g.add_argument("--seed", type=whole(0), default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT appears (repeatable)")


def _add_sparsity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=real(0, 1, hi_open=True), default=0.0, metavar="LEVEL",
                   help="R-Sparse activation sparsity: a level the package holds a plan for (made by `edgeinfer sparsify`; "
                        "the manifest's sparsity.levels lists them), e.g. 0.5; one-token decode steps run sparse, prefill "
                        "dense (default 0: dense)")


MAX_DRAFT = 64  # edgeinfer.speculative.MAX_DRAFT, not imported here: it brings numpy into every command's start (a test checks)


def _add_speculative(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", default=None, metavar="PKG|ngram",
                   help="draft tokens cheaply and verify them with the model in one pass: a smaller package with the same "
                        "tokenizer (folder or catalog name), or ngram (prompt lookup: continue earlier occurrences of the "
                        "last tokens; good for code, edits, quoting). Greedy output is unchanged; sampling keeps the "
                        "model's distribution")
    g.add_argument("--num-draft", type=whole(1, MAX_DRAFT), default=4, metavar="N",
                   help="tokens drafted per step at most, as a chain; the length adapts: 2 more after a draft accepted "
                        "whole, 1 fewer otherwise (default 4)")
    g.add_argument("--tree", default=None, metavar="WxD",
                   help="draft a tree instead of a chain: W candidates per depth, at most D deep (e.g. 2x4), verified "
                        "in one tree-masked pass")


def _add_moe(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts (MoE models only)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--expert-budget", type=whole(1), default=None, metavar="B",
                   help="MoE-Spec: when verifying speculative drafts (--draft), run at most B distinct experts per MoE layer "
                        "(those with the most summed routing probability over the drafted tokens); B >= the model's top-k; "
                        "prefill and plain decoding are never capped")
    b.add_argument("--expert-mass", type=real(0, 1, lo_open=True), default=None, metavar="F",
                   help="like --expert-budget, but keep the fewest experts holding a share F (0 < F <= 1) of the routing mass")
    g.add_argument("--budget-policy", choices=["substitute", "truncate"], default="substitute",
                   help="a token whose experts were cut: substitute (re-pick its top-k among the kept experts) or truncate "
                        "(drop the cut ones) (default substitute)")
    g.add_argument("--moe-top-k", type=whole(1), default=None, metavar="K",
                   help="experts per token for every forward, instead of the model's own top-k (\"dial k\": fewer is faster, "
                        "less exact)")


def _expert_budget(a):
    """--expert-budget/--expert-mass/--budget-policy as an ExpertBudget, or None."""
    if getattr(a, "expert_budget", None) is None and getattr(a, "expert_mass", None) is None:
        return None
    from .moe import ExpertBudget

    return ExpertBudget(budget=a.expert_budget, mass=a.expert_mass, policy=getattr(a, "budget_policy", "substitute"))


def _check_moe(m, a) -> None:
    """MoE flags on a dense model are an error; a budget without a draft does nothing, so it warns."""
    from .moe import check_moe

    budget = _expert_budget(a)
    check_moe(m.spec, budget, None)
    if budget is not None:
        budget.controls(m.spec, getattr(m.backend, "moe_top_k", m.spec.num_experts_per_tok))
        if getattr(a, "draft", None) is None:
            print("edgeinfer: --expert-budget/--expert-mass cap the verification of speculative drafts; without --draft "
                  "they change nothing", file=sys.stderr)


def _attach_speculative(m, a) -> None:
    """--draft/--num-draft/--tree: the model's default speculator."""
    from .speculative import make_speculator

    draft = getattr(a, "draft", None)
    if draft is not None and draft != "ngram":
        from edgeinfer.apps.resolve import resolve_package

        draft = str(resolve_package(draft))
    # MoE-Spec: the budget caps verification forwards only; prefill is never capped
    m.speculative = make_speculator(m, draft, a.num_draft, a.tree, expert_budget=_expert_budget(a))


def _check_speculative(a) -> None:
    from .speculative import check_options

    check_options(getattr(a, "draft", None), getattr(a, "num_draft", 4), getattr(a, "tree", None))


def _add_meter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--meter", default="auto", metavar="auto|none|NAME",
                   help="energy meter for the answer's joules (see `edgeinfer meters`); auto picks the best one here, "
                        "the model estimate when the machine has no power counter (default auto)")


def _attach_meter(m, a) -> None:
    from .energy import open_meter

    m.meter = open_meter(getattr(a, "meter", "none"))


def _sampling(a) -> dict:
    return dict(temp=a.temp, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="edgeinfer", description="Run language models well on the machine in front of you.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"edgeinfer {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("convert", help="convert a Hugging Face model or GGUF file into a package",
                       description="Convert SRC (a Hugging Face repo id, a local Hugging Face folder, a catalog name or a .gguf file) "
                                   "into an edgeinfer package folder OUT. Writing is atomic: a failed run leaves no OUT.")
    p.add_argument("src", help="HF repo id, local HF folder, catalog name or .gguf file")
    p.add_argument("-o", "--out", default=None, help="the package folder to create (leave out when SRC is a package "
                                                      "that gets its ONNX graph added)")
    p.add_argument("--backend", default="all", choices=["mlx", "onnx", "all"],
                   help="what to write: mlx (weights only), onnx or all (weights + model.onnx, which reads the same "
                        "weights) (default all)")
    p.add_argument("--accuracy-level", default="auto", choices=["auto", "1", "4"],
                   help="ONNX MatMulNBits compute: 4 = int8 activations in groups, fast, like llama.cpp's Q8 dot products; "
                        "1 = float, exact, ~25x slower decode; auto (default) = 4 unless a check on a short text finds "
                        "its logits too far from exact, then 1")
    p.add_argument("--bits", type=int, choices=[4, 8, 16, 32], default=None,
                   help="weight bits: 4 or 8 (affine groups), 16 (fp16), 32 (fp32). Default: 4 for HF sources; "
                        "a GGUF keeps its own quantized tensors and stores float ones in fp16, and with --bits every "
                        "tensor is stored at that width (quantized ones re-quantized from their values: smaller, lossy)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None, help="quantization group size (default 64; 32 for GGUF)")
    p.add_argument("--name", default=None, help="model name recorded in the manifest")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja chat template to use when the source has none")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Stream a continuation of a prompt, then one stats line (to stderr).")
    _add_model(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (implies --chat)")
    p.add_argument("--no-stats", action="store_true", help="do not print the stats line")
    _add_sparsity(p)
    _add_meter(p)
    _add_memory(p)
    _add_sampling(p)
    _add_speculative(p)
    _add_moe(p)

    p = sub.add_parser("chat", help="chat with a model (interactive, or one prompt per line from a pipe)",
                       description="Interactive chat in a terminal. With stdin not a terminal, reads one prompt per line "
                                   "and prints one answer per line. /help inside the chat lists its commands.")
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--load", default=None, metavar="FILE", help="continue a conversation saved with /save")
    p.add_argument("--no-markdown", action="store_true", help="print answers as plain text (no Markdown styling)")
    _add_sparsity(p)
    _add_meter(p)
    _add_memory(p)
    _add_sampling(p, max_tokens=512)
    _add_speculative(p)
    _add_moe(p)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
                       description="Serve one model over HTTP with OpenAI's API: POST /v1/chat/completions and /v1/completions "
                                   "(streaming or not), GET /v1/models, /health and /metrics (Prometheus). Binds to loopback "
                                   "unless --host says otherwise; generations run one at a time, in arrival order, and a request "
                                   "that extends the previous conversation prefills only its new tokens. Ctrl-C or SIGTERM stops it.")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=whole(0), default=8080, help="TCP port (default 8080; 0 picks a free one)")
    p.add_argument("--max-body", type=size, default=None, metavar="SIZE", help="largest request body (default 4MB)")
    p.add_argument("--max-queue", type=whole(1), default=16, metavar="N",
                   help="requests waiting or running at once; the next gets 503 with a Retry-After (default 16)")
    p.add_argument("-q", "--quiet", action="store_true", help="no access log")
    _add_meter(p)
    _add_memory(p)

    p = sub.add_parser("plan", help="how a model fits a memory budget, and what it gives up to fit",
                       description="Print the memory plan: bytes for the weights (exact, from the package), the KV cache per "
                                   "token and at the context, activations and workspace, and what was chosen to fit the "
                                   "budget (float or quantized weights, KV precision, context, layers read from disk), or a "
                                   "refusal naming the smallest budget that works (exit status 2). The same planner runs "
                                   "when generate, chat, eval and bench load a model.")
    _add_model(p)
    _add_memory(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("models", help="list the catalog's models and which are converted",
                       description="List the models of models/catalog.json, and whether each is converted under models/.")

    p = sub.add_parser("eval", help="evaluate a package (perplexity, generation check)",
                       description="Evaluate a package. With --sparsity, ppl sparsifies every position (each token on its "
                                   "own, as TEAL evaluates; MLX backend) and gen compares greedy generations with dense.")
    _add_model(p)
    _add_memory(p)
    _add_sparsity(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    esub = p.add_subparsers(dest="task", metavar="TASK")
    esub.required = True
    pp = esub.add_parser("ppl", help="perplexity over non-overlapping token windows of a text file")
    pp.add_argument("--data", required=True, help="UTF-8 text file (e.g. wikitext-2 raw test)")
    pp.add_argument("--window", type=whole(2), default=512, help="tokens per window (default 512)")
    pp.add_argument("--max-windows", type=whole(1), default=None, help="evaluate only the first N windows")
    pp.add_argument("--spread", action="store_true",
                    help="with --max-windows: take the N windows evenly spaced over the whole text, not the first N")
    pp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pg = esub.add_parser("gen", help="greedy generations under --sparsity against dense: agreement, and the texts",
                         description="For a fixed set of prompts (or --prompts FILE, one per line): greedy continuations "
                                     "dense and sparse, both printed so garbled text is visible; agreement = the share of "
                                     "the dense continuation's tokens that the sparse model also predicts greedily when fed "
                                     "the dense text (teacher-forced, decode steps sparse), and the tokens until the free "
                                     "sparse generation first differs.")
    pg.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one per line (default: 8 built-in prompts)")
    pg.add_argument("--max-tokens", type=whole(1), default=48, help="tokens per continuation (default 48)")
    pg.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no texts (the figures only)")

    pa = esub.add_parser("agree", help="greedy chat answers against the exact model (MLX), teacher-forced",
                         description="Greedy answers of the model as loaded (--backend) to each prompt, checked against "
                                     "the exact model on MLX with one prefill over prompt + answer: equal when the exact "
                                     "model's argmax is the answer's token at every position. For each disagreement, the "
                                     "exact model's logit margin at the first differing token (a near-tie is a small one).")
    pa.add_argument("--prompts", default=None, metavar="FILE",
                    help="prompts, one per line (default: the 52 chat prompts of tests/data/chat_prompts.txt)")
    pa.add_argument("--max-tokens", type=whole(1), default=32, help="tokens per answer (default 32)")
    pa.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no per-prompt lines")

    p = sub.add_parser("bench", help="prefill and decode speed, like llama-bench",
                       description="Prefill (ppP) and decode (tgN) tokens/s as mean and standard deviation over -r "
                                   "repetitions, after a warm-up; random token ids (no tokenization); TTFT, peak memory, "
                                   "the share of the memory-bandwidth roofline (bandwidth measured in the same run), "
                                   "the machine and versions.")
    p.add_argument("-m", "--model", default=None, help="package folder or catalog name (default: the catalog's default model)")
    p.add_argument("-p", type=whole(1), default=512, metavar="N", help="prompt tokens of the prefill test (default 512)")
    p.add_argument("-n", type=whole(1), default=128, metavar="N", help="decode steps of the generation test (default 128)")
    p.add_argument("-r", type=whole(1), default=5, metavar="N", help="repetitions (default 5)")
    p.add_argument("--backend", default="auto", help="backend, or several separated by commas: auto, mlx, onnx (default auto)")
    p.add_argument("--threads", type=whole(1), default=None, help="CPU threads for backends that take a count (default: theirs)")
    p.add_argument("--seed", type=whole(0), default=0, help="seed of the random token ids (default 0)")
    p.add_argument("--no-warmup", action="store_true", help="count the first run too")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_sparsity(p)
    _add_memory(p)
    _add_speculative(p)
    _add_moe(p)

    p = sub.add_parser("meters", help="list the energy meters this machine offers",
                       description="List every energy meter edgeinfer knows, what it measures (its source label), whether "
                                   "it works here and why not, and which one --meter auto picks.")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    p = sub.add_parser("sparsify", help="add R-Sparse activation-sparsity plans to a package",
                       description="Calibrate activation sparsity for PKG and add one plan per level (thresholds, sparse "
                                   "shares, ranks, low-rank factors) to the package, atomically; run with --sparsity LEVEL "
                                   "afterwards. Calibration text is generated by the model itself from fixed seed prompts "
                                   "(or --calib FILE); never calibrate on the text you evaluate on.")
    p.add_argument("package", metavar="PKG", help="package folder or catalog name")
    p.add_argument("--sparsity", type=real(0, 1, lo_open=True, hi_open=True), nargs="+", required=True, metavar="LEVEL",
                   help="model-level sparsity (share of the seven projections' weights not read per token), one or more, "
                        "e.g. 0.4 0.5 0.6")
    p.add_argument("--method", choices=["rsparse", "teal"], default="rsparse",
                   help="rsparse: sparse channels plus a low-rank residual, score |x|*||W col|| where rho < 1; "
                        "teal: magnitude thresholds only (rho = 1, no low-rank) (default rsparse)")
    p.add_argument("--search", choices=["evolutionary", "greedy", "uniform"], default=None,
                   help="how sparsity (and rho) are spread over layers: evolutionary (R-Sparse's search, see "
                        "--fitness), greedy (TEAL's per-projection allocation) or uniform "
                        "(default: evolutionary for rsparse, uniform for teal)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calib", default=None, metavar="FILE", help="calibration text (UTF-8) instead of generated text")
    g.add_argument("--calib-generate", type=whole(1), default=2048, metavar="N",
                   help="tokens of calibration text the model generates from built-in seed prompts (default 2048)")
    p.add_argument("--seed", type=whole(0), default=0, help="seed of the generated text and of the search (default 0)")
    s = p.add_argument_group("evolutionary search", "The paper searches with 16 samples, a population of about 32 and "
                             "about 5 generations; the defaults (12 x 4, 8 windows: 42 evaluations of 1024 tokens) take "
                             "about 5 minutes per level for SmolLM2-135M on 2 CPU cores.")
    s.add_argument("--population", type=whole(2), default=12, help="candidates per generation (default 12)")
    s.add_argument("--generations", type=whole(1), default=4, help="generations (default 4)")
    s.add_argument("--fitness-windows", type=whole(1), default=8,
                   help="calibration windows of 128 tokens the fitness is measured on (default 8)")
    s.add_argument("--fitness", choices=["kl", "ppl"], default="kl",
                   help="what the search minimizes on those windows: kl, the mean KL divergence of the sparse model's "
                        "next-token distributions from dense's, or ppl, the sparse model's perplexity (the paper's) "
                        "(default kl)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    from edgeinfer.apps.profile import add_profile_parser

    add_profile_parser(sub)
    from edgeinfer.apps.scenario import add_scenario_parser

    add_scenario_parser(sub)
    return ap


def _load(a):
    from edgeinfer.apps.resolve import resolve_package

    from .model import load

    moe = {} if getattr(a, "moe_top_k", None) is None else {"moe_top_k": a.moe_top_k}
    if moe:  # checked before loading: a dense model refuses the flag in one line
        from .moe import check_moe
        from .package import open_package

        check_moe(open_package(resolve_package(a.model)).spec, None, a.moe_top_k)
    m = load(resolve_package(a.model), backend=a.backend, threads=a.threads, sparsity=getattr(a, "sparsity", 0.0),
             **_memory(a), **moe)
    _check_moe(m, a)
    return m


def cmd_plan(a) -> int:
    from edgeinfer.apps.resolve import resolve_package

    from .backends import choose_backend
    from .memory import plan_memory
    from .package import open_package
    from .tokenizer import Tokenizer

    pkg = open_package(resolve_package(a.model))
    Tokenizer(pkg.path, pkg.tokenizer_info)  # loaded as a run would, so the measured baseline includes it
    m = _memory(a)
    plan = plan_memory(pkg, budget=m["memory_budget"], context=m["context"], kv_overflow=m["kv_overflow"],
                       backend=choose_backend(pkg, a.backend))
    # a refusal is said once, on stderr (below); stdout has the plan it is the total of
    print(json.dumps(plan.to_dict(), indent=1) if a.json else plan.explain(verdict=False))
    if not plan.fits:
        raise EdgeInferError(plan.refusal())
    return 0


def cmd_convert(a) -> int:
    from edgeinfer.converters.convert import convert

    from .evaluate import read_text

    command = "edgeinfer " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    template = read_text(a.chat_template) if a.chat_template else None
    out = convert(a.src, a.out, bits=a.bits, group_size=a.group_size, force=a.force, command=command,
                  progress=not a.quiet, name=a.name, chat_template=template, backend=a.backend,
                  accuracy_level=None if a.accuracy_level == "auto" else int(a.accuracy_level))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    _check_speculative(a)
    m = _load(a)
    _attach_meter(m, a)
    _attach_speculative(m, a)
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    if a.system or a.chat:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
        stream = m.stream(msgs, max_tokens=a.max_tokens, stop=a.stop, **_sampling(a))
    else:
        stream = m.stream(prompt, max_tokens=a.max_tokens, stop=a.stop, **_sampling(a))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not a.no_stats:
        print(m.stats.line(), file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    from edgeinfer.apps.chat import run_chat

    _check_speculative(a)
    m = _load(a)
    _attach_meter(m, a)
    _attach_speculative(m, a)
    return run_chat(m, a, _sampling(a))


def cmd_serve(a) -> int:
    from edgeinfer.apps.serve import MAX_BODY_BYTES, serve

    from .memory import parse_budget

    if a.port > 65535:
        raise EdgeInferError(f"--port must be at most 65535, not {a.port}")
    if a.max_body and a.max_body.endswith("%"):
        raise EdgeInferError(f"--max-body takes a size like 4MB, not {a.max_body!r}")
    max_body = parse_budget(a.max_body, total=1 << 40) if a.max_body else MAX_BODY_BYTES
    m = _load(a)
    _attach_meter(m, a)
    return serve(m, host=a.host, port=a.port, max_body=int(max_body), max_queue=a.max_queue, quiet=a.quiet)


def cmd_models(a) -> int:
    from edgeinfer.apps.resolve import models_dir
    from edgeinfer.converters.fetch import load_catalog

    from .package import MANIFEST

    catalog = load_catalog()
    for name, entry in catalog["models"].items():
        pkg = models_dir() / name
        state = f"converted: {pkg}" if (pkg / MANIFEST).exists() else "not converted yet (fetched on first use)"
        default = " (default)" if name == catalog["default"] else ""
        print(f"{name}{default}\n    {entry.get('description', '')}\n    {state}")
    return 0


def cmd_eval(a) -> int:
    from .evaluate import perplexity, read_text, sparse_every_position

    if a.task == "gen":
        return cmd_eval_gen(a)
    if a.task == "agree":
        return cmd_eval_agree(a)
    text = read_text(a.data)
    if a.sparsity and a.backend == "auto":
        a.backend = "mlx"  # sparse perplexity needs the all-positions mode, which the MLX backend has
    m = _load(a)
    sparse_every_position(m)
    r = perplexity(m, text, window=a.window, max_windows=a.max_windows, progress=not a.quiet, spread=a.spread)
    if a.json:
        print(json.dumps({"model": str(m.package.path), "data": a.data, **r.to_dict()}))
    else:
        print(f"perplexity {r.ppl:.4f} over {r.windows} of {r.total_windows}{' evenly spaced' if r.spread else ''} windows of {r.window} tokens "
              f"({r.predicted_tokens} predicted tokens, {r.seconds:.1f} s)")
    return 0


def cmd_eval_gen(a) -> int:
    from .evaluate import GEN_PROMPTS, generation_check, read_text

    if not a.sparsity:
        raise EdgeInferError("eval gen compares a sparsity level with dense: give --sparsity LEVEL")
    prompts = [x for x in read_text(a.prompts).splitlines() if x.strip()] if a.prompts else GEN_PROMPTS
    if not prompts:
        raise EdgeInferError(f"{a.prompts} has no prompts (one per line)")
    m = _load(a)
    r = generation_check(m, prompts, max_tokens=a.max_tokens, progress=not a.quiet)
    if a.json:
        print(json.dumps({"model": str(m.package.path), "sparsity": m.sparsity, **r}))
        return 0
    if not a.quiet:
        for s in r["samples"]:
            print(f"### {s['prompt']}\n--- dense\n{s['dense']}\n--- sparsity {m.sparsity:.2f}\n{s['sparse']}\n")
    print(f"greedy agreement with dense at sparsity {m.sparsity:.2f}: {r['agreement']:.3f} of {r['tokens']} tokens "
          f"(teacher-forced); free generation matches dense for {r['mean_prefix']:.1f} tokens on average")
    return 0


def cmd_eval_agree(a) -> int:
    from pathlib import Path

    from .evaluate import greedy_agreement, read_text
    from .model import Model

    path = a.prompts or Path(__file__).resolve().parent.parent / "tests" / "data" / "chat_prompts.txt"
    prompts = [x for x in read_text(path).splitlines() if x.strip()]
    if not prompts:
        raise EdgeInferError(f"{path} has no prompts (one per line)")
    m = _load(a)
    ref = Model(m.package.path, backend="mlx")
    r = greedy_agreement(m, ref, prompts, max_tokens=a.max_tokens, progress=not a.quiet)
    if a.json:
        print(json.dumps({"model": str(m.package.path), "backend": m.backend_name, **r}))
        return 0
    if not a.quiet:
        for row in r["rows"]:
            extra = "" if row["equal"] else (f"  differs at token {row['first_difference']}: {row['model_token']!r} "
                                             f"for {row['exact_token']!r}, margin {row['margin']:.3f}")
            print(f"{'=' if row['equal'] else '!'} {row['prompt']}{extra}")
    print(f"{r['equal']} of {r['prompts']} greedy answers ({a.max_tokens} tokens) equal the exact model's on "
          f"{m.backend_name}; largest margin of a disagreement {r['max_margin']:.3f}")
    return 0


def cmd_bench(a) -> int:
    from edgeinfer.apps.bench import main_bench

    return main_bench(a)


def cmd_meters(a) -> int:
    from .energy import print_meters

    print_meters(json_out=a.json)
    return 0


def cmd_sparsify(a) -> int:
    from edgeinfer.apps.resolve import resolve_package
    from edgeinfer.converters.sparsify import SearchSettings, sparsify

    command = "edgeinfer " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    pkg = resolve_package(a.package)
    settings = SearchSettings(population=a.population, generations=a.generations, fitness_windows=a.fitness_windows,
                              fitness=a.fitness)
    done = sparsify(pkg, a.sparsity, method=a.method, search=a.search, calib_file=a.calib, calib_generate=a.calib_generate,
                    seed=a.seed, command=command, settings=settings, progress=not a.quiet)
    for level, e in done.items():
        print(f"wrote {pkg}/{e['file']}: {e['method']} ({e['search']}), realized sparsity {e['realized']:.3f}, "
              f"calibration ppl {e['fitness']['ppl']:.3f} (dense {e['fitness']['dense_ppl']:.3f})", file=sys.stderr)
    return 0


def cmd_profile(a) -> int:
    from edgeinfer.apps.profile import run_profile

    return run_profile(a)


def cmd_scenario(a) -> int:
    from edgeinfer.apps.scenario import cmd_scenario as run

    return run(a)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    try:
        a = ap.parse_args(argv)  # a bad flag: a UsageError, printed below like every other error
        return {"convert": cmd_convert, "generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval,
                "models": cmd_models, "plan": cmd_plan, "bench": cmd_bench,
                "meters": cmd_meters, "serve": cmd_serve, "profile": cmd_profile, "sparsify": cmd_sparsify,
                "scenario": cmd_scenario}[a.cmd](a)
    except EdgeInferError as e:
        print(f"edgeinfer: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
