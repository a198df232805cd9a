"""Reading an edgeinfer package: the manifest is the contract (docs/PACKAGE.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeInferError
from .spec import ArchSpec

FORMAT = "edgeinfer-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Package:
    path: Path
    manifest: dict[str, Any]
    spec: ArchSpec

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name

    @property
    def quantization(self) -> dict[str, Any]:
        return self.manifest.get("quantization", {"mode": "none", "bits": 16})

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return self.manifest["tokenizer"]

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    def verify(self) -> None:
        """Checks every file against the manifest's SHA-256."""
        for name, info in self.manifest["files"].items():
            got = sha256_file(self.path / name)
            if got != info["sha256"]:
                raise EdgeInferError(f"{self.path / name} is corrupted: its SHA-256 does not match the manifest")


def open_package(path: str | Path, verify: bool = False) -> Package:
    path = Path(path)
    if not path.exists():
        raise EdgeInferError(f"{path} does not exist")
    if path.is_file():
        raise EdgeInferError(f"{path} is a file, not an edgeinfer package folder (convert it first: edgeinfer convert {path} -o OUT)")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise EdgeInferError(f"{path} is not an edgeinfer package: it has no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeInferError(f"{mpath} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise EdgeInferError(f"{mpath} is not an edgeinfer manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EdgeInferError(
            f"{mpath} has format version {manifest.get('format_version')}; this edgeinfer reads version {FORMAT_VERSION}"
        )
    for key in ("arch", "tokenizer", "files"):
        if key not in manifest:
            raise EdgeInferError(f"{mpath} is missing the required key {key!r}")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.exists():
            raise EdgeInferError(f"{f} is missing from the package")
        if f.stat().st_size != info["bytes"]:
            raise EdgeInferError(f"{f} has {f.stat().st_size} bytes but the manifest says {info['bytes']}: the package is damaged")
    pkg = Package(path=path, manifest=manifest, spec=ArchSpec.from_dict(manifest["arch"]))
    if verify:
        pkg.verify()
    return pkg
