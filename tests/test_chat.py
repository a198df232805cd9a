"""``edgeinfer chat`` driven like a person drives it: the real program in a real terminal (tmux, on a
private socket), on a tiny random model and on SmolLM2. The assertions read what the screen shows
(``capture-pane``) and the cache length the app reports, never timings.

The tiny model's context is 256 tokens, so overflowing it takes a few turns; its answers are random
bytes, so what they say is checked against a fresh run of the same conversation rather than read.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

# [tokens, tok/s, TTFT] then the context: "[8 tok, 31.0 tok/s, TTFT 12 ms] · ctx 57/256"
STATUS = re.compile(r"\[(\d+) tok, [\d.]+ tok/s, TTFT \d+ ms\](?: · [\d.]+ J)? · ctx (\d+)/(\d+)")
PROMPT = re.compile(r"^>>>", re.M)
EXIT = re.compile(r"^\[exit (\d+)\]$", re.M)
PREFILL = re.compile(r"prefill\s+(\d+) new tokens at [\d.]+ tok/s · (\d+) of the prompt's (\d+) from the cache")

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is needed for the real-terminal tests")


class Screen:
    """``edgeinfer chat ARGS`` in a tmux pane of ``width`` x ``height`` cells."""

    def __init__(self, tmp_path: Path, args: list[str], width: int = 100, height: int = 40, argv: list[str] | None = None):
        self.dir = tempfile.mkdtemp(prefix="ei-tmux-")  # short: a socket path has a length limit
        self.sock = os.path.join(self.dir, "sock")
        conf = Path(self.dir) / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 50000\n")
        env = {"EDGEINFER_CHAT_HISTORY": str(tmp_path / "history"), "LANG": "C.UTF-8", "NO_COLOR": ""}
        argv = argv or [sys.executable, "-m", "edgeinfer.cli", "chat", *args]
        # the shell reports the exit status on the screen (128 + N: killed by signal N)
        cmd = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv) + '; echo "[exit $?]"'

        self._tmux("-f", str(conf), "new-session", "-d", "-x", str(width), "-y", str(height), "-c", str(ROOT), cmd)

    def _tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-u", "-S", self.sock, *args], capture_output=True, text=True,
                           env=dict(cli_env(), LANG="C.UTF-8"), timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def text(self, joined: bool = True, styles: bool = False) -> str:
        """Everything the pane has shown (scrollback included); joined: wrapped rows as one line."""
        return self._tmux("capture-pane", "-p", "-t", "0", "-S", "-50000", *(["-J"] if joined else []), *(["-e"] if styles else []))

    def count(self, pattern) -> int:
        return len(re.findall(pattern, self.text()))

    def wait_for(self, pattern, n: int = 1, timeout: float = 120) -> re.Match:
        """Waits until ``pattern`` shows ``n`` times; returns the n-th match."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            found = list(re.finditer(pattern, text))
            if len(found) >= n:
                return found[n - 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} x{n} never showed; the screen:\n{text}")
            time.sleep(0.1)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "0", "-l", text)

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "0", *keys)

    def enter(self, text: str) -> None:
        self.type(text)
        self.keys("Enter")

    def ask(self, text: str) -> re.Match:
        """Sends a question and waits for the status line of its answer."""
        n = self.count(STATUS)
        self.enter(text)
        return self.wait_for(STATUS, n + 1)

    def command(self, text: str, until) -> re.Match:
        n = self.count(until)
        self.enter(text)
        return self.wait_for(until, n + 1)

    def exit_status(self, timeout: float = 60) -> int:
        return int(self.wait_for(EXIT, timeout=timeout).group(1))

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, env=cli_env())
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def screens(tmp_path):
    opened: list[Screen] = []

    def open_(args, **kw) -> Screen:
        s = Screen(tmp_path, args, **kw)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


@pytest.fixture(scope="module")
def tiny(tiny_package) -> Path:
    return tiny_package("llama", 32)


def chat_args(pkg, *more) -> list[str]:
    return ["-m", str(pkg), "--backend", "mlx", *more]


def stats_context(screen: Screen) -> int:
    """The context length (tokens in the KV cache) that /stats reports."""
    m = screen.command("/stats", r"context\s+(\d+) of (\d+) tokens")
    return int(m.group(1))


