"""The interactive side of ``edgeinfer chat``: prompt, slash commands, settings, statistics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeinfer.errors import EdgeInferError

from .chat import ChatSession
from .chat_render import DIM, RESET, AnswerView, color_allowed, sanitize


# -- /set: one entry per setting ------------------------------------------------------------------
@dataclass
class Setting:
    """``get(repl)`` returns the current value; ``set(repl, text)`` parses, checks and applies a new one
    (raising EdgeInferError with a sentence for the user). A feature that wants a switch in the chat
    adds one entry to SETTINGS."""

    help: str
    get: Callable
    set: Callable


def _number(cast, name: str, text: str):
    if cast is not float and text.lower() in ("none", "off", "random"):
        return None
    try:
        return cast(text)
    except ValueError:
        raise EdgeInferError(f"{name} takes {'a number' if cast is float else 'a whole number'}, not {text!r}") from None


def _sampling_setting(name: str, cast, help: str) -> Setting:
    from edgeinfer.sampling import SamplingParams

    def get(r):
        return r.session.opts["sampling"].get(name, getattr(SamplingParams(), name))

    def set_(r, text):
        new = dict(r.session.opts["sampling"], **{name: _number(cast, name, text)})
        if new[name] is None and name != "seed":
            raise EdgeInferError(f"{name} takes a number")
        try:
            SamplingParams(**new).validate()
        except EdgeInferError as e:  # worded for the command line flags: --top-p -> top_p
            raise EdgeInferError(re.sub(r"--([\w-]+)", lambda m: m.group(1).replace("-", "_"), str(e))) from None
        r.session.opts["sampling"] = new

    return Setting(help, get, set_)


def _set_max_tokens(r, text):
    n = _number(int, "max_tokens", text)
    if n is None or n < 1:
        raise EdgeInferError(f"max_tokens must be >= 1, not {text}")
    r.session.opts["max_tokens"] = n


def _set_markdown(r, text):
    flag = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}.get(text.lower())
    if flag is None:
        raise EdgeInferError(f"markdown is on or off, not {text!r}")
    r.markdown = flag


SETTINGS: dict[str, Setting] = {
    "temp": _sampling_setting("temp", float, "temperature; 0 is greedy"),
    "top_p": _sampling_setting("top_p", float, "nucleus sampling mass, in (0, 1]"),
    "top_k": _sampling_setting("top_k", int, "keep the k most likely tokens; 0 is off"),
    "min_p": _sampling_setting("min_p", float, "drop tokens below min_p times the top probability"),
    "repetition_penalty": _sampling_setting("repetition_penalty", float, "penalty for recent tokens; 1 is off"),
    "seed": _sampling_setting("seed", int, "random seed for sampling; none for a fresh one each answer"),
    "max_tokens": Setting("tokens per answer at most", lambda r: r.session.opts["max_tokens"], _set_max_tokens),
    "markdown": Setting("draw answers as Markdown: on or off", lambda r: "on" if r.markdown else "off", _set_markdown),
}


# -- formatting -----------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def memory_line(model) -> str:
    """Process RSS, MLX's active memory on the MLX backend, and the memory planner's budget."""
    parts = []
    try:
        import psutil

        parts.append(f"RSS {fmt_bytes(psutil.Process().memory_info().rss)}")
    except Exception:  # psutil missing or refused on this platform
        parts.append("RSS n/a")
    if backend_name(model) == "mlx":
        import mlx.core as mx

        if hasattr(mx, "get_active_memory"):
            parts.append(f"MLX active {fmt_bytes(mx.get_active_memory())}")
    budget = getattr(getattr(model, "plan", None), "budget_bytes", None)
    parts.append(f"budget {fmt_bytes(budget)}" if budget else "budget n/a")
    return " · ".join(parts)


def backend_name(model) -> str:
    return getattr(model, "backend_name", None) or getattr(model.backend, "backend", None) or type(model.backend).__name__


def status_line(session: ChatSession) -> str:
    """The line after each answer: tokens, tok/s, TTFT, then energy (when metered) and the context."""
    s = session.model.stats
    line = f"[{s.generated_tokens} tok, {s.decode_tps:.1f} tok/s, TTFT {s.ttft * 1000:.0f} ms]"
    if s.energy_joules is not None:
        line += f" · {s.energy_joules:.2f} J"
    line += f" · ctx {session.context_tokens}/{session.context_limit}"
    if s.finish_reason == "length":
        line += " · cut at max_tokens"
    elif s.finish_reason == "context":
        line += " · cut: context full"
    return line


HELP = """commands:
  /help                this help
  /reset               forget the conversation (the system prompt stays)
  /system [TEXT]       show the system prompt, or set it and start over (/system none: no system prompt)
  /stats               speed, context, memory (and energy) of the last answer
  /set [KEY VALUE]     show the settings, or change one: {keys}
  /save FILE           save the conversation as JSON
  /load FILE           continue a saved conversation
  /history             show the conversation
  /undo                forget the last question and its answer
  /sparsity [LEVEL]    show the R-Sparse level and the package's levels, or switch (0: dense; the conversation stays)
  /exit                leave (Ctrl-D works too)
