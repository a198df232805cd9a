"""``edgeinfer chat``: an interactive chat in a terminal, or one answer per line from a pipe.

The KV cache is kept across turns: each turn renders the whole conversation with the chat template,
and only the tokens after the longest prefix already in the cache are prefilled.
"""

from __future__ import annotations

import sys

from edgeinfer.errors import EdgeInferError
from edgeinfer.tokenizer import ChatTemplateError

HELP = """commands:
  /help            this help
  /reset           forget the conversation (keeps the system prompt)
  /system TEXT     set the system prompt and start over
  /stats           statistics of the last answer
  /exit            leave (Ctrl-D works too; Ctrl-C stops an answer)"""


class ChatSession:
    def __init__(self, model, system: str | None, gen_opts: dict):
        self.model = model
        self.system = system
        self.gen_opts = gen_opts
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str):
        """Streams the answer to ``text``; the turn is kept only if the answer completes."""
        msgs = self.messages + [{"role": "user", "content": text}]
        try:
            ids = self.model.tokenizer.encode_chat(msgs)
        except ChatTemplateError as e:
            print(f"edgeinfer: {e}; using a plain format", file=sys.stderr)
            self.model.tokenizer.chat_template = None
            ids = self.model.tokenizer.encode_chat(msgs)
        answer = []
        from edgeinfer.model import GenerationConfig
        from edgeinfer.sampling import SamplingParams

        cfg = GenerationConfig(
            max_tokens=self.gen_opts["max_tokens"], sampling=SamplingParams(**self.gen_opts["sampling"]),
            stop=self.gen_opts.get("stop", []),
        )
        for piece in self.model.stream_text(ids, cfg):
            answer.append(piece)
            yield piece
        self.messages = msgs + [{"role": "assistant", "content": "".join(answer).strip()}]


def run_chat(model, a, sampling: dict) -> int:
    """``a``: the parsed ``edgeinfer chat`` arguments (system prompt, max tokens, stop strings)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    session = ChatSession(model, a.system, {"max_tokens": a.max_tokens, "stop": a.stop, "sampling": sampling})
    if not interactive:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            answer = "".join(session.ask(line))
            print(" ".join(answer.split()), flush=True)
        return 0
    return _interactive(session)


def _interactive(session: ChatSession) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    model = session.model
    print(f"edgeinfer chat: {model.name} ({model.backend.backend}). /help for commands, Ctrl-D to leave.")
    prompt = PromptSession(history=InMemoryHistory())
    while True:
        try:
            text = prompt.prompt(">>> ").strip()
        except KeyboardInterrupt:
            continue
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            if cmd == "/help":
                print(HELP)
            elif cmd == "/reset":
                session.reset()
                print("(conversation cleared)")
            elif cmd == "/system":
                session.system = arg.strip() or None
                session.reset()
                print("(system prompt set; conversation cleared)")
            elif cmd == "/stats":
                print(model.stats.line())
            else:
                print(f"unknown command {cmd}; /help lists them")
            continue
        try:
            for piece in session.ask(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(stopped)")
            continue
        except EdgeInferError as e:
            print(f"\nedgeinfer: {e}")
            continue
        s = model.stats
        print(f"\n\x1b[2m[{s.generated_tokens} tok, {s.decode_tps:.1f} tok/s, TTFT {s.ttft * 1000:.0f} ms]\x1b[0m")