def fresh_answer(pkg, messages: list[dict], max_tokens: int) -> str:
    """What a freshly loaded model answers to ``messages`` (the plain format's stop included)."""
    import edgeinfer

    m = edgeinfer.load(pkg, backend="mlx")
    stop = ["\nUser:"] if m.tokenizer.chat_template is None else []
    return m.generate(messages, max_tokens=max_tokens, stop=stop)


# -- the tiny model -------------------------------------------------------------------------------
def test_three_turns_reuse_the_cache_and_reset(tiny, screens, tmp_path):
    s = screens(chat_args(tiny, "--system", "be brief", "--max-tokens", "8"))
    s.wait_for(PROMPT)
    start = stats_context(s)
    assert start > 0  # the system prompt is prefilled before the first question
    ctx, prefill = [start], []
    for q in ("first question", "second question", "third question"):
        m = s.ask(q)
        assert int(m.group(3)) == 256
        ctx.append(int(m.group(2)))
        m = s.command("/stats", PREFILL)
        prefill.append(tuple(map(int, m.groups())))  # (new, reused, prompt)
    assert ctx == sorted(ctx) and len(set(ctx)) == 4  # the context grows turn by turn
    assert f"context   {ctx[3]} of 256 tokens · 3 turns" in s.text()
    # each turn took the whole previous prompt from the cache: only the last answer (the tiny model's
    # random bytes tokenize differently once they are text) and the new question were prefilled
    assert prefill[0][1] == start
    for (new, reused, prompt), prev in zip(prefill[1:], prefill):
        assert reused >= prev[2] and new == prompt - reused
    # what it answered is what a fresh model answers to the same conversation
    saved = tmp_path / "conv.json"
    s.command(f"/save {saved}", r"\(saved 3 turns to ")
    msgs = json.loads(saved.read_text())["messages"]
    assert [x["role"] for x in msgs] == ["system"] + ["user", "assistant"] * 3
    assert msgs[0]["content"] == "be brief" and msgs[5]["content"] == "third question"
    assert fresh_answer(tiny, msgs[:-1], 8) == msgs[-1]["content"]
    # /reset: back to the system prompt alone, the cache back to its length at the start
    m = s.command("/reset", r"\(conversation cleared; ctx (\d+)/256\)")
    assert int(m.group(1)) == start
    assert stats_context(s) == start
    s.command("/history", r"/history\nsystem: be brief\n>>>")
    s.enter("/exit")
    assert s.exit_status() == 0


def test_commands_settings_and_multiline_input(tiny, screens):
    s = screens(chat_args(tiny, "--max-tokens", "8"))
    s.wait_for(PROMPT)
    s.command("/help", r"/save FILE")
    s.command("/set temp 0.7", r"\(temp 0\.7\)")
    s.command("/set top_p 2", r"edgeinfer: top_p must be in \(0, 1\], not 2\.0")
    s.command("/set max_tokens 5", r"\(max_tokens 5\)")
    s.command("/set bogus 0.5", r"edgeinfer: unknown setting bogus; one of: temp, top_p")
    s.command("/set", r"max_tokens\s+5\s+tokens per answer at most")
    s.command("/frobnicate", r"edgeinfer: unknown command /frobnicate; /help lists them")
    s.command("/system", r"\(no system prompt\)")
    s.command("/system you are terse", r"\(system prompt set; conversation cleared; ctx \d+/256\)")
    # a """ block spans lines; Enter inside it starts a new line
    n = s.count(STATUS)
    for line in ('"""first line', "second line", '"""'):
        s.enter(line)
    m = s.wait_for(STATUS, n + 1)
    assert int(m.group(1)) <= 5  # max_tokens 5 took effect
    # a line ending in a backslash continues too
    s.enter("third \\")
    s.ask("fourth")
    s.command("/history", r"you: first line\nsecond line\n")
    assert "you: third \nfourth" in s.text() or "you: third\nfourth" in s.text()
    s.command("/undo", r"\(forgot the last turn; ctx \d+/256\)")
    text = s.command("/history", r"system: you are terse").string
    assert "you: third" not in text.split("/undo")[-1]
    s.keys("C-d")
    assert s.exit_status() == 0


