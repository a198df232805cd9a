"""Held-out Python text of the tiny MoE and its draft (models/tiny-moe): a fixed list of standard-library
modules, read from a Python installation's standard library and joined into one text file.

    python benchmarks/heldout_python.py --out /tmp/heldout.py.txt            # this Python's stdlib
    python benchmarks/heldout_python.py --stdlib /usr/lib/python3.12 --out heldout.txt

The training run on the accelerator machine (models/tiny-moe/train.py) imports HELDOUT from here and leaves
these files out of its training data by path (and any other file with identical content), so the split is by
file. The list was drawn once, by a fixed rule, from Python 3.11's standard library (non-test modules whose
path's SHA-256 is 0 mod 8, less a version-specific config script) and frozen here, so that it stays the same
on any Python: files a given Python lacks (older or newer versions, distributions that ship idlelib, tkinter
or turtledemo separately) are skipped and listed. The text differs between Python versions, so the training
run also returns the exact text it evaluated on (models/tiny-moe/README.md); this script rebuilds the
equivalent text from another Python.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import sysconfig
from pathlib import Path

HELDOUT = (
    "__phello__/__init__.py", "_sitebuiltins.py", "asyncio/base_tasks.py", "asyncio/transports.py", "chunk.py",
    "concurrent/futures/_base.py", "concurrent/futures/process.py", "contextlib.py", "ctypes/macholib/__init__.py",
    "ctypes/wintypes.py", "curses/textpad.py", "email/generator.py", "email/mime/application.py",
    "email/mime/text.py", "email/parser.py", "encodings/__init__.py", "encodings/cp1006.py", "encodings/cp737.py",
    "encodings/cp775.py", "encodings/cp858.py", "encodings/iso8859_4.py", "encodings/mac_greek.py",
    "encodings/uu_codec.py", "hmac.py", "idlelib/calltip.py", "idlelib/calltip_w.py", "idlelib/debugobj_r.py",
    "idlelib/history.py", "idlelib/pyshell.py", "idlelib/sidebar.py", "idlelib/squeezer.py", "idlelib/textview.py",
    "importlib/metadata/_collections.py", "importlib/metadata/_itertools.py", "keyword.py", "mailbox.py",
    "multiprocessing/__init__.py", "multiprocessing/forkserver.py", "pkgutil.py", "poplib.py", "posixpath.py",
    "pyclbr.py", "re/__init__.py", "rlcompleter.py", "stringprep.py", "tkinter/constants.py", "tkinter/dnd.py",
    "traceback.py", "turtledemo/bytedesign.py", "turtledemo/clock.py", "turtledemo/forest.py",
    "turtledemo/penrose.py", "turtledemo/tree.py", "turtledemo/yinyang.py", "unittest/loader.py",
    "urllib/response.py", "uu.py", "wave.py", "wsgiref/handlers.py", "xml/dom/__init__.py", "zoneinfo/__init__.py",
)


def build_heldout(stdlib: Path) -> tuple[str, list[str], list[str]]:
    """The held-out text from one standard library: (text, files used, files missing there).

    Files are joined in the list's order, each ending in exactly one newline and followed by a blank line, so
    the text is a plain file that any perplexity tool tokenizes the same way."""
    parts, used, missing = [], [], []
    for rel in HELDOUT:
        p = stdlib / rel
        if not p.is_file():
            missing.append(rel)
            continue
        parts.append(p.read_text(encoding="utf-8").rstrip("\n") + "\n\n")
        used.append(rel)
    return "".join(parts), used, missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                    help="standard-library folder to read (default: this Python's)")
    ap.add_argument("--out", type=Path, required=True, help="text file to write")
    a = ap.parse_args()
    if not (a.stdlib / "os.py").is_file():
        print(f"edgeinfer: {a.stdlib} is not a Python standard library (it has no os.py)", file=sys.stderr)
        return 2
    text, used, missing = build_heldout(a.stdlib)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(a.out)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"{a.out}: {len(used)} files, {len(text)} characters, sha256 {digest}"
          + (f"; missing in {a.stdlib}: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
