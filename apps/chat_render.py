"""Terminal output of ``edgeinfer chat``: answers streamed as they arrive, Markdown drawn line by line.

Every piece of text is written the moment it arrives. When a line is complete it is redrawn once in
its Markdown form (headings, lists, emphasis, inline code, fenced code with syntax highlighting), and
only if that form differs from what is on screen: plain prose is never redrawn, nothing above the
current line is ever touched, so nothing flickers and a long answer that scrolls off the screen
cannot garble. Model output is sanitized first: control characters (escape sequences included) never
reach the terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

RESET = "\x1b[0m"
BOLD = "\x1b[1m"
DIM = "\x1b[2m"
ITALIC = "\x1b[3m"
UNDERLINE = "\x1b[4m"
CODE = "\x1b[36m"
BULLET = "\x1b[33m"

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+#.-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_QUOTE = re.compile(r"^(\s*)>\s?(.*)$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^(\s*)(\d{1,3}[.)])\s+(.*)$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_ITALIC = re.compile(r"(?<![\w*])\*(?=[^\s*])([^*]*?[^\s*])\*(?![\w*])|(?<![\w_])_(?=[^\s_])([^_]*?[^\s_])_(?![\w_])")
_LINK = re.compile(r"\[([^\]]+)\]\((\S+?)\)")


def sanitize(text: str) -> str:
    """Model text made safe for a terminal: tabs become spaces, other control characters (and
    bidirectional overrides) are dropped; newlines stay."""
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\t", "    "))


def color_allowed(stream) -> bool:
    """ANSI styling only on a terminal, and not when NO_COLOR is set or TERM is dumb."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def terminal_background() -> str:
    """'light' or 'dark', from COLORFGBG ("fg;bg", set by rxvt, Konsole, iTerm2...); dark if unknown."""
    bg = os.environ.get("COLORFGBG", "").split(";")[-1]
    return "light" if bg.isdigit() and int(bg) in (7, 15) else "dark"


def _cells(ch: str) -> int:
    from rich.cells import cell_len

    return cell_len(ch)


def screen_rows(text: str, width: int) -> int:
    """How many terminal rows ``text`` occupies when written from column 0 of a ``width``-cell
    terminal (a wide character that does not fit at the end of a row moves to the next one)."""
    rows, col = 1, 0
    for ch in text:
        w = _cells(ch)
        if col + w > width:
            rows, col = rows + 1, 0
        col += w
    return rows


def inline(text: str) -> str:
    """Inline Markdown: `code`, **bold**, *italic*, [links](url). Returns ``text`` itself when it has
    none, so that callers can tell whether a redraw is needed."""
    out, last = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(_emphasis(text[last : m.start()]))
        out.append(CODE + m.group(2) + RESET)
        last = m.end()
    out.append(_emphasis(text[last:]))
    result = "".join(out)
    return text if result == text else result


def _emphasis(s: str) -> str:
    s = _LINK.sub(lambda m: UNDERLINE + m.group(1) + RESET + DIM + f" ({m.group(2)})" + RESET, s)
    s = _BOLD.sub(lambda m: BOLD + m.group(2) + RESET, s)
    return _ITALIC.sub(lambda m: ITALIC + (m.group(1) or m.group(2)) + RESET, s)