def test_save_then_load_continues_the_conversation(tiny, screens, tmp_path):
    a = screens(chat_args(tiny, "--system", "answer in French", "--max-tokens", "12"))
    a.wait_for(PROMPT)
    a.ask("bonjour")
    a.ask("comment vas-tu")
    f1, f2, f3 = (tmp_path / f"c{i}.json" for i in (1, 2, 3))
    a.command(f"/save {f1}", r"\(saved 2 turns to ")
    ctx_a = int(a.ask("et demain")[2])
    a.command(f"/save {f2}", r"\(saved 3 turns to ")
    a.enter("/exit")
    assert a.exit_status() == 0

    b = screens(chat_args(tiny, "--max-tokens", "12"))
    b.wait_for(PROMPT)
    b.command(f"/load {tmp_path / 'nope.json'}", r"edgeinfer: cannot load .*nope\.json: no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    b.command(f"/load {bad}", r"edgeinfer: cannot load .*bad\.json: not JSON")
    m = b.command(f"/load {f1}", r"\(loaded 2 turns from .*c1\.json; ctx (\d+)/256\)")
    assert int(m.group(1)) > 0  # the loaded conversation is prefilled
    b.command("/history", r"system: answer in French\nyou: bonjour\nmodel: .*\nyou: comment vas-tu\n")
    assert int(b.ask("et demain")[2]) == ctx_a
    b.command(f"/save {f3}", r"\(saved 3 turns to ")
    # the loaded conversation goes on exactly as the original did
    assert json.loads(f3.read_text())["messages"] == json.loads(f2.read_text())["messages"]
    b.enter("/exit")
    assert b.exit_status() == 0

    # --load starts from a saved conversation
    c = screens(chat_args(tiny, "--max-tokens", "12", "--load", str(f1)))
    c.wait_for(r"\(loaded 2 turns from .*c1\.json; ctx \d+/256\)")
    c.wait_for(PROMPT)
    c.enter("/exit")
    assert c.exit_status() == 0


def test_context_overflow_drops_the_oldest_turns_once_told(tiny, screens, tmp_path):
    s = screens(chat_args(tiny, "--system", "keep it short", "--max-tokens", "40"))
    s.wait_for(PROMPT)
    questions = [f"question number {i}, asked to fill the context" for i in range(1, 9)]
    for q in questions:
        m = s.ask(q)
        assert int(m.group(2)) <= 256
    text = s.text()
    notice = "(the conversation outgrew the 256-token context: dropping the oldest turns (the system prompt stays))"
    assert text.count(notice) == 1
    assert len(STATUS.findall(text)) == 8  # every question was answered
    s.command("/stats", r"context\s+\d+ of 256 tokens · \d+ turns \(\d+ dropped for room\)")
    hist = s.command("/history", r"you: question number 8").string.split("/history")[-1]
    assert hist.lstrip().startswith("system: keep it short") and "question number 1," not in hist
    # after the re-prefill the answer is still what a fresh model says to the kept turns: not garbled
    saved = tmp_path / "after.json"
    s.command(f"/save {saved}", r"\(saved \d+ turns to ")
    msgs = json.loads(saved.read_text())["messages"]
    assert msgs[0] == {"role": "system", "content": "keep it short"} and msgs[-2]["content"] == questions[-1]
    assert fresh_answer(tiny, msgs[:-1], 40) == msgs[-1]["content"]
    # a single message larger than the context is refused in one line; the chat goes on
    s.command("/set max_tokens 8", r"\(max_tokens 8\)")
    s.command("x" * 300, r"edgeinfer: this message makes a prompt of \d+ tokens with the system prompt; the model's context holds 256")
    s.ask("still there?")
    s.enter("/exit")
    assert s.exit_status() == 0


def _template_package(tiny, tmp_path, template: str) -> Path:
    """A copy of the tiny package with ``template`` as its chat template."""
    import hashlib

    pkg = tmp_path / "templated"
    shutil.copytree(tiny, pkg)
    (pkg / "chat_template.jinja").write_text(template)
    man = json.loads((pkg / "manifest.json").read_text())
    man["tokenizer"]["chat_template_file"] = "chat_template.jinja"
    data = template.encode()
    man["files"]["chat_template.jinja"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (pkg / "manifest.json").write_text(json.dumps(man, indent=2))
    return pkg


def test_a_template_that_raises_falls_back_to_a_plain_format(tiny, screens, tmp_path):
    pkg = _template_package(tiny, tmp_path, "{% for m in messages %}{{ raise_exception('roles are off') }}{% endfor %}")
    s = screens(chat_args(pkg, "--max-tokens", "8"))
    s.wait_for(r"\(warning: the package's chat template failed: roles are off; using a plain 'User: \.\.\.' format instead\)")
    s.wait_for(PROMPT)
    s.ask("hello")
    s.ask("again")
    assert s.text().count("chat template failed") == 1
    s.enter("/exit")
    assert s.exit_status() == 0


def test_a_template_that_does_not_compile_in_a_pipe(tiny, tmp_path):
    pkg = _template_package(tiny, tmp_path, "{% for m in messages %}{{ m.content }")
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "chat", *chat_args(pkg, "--max-tokens", "8")],
                       input="hello\n", capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("edgeinfer: warning: the package's chat template does not compile")
    # the plain format is the one a package without a template gets
    plain = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "chat", *chat_args(tiny, "--max-tokens", "8")],
                           input="hello\n", capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT)
    assert r.stdout == plain.stdout and len(r.stdout.splitlines()) == 1


