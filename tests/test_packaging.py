"""pyproject.toml's package configuration (issue 20, item 5): building the wheel, as `make setup`'s
`pip install -e .` does, gives no setuptools warning about folders absent from `packages` (it printed ~90
lines, for edgeinfer/scenario/builtin and edgeinfer/scenario/data/speech), and the wheel carries every
module and the scenario data.

The build runs on a copy of the packages' files (tracked or new, not ignored) and pyproject.toml only:
setup.py's C extension is not what is checked here, and compiling it would take the test past seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIRS = {"edgeinfer": "edgeinfer", "converters": "edgeinfer/converters", "apps": "edgeinfer/apps"}  # package-dir


def _files() -> list[str]:
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *DIRS], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return [f for f in r.stdout.split("\0") if f and (ROOT / f).is_file() and "__pycache__" not in f]


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_wheel_builds_without_package_warnings_and_carries_the_data(tmp_path):
    src = tmp_path / "src"
    files = _files()
    for f in files + ["pyproject.toml", "README.md"]:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-W", "always", "-c",
                        "import setuptools.build_meta as b, sys; print(b.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
                       cwd=src, env=env, capture_output=True, text=True, timeout=120)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "absent from the `packages` configuration" not in log, log
    assert "SetuptoolsDeprecationWarning" not in log and "SetuptoolsWarning" not in log, log

    wheel = tmp_path / "dist" / r.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for f in files:
        top, _, rest = f.partition("/")
        if f.endswith(".py") or "/scenario/builtin/" in f or "/scenario/data/" in f or "apps/static/" in f:
            want.add(f"{DIRS[top]}/{rest}")
    assert any("/scenario/builtin/" in w for w in want) and any("/scenario/data/speech/" in w for w in want)
    assert "edgeinfer/apps/static/chat.html" in want
    assert sorted(want - names) == []
