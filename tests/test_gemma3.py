"""The second real model, for architecture coverage: Gemma 3 270M from its Q4_K_M GGUF (Q4_K, Q5_0,
Q8_0 and Q6_K tensors; sliding-window layers, q/k norms, sandwich norms, a 262k SentencePiece vocab)."""

from __future__ import annotations

import numpy as np
import pytest

import edgeinfer
from edgeinfer.evaluate import perplexity

from _hf_ref import assert_gguf_dequantizes_to, build_hf, hf_state_dict, package_weights


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


# google/gemma-3-270m's config.json (upstream, not the package's spec, so a wrong spec shows up as logits)
HF_CONFIG = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6, sliding_window=512,
    max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
    attn_logit_softcapping=None, tie_word_embeddings=True, attention_bias=False,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
)


@pytest.fixture(scope="module")
def hf_sd(model) -> dict[str, np.ndarray]:
    """The package's weights, dequantized to fp32, under transformers' Gemma 3 names."""
    return hf_state_dict(package_weights(model.package), "gemma3")


def test_weights_equal_the_gguf_dequantization(model, hf_sd, gemma3_gguf):
    """What transformers' GGUF loader would load (gguf.quants.dequantize, its names, its 1 + w shift):
    equal for every Q4_K, Q5_0, Q8_0 and F32 tensor, within the recorded error for the nine Q6_K ones."""
    assert_gguf_dequantizes_to(gemma3_gguf, hf_sd, "gemma3", model.package.quantization["notes"])


def test_logits_agree_with_transformers(model, hf_sd):
    """transformers' Gemma3ForCausalLM on those weights (fp32, eager) against MLX: the same fp32 weights on
    both sides, so only the order of summation differs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = build_hf(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(**HF_CONFIG, attn_implementation="eager"), hf_sd)
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog because it wanted to")
    ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = model.logits(ids)
    assert np.abs(ours - ref).max() < 2e-3 * np.abs(ref).max(), np.abs(ours - ref).max() / np.abs(ref).max()
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