def test_piped_one_answer_per_line_and_flags(tiny):
    def run(*args, input="first\n\nsecond\nthird\n"):
        return subprocess.run([sys.executable, "-m", "edgeinfer.cli", "chat", *chat_args(tiny, *args)],
                              input=input, capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT)

    r = run("--max-tokens", "6", "--system", "be brief")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.split("\n")
    assert len(lines) == 4 and lines[3] == ""  # three answers, the blank input line skipped, nothing else
    # the answers are those of the conversation, turn after turn
    msgs = [{"role": "system", "content": "be brief"}]
    for q, a in zip(("first", "second"), lines):
        msgs.append({"role": "user", "content": q})
        expect = fresh_answer(tiny, msgs, 6)
        assert " ".join(expect.split()) == a
        msgs.append({"role": "assistant", "content": expect})
    r = run("--temp", "-1")
    assert r.returncode == 2 and r.stderr == "edgeinfer: --temp must be at least 0, not -1\n" and r.stdout == ""
    r = run("--max-tokens", "0")
    assert r.returncode == 2 and r.stderr == "edgeinfer: --max-tokens must be at least 1, not 0\n"
    r = run("--max-tokens", "4", input="x" * 400 + "\n")
    assert r.returncode == 2 and "the model's context holds 256" in r.stderr and r.stderr.count("\n") == 1


def test_an_interrupted_answer_rolls_the_cache_back(edge_models):
    """The roll-back itself, on the API the terminal drives (Ctrl-C in a terminal: the SmolLM2 test)."""
    from edgeinfer.apps.chat import ChatSession

    m = edge_models("llama", 32, backend="mlx")
    s = ChatSession(m, "sys", {"max_tokens": 30})
    s.prefill()
    "".join(s.ask("one"))
    done, msgs = m.cache.offset, list(s.messages)
    gen = s.ask("two")
    for _ in range(5):
        next(gen)
    assert m.cache.offset > done
    gen.close()
    assert m.cache.offset == done and len(m.cache_tokens) == done and s.messages == msgs and s.interrupted
    # the next turn is the same as if the interrupted one never happened
    again = "".join(s.ask("three"))
    assert again == fresh_answer_model(m, msgs + [{"role": "user", "content": "three"}], 30)


def fresh_answer_model(m, messages, max_tokens):
    m.reset()
    return m.generate(messages, max_tokens=max_tokens, stop=["\nUser:"])


# -- the renderer, in a real terminal ---------------------------------------------------------------
RENDER_SCRIPT = r'''
import sys, time
from edgeinfer.apps.chat_render import AnswerView
text = sys.argv[1]
v = AnswerView(markdown=True, color=True)
v.begin()
for i in range(0, len(text), 3):
    v.feed(text[i:i + 3])
v.finish()
print("DONE")
time.sleep(600)
'''