class MarkdownLines:
    """The Markdown form of an answer, one complete line at a time (it keeps the fenced-code state)."""

    CODE_WINDOW = 80  # code lines lexed for highlighting the newest one

    def __init__(self, width: int = 80):
        self.width = width
        self.fence: str | None = None
        self.code: list[str] = []
        self._lexer = None
        self._formatter = None

    def render(self, line: str) -> str:
        stripped = line.lstrip()
        if self.fence is not None:
            if stripped.startswith(self.fence) and not stripped.strip(self.fence[0]):
                self.fence = None
                return DIM + line + RESET
            self.code.append(line)
            return self._highlight()
        m = _FENCE.match(stripped)
        if m:
            self.fence, self.code = m.group(1), []
            self._lexer = self._lexer_for(m.group(2))
            return DIM + line + RESET
        m = _HEADING.match(line)
        if m:
            style = BOLD + UNDERLINE if len(m.group(1)) == 1 else BOLD
            return style + m.group(2) + RESET
        if _RULE.match(line):
            return DIM + "─" * min(self.width, 60) + RESET
        m = _QUOTE.match(line)
        if m:
            return m.group(1) + DIM + "│ " + RESET + ITALIC + m.group(2) + RESET
        m = _BULLET.match(line)
        if m:
            return m.group(1) + BULLET + "•" + RESET + " " + inline(m.group(2))
        m = _NUMBERED.match(line)
        if m:
            rest = inline(m.group(3))
            return line if rest == m.group(3) else m.group(1) + m.group(2) + " " + rest
        return inline(line)

    def blank(self) -> None:
        if self.fence is not None:
            self.code.append("")

    # -- fenced code --------------------------------------------------------------------------------
    @staticmethod
    def _lexer_for(lang: str):
        from pygments.lexers import TextLexer, get_lexer_by_name
        from pygments.util import ClassNotFound

        opts = dict(stripnl=False, stripall=False, ensurenl=True)
        try:
            return get_lexer_by_name(lang, **opts) if lang else TextLexer(**opts)
        except ClassNotFound:
            return TextLexer(**opts)

    def _highlight(self) -> str:
        """The newest code line, highlighted in the context of the block's recent lines."""
        import pygments
        from pygments.formatters import TerminalFormatter

        if self._formatter is None:  # the terminal's own 16 colors, for a dark background unless it says light
            self._formatter = TerminalFormatter(bg=terminal_background())
        window = self.code[-self.CODE_WINDOW :]
        lines: list[list] = [[]]
        for ttype, value in self._lexer.get_tokens("\n".join(window) + "\n"):
            for j, part in enumerate(value.split("\n")):
                if j:
                    lines.append([])
                if part:
                    lines[-1].append((ttype, part))
        newest = lines[len(window) - 1] if len(window) - 1 < len(lines) else []
        text = pygments.format(newest, self._formatter).rstrip("\n")
        return text + RESET if "\x1b" in text else window[-1]


class AnswerView:
    """Writes one streamed answer to a terminal.

    ``feed(text)`` as pieces arrive, then ``finish()``, or ``abort()`` when the answer is interrupted.
    Leading blank lines are skipped, trailing ones dropped, and runs of blank lines outside code
    collapse to one.
    """

    def __init__(self, out=None, markdown: bool = True, color: bool = True):
        self.out = out or sys.stdout
        self.color = color
        self.markdown = markdown and color
        size = shutil.get_terminal_size()
        self.md = MarkdownLines(size.columns)
        self.partial = ""  # the current line, on screen as it arrived
        self.blank = 0  # blank lines owed before the next line
        self.started = False  # some text has been written
        self.waiting = False  # the "thinking" mark is on screen

    def begin(self) -> None:
        """Shows a dim mark until the first text arrives (prefill can take a moment)."""
        if self.color:
            self.out.write(DIM + "…" + RESET)
            self.out.flush()
            self.waiting = True

    def _unwait(self) -> None:
        if self.waiting:
            self.out.write("\r\x1b[K")
            self.waiting = False

    def feed(self, text: str) -> None:
        parts = sanitize(text).split("\n")
        for i, part in enumerate(parts):
            if part:
                if not self.partial:
                    self._start_line()
                self.partial += part
                self.out.write(part)
            if i < len(parts) - 1:
                self._end_line()
        self.out.flush()

    def _start_line(self) -> None:
        self._unwait()
        if self.started and self.blank:
            self.out.write("\n" * self.blank)
        self.blank = 0
        self.started = True

    def _end_line(self) -> None:
        line, self.partial = self.partial, ""
        if not line:
            if self.started:
                self.blank = self.blank + 1 if self.md.fence is not None else 1
            if self.markdown:
                self.md.blank()
            return
        if self.markdown:
            rendered = self.md.render(line)
            if rendered != line:
                self._redraw(line, rendered)
        self.out.write("\n")

    def _redraw(self, raw: str, rendered: str) -> None:
        """Replaces the current line (``raw``, perhaps wrapped over several rows) by ``rendered``;
        leaves it as it is when it is taller than the screen (the rows above are out of reach)."""
        size = shutil.get_terminal_size()
        rows = screen_rows(raw, max(1, size.columns))
        if rows >= size.lines:
            return
        # Each row is erased on its own (EL), not "erase below" (ED): some terminals (tmux's
        # scroll-on-clear) push the screen into the scrollback when ED clears it from the top.
        up = f"\x1b[{rows - 1}A" if rows > 1 else ""
        self.out.write("\r" + up + "\x1b[2K" + "\x1b[B\x1b[2K" * (rows - 1) + up + "\r" + rendered)

    def finish(self) -> None:
        if self.partial:
            self._end_line()
        self._unwait()
        self.out.flush()

    def abort(self) -> None:
        """After an interruption: ends the current line wherever it stands."""
        self._unwait()
        self.out.write(RESET + ("\n" if self.partial else ""))
        self.partial = ""
        self.out.flush()
