"""GGUF files (llama.cpp) as a conversion source.

``open_gguf(path)`` reads the header (memory-mapped, through ``gguf.GGUFReader``), normalizes the
metadata into an ``ArchSpec`` and checks every tensor up front: its name, its type and that its bytes
lie inside the file. ``GGUFSource.tensors()`` then converts one tensor at a time into the package's
names (docs/PACKAGE.md) and layouts:

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32, fp16 d and m) map without loss onto the affine layout
  ``w = scale * q + bias`` in groups of 32: Q4_0 is ``d*q - 8d`` with q = the stored nibble, Q5_0
  ``d*q - 16d``, Q8_0 ``d*(q+128) - 128d`` with q+128 = the int8 with its sign bit flipped. Scales and
  biases stay fp16 when the bias is exact in fp16 (it always is, short of overflow), else fp32.
- Q4_K and Q5_K (super-blocks of 256 in 8 sub-blocks of 32 with 6-bit scales and mins) are lossless
  too: scale = d * sc_j and bias = -dmin * m_j, computed in fp32 exactly as ggml does and stored fp32.
- Q6_K has sub-blocks of 16, which MLX's group sizes (32/64/128) cannot express: it is dequantized and
  re-quantized to 8 bits in groups of 32, symmetric with fp16 scales (8.5 bits a weight where asymmetric
  fp32 scales and biases took 10, for about the same error: the native step stores no biases for it);
  ``notes`` records the measured error.
- F32/F16/BF16: 1-D tensors (norms, biases) become float32, 2-D matrices float16.

GGUF's "llama" architecture stores the Q and K rows permuted for interleaved (GPT-J style) rope; the
permutation is undone here (rows only, so quantized tensors stay exact), the same way transformers'
GGUF loader does, so that the package has Hugging Face's rotate-half order.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeinfer.errors import EdgeInferError
from edgeinfer.spec import ArchSpec

from .quantize import QuantizedTensor, pack_bits, quantize, quantize_symmetric

# GGUF general.architecture -> our arch name. Mistral GGUFs say "llama".
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}

_GLOBAL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "ffn_norm": "mlp_norm",  # the pre-MLP norm in every supported arch, Gemma 3 included
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER_NAMES = {"post_attention_norm": "post_attn_norm", "post_ffw_norm": "post_mlp_norm"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_SKIPPED = {"rope_freqs.weight"}  # read into the spec (Llama 3 rope scaling), not stored

_LOSSLESS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K")
_REQUANTIZED = ("Q6_K",)
_FLOAT = ("F32", "F16", "BF16")
SUPPORTED_TYPES = _FLOAT + _LOSSLESS + _REQUANTIZED


class _Truncated(ValueError):
    def __init__(self, needed: int, size: int):
        super().__init__(f"needs bytes up to offset {needed} but the file has {size}")
        self.needed, self.size = needed, size


def _reader_class():
    """gguf.GGUFReader, made about 5x faster to open on big vocabularies.

    The stock reader slices an ``np.memmap`` once per metadata value (three times per token of a
    262k vocabulary), and every memmap slice pays for memmap's bookkeeping. This subclass slices a
    plain ndarray view of the same mapping instead (still memory-mapped, nothing is read early) and
    reads arrays of numbers in one piece (one part holding the whole array instead of one per
    element; ``ReaderField.contents()`` on the whole field still works).
    """
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    class _Reader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            dt = np.dtype(dtype)
            end = offset + dt.itemsize * count
            if end > plain.shape[0]:
                raise _Truncated(end, plain.shape[0])
            arr = plain[offset:end].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

        def _get_field_parts(self, orig_offs, raw_type):
            if GGUFValueType(raw_type) == GGUFValueType.ARRAY:
                raw_itype = self._get(orig_offs, np.uint32)
                itype = GGUFValueType(int(raw_itype[0]))
                nptype = self.gguf_scalar_to_np.get(itype)
                if nptype is not None:
                    alen = self._get(orig_offs + 4, np.uint64)
                    vals = self._get(orig_offs + 12, nptype, int(alen[0]))
                    size = 12 + int(vals.nbytes)
                    return size, [raw_itype, alen, vals], [2], [GGUFValueType.ARRAY, itype]
            return super()._get_field_parts(orig_offs, raw_type)

    return _Reader


_READER = None


def _open_reader(path: Path):
    global _READER
    if _READER is None:
        _READER = _reader_class()
    return _READER(path, "r")


def _field_value(field) -> Any:
    """A metadata value as Python: str, int, float, bool, list[str] or a numpy array of numbers."""
    from gguf.constants import GGUFValueType

    t = field.types
    if not t:
        return None
    if t[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    if t[0] == GGUFValueType.ARRAY:
        if len(t) < 2:
            return []
        if t[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if t[1] == GGUFValueType.ARRAY:
            return None  # nested arrays: nothing we read uses them
        parts = [np.asarray(field.parts[i]) for i in field.data]
        return np.concatenate(parts) if parts else np.zeros(0)
    v = field.parts[-1][0]
    return v.item() if hasattr(v, "item") else v


class GGUFSource:
    """One GGUF file, opened and checked. Attributes are set at open; ``tokenizer_json`` is built on
    first access (a few seconds for a 262k vocabulary). ``notes`` gains one line per re-quantized
    tensor (with its measured error) as ``tensors()`` converts it: read it after iterating."""

    kind = "gguf"

    path: Path
    spec: ArchSpec
    name: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos: bool
    chat_template: str | None
    notes: list[str]

    def __init__(self, path: Path):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.exists():
            raise EdgeInferError(f"{where} does not exist")
        if not self.path.is_file():
            raise EdgeInferError(f"{where} is not a file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise EdgeInferError(f"{where} is not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            self._reader = _open_reader(self.path)
        except _Truncated as e:
            raise EdgeInferError(
                f"{where} is truncated: its contents need bytes up to offset {e.needed} but the file has {e.size}"
            ) from None
        except Exception as e:  # GGUFReader raises ValueError, KeyError, IndexError... on bad files
            raise EdgeInferError(f"{where} is truncated or is not a valid GGUF file ({e})") from None
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise EdgeInferError(
                    f"{where} is truncated: tensor {t.name} needs bytes up to offset {end} but the file has {size}"
                )
        self.meta: dict[str, Any] = {k: _field_value(f) for k, f in self._reader.fields.items()}
        self.notes = []
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_tensor_types()
        self.gguf_arch = self.meta.get("general.architecture")
        arch = GGUF_ARCHS.get(self.gguf_arch)
        if arch is None:
            raise EdgeInferError(
                f"{where} holds a model of architecture {self.gguf_arch!r}, which edgeinfer does not support "
                f"(supported GGUF architectures: {', '.join(GGUF_ARCHS)})"
            )
        self.spec = self._spec(arch)
        self._names = self._map_names()
        name = self.meta.get("general.name")
        self.name = name if isinstance(name, str) and name.strip() else self.path.stem

        from .gguf_tokenizer import special_ids

        self.bos_token_id, self.eos_token_ids, self.add_bos, self.chat_template = special_ids(self.meta)
        if self.spec.arch == "gemma3":
            self._check_gemma_norms()

    # -- metadata -> spec -----------------------------------------------------------------------
    def _key(self, key: str, default=None, required: bool = False):
        v = self.meta.get(f"{self.gguf_arch}.{key}")
        if v is None:
            if required:
                raise EdgeInferError(f"{self.path} is missing the metadata key {self.gguf_arch}.{key}")
            return default
        if isinstance(v, np.ndarray):
            if v.size and np.all(v == v.flat[0]):
                return v.flat[0].item()
            raise EdgeInferError(
                f"{self.path} has per-layer values for {self.gguf_arch}.{key}, which edgeinfer does not support"
            )
        return v

    def _spec(self, arch: str) -> ArchSpec:
        where = str(self.path)
        hidden = int(self._key("embedding_length", required=True))
        n_layers = int(self._key("block_count", required=True))
        heads = int(self._key("attention.head_count", required=True))
        kv_heads = int(self._key("attention.head_count_kv", heads))
        head_dim = int(self._key("attention.key_length", hidden // heads))
        v_dim = int(self._key("attention.value_length", head_dim))
        if v_dim != head_dim:
            raise EdgeInferError(f"{where} has value heads of {v_dim} and key heads of {head_dim}; edgeinfer needs them equal")
        rope_dim = int(self._key("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise EdgeInferError(
                f"{where} applies rope to {rope_dim} of {head_dim} head dimensions; edgeinfer supports full rope only"
            )
        emb = self._tensors.get("token_embd.weight")
        if emb is None:
            raise EdgeInferError(f"{where} has no token embedding tensor (token_embd.weight)")
        vocab = int(emb.shape[1]) if len(emb.shape) > 1 else 0
        ffn = self._key("feed_forward_length")
        if ffn is None:
            g = self._tensors.get("blk.0.ffn_gate.weight")
            if g is None:
                raise EdgeInferError(f"{where} is missing the metadata key {self.gguf_arch}.feed_forward_length")
            ffn = int(g.shape[1])
        theta = float(self._key("rope.freq_base", 10000.0))
        spec: dict[str, Any] = dict(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(ffn),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(self._key("attention.layer_norm_rms_epsilon", 1e-6 if arch == "gemma3" else 1e-5)),
            rope_theta=theta,
            rope_scaling=self._rope_scaling(head_dim, theta),
            max_position_embeddings=int(self._key("context_length", 4096)),
            tie_embeddings="output.weight" not in self._tensors,
        )
        if arch == "qwen2":
            spec["attention_bias"] = True
        elif arch in ("llama", "qwen3"):
            spec["attention_bias"] = "blk.0.attn_q.bias" in self._tensors
        if arch == "qwen3":
            spec["qk_norm"] = True
        window = self._key("attention.sliding_window")
        if arch == "gemma3":
            spec["qk_norm"] = True
            spec["sandwich_norm"] = True
            spec["mlp_act"] = "gelu_tanh"
            spec["embed_scale"] = math.sqrt(hidden)
            # GGUF does not store query_pre_attn_scalar. llama.cpp uses head_dim for every Gemma 3
            # but the 27B (hidden / heads = 168); the Hugging Face configs agree.
            if n_layers == 62 and hidden == 5376:
                scalar = hidden // heads
            else:
                scalar = head_dim
            spec["attn_scale"] = float(scalar) ** -0.5
            self.notes.append(
                f"gemma3: query_pre_attn_scalar is not in GGUF metadata; assumed {scalar} as llama.cpp does"
            )
            spec["rope_local_theta"] = 10000.0
            # llama.cpp hard-codes Gemma 3's pattern: five sliding-window layers, then one global.
            spec["layer_types"] = ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(n_layers)]
            spec["sliding_window"] = int(window) if window else None
            if not window:
                spec["layer_types"] = ["full"] * n_layers
            spec["final_logit_softcap"] = self._key("final_logit_softcapping")
            spec["attn_logit_softcap"] = self._key("attn_logit_softcapping")
        elif window:
            # Other GGUFs with a window (none of the supported ones today) use it on every layer.
            spec["sliding_window"] = int(window)
        try:
            return ArchSpec(**spec)
        except EdgeInferError as e:
            raise EdgeInferError(f"{where}: {e}") from None

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        kind = self._key("rope.scaling.type")
        factor = self._key("rope.scaling.factor")
        if kind is None and self._key("rope.scale_linear") is not None:  # older files
            kind, factor = "linear", self._key("rope.scale_linear")
        if "rope_freqs.weight" in self._tensors:
            return self._llama3_scaling(head_dim, theta)
        if kind in (None, "none") or factor in (None, 1.0, 0.0):
            return None
        if kind == "linear":
            return {"type": "linear", "factor": float(factor)}
        if kind == "yarn":
            out = {"type": "yarn", "factor": float(factor)}
            orig = self._key("rope.scaling.original_context_length")
            if orig:
                out["original_max_position_embeddings"] = int(orig)
            for src, dst in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
                v = self._key(src)
                if v is not None:
                    out[dst] = float(v)
            attn = self._key("rope.scaling.attn_factor")
            if attn is not None:
                out["attention_factor"] = float(attn)
            return out
        raise EdgeInferError(f"{self.path} uses rope scaling {kind!r}, which edgeinfer does not support")

    def _llama3_scaling(self, head_dim: int, theta: float) -> dict:
        """Llama 3.1+ GGUFs carry the rope frequency factors as a tensor (rope_freqs), not the
        parameters. Recover the parameters by matching the factors llama.cpp's converter computes."""
        t = self._tensors["rope_freqs.weight"]
        if t.tensor_type.name != "F32":
            raise EdgeInferError(f"{self.path}: tensor rope_freqs.weight has type {t.tensor_type.name}, expected F32")
        got = np.asarray(t.data, dtype=np.float64).reshape(-1)
        freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        wavelen = 2 * math.pi / freqs
        orig_ctx = int(self._key("rope.scaling.original_context_length", 8192))
        for orig in dict.fromkeys((orig_ctx, 8192)):
            for factor in (8.0, 16.0, 32.0, 4.0, 2.0, 64.0):
                for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
                    lw, hw = orig / low, orig / high
                    smooth = (orig / wavelen - low) / (high - low)
                    want = np.where(
                        wavelen < hw, 1.0, np.where(wavelen > lw, factor, 1.0 / ((1 - smooth) / factor + smooth))
                    )
                    if want.shape == got.shape and np.allclose(got, want, rtol=1e-4, atol=1e-6):
                        self.notes.append(
                            f"rope: llama3 scaling recovered from rope_freqs (factor {factor:g}, low {low:g}, "
                            f"high {high:g}, original context {orig})"
                        )
                        return {
                            "type": "llama3",
                            "factor": factor,
                            "low_freq_factor": low,
                            "high_freq_factor": high,
                            "original_max_position_embeddings": orig,
                        }
        raise EdgeInferError(
            f"{self.path} has rope frequency factors (rope_freqs.weight) that match no Llama 3 rope scaling edgeinfer knows"
        )

    # -- tensors ------------------------------------------------------------------------------
    def _check_tensor_types(self) -> None:
        for t in self._reader.tensors:
            tname = t.tensor_type.name
            if tname not in SUPPORTED_TYPES:
                raise EdgeInferError(
                    f"{self.path}: tensor {t.name} has type {tname}, which edgeinfer cannot import "
                    f"(supported: {', '.join(SUPPORTED_TYPES)})"
                )
            nd = len(t.shape)
            if nd > 2 or (nd == 2 and tname not in _FLOAT and int(t.shape[0]) % 32) or (nd == 1 and tname not in _FLOAT):
                raise EdgeInferError(
                    f"{self.path}: tensor {t.name} of type {tname} has shape {list(map(int, t.shape))}, "
                    "which edgeinfer cannot import"
                )

    def _map_names(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        layer_names = {**_LAYER_NAMES, **(_GEMMA3_LAYER_NAMES if self.spec.arch == "gemma3" else {})}
        for name in self._tensors:
            if name in _SKIPPED:
                out[name] = None
                continue
            pkg = _GLOBAL_NAMES.get(name)
            if pkg is None:
                m = _LAYER_RE.fullmatch(name)
                if m and m.group(2) in layer_names and int(m.group(1)) < self.spec.num_layers:
                    pkg = f"layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
            if pkg is None:
                raise EdgeInferError(
                    f"{self.path}: tensor {name} does not belong to a {self.gguf_arch} model as edgeinfer knows it"
                )
            out[name] = pkg
        return out

    def _check_gemma_norms(self) -> None:
        """llama.cpp's converter folds Gemma's (1 + w) into the stored norm weights, so they are used
        as-is. Checked against the data: Gemma checkpoints are bf16 and the converter adds 1 in fp32,
        so ``w - 1`` is exactly a bf16 value everywhere while ``w`` itself often is not. Raw (unshifted)
        bf16 weights would show the opposite."""
        vals = [
            np.asarray(t.data, dtype=np.float32).reshape(-1)
            for name, t in self._tensors.items()
            if name.endswith("norm.weight") and t.tensor_type.name == "F32"
        ]
        if not vals:
            return
        w = np.concatenate(vals)

        def bf16_exact(x):
            return float(((np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & 0xFFFF) == 0).mean())

        raw, shifted = bf16_exact(w), bf16_exact(w - np.float32(1.0))
        if raw == 1.0 and shifted < 0.9:
            raise EdgeInferError(
                f"{self.path} has Gemma 3 norm weights that look unshifted (raw bf16 values, without the +1 "
                "llama.cpp's converter folds in); edgeinfer cannot tell how to read them"
            )
        verdict = "verified" if shifted > raw else "assumed (the data cannot tell)"
        self.notes.append(
            f"gemma3: norm weights already include (1 + w), {verdict}: w - 1 is bf16-exact for {shifted:.1%} of "
            f"{w.size} values, w itself for {raw:.1%}; stored as-is"
        )

    def tensor_names(self) -> list[str]:
        """Package names of the tensors ``tensors()`` yields, in file order."""
        return [p for p in self._names.values() if p is not None]

    def tensors(self) -> Iterator[tuple[str, np.ndarray | QuantizedTensor]]:
        """Yields (package name, float array or QuantizedTensor), one tensor at a time."""
        spec = self.spec
        for t in self._reader.tensors:
            pkg = self._names[t.name]
            if pkg is None:
                continue
            arr = self._convert(t)
            if self.gguf_arch == "llama" and pkg.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
                arr = _unpermute_rows(arr, spec.num_heads)
            elif self.gguf_arch == "llama" and pkg.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
                arr = _unpermute_rows(arr, spec.num_kv_heads)
            yield pkg, arr

    def _convert(self, t) -> np.ndarray | QuantizedTensor:
        tname = t.tensor_type.name
        if tname in _FLOAT:
            if tname == "BF16":
                # bf16 -> fp32 is exact; 2-D matrices then go to fp16 like every float matrix here.
                raw = np.ascontiguousarray(t.data).view(np.uint16)
                a = (raw.astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.asarray(t.data)
            if a.ndim == 1:
                return np.array(a, dtype=np.float32)
            out = a.astype(np.float16)
            if not np.isfinite(out).all() and np.isfinite(a).all():
                self._note(t.name, f"{t.name} ({tname}) kept in float32: its values overflow float16")
                return np.array(a, dtype=np.float32)
            return out
        raw = np.asarray(t.data)
        if tname in _REQUANTIZED:
            return self._requantize(t, raw)
        return CONVERTERS[tname](raw)

    def _requantize(self, t, raw: np.ndarray) -> QuantizedTensor:
        from gguf.quants import dequantize

        w = dequantize(raw, t.tensor_type)
        q = quantize_symmetric(w, bits=8, group_size=32)
        err = q.dequantize() - w
        max_abs = float(np.abs(err).max())
        rms = float(np.sqrt(np.mean(np.square(err, dtype=np.float64))))
        ref = float(np.sqrt(np.mean(np.square(w, dtype=np.float64))))
        self._note(
            t.name,
            f"{t.name}: {t.tensor_type.name} re-quantized to 8 bits in groups of 32 (symmetric, {q.scales.dtype.name} scales); "
            f"max abs error {max_abs:.3g}, relative RMS error {rms / ref if ref else 0.0:.3g}",
        )
        return q

    def _note(self, key: str, text: str) -> None:
        prefix = f"{key}:"
        # One line per tensor however many times tensors() runs.
        self.notes[:] = [n for n in self.notes if not n.startswith(prefix) and not n.startswith(f"{key} (")]
        self.notes.append(text)

    @functools.cached_property
    def tokenizer_json(self) -> str:
        from .gguf_tokenizer import build_tokenizer

        tok = build_tokenizer(self.meta, str(self.path))
        for n in tok.notes:
            if n not in self.notes:
                self.notes.append(n)
        return tok.tokenizer_json


def open_gguf(path) -> GGUFSource:
    return GGUFSource(Path(path))


# -- lossless block conversions ---------------------------------------------------------------------
def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    rows = raw.shape[0]
    return raw.reshape(rows, -1, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per entry of the last axis -> float32 of shape b.shape[:-1]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """ggml's 16-byte nibble blocks: value j < 16 is the low nibble of byte j, value 16 + j the high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of high bits (a little-endian uint32) -> 32 values of 0 or 1."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _affine(vals: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int, prefer16: bool) -> QuantizedTensor:
    """vals uint8 [rows, n]; scale/bias fp32 [rows, n/32]. Stores fp16 when both round-trip exactly."""
    rows = vals.shape[0]
    scale = scale.reshape(rows, -1)
    bias = bias.reshape(rows, -1)
    dtype = np.float32
    if prefer16:
        with np.errstate(over="ignore"):
            s16, b16 = scale.astype(np.float16), bias.astype(np.float16)
        if np.array_equal(s16.astype(np.float32), scale) and np.array_equal(b16.astype(np.float32), bias):
            return QuantizedTensor(pack_bits(vals.reshape(rows, -1), bits), s16, b16, bits, 32)
    return QuantizedTensor(pack_bits(vals.reshape(rows, -1), bits), scale.astype(dtype), bias.astype(dtype), bits, 32)


def _q4_0(raw):
    b = _blocks(raw, 18)
    d = _f16(b[..., 0:2])
    return _affine(_nibbles_32(b[..., 2:]), d, -8.0 * d, 4, True)


def _q4_1(raw):
    b = _blocks(raw, 20)
    return _affine(_nibbles_32(b[..., 4:]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4, True)


def _q5_0(raw):
    b = _blocks(raw, 22)
    d = _f16(b[..., 0:2])
    vals = _nibbles_32(b[..., 6:]) | (_high_bits_32(b[..., 2:6]) << 4)
    return _affine(vals, d, -16.0 * d, 5, True)


def _q5_1(raw):
    b = _blocks(raw, 24)
    vals = _nibbles_32(b[..., 8:]) | (_high_bits_32(b[..., 4:8]) << 4)
    return _affine(vals, _f16(b[..., 0:2]), _f16(b[..., 2:4]), 5, True)


def _q8_0(raw):
    b = _blocks(raw, 34)
    d = _f16(b[..., 0:2])
    vals = b[..., 2:] ^ np.uint8(0x80)  # int8 x -> x + 128
    return _affine(vals, d, -128.0 * d, 8, True)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-block header -> fp32 (scale, bias) per sub-block [rows, nb, 8], as ggml computes them."""
    from gguf.quants import Q4_K

    rows, nb = b.shape[:2]
    d = _f16(b[..., 0:2])[..., None]
    dmin = _f16(b[..., 2:4])[..., None]
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
    sc = sc.reshape(rows, nb, 8).astype(np.float32)
    m = m.reshape(rows, nb, 8).astype(np.float32)
    return d * sc, -(dmin * m)


def _q4_k(raw):
    b = _blocks(raw, 144)
    rows, nb = b.shape[:2]
    scale, bias = _k_scales(b)
    qs = b[..., 16:].reshape(rows, nb, 4, 1, 32)
    # Sub-block 2j is the low nibbles of the j-th 32 bytes, sub-block 2j+1 their high nibbles.
    vals = np.concatenate([qs & 0x0F, qs >> 4], axis=3)
    return _affine(vals.reshape(rows, -1), scale, bias, 4, False)


def _q5_k(raw):
    b = _blocks(raw, 176)
    rows, nb = b.shape[:2]
    scale, bias = _k_scales(b)
    qh = b[..., 16:48]
    qs = b[..., 48:].reshape(rows, nb, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, nb, 8, 32)
    # Sub-block i takes bit i of each of the 32 qh bytes as its fifth bit.
    high = (qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1
    vals = low | (high << 4)
    return _affine(vals.reshape(rows, -1), scale, bias, 5, False)


CONVERTERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k}


def _unpermute_rows(w, n_head: int):
    """Undoes llama.cpp's Q/K row permutation (interleaved rope -> rotate-half), as transformers does:
    ``w.reshape(n_head, dim, 2, ...).swapaxes(1, 2)`` with dim = rows // n_head // 2."""
    rows = w.shape[0]
    dim = rows // n_head // 2
    perm = np.arange(rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(-1)
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.weight[perm], w.scales[perm], w.biases[perm], w.bits, w.group_size)
    return w[perm]
