"""A fresh clone's test run (issue 20): no ../shared beside the repository, CI unset.

The committed HEAD is cloned into a temporary folder (nothing beside it), and there pytest runs the tests
that need the shared evaluation data (marked ``shared_data`` by conftest.py) plus a few ordinary ones,
on the clone's own code with this interpreter and its installed dependencies. The data tests must be
skipped, each with the sentence naming the missing file; nothing may error. With CI=true the same tests
must fail instead (CI has the data, so a skip there would hide it).

The clone's code, not this checkout's: this venv has edgeinfer installed in editable mode, whose import
finder maps ``edgeinfer``, ``edgeinfer.converters`` and ``edgeinfer.apps`` onto this checkout. A
sitecustomize.py on PYTHONPATH (so every Python the tests start inherits it) drops that finder and maps
the packages onto the clone, by the clone's own pyproject.toml package-dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SITECUSTOMIZE = '''\
import os
import sys
from importlib.util import spec_from_file_location
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

_root = Path(os.environ["EDGEINFER_CLONE_ROOT"])
_cfg = tomllib.loads((_root / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
_map = {"edgeinfer": _root / "edgeinfer"}
_map.update({name: _root / d for name, d in _cfg.get("package-dir", {}).items() if name})
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]


class _CloneFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        d = _map.get(fullname)
        if d is None or not (d / "__init__.py").is_file():
            return None
        return spec_from_file_location(fullname, d / "__init__.py", submodule_search_locations=[str(d)])


sys.meta_path.insert(0, _CloneFinder)
'''

# Ordinary tests run alongside: cheap, and between them they import the runtime, the converters' catalog
# (by its path relative to the code) and start the CLI in a child process.
ORDINARY = ["test_real_catalog_is_valid_and_complete", "test_paths_follow_the_environment", "test_nonexistent_path"]
# The tests that needed ../shared when issue 20 was filed (7 errors in a fresh clone's make test).
AT_LEAST = 7


def _env(clone: Path, site: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "EDGEINFER_WIKITEXT", "PYTEST_ADDOPTS", "PYTHONPATH", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(site), EDGEINFER_CLONE_ROOT=str(clone), PYTHONDONTWRITEBYTECODE="1", EDGEINFER_IN_FRESH_CLONE="1",
               **extra)
    return env


def _pytest(clone: Path, env: dict, junit: Path, *args: str) -> subprocess.CompletedProcess:
    """The clone's pytest in a session of its own: on a timeout the whole session goes, the processes its
    tests started included (a plain timeout kills only the child, and leaves the rest running)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    proc = subprocess.Popen(cmd, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _cases(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, message) from a junit report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("skipped", "failure", "error"):
                outcome, message = child.tag, child.get("message") or ""
        out[name] = (outcome, message)
    return out


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
@pytest.mark.skipif(bool(os.environ.get("EDGEINFER_IN_FRESH_CLONE")), reason="already the fresh clone's run (no recursion)")
def test_fresh_clone_skips_the_data_tests_with_the_reason(tmp_path):
    home = tmp_path / "fresh"
    home.mkdir()
    clone = home / "edgeinfer"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, capture_output=True, timeout=120)
    assert not (home / "shared").exists()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = _env(clone, site)

    # the clone's own packages are what a Python started there imports
    r = subprocess.run([sys.executable, "-c", "import edgeinfer, edgeinfer.cli, edgeinfer.converters.fetch as f, edgeinfer.apps.resolve as a;"
                        "print(edgeinfer.__file__); print(f.__file__); print(a.__file__)"],
                       cwd=home, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    files = r.stdout.split()
    assert len(files) == 3 and all(Path(p).resolve().is_relative_to(clone.resolve()) for p in files), files

    missing = home / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    reason = f"{missing} is missing: the shared data sits beside the repository (or set EDGEINFER_WIKITEXT)"
    # (-k matches names as well as markers: this test's own name must not select it there)
    r = _pytest(clone, env, tmp_path / "fresh.xml", "-k", f"({' or '.join(['shared_data', *ORDINARY])}) and not test_fresh_clone")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cases = _cases(tmp_path / "fresh.xml")
    skipped = {n: m for n, (o, m) in cases.items() if o == "skipped"}
    passed = {n for n, (o, _) in cases.items() if o == "passed"}
    assert not {n for n, (o, _) in cases.items() if o in ("error", "failure")}
    assert len(skipped) >= AT_LEAST, cases
    assert all(m == reason for m in skipped.values()), skipped
    assert {n.rsplit("::", 1)[1] for n in passed} == set(ORDINARY), cases
    assert reason in r.stdout  # the -ra summary names it too

    # under CI the same tests are errors, not skips (their modules only, to keep collection short)
    modules = sorted({n.split("::")[0].replace(".", "/") + ".py" for n in skipped})
    r = _pytest(clone, _env(clone, site, CI="true"), tmp_path / "ci.xml", "-k", "shared_data and not test_fresh_clone", *modules)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    ci = _cases(tmp_path / "ci.xml")
    assert set(ci) == set(skipped)
    assert all(o == "error" and reason in m for o, m in ci.values()), ci