MARKDOWN = (
    "\n\n# A title\n"
    "Some **bold** words and `inline code` in a line long enough to wrap over the forty cells of this terminal.\n"
    "\n\n\n"
    "- first *item*\n"
    "東京東京東京東京東京東京東京東京東京東京東京東京東京東京 **wide** 東京東京東京\n"
    "```python\n"
    "def f(x):\n"
    "    return x * 2  # doubled\n"
    "```\n"
    "bad \x1b[2J escape and a tab\there\n\n"
)


def test_markdown_is_drawn_line_by_line_without_leftovers(screens, tmp_path):
    """Streamed in 3-character pieces into a 40-column terminal: every line ends up drawn once, in its
    Markdown form, wrapped lines included; the escape sequence in the text does not reach the terminal."""
    s = screens([], width=40, height=30, argv=[sys.executable, "-c", RENDER_SCRIPT, MARKDOWN])
    s.wait_for(r"DONE")
    rows = s.text(joined=False).split("\n")
    rows = rows[: rows.index("DONE")]
    para = "Some bold words and inline code in a line long enough to wrap over the forty cells of this terminal."
    wide = "東京" * 14 + " wide " + "東京" * 3
    expect = (["A title"] + [para[i : i + 40] for i in range(0, len(para), 40)] + [""] + ["• first item"]
              + ["東京" * 10, "東京" * 4 + " wide " + "東京" * 3][: 2] + ["```python", "def f(x):", "    return x * 2  # doubled", "```"]
              + ["bad [2J escape and a tab    here"])
    assert wide.startswith("東京" * 10)
    assert [r.rstrip() for r in rows] == expect
    styled = s.text(joined=False, styles=True)
    assert "\x1b[1mbold" in styled and "inline code" in styled and "\x1b[3mitem" in styled
    assert "**" not in s.text() and "`inline" not in s.text()


# -- SmolLM2 ----------------------------------------------------------------------------------------
def answer_to(screen: Screen, question: str, k: int = -1) -> str:
    """The text shown between the k-th ``>>> question`` line and the status line after it."""
    return screen.text().split(f">>> {question}\n")[k].split("\n[")[0]


@pytest.mark.slow
def test_smollm2_conversation_interrupt_and_reset(smollm2_package, screens):
    s = screens(chat_args(smollm2_package, "--max-tokens", "120"))
    s.wait_for(PROMPT)
    start = stats_context(s)
    ctx1 = int(s.ask("Say OK.")[2])
    answer1 = answer_to(s, "Say OK.")
    # Ctrl-C in the middle of an answer
    s.enter("Count from 1 to 100, separated by commas.")
    s.wait_for(r"\b6\. 6\b")
    s.keys("C-c")
    m = s.wait_for(r"\(stopped; the conversation is back to its last complete turn, ctx (\d+)/8192\)")
    assert int(m.group(1)) == ctx1
    assert stats_context(s) == ctx1
    s.command("/stats", r"finished: interrupted")
    # the interrupted turn left no trace: forgetting turn 1 and asking it again gives the same answer
    # and the same cache length
    s.command("/undo", r"\(forgot the last turn; ctx \d+/8192\)")
    assert int(s.ask("Say OK.")[2]) == ctx1
    assert answer_to(s, "Say OK.") == answer1
    m = s.command("/reset", r"\(conversation cleared; ctx (\d+)/8192\)")
    assert int(m.group(1)) == start
    # a conversation remembers, and each turn prefills only itself
    s.command("/set max_tokens 40", r"\(max_tokens 40\)")
    s.ask("I live in Nairobi.")
    s.ask("In which city do I live?")
    assert "Nairobi" in answer_to(s, "In which city do I live?")
    new, reused, _ = map(int, s.command("/stats", PREFILL).groups())
    assert new <= 24 and reused >= 60  # the new question and the template tokens around it
    s.keys("C-d")
    assert s.exit_status() == 0


@pytest.mark.slow
def test_smollm2_code_block_is_highlighted(smollm2_package, screens):
    s = screens(chat_args(smollm2_package, "--max-tokens", "60"), width=100)
    s.wait_for(PROMPT)
    s.ask("Write a Python function that adds two numbers, in a code block.")
    plain = s.text().split("in a code block.")[-1]
    assert "```python\ndef " in plain  # the code block as the model wrote it, fences included
    styled = s.text(joined=False, styles=True).split("in a code block.")[-1]
    assert re.search(r"\x1b\[[\d;]*m\s*def\x1b", styled)  # the keyword is colored
