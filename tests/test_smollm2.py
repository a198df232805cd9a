"""The real default model: SmolLM2-135M-Instruct from its Q4_1 GGUF, against transformers on the same
dequantized weights (transformers reads the GGUF itself)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import edgeinfer
from edgeinfer.evaluate import perplexity
from edgeinfer.model import GenerationConfig

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(smollm2_package):
    return edgeinfer.load(smollm2_package, backend="mlx")  # exact; the ONNX backend: test_onnx.py


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_grad_enabled(False)
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return tok, m


def test_manifest_records_a_lossless_import(smollm2_package, smollm2_gguf):
    pkg = edgeinfer.load(smollm2_package).package
    q = pkg.quantization
    assert q["mode"] == "affine" and q["bits"] == 4 and q["group_size"] == 32
    assert q["tensors"]["embed"] == {"bits": 8, "group_size": 32}  # Q8_0 embedding
    assert pkg.manifest["source"]["kind"] == "gguf"
    assert pkg.manifest["source"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    pkg.verify()


def test_logits_match_transformers(model, hf):
    tok, m = hf
    import torch

    ids = tok(PROMPTS[2], add_special_tokens=False)["input_ids"]
    ref = m(torch.tensor([ids])).logits[0].numpy()
    ours = model.logits(ids)
    # Same dequantized weights in fp32 on both sides: only summation order differs.
    assert np.abs(ours - ref).max() < 2e-3 * np.abs(ref).max()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuations_agree_for_32_tokens(model, hf, prompt):
    """32 greedy tokens past any EOS on both sides (transformers through its own KV cache)."""
    tok, m = hf
    import torch

    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = m(torch.tensor([ids]), use_cache=True)
    ref = []
    for _ in range(32):
        ref.append(int(out.logits[0, -1].argmax()))
        out = m(torch.tensor([[ref[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    model.reset()
    ours = list(model.stream_ids(ids, GenerationConfig(max_tokens=32, ignore_eos=True)))
    assert ours == ref, (tok.decode(ours), tok.decode(ref))


def test_perplexity_within_one_percent_of_transformers(model, hf, wikitext):
    tok, m = hf
    import torch

    text = wikitext
    windows = 3
    ours = perplexity(model, text, window=512, max_windows=windows, progress=False)
    ids = tok(text[:200_000], add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    for w in range(windows):
        x = torch.tensor([ids[w * 512 : (w + 1) * 512]])
        logp = torch.log_softmax(m(x).logits[0, :-1], -1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += 511
    ref = math.exp(nll / count)
    assert ours.predicted_tokens == count
    assert abs(ours.ppl / ref - 1) < 0.01, (ours.ppl, ref)


def test_chat_template_is_chatml_and_answers(model):
    text = model.tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    model.reset()
    answer = model.generate([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24)
    assert "Paris" in answer
    assert model.stats.finish_reason in ("stop", "length")


def test_cli_generate_streams_text_and_one_stats_line(smollm2_package):
    r = subprocess.run(
        [sys.executable, "-m", "edgeinfer.cli", "generate", "-m", str(smollm2_package), "-p", "The capital of France is",
         "--max-tokens", "8", "--backend", "mlx"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("prompt 5 tok") and "TTFT" in last and "tok/s" in last and "peak memory" in last


def test_cli_chat_piped_one_answer_per_line(smollm2_package):
    r = subprocess.run(
        [sys.executable, "-m", "edgeinfer.cli", "chat", "-m", str(smollm2_package), "--max-tokens", "16", "--backend", "mlx"],
        input="What is the capital of France?\nAnd of Italy?\n", capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and "Paris" in lines[0] and "Rome" in lines[1], lines


def test_chat_without_a_model_prepares_the_default_once(smollm2_gguf, tmp_path):
    """What `make run` does: no -m, so the catalog's default is fetched (here: from the cache the
    fixture filled), converted into models/NAME, and reused on the next run."""
    import os

    env = dict(os.environ, EDGEINFER_MODELS=str(tmp_path))
    cmd = [sys.executable, "-m", "edgeinfer.cli", "chat", "--max-tokens", "12"]
    first = subprocess.run(cmd, input="What is the capital of France?\n", capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    # the default backend here (ONNX, int8 activations) turns this question's near-tie (0.08 logits) the
    # way llama.cpp does, so only the shape of the answer is checked; its content: test_onnx.py
    assert "preparing smollm2-135m-instruct" in first.stderr and len(first.stdout.splitlines()) == 1
    assert len(first.stdout.split()) >= 3
    manifest = tmp_path / "smollm2-135m-instruct" / "manifest.json"
    assert manifest.exists()
    stamp = manifest.stat().st_mtime_ns
    second = subprocess.run(cmd, input="What is the capital of France?\n", capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0 and "preparing" not in second.stderr and second.stdout == first.stdout
    assert manifest.stat().st_mtime_ns == stamp
