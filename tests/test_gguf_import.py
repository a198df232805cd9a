"""GGUF import: tensor conversion (exact against gguf's own dequantizer), spec, tokenizer, and errors.

Synthetic tests build tiny GGUFs with gguf.GGUFWriter; the real-file tests use two small public GGUFs
(SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M), fetched through the catalog by conftest.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from converters.gguf_import import CONVERTERS, open_gguf  # noqa: E402
from converters.gguf_tokenizer import build_tokenizer, sentencepiece_merges  # noqa: E402
from converters.quantize import QuantizedTensor  # noqa: E402
from edgeinfer.errors import EdgeInferError  # noqa: E402



# -- synthetic GGUFs ----------------------------------------------------------------------------------
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 288


def _bytes_vocab():
    """A tiny byte-level BPE vocab: the 256 byte symbols, a few merges, two control tokens."""
    # GPT-2's printable spelling of the 256 bytes.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    sym = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    tokens = sym + [m.replace(" ", "") for m in merges]
    tokens += ["<|im_start|>", "<|im_end|>"]
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    types = [1] * (256 + len(merges)) + [3] * (VOCAB - 256 - len(merges))
    return tokens, types, merges


def write_gguf(path: Path, arch: str = "llama", tensors: dict | None = None, ffn: int = FFN, tokenizer: bool = True):
    """Writes a 1-layer model. ``tensors`` maps GGUF names to (float32 array, GGML type); by default a
    llama layer with one tensor of each block type."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(ffn)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_name("tiny")
    if tokenizer:
        tokens, types, merges = _bytes_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
        w.add_chat_template("{{ messages }}")
    for name, (arr, qtype) in (tensors if tensors is not None else default_tensors()).items():
        if qtype in (QT.F32, QT.F16):
            w.add_tensor(name, arr.astype(np.float32 if qtype == QT.F32 else np.float16))
        elif isinstance(arr, np.ndarray) and arr.dtype == np.uint8:  # raw blocks
            w.add_tensor(name, arr, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf_quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32) * 0.05


def default_tensors():
    return {
        "token_embd.weight": (_rand(VOCAB, HIDDEN, seed=1), QT.Q8_0),
        "output_norm.weight": (1 + _rand(HIDDEN, seed=2), QT.F32),
        "output.weight": (_rand(VOCAB, HIDDEN, seed=3), QT.Q4_0),
        "blk.0.attn_norm.weight": (1 + _rand(HIDDEN, seed=4), QT.F32),
        "blk.0.attn_q.weight": (_rand(HEADS * HEAD_DIM, HIDDEN, seed=5), QT.Q4_0),
        "blk.0.attn_k.weight": (_rand(KV_HEADS * HEAD_DIM, HIDDEN, seed=6), QT.Q8_0),
        "blk.0.attn_v.weight": (_rand(KV_HEADS * HEAD_DIM, HIDDEN, seed=7), QT.Q4_1),
        "blk.0.attn_output.weight": (_rand(HIDDEN, HEADS * HEAD_DIM, seed=8), QT.Q5_0),
        "blk.0.ffn_norm.weight": (1 + _rand(HIDDEN, seed=9), QT.F32),
        "blk.0.ffn_gate.weight": (_rand(FFN, HIDDEN, seed=10), QT.Q5_1),
        "blk.0.ffn_up.weight": (_rand(FFN, HIDDEN, seed=11), QT.BF16),
        "blk.0.ffn_down.weight": (_rand(HIDDEN, FFN, seed=12), QT.F16),
    }


def reverse_permute(w, n_head):  # transformers' LlamaTensorProcessor._reverse_permute_weights
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def raw_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def reference(t) -> np.ndarray:
    """gguf's own float32 view of a tensor."""
    if t.tensor_type in (QT.F32, QT.F16):
        return np.asarray(t.data, dtype=np.float32)
    return dequantize(np.asarray(t.data), t.tensor_type)


def as_float(x) -> np.ndarray:
    return x.dequantize() if isinstance(x, QuantizedTensor) else np.asarray(x, dtype=np.float32)


