"""Tokenizer, chat template and streaming detokenization for a package."""

from __future__ import annotations

import datetime
from pathlib import Path

from .errors import EdgeInferError


class ChatTemplateError(EdgeInferError):
    pass


class Tokenizer:
    def __init__(self, pkg_path: Path, info: dict):
        self.info = info
        path = Path(pkg_path) / info["file"]
        self.kind = info.get("kind", "tokenizers")
        try:
            if self.kind == "tokenizers":
                from tokenizers import Tokenizer as HFTokenizer

                self._tok = HFTokenizer.from_file(str(path))
                self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            else:
                import sentencepiece as spm

                self._sp = spm.SentencePieceProcessor(model_file=str(path))
                self.vocab_size = self._sp.get_piece_size()
        except Exception as e:  # the libraries raise their own exception types
            raise EdgeInferError(f"cannot read the tokenizer {path}: {e}") from None
        self.bos_token_id = info.get("bos_token_id")
        self.eos_token_ids = set(info.get("eos_token_ids") or [])
        self.add_bos = bool(info.get("add_bos", False))
        tf = info.get("chat_template_file")
        self.chat_template = (Path(pkg_path) / tf).read_text() if tf else None
        self._compiled_template = None

    # -- ids <-> text -----------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Encodes text; special-token strings in it become their ids. Adds BOS where the model
        expects one (unless add_bos=False, as for rendered chat templates that carry their own)."""
        if self.kind == "tokenizers":
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = list(ids)
        if self.kind == "tokenizers":
            return self._tok.decode(ids, skip_special_tokens=skip_special)
        return self._sp.decode(ids)

    def token_to_str(self, i: int) -> str:
        return self._tok.id_to_token(i) if self.kind == "tokenizers" else self._sp.id_to_piece(i)

    # -- chat -------------------------------------------------------------------------------------
    def _template(self):
        if self._compiled_template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            try:
                self._compiled_template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise ChatTemplateError(f"the package's chat template does not compile: {e}") from None
        return self._compiled_template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders messages with the package's template (a sandboxed jinja2, as transformers does)."""
        if not self.chat_template:
            return plain_chat_format(messages, add_generation_prompt)
        bos = self.token_to_str(self.bos_token_id) if self.bos_token_id is not None else ""
        eos_id = min(self.eos_token_ids) if self.eos_token_ids else None
        eos = self.token_to_str(eos_id) if eos_id is not None else ""
        try:
            return self._template().render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
            )
        except Exception as e:  # anything a template can raise
            raise ChatTemplateError(f"the package's chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=None if not self.chat_template else False)


def plain_chat_format(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The fallback when a package has no usable template: role-prefixed lines."""
    out = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return out + ("Assistant:" if add_generation_prompt else "")


class StreamingDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a multi-byte character.

    Decodes a short window of recent tokens and emits only what is new once it no longer ends in an
    incomplete character (U+FFFD), the way transformers' TextStreamer and vLLM do.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text was already emitted
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        new_text = self.tok.decode(self.ids[self.prefix :])
        if new_text.endswith("\ufffd") or len(new_text) < len(prefix_text):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        full = self.tok.decode(self.ids[self.prefix :])
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        delta = full[len(prefix_text) :]
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta
