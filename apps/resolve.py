"""``-m`` resolution: a package folder, or a catalog name that is fetched and converted once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgeinfer.errors import EdgeInferError
from edgeinfer.package import MANIFEST

REPO_ROOT = Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    return Path(os.environ.get("EDGEINFER_MODELS") or REPO_ROOT / "models")


def resolve_package(spec: str | None, progress: bool = True) -> Path:
    """Returns a package folder for ``spec``: an existing path, or a catalog name (None: the default
    model), converting it into models/NAME on first use."""
    if spec is not None and (Path(spec).expanduser().exists() or os.sep in spec or spec.startswith(".")):
        return Path(spec).expanduser()
    from edgeinfer.converters.fetch import fetch, load_catalog

    catalog = load_catalog()
    name = spec or catalog["default"]
    entry = catalog["models"].get(name)
    if entry is None:
        known = ", ".join(sorted(catalog["models"]))
        raise EdgeInferError(f"{name} is neither a package folder nor a catalog model (known: {known})")
    out = models_dir() / name
    if (out / MANIFEST).exists():
        return out
    from edgeinfer.converters.convert import convert

    if progress:
        print(f"edgeinfer: preparing {name} (first use: fetch and convert, once)", file=sys.stderr)
    src = fetch(name, progress=progress)
    opts = entry.get("convert", {})
    convert(
        str(src), out, bits=opts.get("bits"), group_size=opts.get("group_size"), progress=progress, name=name,
        chat_template=entry.get("chat_template"), command=f"edgeinfer convert {src} -o {out}",
    )
    return out