def test_synthetic_llama_tensors_exact(tmp_path):
    p = write_gguf(tmp_path / "tiny.gguf")
    src = open_gguf(p)
    s = src.spec
    assert (s.arch, s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == ("llama", 1, 64, 4, 2, 16)
    assert (s.vocab_size, s.intermediate_size, s.max_position_embeddings) == (VOCAB, FFN, 256)
    assert s.tie_embeddings is False and s.qk_norm is False and s.rope_theta == 10000.0
    assert src.name == "tiny" and src.kind == "gguf"
    raw = raw_tensors(p)
    back = {
        "embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
        "layers.0.attn_norm.weight": "blk.0.attn_norm.weight", "layers.0.attn.q_proj.weight": "blk.0.attn_q.weight",
        "layers.0.attn.k_proj.weight": "blk.0.attn_k.weight", "layers.0.attn.v_proj.weight": "blk.0.attn_v.weight",
        "layers.0.attn.o_proj.weight": "blk.0.attn_output.weight", "layers.0.mlp_norm.weight": "blk.0.ffn_norm.weight",
        "layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight", "layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    }
    got = dict(src.tensors())
    assert set(got) == set(back) == set(src.tensor_names())
    for name, x in got.items():
        t = raw[back[name]]
        if t.tensor_type == QT.BF16:
            ref = dequantize(np.asarray(t.data), QT.BF16)
            assert x.dtype == np.float16 and np.array_equal(x, ref.astype(np.float16)), name
            continue
        ref = reference(t)
        if name.endswith("q_proj.weight"):
            ref = reverse_permute(ref, HEADS)
        elif name.endswith("k_proj.weight"):
            ref = reverse_permute(ref, KV_HEADS)
        if isinstance(x, QuantizedTensor):
            assert x.group_size == 32 and x.scales.dtype == np.float16  # fp16 d stays fp16
            assert x.bits == {QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q8_0: 8}[t.tensor_type]
        elif x.ndim == 1:
            assert x.dtype == np.float32
        else:
            assert x.dtype == np.float16
        assert np.array_equal(as_float(x), ref), name


def test_synthetic_tokenizer_and_specials(tmp_path):
    from tokenizers import Tokenizer

    src = open_gguf(write_gguf(tmp_path / "tiny.gguf"))
    tokens, _, _ = _bytes_vocab()
    assert src.bos_token_id == tokens.index("<|im_start|>")
    assert src.eos_token_ids == [tokens.index("<|im_end|>")]
    assert src.add_bos is False and src.chat_template == "{{ messages }}"
    tok = Tokenizer.from_str(src.tokenizer_json)
    assert tok.get_vocab_size() == VOCAB
    enc = tok.encode("<|im_start|>hello world<|im_end|>", add_special_tokens=False)
    assert enc.tokens == ["<|im_start|>", "hello", "Ġworld", "<|im_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "hello world"
    json.loads(src.tokenizer_json)


def test_qwen2_biases_and_no_permutation(tmp_path):
    t = {k: v for k, v in default_tensors().items() if k != "output.weight"}
    t["blk.0.attn_q.bias"] = (_rand(HEADS * HEAD_DIM, seed=20), QT.F32)
    t["blk.0.attn_k.bias"] = (_rand(KV_HEADS * HEAD_DIM, seed=21), QT.F32)
    t["blk.0.attn_v.bias"] = (_rand(KV_HEADS * HEAD_DIM, seed=22), QT.F32)
    p = write_gguf(tmp_path / "qwen.gguf", arch="qwen2", tensors=t)
    src = open_gguf(p)
    assert src.spec.arch == "qwen2" and src.spec.attention_bias and src.spec.tie_embeddings
    raw = raw_tensors(p)
    got = dict(src.tensors())
    assert np.array_equal(as_float(got["layers.0.attn.q_proj.weight"]), reference(raw["blk.0.attn_q.weight"]))
    assert np.array_equal(got["layers.0.attn.k_proj.bias"], reference(raw["blk.0.attn_k.bias"]))
    assert "lm_head.weight" not in got


def _random_kquant_blocks(qtype, rows, cols, seed=0):
    """Random K-quant super-blocks with finite fp16 d (and dmin)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = (rng.random((rows, cols // block)) * 1e-3 + 1e-5).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == QT.Q6_K:
        b[..., -2:] = d
    else:
        b[..., 0:2] = d
        b[..., 2:4] = (rng.random((rows, cols // block)) * 1e-3).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K])
def test_kquants_exact_on_random_blocks(qtype):
    raw = _random_kquant_blocks(qtype, 8, 512)
    q = CONVERTERS[qtype.name](raw)
    assert q.bits == (4 if qtype == QT.Q4_K else 5) and q.group_size == 32 and q.scales.dtype == np.float32
    assert np.array_equal(q.dequantize(), dequantize(raw, qtype))


def test_q8_0_large_scale_falls_back_to_fp32():
    # d = 1000: -128*d overflows fp16, so scales/biases must be fp32 (and still exact).
    w = np.zeros((2, 64), np.float32)
    w[:, ::32] = 127000.0
    raw = gguf_quantize(w, QT.Q8_0)
    q = CONVERTERS["Q8_0"](raw)
    assert q.scales.dtype == np.float32
    assert np.array_equal(q.dequantize(), dequantize(raw, QT.Q8_0))


def test_q6_k_requantized_with_note(tmp_path):
    t = default_tensors()
    t["blk.0.ffn_down.weight"] = (_random_kquant_blocks(QT.Q6_K, HIDDEN, 256, seed=3), QT.Q6_K)
    t["blk.0.ffn_gate.weight"] = (_rand(256, HIDDEN, seed=10), QT.Q5_1)
    t["blk.0.ffn_up.weight"] = (_rand(256, HIDDEN, seed=11), QT.Q5_1)
    p = write_gguf(tmp_path / "q6k.gguf", tensors=t, ffn=256)
    src = open_gguf(p)
    got = dict(src.tensors())
    down = got["layers.0.mlp.down_proj.weight"]
    assert isinstance(down, QuantizedTensor) and down.bits == 8 and down.group_size == 32
    ref = reference(raw_tensors(p)["blk.0.ffn_down.weight"])
    err = down.dequantize() - ref
    assert np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(ref**2)) < 0.01
    notes = [n for n in src.notes if n.startswith("blk.0.ffn_down.weight")]
    assert len(notes) == 1 and "Q6_K" in notes[0] and "relative RMS" in notes[0]
    list(src.tensors())  # a second pass does not repeat the note
    assert len([n for n in src.notes if n.startswith("blk.0.ffn_down.weight")]) == 1


def test_missing_and_not_gguf(tmp_path):
    with pytest.raises(EdgeInferError, match="nothere.gguf does not exist"):
        open_gguf(tmp_path / "nothere.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(EdgeInferError, match="bad.gguf is not a GGUF file"):
        open_gguf(bad)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02])
def test_truncated(tmp_path, keep):
    p = write_gguf(tmp_path / "tiny.gguf")
    data = p.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(EdgeInferError) as e:
        open_gguf(cut)
    msg = str(e.value)
    assert str(cut) in msg and "truncated" in msg and "\n" not in msg


def test_unsupported_tensor_type(tmp_path):
    t = default_tensors()
    t["blk.0.ffn_down.weight"] = (_random_kquant_blocks(QT.Q2_K, HIDDEN, 256), QT.Q2_K)
    p = write_gguf(tmp_path / "q2k.gguf", tensors=t)
    with pytest.raises(EdgeInferError, match=r"q2k\.gguf: tensor blk\.0\.ffn_down\.weight has type Q2_K"):
        open_gguf(p)


def test_unknown_architecture(tmp_path):
    p = write_gguf(tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(EdgeInferError, match=r"phi\.gguf.*architecture 'phi3'"):
        open_gguf(p)


def test_unknown_tensor_name(tmp_path):
    t = default_tensors()
    t["blk.0.ffn_gate_exps.weight"] = t["blk.0.ffn_gate.weight"]
    with pytest.raises(EdgeInferError, match="blk.0.ffn_gate_exps.weight does not belong"):
        open_gguf(write_gguf(tmp_path / "moe.gguf", tensors=t))


def test_sentencepiece_merges_follow_scores():
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<0x41>"]
    scores = [0, -1, -2, -3, -5, -4, -6, 0]
    types = [2, 1, 1, 1, 1, 1, 1, 6]
    assert sentencepiece_merges(tokens, scores, types) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_sentencepiece_tokenizer_byte_fallback():
    from tokenizers import Tokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁", "h", "i", "▁h", "▁hi", "<turn>"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1, 1, 1, 3]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, 0.0]
    meta = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": np.array(scores),
        "tokenizer.ggml.token_type": np.array(types), "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_space_prefix": True,
    }
    built = build_tokenizer(meta, "x.gguf")
    assert built.add_bos is True and built.bos_token_id == 1 and built.eos_token_ids == [2]
    tok = Tokenizer.from_str(built.tokenizer_json)
    enc = tok.encode("hi hé<turn>hi", add_special_tokens=False)
    assert enc.tokens == ["▁hi", "▁h", "<0xC3>", "<0xA9>", "<turn>", "▁hi"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "hi hé<turn> hi"
    assert tok.decode(tok.encode("hi hi", add_special_tokens=False).ids) == "hi hi"


# -- real files -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm(smollm2_gguf):
    return open_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def gemma(gemma3_gguf):
    return open_gguf(gemma3_gguf)


def test_smollm_spec_and_specials(smollm):
    s = smollm.spec
    assert (s.arch, s.num_layers, s.hidden_size, s.intermediate_size) == ("llama", 30, 576, 1536)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (9, 3, 64, 49152)
    assert s.rope_theta == 100000.0 and s.tie_embeddings and s.max_position_embeddings == 8192
    assert math.isclose(s.rms_norm_eps, 1e-5, rel_tol=1e-6)
    assert smollm.bos_token_id == 1 and smollm.eos_token_ids == [2] and smollm.add_bos is False
    assert "<|im_start|>" in smollm.chat_template


def test_smollm_tensors_exact(smollm):
    raw = {t.name: t for t in smollm._reader.tensors}
    names = []
    for name, x in smollm.tensors():
        names.append(name)
        if not (name.startswith(("layers.0.", "layers.29.")) or name == "embed.weight"):
            continue
        gname = {"embed.weight": "token_embd.weight"}.get(name) or _gguf_name(name)
        ref = reference(raw[gname])
        if name.endswith("q_proj.weight"):
            ref = reverse_permute(ref, 9)
        elif name.endswith("k_proj.weight"):
            ref = reverse_permute(ref, 3)
        assert np.array_equal(as_float(x), ref), name
        if isinstance(x, QuantizedTensor):
            assert x.scales.dtype == np.float16
    assert len(names) == 272 and "lm_head.weight" not in names and names.count("norm.weight") == 1


def _gguf_name(pkg: str) -> str:
    table = {
        "attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
        "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
        "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm",
    }
    _, i, rest = pkg.split(".", 2)
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{table[mod]}.{kind}"


def test_smollm_tokenizer_matches_transformers(smollm, smollm2_gguf, wikitext):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    p = smollm2_gguf
    ref = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    mine = Tokenizer.from_str(smollm.tokenizer_json)
    texts = [
        "2024 and 3.14159 and 1,000,000", "  two leading spaces", "tabs\tand\nnewlines\n\n", "héllo wörld ñ",
        "日本語のテキスト", "emoji 🤖🎉👨‍👩‍👧", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>x", "don't I'll we've", "    code = 1  # comment", "x\r\ny", "\u00a0nbsp \u200b",
    ] + [ln for ln in wikitext.split("\n") if ln.strip()][:300]
    # transformers' GGUF loader gives "smollm" no Digits pre-tokenizer; SmolLM2's own tokenizer.json and
    # llama.cpp split every \p{N} character alone, which only shows on non-ASCII numerals such as "½".
    texts = [t for t in texts if "½" not in t]
    for text in texts:
        ids = mine.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert mine.decode(ids, skip_special_tokens=False) == text
    assert mine.encode(" 4 ½", add_special_tokens=False).tokens == ["Ġ", "4", "Ġ", "Â½"]


def test_gemma_spec(gemma):
    s = gemma.spec
    assert (s.arch, s.num_layers, s.hidden_size, s.intermediate_size) == ("gemma3", 18, 640, 2048)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (4, 1, 256, 262144)
    assert s.qk_norm and s.sandwich_norm and s.tie_embeddings and s.mlp_act == "gelu_tanh"
    assert math.isclose(s.embed_scale, math.sqrt(640)) and math.isclose(s.attn_scale, 1 / 16)
    assert s.rope_theta == 1e6 and s.rope_local_theta == 10000.0 and s.sliding_window == 512
    assert s.layer_types == ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(18)]
    assert gemma.bos_token_id == 2 and gemma.eos_token_ids == [1, 106] and gemma.add_bos is True
    assert gemma.chat_template is None
    assert any("norm weights already include (1 + w), verified" in n for n in gemma.notes)


def test_gemma_tensors(gemma):
    raw = {t.name: t for t in gemma._reader.tensors}
    seen = set()
    for name, x in gemma.tensors():
        gname = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}.get(name) or _gguf_name(name)
        t = raw[gname]
        kind = t.tensor_type.name
        if name == "embed.weight":
            assert isinstance(x, QuantizedTensor) and x.shape == (262144, 640) and x.bits == 8
            continue  # Q8_0 is checked on layer 0's attn_v; dequantizing 168M values twice is slow
        if kind == "Q6_K" or (kind in seen and not name.startswith("layers.0.")):
            continue  # one check per type (plus all of layer 0) keeps this fast
        seen.add(kind)
        ref = reference(t)
        assert np.array_equal(as_float(x), ref), name
        if kind in ("Q5_0", "Q8_0"):
            assert x.scales.dtype == np.float16
        if kind == "Q4_K":
            assert x.bits == 4 and x.scales.dtype == np.float32
    assert {"Q8_0", "Q5_0", "Q4_K", "F32"} <= seen
    q6 = [n for n in gemma.notes if "Q6_K re-quantized" in n]
    assert len(q6) == 9
    for n in q6:
        assert float(n.rsplit("relative RMS error ", 1)[1]) < 0.01
    names = gemma.tensor_names()
    assert "layers.0.post_attn_norm.weight" in names and "layers.17.post_mlp_norm.weight" in names
    assert "layers.0.attn.q_norm.weight" in names and "lm_head.weight" not in names


def test_gemma_tokenizer(gemma, wikitext):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(gemma.tokenizer_json)
    assert tok.get_vocab_size() == 262144

    def ids(t):
        return tok.encode(t, add_special_tokens=False).ids

    # Reference ids from transformers' own GGUF tokenizer for Gemma 3 (which agreed on all 2,892 lines
    # of wiki.test.raw when this was written).
    assert ids("The quick brown fox jumps over the lazy dog.") == [818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761]
    assert ids("  Robert Boulter is an English film , television and theatre actor .\n") == [
        138, 34326, 151936, 589, 563, 614, 5422, 4103, 1031, 13617, 532, 26470, 13387, 783, 107]
    assert ids("<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n") == [
        105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107]
    assert ids("naïve café 🤖 東京") == [1789, 238527, 560, 33443, 236743, 246143, 86459]
    assert ids("<start_of_turn>") == [105]
    for word in (" the", " and", " music", " government"):
        assert len(ids(word)) == 1, word
    for line in [ln for ln in wikitext.split("\n") if ln.strip()][:200] + ["tabs\tand  spaces\n\n", "emoji 🤖🎉", "\u00a0\u200b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:
        assert tok.decode(ids(line), skip_special_tokens=False) == line
    assert tok.decode(ids("<start_of_turn>user\nhi"), skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("case", ["truncated", "unsupported-type"])
def test_bad_gguf_through_the_cli(tmp_path, case):
    """The same errors as the user sees them: one line, exit status 2, no package left behind."""
    import subprocess
    import sys

    if case == "truncated":
        full = write_gguf(tmp_path / "full.gguf").read_bytes()
        src = tmp_path / "cut.gguf"
        src.write_bytes(full[: len(full) // 2])
    else:
        t = default_tensors()
        t["blk.0.ffn_down.weight"] = (_random_kquant_blocks(QT.Q2_K, HIDDEN, 256), QT.Q2_K)
        src = write_gguf(tmp_path / "q2k.gguf", tensors=t)
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "convert", str(src), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgeinfer: {src}"), r.stderr
    assert ("truncated" if case == "truncated" else "Q2_K") in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".pkg*"))


def test_requantize_with_bits(tmp_path):
    """--bits on a GGUF stores every quantized tensor at that width from its dequantized values (said in
    the notes); without it the GGUF's own types are kept, exactly."""
    from converters.convert import convert
    from edgeinfer.safetensors_map import map_safetensors

    src = write_gguf(tmp_path / "tiny.gguf")
    kept = convert(str(src), tmp_path / "kept", backend="mlx", progress=False)
    req = convert(str(src), tmp_path / "q4", bits=4, group_size=32, backend="mlx", progress=False)
    mk, mq = (json.loads((p / "manifest.json").read_text())["quantization"] for p in (kept, req))
    assert "tensors" in mk and not any("re-quantized to 4 bits" in n for n in mk.get("notes", []))
    assert (mq["bits"], mq["group_size"]) == (4, 32) and "tensors" not in mq, mq  # every tensor at 4 bits
    assert any(n.startswith("re-quantized to 4 bits in groups of 32") for n in mq["notes"]), mq["notes"]
    wk, wq = map_safetensors(kept / "model.safetensors"), map_safetensors(req / "model.safetensors")
    raw = raw_tensors(src)
    for gname, name in (("blk.0.attn_output.weight", "layers.0.attn.o_proj"), ("output.weight", "lm_head"),
                        ("blk.0.ffn_gate.weight", "layers.0.mlp.gate_proj"), ("token_embd.weight", "embed")):
        before = QuantizedTensor(*(np.asarray(wk[f"{name}.{k}"]) for k in ("weight", "scales", "biases")),
                                 bits=mk.get("tensors", {}).get(name, mk)["bits"], group_size=32).dequantize()
        assert np.array_equal(before, reference(raw[gname]).reshape(before.shape))  # kept: exact
        after = QuantizedTensor(*(np.asarray(wq[f"{name}.{k}"]) for k in ("weight", "scales", "biases")), 4, 32).dequantize()
        g = before.reshape(-1, 32)
        err = np.abs(after.reshape(-1, 32) - g)
        if gname == "output.weight":  # Q4_0: already 4 bits in groups of 32, so kept as it is
            assert err.max() == 0
            continue
        assert (err.max(-1) <= (g.max(-1) - g.min(-1)) / 15 * 0.75 + 1e-6).all(), gname  # within 4-bit rounding
        assert 0 < np.sqrt((err**2).mean()) < 0.1 * np.sqrt((g**2).mean())
    for name in ("layers.0.mlp.up_proj", "layers.0.mlp.down_proj"):  # float in the GGUF: float kept, 4 bits with --bits
        assert f"{name}.scales" not in wk and f"{name}.scales" in wq


def test_quantize_search_beats_round_to_nearest_on_a_quantized_grid():
    """Re-quantizing values that already sit on a 5-bit grid: the searched scales leave less error than
    round-to-nearest on min..max, in every measure the search optimizes and in plain RMS."""
    from converters.quantize import quantize, quantize_search

    w = np.asarray(dequantize(gguf_quantize(_rand(256, 512, seed=5) * 3, QT.Q5_0), QT.Q5_0), np.float32)
    errs = {}
    for f in (quantize, quantize_search):
        q = f(w, 4, 32)
        assert q.bits == 4 and q.shape == w.shape and q.scales.dtype == np.float16
        errs[f.__name__] = np.sqrt(((q.dequantize() - w) ** 2).mean())
    assert errs["quantize_search"] < 0.97 * errs["quantize"], errs