keys:
  Enter sends · Alt-Enter (or Esc Enter), a line ending in \\, or a block between \"\"\" lines: several lines
  Up/Down: history · Ctrl-C: stop an answer (the conversation stays as it was) · //text sends /text"""


@contextlib.contextmanager
def _keys_not_echoed():
    """While an answer streams, typed keys are not echoed over it (they wait for the next prompt);
    Ctrl-C still interrupts."""
    try:
        import termios

        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
    except Exception:  # not a terminal, or no termios (Windows)
        yield
        return
    new = list(old)
    new[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


@contextlib.contextmanager
def _no_interrupts():
    """A second Ctrl-C must not cut the roll-back that follows the first."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def history_path() -> Path:
    env = os.environ.get("EDGEINFER_CHAT_HISTORY")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("EDGEINFER_CACHE") or Path.home() / ".cache" / "edgeinfer") / "chat_history"


class Repl:
    def __init__(self, model, a, opts: dict):
        self.model = model
        self.args = a
        self.color = color_allowed(sys.stdout)
        self.markdown = not getattr(a, "no_markdown", False)
        self.session = ChatSession(model, a.system, opts, notice=self.say)
        self.commands = {
            "/help": self.cmd_help, "/reset": self.cmd_reset, "/system": self.cmd_system, "/stats": self.cmd_stats,
            "/set": self.cmd_set, "/save": self.cmd_save, "/load": self.cmd_load, "/history": self.cmd_history,
            "/undo": self.cmd_undo, "/sparsity": self.cmd_sparsity,
        }

    # -- output -------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        """A note from the app (not the model), dim."""
        print(f"{DIM}({msg}){RESET}" if self.color else f"({msg})", flush=True)

    def error(self, msg: str) -> None:
        print(f"edgeinfer: {msg}", flush=True)

    # -- input --------------------------------------------------------------------------------------
    def _prompt_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.completion import NestedCompleter
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        try:
            path = history_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        kb = KeyBindings()

        @kb.add("enter")
        def _enter(event):
            buf = event.current_buffer
            text = buf.text
            if _open_block(text):
                buf.insert_text("\n")
            elif text.endswith("\\") and buf.cursor_position == len(text):
                buf.delete_before_cursor(1)
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        @kb.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        words = {c: None for c in self.commands} | {"/exit": None, "/quit": None}
        words["/set"] = {k: None for k in SETTINGS}
        return PromptSession(history=history, auto_suggest=AutoSuggestFromHistory(), completer=NestedCompleter.from_nested_dict(words),
                             complete_while_typing=False, key_bindings=kb, multiline=True,
                             prompt_continuation=lambda width, line, wrap: "" if wrap else "... ".rjust(width))

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> int:
        m = self.model
        print(f"edgeinfer chat · {m.name} ({backend_name(m)}) · {self.session.context_limit}-token context")
        print(f"{DIM}/help for commands · Alt-Enter for a new line · Ctrl-C stops an answer · Ctrl-D leaves{RESET}"
              if self.color else "/help for commands · Alt-Enter for a new line · Ctrl-C stops an answer · Ctrl-D leaves")
        load = getattr(self.args, "load", None)
        if load:
            self.cmd_load(load)
        else:
            self.session.prefill()
        prompt = self._prompt_session()
        while True:
            try:
                text = prompt.prompt(">>> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                print()
                return 0
            text = _unwrap_block(text).strip()
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                cmd, _, arg = text.partition(" ")
                if cmd in ("/exit", "/quit", "/bye"):
                    return 0
                handler = self.commands.get(cmd)
                if handler is None:
                    self.error(f"unknown command {cmd}; /help lists them")
                    continue
                try:
                    handler(arg.strip())
                except EdgeInferError as e:
                    self.error(str(e))
                except KeyboardInterrupt:
                    self.say("stopped")
                continue
            self.answer(text[1:] if text.startswith("//") else text)

    def answer(self, text: str) -> None:
        view = AnswerView(markdown=self.markdown, color=self.color)
        gen = self.session.ask(text)
        try:
            with _keys_not_echoed():
                view.begin()
                for piece in gen:
                    view.feed(piece)
                view.finish()
        except KeyboardInterrupt:
            with _no_interrupts():
                gen.close()
                view.abort()
            self.say(f"stopped; the conversation is back to its last complete turn, ctx {self.session.context_tokens}"
                     f"/{self.session.context_limit}")
            return
        except EdgeInferError as e:
            gen.close()
            view.abort()
            self.error(str(e))
            return
        line = status_line(self.session)
        print(f"{DIM}{line}{RESET}" if self.color else line, flush=True)

    # -- commands -----------------------------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        print(HELP.format(keys=", ".join(SETTINGS)))

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        self.say(f"conversation cleared; ctx {self.session.context_tokens}/{self.session.context_limit}")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.say(f"system prompt: {self.session.system}" if self.session.system else "no system prompt")
            return
        self.session.set_system(None if arg.lower() == "none" else arg)
        self.say(("system prompt set" if self.session.system else "system prompt removed")
                 + f"; conversation cleared; ctx {self.session.context_tokens}/{self.session.context_limit}")

    def cmd_stats(self, arg: str) -> None:
        s, sess = self.model.stats, self.session
        rows = []
        if s.prompt_tokens:
            rows.append(("answer", f"{s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s · TTFT {s.ttft * 1000:.0f} ms · "
                                   f"finished: {'interrupted' if sess.interrupted else s.finish_reason}"))
            rows.append(("prefill", f"{s.prompt_tokens - s.reused_tokens} new tokens at {s.prefill_tps:.1f} tok/s · "
                                    f"{s.reused_tokens} of the prompt's {s.prompt_tokens} from the cache"))
        else:
            rows.append(("answer", "none yet"))
        dropped = f" ({sess.turns_dropped} dropped for room)" if sess.turns_dropped else ""
        rows.append(("context", f"{sess.context_tokens} of {sess.context_limit} tokens · {sess.turns} turns{dropped}"))
        rows.append(("memory", memory_line(self.model)))
        if s.energy_joules is not None:
            rows.append(("energy", f"{s.energy_joules:.3f} J for the last answer ({s.energy_source or 'meter'})"))
        rows.append(("settings", " · ".join(f"{k} {v.get(self)}" for k, v in SETTINGS.items())))
        for k, v in rows:
            print(f"{k:<9} {v}")

    def cmd_set(self, arg: str) -> None:
        if not arg:
            for k, v in SETTINGS.items():
                print(f"{k:<19} {str(v.get(self)):<8} {DIM if self.color else ''}{v.help}{RESET if self.color else ''}")
            return
        key, _, value = arg.partition(" ")
        setting = SETTINGS.get(key.replace("-", "_"))
        if setting is None:
            raise EdgeInferError(f"unknown setting {key}; one of: {', '.join(SETTINGS)}")
        if not value.strip():
            print(f"{key} {setting.get(self)}")
            return
        setting.set(self, value.strip())
        self.say(f"{key.replace('-', '_')} {setting.get(self)}")

    def cmd_sparsity(self, arg: str) -> None:
        from edgeinfer.sparse.plan import available_levels

        levels = ", ".join(f"{x:.2f}" for x in available_levels(self.model.package)) or "none (edgeinfer sparsify makes them)"
        if not arg:
            self.say(f"sparsity {self.model.sparsity:.2f}; this package's levels: {levels}")
            return
        try:
            level = float(arg)
        except ValueError:
            raise EdgeInferError(f"/sparsity takes a level such as 0.5 (this package's: {levels}), not {arg!r}") from None
        self.model.set_sparsity(level)  # clears the cache: the next answer recomputes the conversation under the new plan
        self.say(f"sparsity {self.model.sparsity:.2f}")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise EdgeInferError("/save needs a file name")
        p = self.session.save(arg)
        self.say(f"saved {self.session.turns} turns to {p}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise EdgeInferError("/load needs a file name")
        self.session.load(arg)
        self.say(f"loaded {self.session.turns} turns from {Path(arg).expanduser()}; "
                 f"ctx {self.session.context_tokens}/{self.session.context_limit}")

    def cmd_history(self, arg: str) -> None:
        names = {"system": "system", "user": "you", "assistant": "model"}
        if not self.session.messages:
            self.say("the conversation is empty")
        for msg in self.session.messages:
            label = f"{names[msg['role']]}:"
            print(f"{DIM}{label}{RESET} " if self.color else f"{label} ", end="")
            print(sanitize(msg["content"]).strip())

    def cmd_undo(self, arg: str) -> None:
        if self.session.undo():
            self.say(f"forgot the last turn; ctx {self.session.context_tokens}/{self.session.context_limit}")
        else:
            self.say("nothing to undo")


def _open_block(text: str) -> bool:
    """True while a \"\"\"-block is still open."""
    t = text.strip()
    return t.startswith('"""') and not (len(t) >= 6 and t.endswith('"""'))


def _unwrap_block(text: str) -> str:
    t = text.strip()
    if t.startswith('"""') and len(t) >= 6 and t.endswith('"""'):
        return t[3:-3]
    return text
