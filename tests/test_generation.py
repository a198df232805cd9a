"""Generation on a tiny random model: sampling, stop rules, streaming detokenization, the KV cache
across chat turns, evaluation, and the CLI around them."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from edgeinfer.errors import EdgeInferError
from edgeinfer.model import GenerationConfig
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.tokenizer import StreamingDetokenizer


@pytest.fixture(scope="module")
def model(edge_models):
    m = edge_models("llama", 32)
    m.reset()
    return m


def greedy_text(model, prompt="hello world", n=40):
    model.reset()
    return model.generate(prompt, max_tokens=n)


def test_streaming_detokenizer_never_splits_a_character(model):
    text = "naïve café 東京 🙂 ok"
    ids = model.tokenizer.encode(text)
    assert len(ids) == len(text.encode())  # a byte-level vocabulary: multi-byte characters span tokens
    d = StreamingDetokenizer(model.tokenizer)
    deltas = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)


def test_stream_pieces_join_to_generate(model):
    full = greedy_text(model)
    model.reset()
    assert "".join(model.stream("hello world", max_tokens=40)) == full


def test_stop_string_cuts_before_it(model):
    full = greedy_text(model)
    stop = full[12:15]
    cut = full.find(stop)
    model.reset()
    out = model.generate("hello world", max_tokens=40, stop=[stop])
    assert out == full[:cut]
    assert model.stats.finish_reason == "stop"


def test_max_tokens_and_eos(model):
    model.reset()
    ids = list(model.stream_ids(model.tokenizer.encode("abc"), GenerationConfig(max_tokens=7)))
    assert len(ids) == 7 and model.stats.finish_reason == "length"
    first = ids[0]
    saved = set(model.tokenizer.eos_token_ids)
    try:
        model.tokenizer.eos_token_ids = {first}
        model.reset()
        assert list(model.stream_ids(model.tokenizer.encode("abc"), GenerationConfig(max_tokens=7))) == []
        assert model.stats.finish_reason == "stop"
    finally:
        model.tokenizer.eos_token_ids = saved


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    def run(**kw):
        model.reset()
        return model.generate("hello world", max_tokens=24, **kw)

    a = run(temp=1.0, seed=7)
    assert a == run(temp=1.0, seed=7)
    assert a != run(temp=1.0, seed=8) or a != run(temp=1.0, seed=9)
    assert run(temp=1.0, top_k=1, seed=3) == greedy_text(model, n=24)
    assert run(temp=0.8, top_p=1e-6, seed=3) == greedy_text(model, n=24)


def _samples(params: SamplingParams, logits: np.ndarray, n=400, history=None):
    s = Sampler(params)
    lg = mx.array(logits[None].astype(np.float32))
    return {int(s(lg, history).item()) for _ in range(n)}


def test_sampler_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.04, 0.01]))
    assert _samples(SamplingParams(temp=1.0, seed=0), logits) >= {0, 1, 2, 3}  # unfiltered: the tail shows up
    assert _samples(SamplingParams(temp=1.0, top_k=2, seed=0), logits) == {0, 1}
    # top-p 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it, so tokens 0 and 1 remain
    assert _samples(SamplingParams(temp=1.0, top_p=0.7, seed=0), logits) == {0, 1}
    # min-p 0.2: keep p >= 0.2 * 0.5 = 0.1
    assert _samples(SamplingParams(temp=1.0, min_p=0.2, seed=0), logits) == {0, 1, 2}
    assert _samples(SamplingParams(temp=0.0), logits) == {0}


def test_repetition_penalty_moves_the_argmax():
    logits = np.array([2.0, 1.9, -1.0])
    assert _samples(SamplingParams(temp=0.0), logits, n=1, history=[0]) == {0}
    assert _samples(SamplingParams(temp=0.0, repetition_penalty=1.2), logits, n=1, history=[0]) == {1}
    # a negative logit is pushed further down, never up
    assert _samples(SamplingParams(temp=0.0, repetition_penalty=10), np.array([-1.0, -1.05]), n=1, history=[1]) == {0}


@pytest.mark.parametrize("bad", [dict(temp=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=1.0),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_parameters(bad):
    with pytest.raises(EdgeInferError):
        SamplingParams(**bad).validate()


def test_chat_turns_reuse_the_cache_and_match_a_fresh_run(edge_models, tiny_package):
    import edgeinfer
    from edgeinfer.apps.chat import ChatSession

    m = edge_models("qwen3", 32)
    m.reset()
    opts = {"max_tokens": 12, "sampling": {}, "stop": []}
    s = ChatSession(m, "be brief", opts)
    "".join(s.ask("first question"))
    turn1_prompt = m.stats.prompt_tokens
    second = "".join(s.ask("second question"))
    # only the new turn (and the tail of the previous answer as re-rendered) is prefilled
    assert m.stats.reused_tokens >= turn1_prompt - 1
    assert m.stats.reused_tokens < m.stats.prompt_tokens
    fresh = edgeinfer.load(tiny_package("qwen3", 32), backend="mlx")
    msgs = s.messages[:-1]
    assert fresh.generate(msgs, max_tokens=12).strip() == second.strip()


def test_cache_rolls_back_to_a_common_prefix(model):
    model.reset()
    a = model.tokenizer.encode("the first prompt")
    b = model.tokenizer.encode("the other prompt")
    list(model.stream_ids(a, GenerationConfig(max_tokens=3)))
    ref = model.logits(b)[-1]
    model._prefill(b, 512)
    assert model.cache_tokens == b and model.cache.offset == len(b)
    model.cache.trim_to(len(b) - 1)
    model.cache_tokens = b[:-1]
    last, reused = model._prefill(b, 512)
    assert reused == len(b) - 1
    np.testing.assert_allclose(np.array(last)[0], ref, atol=1e-4)


def test_prompt_longer_than_the_context_is_refused(model):
    ids = [5] * (model.cache.max_tokens + 1)
    with pytest.raises(EdgeInferError, match="context"):
        list(model.stream_ids(ids, GenerationConfig(max_tokens=2)))


def test_chunked_prefill_equals_one_chunk(model):
    ids = model.tokenizer.encode("a longer prompt, long enough to be cut into a few chunks")
    model.reset()
    l1, _ = model._prefill(ids, 512)
    model.reset()
    l2, _ = model._prefill(ids, 7)
    np.testing.assert_allclose(np.array(l1), np.array(l2), atol=1e-4)


def _cli(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "edgeinfer.cli", *args], capture_output=True, text=True,
                          input=input, timeout=300, env=env)


def test_cli_eval_ppl(tiny_package, tmp_path):
    pkg = tiny_package("llama", 32)
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    r = _cli("eval", "-m", str(pkg), "--json", "ppl", "--data", str(data), "--window", "64", "--max-windows", "3", env=None)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["windows"] == 3 and res["predicted_tokens"] == 3 * 63 and res["ppl"] > 1
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    r = _cli("eval", "-m", str(pkg), "ppl", "--data", str(short), env=None)
    assert r.returncode == 2 and r.stderr.startswith("edgeinfer: ") and "fewer than one window" in r.stderr
    r = _cli("eval", "-m", str(pkg), "ppl", "--data", str(tmp_path / "missing.txt"), env=None)
    assert r.returncode == 2 and "missing.txt does not exist" in r.stderr


def test_perplexity_spread_takes_windows_over_the_whole_text(tiny_package):
    import math

    import edgeinfer
    from edgeinfer.evaluate import perplexity, window_nll

    m = edgeinfer.load(tiny_package("llama", 32), backend="mlx")
    text = "the quick brown fox jumps over the lazy dog. " * 30 + " ".join(f"w{i * 7919 % 1000}" for i in range(400))
    ids = m.tokenizer.encode(text, add_bos=False)
    total = len(ids) // 64
    bos = [m.tokenizer.bos_token_id] if m.tokenizer.add_bos else []
    want = [window_nll(m, bos + ids[w * 64:(w + 1) * 64]) for w in (0, total // 2, total - 1)]
    r = perplexity(m, text, window=64, max_windows=3, spread=True, progress=False)
    assert r.spread and r.windows == 3 and r.total_windows == total > 6
    assert math.isclose(r.ppl, math.exp(sum(a for a, _ in want) / sum(b for _, b in want)), rel_tol=1e-5)
    assert not math.isclose(r.ppl, perplexity(m, text, window=64, max_windows=3, progress=False).ppl, rel_tol=1e-3)


def test_cli_generate_bad_inputs(tiny_package, tmp_path):
    pkg = tiny_package("llama", 32)
    r = _cli("generate", "-m", str(pkg), "-p", "hi", "--temp", "-1", env=None)
    assert r.returncode == 2 and r.stderr.strip() == "edgeinfer: --temp must be at least 0, not -1"
    r = _cli("generate", "-m", str(tmp_path), "-p", "hi", env=None)
    assert r.returncode == 2 and "not an edgeinfer package" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", "-m", "no-such-model", "-p", "hi", env=None)
    assert r.returncode == 2 and "catalog" in r.stderr


def test_damaged_package_is_refused(tiny_package, tmp_path):
    import shutil

    import edgeinfer

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package("llama", 8, 32), pkg)
    with open(pkg / "model.safetensors", "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x00" * 16)
    with pytest.raises(EdgeInferError, match="corrupted"):
        edgeinfer.load(pkg, verify=True)
    with open(pkg / "model.safetensors", "ab") as f:
        f.write(b"extra")
    with pytest.raises(EdgeInferError, match="damaged"):
        edgeinfer.load(pkg)


def test_interactive_chat_in_a_real_terminal(tiny_package):
    pexpect = pytest.importorskip("pexpect")
    pkg = tiny_package("llama", 32)
    import os

    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color")
    child = pexpect.spawn(sys.executable, ["-m", "edgeinfer.cli", "chat", "-m", str(pkg), "--max-tokens", "8"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 120))
    try:
        child.expect(">>>")
        child.sendline("hello")
        child.expect(r"\[8 tok, [\d.]+ tok/s, TTFT \d+ ms\]")
        child.expect(">>>")
        child.sendline("/help")
        child.expect("/reset")
        child.expect(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_cli_models_lists_the_catalog_and_what_is_converted(tiny_package, tmp_path):
    import os
    import shutil

    shutil.copytree(tiny_package("llama", 8, 32), tmp_path / "gemma3-270m")
    r = _cli("models", env=dict(os.environ, EDGEINFER_MODELS=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "smollm2-135m-instruct (default)" in out and "not converted yet" in out
    assert f"converted: {tmp_path / 'gemma3-270m'}" in out


@pytest.mark.parametrize("arch, dtype", [("llama", "float16"), ("gemma3", "bfloat16")])
def test_the_metal_configuration_runs_on_cpu(edge_models, arch, dtype):
    """What a Mac runs by default: MLX's quantized kernels and half-precision activations (bf16 for
    Gemma, whose activations overflow fp16), with fp16/fp32 scales kept as stored."""
    half = edge_models(arch, 8, 32, dequantize=False, dtype=getattr(mx, dtype))
    full = edge_models(arch, 8, 32)
    ids = full.tokenizer.encode("hello world, this is a test")
    a, b = half.logits(ids), full.logits(ids)
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8
    assert half.backend.layers[0].q.quant[0].dtype != mx.bfloat16


def test_a_sentencepiece_tokenizer_model_is_carried_and_used(tiny_models, tmp_path, wikitext):
    """An HF folder with only tokenizer.model (no tokenizer.json): the package carries it and the
    runtime tokenizes through sentencepiece."""
    import shutil

    import sentencepiece as spm

    import edgeinfer
    from edgeinfer.converters.convert import convert

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").unlink(missing_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(ln for ln in wikitext.splitlines()[:3000] if ln.strip()))
    cfg = json.loads((src / "config.json").read_text())
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(src / "tokenizer"), vocab_size=cfg["vocab_size"],
                                   model_type="bpe", byte_fallback=True, character_coverage=0.99, minloglevel=2)
    pkg = convert(str(src), tmp_path / "pkg", bits=32, progress=False)
    assert (pkg / "tokenizer.model").exists() and not (pkg / "tokenizer.json").exists()
    m = edgeinfer.load(pkg)
    assert m.tokenizer.kind == "sentencepiece" and m.tokenizer.add_bos
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    text = "The tower is 324 metres tall. Ünïcode ☃"
    ids = m.tokenizer.encode(text)
    assert ids[0] == m.tokenizer.bos_token_id and ids[1:] == sp.encode(text)
    assert m.tokenizer.decode(ids[1:]) == text
    assert len(list(m.stream_ids(ids, GenerationConfig(max_tokens=5)))) <= 5
