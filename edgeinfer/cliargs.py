"""The command line's argument checking, in one place: numeric flags are parsed by range-checked
``argparse`` types (``whole`` and ``real``), and every argparse error becomes the CLI's usual one
plain sentence, ``edgeinfer: ...``, with exit status 2 (``Parser``; ``edgeinfer.cli.main`` prints it).

    p.add_argument("--max-tokens", type=whole(1))              # 0, -1 or "x": "--max-tokens must be at least 1, not -1"
    p.add_argument("--top-p", type=real(0, 1, lo_open=True))   # "--top-p must be in (0, 1], not 1.5"
"""

from __future__ import annotations

import argparse
import math
import re

from .errors import EdgeInferError

__all__ = ["Parser", "UsageError", "real", "size", "whole"]

# what a range-checked type says; the Parser puts the flag's name in front
_MUST = "must be "


class UsageError(EdgeInferError):
    """A command line argparse refused (exit status 2, like every EdgeInferError)."""


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class _Number:
    def __init__(self, kind: type, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def _range(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            if self.kind is int or not (self.lo_open or self.hi_open):
                return f"between {_num(lo)} and {_num(hi)}"
            return f"in {'(' if self.lo_open else '['}{_num(lo)}, {_num(hi)}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'more than' if self.lo_open else 'at least'} {_num(lo)}"
        if hi is not None:
            return f"{'less than' if self.hi_open else 'at most'} {_num(hi)}"
        return "a number"

    def __call__(self, text: str):
        s = str(text).strip()
        try:
            v = self.kind(s)
        except ValueError:
            v = None
        if v is None or (self.kind is float and not math.isfinite(v)):
            what = "a whole number" if self.kind is int else "a number"
            rng = self._range()
            raise argparse.ArgumentTypeError(f"{_MUST}{what}{'' if rng == 'a number' else ', ' + rng}, not {text!r}")
        lo, hi = self.lo, self.hi
        if ((lo is not None and (v <= lo if self.lo_open else v < lo))
                or (hi is not None and (v >= hi if self.hi_open else v > hi))):
            raise argparse.ArgumentTypeError(f"{_MUST}{self._range()}, not {s}")
        return v

    def __repr__(self) -> str:
        return f"{self.kind.__name__} {self._range()}"


def whole(lo: int | None = None, hi: int | None = None) -> _Number:
    """An int flag in [lo, hi] (either end may be left open-ended with None)."""
    return _Number(int, lo, hi)


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> _Number:
    """A finite float flag between lo and hi, each end inclusive unless ``lo_open``/``hi_open``."""
    return _Number(float, lo, hi, lo_open, hi_open)


def size(text: str) -> str:
    """A --memory-budget: checked here (its form, a percentage's range, more than 0 bytes) and passed on as
    written; a percentage is of the device's memory, which the planner reads when it runs."""
    from .memory import parse_budget

    try:
        ok = parse_budget(text, total=1 << 40) > 0
    except EdgeInferError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{_MUST}a size above 0 like 1.5GB, 800MiB or 60% (at most 100%), not {text!r}")
    return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one plain sentence (no usage block): ``UsageError``, which
    ``edgeinfer.cli.main`` prints as ``edgeinfer: ...`` with exit status 2. Subparsers inherit it."""

    def error(self, message: str):
        m = re.fullmatch(r"argument (\S+): (.*)", message, re.S)
        if m and m.group(2).startswith(_MUST):  # a range-checked type: "--top-p must be in (0, 1], not 2"
            raise UsageError(f"{max(m.group(1).split('/'), key=len)} {m.group(2)}")
        raise UsageError(f"{message} (see `{self.prog} --help`)")
