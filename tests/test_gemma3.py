"""The second real model, for architecture coverage: Gemma 3 270M from its Q4_K_M GGUF (Q4_K, Q5_0,
Q8_0 and Q6_K tensors; sliding-window layers, q/k norms, sandwich norms, a 262k SentencePiece vocab)."""

from __future__ import annotations


import numpy as np
import pytest

import edgeinfer
from edgeinfer.evaluate import perplexity


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(gemma3_package):
    return edgeinfer.load(gemma3_package, backend="mlx")


def test_package_records_what_was_requantized(model):
    q = model.package.quantization
    notes = [n for n in q["notes"] if "Q6_K re-quantized" in n]
    assert len(notes) == 9  # the nine ffn_down tensors
    assert all("relative RMS error" in n for n in notes)
    s = model.spec
    assert (s.arch, s.num_layers, s.sliding_window, s.layer_types.count("full")) == ("gemma3", 18, 512, 3)


def test_logits_agree_with_transformers_on_the_gguf(model, gemma3_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_grad_enabled(False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name, dtype=torch.float32
    ).eval()
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog because it wanted to")
    ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = model.logits(ids)
    # The only difference is the 8-bit re-quantization of the Q6_K tensors (about 0.5% RMS per weight).
    assert np.abs(ours - ref).max() < 0.02 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize(
    "prompt, expected",
    [("Water boils at", "100 degrees"), ("def add(a, b):", "return a + b"), ("The capital of Japan is", "Tokyo"), ("Monday, Tuesday,", "Wednesday, Thursday, Friday")],
)
def test_generates_coherent_text(model, prompt, expected):
    model.reset()
    out = model.generate(prompt, max_tokens=16)
    assert expected in out, out


def test_perplexity_on_a_few_windows(model, wikitext):
    r = perplexity(model, wikitext, window=512, max_windows=2, progress=False)
    # each window starts with BOS (Gemma expects one), so all 512 tokens of a window are predicted
    assert r.predicted_tokens == 2 * 512
    assert 5 < r.ppl < 40, r.ppl


def test_chat_template_renders_gemma_turns(model):
    text = model.tokenizer.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text.startswith("<bos><start_of_turn>user\nBe brief.")
    assert text.endswith("<start_of_turn>model\n")
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == model.tokenizer.bos_token_id and ids.count(model.tokenizer.bos_token_id) == 1
