"""A GGUF file's vocabulary as a Hugging Face ``tokenizers`` JSON, so that a package never needs the GGUF.

GGUF keeps the tokenizer as metadata under llama.cpp's keys (``tokenizer.ggml.*``). Two families are
rebuilt here:

- ``gpt2``: byte-level BPE (SmolLM, Llama 3, Qwen2/3, Mistral Nemo...). Tokens and merges come from the
  file; the pre-tokenizer split is chosen by ``tokenizer.ggml.pre``, as llama.cpp does.
- ``llama``: SentencePiece BPE with scores (Llama 2, Mistral v0.1-v0.3, Gemma). The file has no merges,
  so they are derived from the scores the way SentencePiece applies them: a pair may merge when the
  merged piece is in the vocabulary, and the higher the merged piece's score, the earlier it merges.
  Characters outside the vocabulary fall back to the ``<0xXX>`` byte tokens.

Token types (llama.cpp's ``llama_token_type``): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte. Control tokens become special added tokens; user-defined tokens become added tokens
that are matched whole in the text (as llama.cpp does) but are *not* special, so that decoding with
``skip_special_tokens`` keeps them (Gemma's newline and multi-space tokens are user-defined).

The runtime adds BOS itself from ``add_bos``; the JSON has no post-processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edgeinfer.errors import EdgeInferError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes, by tokenizer.ggml.pre (llama.cpp's names). These are the published
# regexes of each tokenizer family (the same ones their tokenizer.json files carry).
_GPT2_DEFAULT = None  # ByteLevel(use_regex=True) carries the GPT-2 regex itself
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> ("bytelevel") | ("digits") | ("split", regex, ignore_merges)
_BPE_PRE: dict[str, tuple] = {
    "default": ("bytelevel",),
    "gpt2": ("bytelevel",),
    "gpt-2": ("bytelevel",),
    "smollm": ("digits",),
    "llama-bpe": ("split", _LLAMA3, True),
    "llama3": ("split", _LLAMA3, True),
    "llama-v3": ("split", _LLAMA3, True),
    "smaug-bpe": ("split", _LLAMA3, False),
    "dbrx": ("split", _LLAMA3, False),
    "falcon3": ("split", _LLAMA3, False),
    "qwen2": ("split", _QWEN2, False),
    "deepseek-r1-qwen": ("split", _QWEN2, False),
    "megrez": ("split", _QWEN2, False),
    "tekken": ("split", _TEKKEN, False),
    "gpt-4o": ("split", _GPT4O, False),
    "llama4": ("split", _GPT4O, False),
}
SUPPORTED_BPE_PRE = tuple(sorted(_BPE_PRE))

# Tokens that end a turn in the common chat formats; added to eos_token_ids when they are in the vocab.
_END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


@dataclass
class GGUFTokenizer:
    tokenizer_json: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos: bool
    chat_template: str | None
    notes: list[str] = field(default_factory=list)


def _get(meta: Mapping[str, Any], key: str, default=None):
    v = meta.get(key)
    return default if v is None else v


def special_ids(meta: Mapping[str, Any]) -> tuple[int | None, list[int], bool, str | None]:
    """(bos_token_id, eos_token_ids, add_bos, chat_template) from the metadata; cheap (no tokenizer build).

    ``meta`` maps GGUF keys to Python values; ``tokenizer.ggml.tokens`` a list of str and
    ``tokenizer.ggml.token_type`` an int array.
    """
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type")
    model = meta.get("tokenizer.ggml.model")
    n = len(tokens)

    def valid(i):
        return i is not None and 0 <= int(i) < max(n, 1)

    bos = meta.get("tokenizer.ggml.bos_token_id")
    bos = int(bos) if valid(bos) else None
    eos: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(key)
        if valid(v) and int(v) not in eos:
            eos.append(int(v))
    if tokens:
        wanted = set(_END_OF_TURN)
        for i, t in enumerate(tokens):
            if t in wanted and i not in eos and (types is None or int(types[i]) in (CONTROL, USER_DEFINED)):
                eos.append(i)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        # llama.cpp's default: SentencePiece vocabularies add BOS, byte-level ones do not.
        add_bos = model == "llama"
    template = meta.get("tokenizer.chat_template")
    return bos, eos, bool(add_bos), (template if isinstance(template, str) and template else None)


def build_tokenizer(meta: Mapping[str, Any], where: str) -> GGUFTokenizer:
    """Builds the tokenizer JSON from GGUF metadata; ``where`` names the file in error messages."""
    from tokenizers import AddedToken

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise EdgeInferError(f"{where} has no tokenizer vocabulary (tokenizer.ggml.model/tokens)")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    types = np.full(n, NORMAL, dtype=np.int32) if types is None else np.asarray(types, dtype=np.int32)
    if len(types) != n:
        raise EdgeInferError(f"{where} has {len(types)} token types for {n} tokens")
    notes: list[str] = []

    # The model's vocab must be a bijection; a repeated piece keeps its first id.
    vocab: dict[str, int] = {}
    dups = 0
    for i, t in enumerate(tokens):
        if t in vocab:
            dups += 1
        else:
            vocab[t] = i
    if dups:
        notes.append(f"tokenizer: {dups} repeated token strings in the GGUF vocabulary keep their first id")

    if model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, types, vocab, where, notes)
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types, vocab, where, notes)
    else:
        raise EdgeInferError(
            f"{where} uses the tokenizer model {model!r}, which edgeinfer cannot rebuild (supported: gpt2, llama)"
        )

    control = [i for i in np.flatnonzero(types == CONTROL) if vocab.get(tokens[i]) == i]
    user = [i for i in np.flatnonzero(types == USER_DEFINED) if vocab.get(tokens[i]) == i]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    if user:
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    if tok.get_vocab_size(with_added_tokens=True) != n:
        raise EdgeInferError(
            f"{where}: the rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, not {n}"
        )
    bos, eos, add_bos, template = special_ids(meta)
    return GGUFTokenizer(tok.to_str(), bos, eos, add_bos, template, notes)


def _byte_level_bpe(meta, tokens, types, vocab, where, notes):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise EdgeInferError(f"{where} has a byte-level BPE vocabulary without merges (tokenizer.ggml.merges)")
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise EdgeInferError(f"{where} has a malformed BPE merge {m!r}")
        merges.append((a, b))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    kind = _BPE_PRE.get(pre)
    if kind is None:
        raise EdgeInferError(
            f"{where} uses the pre-tokenizer {pre!r}, which edgeinfer does not know "
            f"(known: {', '.join(SUPPORTED_BPE_PRE)})"
        )
    ignore_merges = len(kind) == 3 and kind[2]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    if kind[0] == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind[0] == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(kind[1]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary: for every normal piece, every split into two
    normal pieces; ordered by the merged piece's score (best first), then by the left part's length
    (longest first), as Hugging Face's SentencePieceExtractor orders them."""
    scores = np.asarray(scores, dtype=np.float64)
    normal = np.asarray(types) == NORMAL
    ids = {}
    for i in np.flatnonzero(normal):
        t = tokens[i]
        if t not in ids:
            ids[t] = int(i)
    rows: list[tuple[float, int, int, int, str, str]] = []
    append = rows.append
    for t, i in ids.items():
        if len(t) < 2:
            continue
        s = -scores[i]
        for k in range(1, len(t)):
            a = t[:k]
            if a in ids:
                b = t[k:]
                j = ids.get(b)
                if j is not None:
                    append((s, -k, -len(b), i, a, b))
    rows.sort(key=lambda r: r[:4])
    return [(r[4], r[5]) for r in rows]


def _sentencepiece_bpe(meta, tokens, types, vocab, where, notes):
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise EdgeInferError(f"{where} has a SentencePiece vocabulary without one score per token")
    merges = sentencepiece_merges(tokens, scores, types)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    n_bytes = int((np.asarray(types) == BYTE).sum())
    if n_bytes != 256:
        notes.append(f"tokenizer: the vocabulary has {n_bytes} byte tokens, not 256; byte fallback is partial")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp's default for SentencePiece vocabularies is to add a prefix space.
    prefix = bool(_get(meta, "tokenizer.ggml.add_space_prefix", True))
    if prefix:
        # Normalizers run on every piece of text between added tokens, so like llama.cpp this puts
        # the space at the start of the text and after every special token.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    notes.append(f"tokenizer: SentencePiece BPE rebuilt with {len(merges)} merges derived from the scores")
    return tok
