"""``edgeinfer chat``: a conversation with a model, in a terminal or through a pipe.

The KV cache is kept across turns. Each turn renders the whole conversation with the chat template
and the model prefills only the tokens after the longest prefix already in the cache: in practice the
new user message and the template's few tokens around it. The system prompt (and the template's text
before the first user message) is prefilled before the first question. An interrupted answer rolls
the cache back to the end of the last complete turn. When the conversation outgrows the context, the
oldest turns are dropped (the system prompt stays) and the rest is prefilled again, once.

This module holds the conversation (``ChatSession``) and the piped mode; ``chat_repl`` is the
interactive terminal and ``chat_render`` its output.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from edgeinfer.errors import EdgeInferError
from edgeinfer.tokenizer import ChatTemplateError

SAVE_FORMAT = "edgeinfer-chat"
ROLES = ("system", "user", "assistant")
PLAIN_STOPS = ["\nUser:"]  # the plain fallback format has no end-of-turn token


def _stderr_line(msg: str) -> None:
    print(f"edgeinfer: {msg}", file=sys.stderr, flush=True)


class ChatSession:
    """A conversation and the model's KV cache for it.

    ``opts``: ``{"max_tokens": int, "sampling": dict of SamplingParams fields, "stop": [str]}``.
    ``notice(msg)`` tells the user something once (context overflow, template fallback).
    """

    def __init__(self, model, system: str | None, opts: dict, notice: Callable[[str], None] | None = None):
        self.model = model
        self.system = system
        self.opts = {"max_tokens": opts.get("max_tokens", 512), "sampling": dict(opts.get("sampling") or {}),
                     "stop": list(opts.get("stop") or [])}
        self.notice = notice or _stderr_line
        self.messages: list[dict] = []
        self.committed = 0  # cache length at the end of the last complete turn
        self.turns_dropped = 0  # turns dropped for room in this conversation
        self._overflow_told = False
        self._template_failed = False
        self.interrupted = False  # the last answer did not complete
        self.reset(prefill=False)

    # kept for callers of the first version
    @property
    def gen_opts(self) -> dict:
        return self.opts

    # -- the conversation ---------------------------------------------------------------------------
    def reset(self, prefill: bool = True) -> None:
        """Starts over with the current system prompt; the cache keeps what it can reuse."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns_dropped = 0
        self._overflow_told = False
        if prefill:
            self.prefill()
        else:
            self._rollback(0)

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "user")

    def undo(self) -> bool:
        """Forgets the last complete turn (question and answer)."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            return False
        self.messages = self.messages[:last_user]
        self.prefill()
        return True

    # -- tokens -------------------------------------------------------------------------------------
    def encode(self, msgs: list[dict]) -> list[int]:
        """The conversation as token ids; a failing chat template is reported once and replaced by a
        plain ``Role: text`` format for the rest of the session."""
        tok = self.model.tokenizer
        try:
            return tok.encode_chat(msgs)
        except ChatTemplateError as e:
            tok.chat_template = None
            self._template_failed = True
            # render_chat wraps the compile error of _template() in its own "failed: ..." sentence
            msg = str(e).replace("chat template failed: the package's chat template ", "chat template ")
            self.notice(f"warning: {msg}; using a plain 'User: ...' format instead")
            return tok.encode_chat(msgs)

    @property
    def context_tokens(self) -> int:
        return self.model.cache.offset

    @property
    def context_limit(self) -> int:
        return self.model.cache.max_tokens

    def _reserve(self) -> int:
        """Room kept free for an answer when deciding whether the conversation fits."""
        return max(1, min(self.opts["max_tokens"], self.context_limit // 4))

    def fit(self, msgs: list[dict]) -> tuple[list[dict], list[int]]:
        """``msgs`` (ending with a user message) and their ids, dropping the oldest turns when they
        leave too little room for an answer. After a drop the conversation is cut to about 3/4 of the
        context, so that the full re-prefill a drop costs is not paid again on the next turns."""
        ids = self.encode(msgs)
        limit, reserve = self.context_limit, self._reserve()
        if len(ids) + reserve <= limit:
            return msgs, ids
        goal = max(limit * 3 // 4, reserve + 1)
        head = 1 if msgs and msgs[0]["role"] == "system" else 0
        dropped = 0
        while len(ids) + reserve > goal and len(msgs) - head > 1:
            j = head + 1
            while j < len(msgs) - 1 and msgs[j]["role"] != "user":
                j += 1
            msgs = msgs[:head] + msgs[j:]
            dropped += 1
            ids = self.encode(msgs)
        if len(ids) >= limit:
            raise EdgeInferError(f"this message makes a prompt of {len(ids)} tokens"
                                 f"{' with the system prompt' if head else ''}; the model's context holds {limit}")
        if dropped:
            self.turns_dropped += dropped
            if not self._overflow_told:
                self._overflow_told = True
                self.notice(f"the conversation outgrew the {limit}-token context: dropping the oldest turns"
                            f"{' (the system prompt stays)' if head else ''}")
        return msgs, ids

    def _config(self, max_tokens: int | None = None):
        from edgeinfer.model import GenerationConfig
        from edgeinfer.sampling import SamplingParams

        stop = list(self.opts["stop"])
        if self.model.tokenizer.chat_template is None:
            stop += PLAIN_STOPS
        return GenerationConfig(max_tokens=self.opts["max_tokens"] if max_tokens is None else max_tokens,
                                sampling=SamplingParams(**self.opts["sampling"]), stop=stop)

    # -- the cache ----------------------------------------------------------------------------------
    def _rollback(self, n: int) -> None:
        """Keeps the first ``n`` cached tokens (fewer if the cache holds fewer)."""
        m = self.model
        n = max(0, min(n, m.cache.offset, len(m.cache_tokens)))
        m.cache.trim_to(n)
        m.cache_tokens = m.cache_tokens[:n]
        self.committed = n

    def _mark_complete(self) -> None:
        self.committed = min(self.model.cache.offset, len(self.model.cache_tokens))

    def prefill(self) -> None:
        """Brings the cache to the conversation so far plus the template's text before the next user
        message, so that the next answer starts sooner (for a fresh conversation: the system prompt)."""
        msgs, ids = self.fit(self.messages + [{"role": "user", "content": "a"}])
        self.messages = msgs[:-1]
        other = self.encode(self.messages + [{"role": "user", "content": "b"}])
        n = 0
        while n < min(len(ids), len(other)) and ids[n] == other[n]:
            n += 1
        m = self.model
        if n < 2:  # nothing worth keeping: the whole prompt depends on the next message
            self._rollback(0)
            return
        saved = m.stats
        try:
            for _ in m.stream_ids(ids[:n], self._config(max_tokens=0)):
                pass
        except BaseException:
            self._rollback(self.committed)
            raise
        finally:
            m.stats = saved
        self._rollback(n)

    # -- answers ------------------------------------------------------------------------------------
    def ask(self, text: str) -> Iterator[str]:
        """Streams the answer to ``text``. The turn joins the conversation only when the answer
        completes; otherwise (an interruption, an error) the cache goes back to the last complete turn."""
        msgs, ids = self.fit(self.messages + [{"role": "user", "content": text}])
        stream = self.model.stream_text(ids, self._config())
        answer: list[str] = []
        done = False
        try:
            for piece in stream:
                answer.append(piece)
                yield piece
            done = True
        finally:
            stream.close()
            self.interrupted = not done
            if done:
                self.messages = msgs + [{"role": "assistant", "content": "".join(answer)}]
                self._mark_complete()
            else:
                self._rollback(self.committed)

    # -- files --------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": SAVE_FORMAT, "version": 1, "model": self.model.name,
            "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "system": self.system, "settings": {"max_tokens": self.opts["max_tokens"], **self.opts["sampling"]},
            "messages": self.messages,
        }

    def save(self, path: str) -> Path:
        p = Path(path).expanduser()
        if not p.parent.is_dir():
            raise EdgeInferError(f"cannot save to {p}: the folder {p.parent} does not exist")
        tmp = p.with_name(p.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise EdgeInferError(f"cannot save to {p}: {e.strerror or e}") from None
        return p

    def load(self, path: str) -> None:
        """Replaces the conversation by a saved one (its system prompt included) and prefills it."""
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EdgeInferError(f"cannot load {p}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeInferError(f"cannot load {p}: {getattr(e, 'strerror', None) or e}") from None
        except json.JSONDecodeError as e:
            raise EdgeInferError(f"cannot load {p}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or data.get("format", SAVE_FORMAT) != SAVE_FORMAT:
            raise EdgeInferError(f"cannot load {p}: not a saved edgeinfer chat")
        msgs = data.get("messages")
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs
        ):
            raise EdgeInferError(f"cannot load {p}: 'messages' must be a list of {{role: system|user|assistant, content: text}}")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if any(m["role"] == "system" for m in msgs[1:]):
            raise EdgeInferError(f"cannot load {p}: a system message may only come first")
        self.system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
        while len(msgs) > (1 if self.system else 0) and msgs[-1]["role"] == "user":
            msgs.pop()  # a question without its answer is asked again by the user, not replayed
        self.messages = msgs
        self.turns_dropped = 0
        self._overflow_told = False
        self.prefill()


def run_chat(model, a, sampling: dict) -> int:
    """``a``: the parsed ``edgeinfer chat`` arguments; ``sampling``: SamplingParams fields."""
    from edgeinfer.sampling import SamplingParams

    SamplingParams(**sampling).validate()
    if a.max_tokens < 1:
        raise EdgeInferError(f"--max-tokens must be >= 1, not {a.max_tokens}")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    opts = {"max_tokens": a.max_tokens, "stop": a.stop, "sampling": sampling}
    if not interactive:
        return _piped(ChatSession(model, a.system, opts), getattr(a, "load", None))
    from edgeinfer.apps.chat_repl import Repl

    return Repl(model, a, opts).run()


def _piped(session: ChatSession, load: str | None) -> int:
    """One prompt per input line, one answer per output line (its whitespace runs, newlines
    included, become single spaces); nothing else on stdout."""
    if load:
        session.load(load)
    else:
        session.prefill()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        answer = "".join(session.ask(line))
        print(" ".join(answer.split()), flush=True)
    return 0
