"""Source (HF folder, hub repo id, catalog name or GGUF file) -> edgeinfer package, atomically.

Everything is written into a hidden temporary folder beside OUT and renamed at the very end, so an
interrupted or failed conversion never leaves an OUT that looks valid.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgeinfer import __version__
from edgeinfer.errors import EdgeInferError
from edgeinfer.package import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, sha256_file

from .quantize import QuantizedTensor, quantize, quantize_search
from .safetensors_io import write_safetensors

QUANTIZABLE = re.compile(r"(_proj\.weight|^embed\.weight|^lm_head\.weight)$")


def open_source(src: str, progress: bool = True):
    """Returns an HFSource or GGUFSource for a local path, a catalog name or a hub repo id."""
    p = Path(src).expanduser()
    if p.exists():
        if p.is_dir():
            from .hf_import import open_hf

            return open_hf(p)
        if p.suffix == ".gguf":
            from .gguf_import import open_gguf

            return open_gguf(p)
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise EdgeInferError(f"{p} is a pickled PyTorch checkpoint; edgeinfer never unpickles (it can run arbitrary code)")
        if p.suffix == ".safetensors":
            raise EdgeInferError(f"{p} is a bare safetensors file; give the folder that holds it with config.json and the tokenizer")
        raise EdgeInferError(f"{p} is neither a Hugging Face model folder nor a .gguf file")
    looks_remote = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", src) and not src.startswith((".", "/", "~"))
    if not looks_remote:
        raise EdgeInferError(f"{src} does not exist")
    from .fetch import fetch

    return open_source(str(fetch(src, progress=progress)), progress=progress)


def _source_record(source) -> dict:
    if source.kind == "gguf":
        return {"kind": "gguf", "path": str(source.path), "sha256": sha256_file(source.path)}
    return {
        "kind": "hf",
        "path": str(source.path),
        "sha256": {f.path.name: sha256_file(f.path) for f in source.files},
    }


def _store(name: str, t, bits: int, group: int, notes: list[str], requantize: bool = False):
    """Decides how one tensor is stored. Returns a float array or a QuantizedTensor. A source's quantized
    tensor is kept as it is unless ``requantize``: then it is stored at ``bits`` from its dequantized values."""
    if isinstance(t, QuantizedTensor):
        if not requantize or (t.bits, t.group_size) == (bits, group):
            return t
        t = t.dequantize() if t.weight.ndim == 2 else np.stack([_expert(t, e).dequantize() for e in range(t.weight.shape[0])])
    t = np.asarray(t)
    # 3-D: MoE experts stacked [E, out, in], quantized as E*out rows. The router (moe.router.weight) is
    # not a _proj and stays float32: it is tiny, and its top-k is a discrete choice that rounding flips.
    if t.ndim not in (2, 3) or not QUANTIZABLE.search(name):
        return t.astype(np.float32)
    if bits == 32:
        return t.astype(np.float32)
    if bits == 16:
        return t.astype(np.float16)
    if t.shape[-1] % group:
        notes.append(f"{name} kept in float16: its input size {t.shape[-1]} is not a multiple of {group}")
        return t.astype(np.float16)
    # re-quantized values sit on the source's grid already: searching the scales saves part of the second rounding
    fit = quantize_search if requantize else quantize
    if t.ndim == 3:
        q = fit(t.reshape(-1, t.shape[-1]), bits, group, scale_dtype=np.float16)
        lead = t.shape[:2]
        return QuantizedTensor(q.weight.reshape(*lead, -1), q.scales.reshape(*lead, -1), q.biases.reshape(*lead, -1),
                               bits, group)
    return fit(t, bits, group, scale_dtype=np.float16)


def _expert(t: QuantizedTensor, e: int) -> QuantizedTensor:
    return QuantizedTensor(t.weight[e], t.scales[e], t.biases[e], t.bits, t.group_size)


def convert(
    src: str,
    out: str | Path,
    bits: int | None = None,
    group_size: int | None = None,
    force: bool = False,
    command: str | None = None,
    progress: bool = True,
    name: str | None = None,
    chat_template: str | None = None,
    backend: str = "all",
    accuracy_level: int | None = None,
) -> Path:
    """``backend``: ``mlx`` writes the weights only; ``onnx``/``all`` also write the ONNX graph (which reads
    its weights from the same file). An existing package as ``src`` gets its graph added in place."""
    if backend not in ("mlx", "onnx", "all"):
        raise EdgeInferError(f"--backend must be mlx, onnx or all, not {backend}")
    p = Path(src).expanduser()
    if (p / MANIFEST).is_file():
        if out is not None and Path(out).expanduser().resolve() != p.resolve():
            raise EdgeInferError(f"{src} is already an edgeinfer package; to add its ONNX graph in place, leave out -o")
        if backend == "mlx":
            raise EdgeInferError(f"{src} is already an edgeinfer package; MLX runs it as it is")
        from .onnx_export import add_onnx_graph

        return add_onnx_graph(p, accuracy_level=accuracy_level, progress=progress).parent
    if out is None:
        raise EdgeInferError("-o/--out is required: the package folder to create")
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise EdgeInferError(f"{out} already exists; pass --force to replace it")
    if bits is not None and bits not in (4, 8, 16, 32):
        raise EdgeInferError(f"--bits must be 4, 8, 16 or 32, not {bits}")
    if group_size is not None and group_size not in (32, 64, 128):
        raise EdgeInferError(f"--group-size must be 32, 64 or 128, not {group_size}")
    source = open_source(src, progress=progress)
    # A GGUF keeps its own quantized tensors unless --bits is given: then every tensor is stored at that
    # width, the quantized ones re-quantized from their dequantized values (lossy, and said in the notes).
    requantize = source.kind == "gguf" and bits is not None
    if bits is None:
        bits = 16 if source.kind == "gguf" else 4
    group = group_size or (32 if source.kind == "gguf" else 64)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        # Inside the try: an unwritable destination becomes a one-line error, and a Ctrl-C that lands
        # as mkdir returns still removes the folder.
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        tmp.mkdir()
        _write_package(source, tmp, bits, group, command, progress, name, chat_template, requantize)
        if backend != "mlx":
            from .onnx_export import add_onnx_graph

            add_onnx_graph(tmp, accuracy_level=accuracy_level, progress=progress)
        if out.exists() or out.is_symlink():
            out.rename(old)
            tmp.rename(out)
            _remove(old)
        else:
            tmp.rename(out)
    except BaseException as e:
        _remove(tmp)
        if old.exists() and not out.exists():
            old.rename(out)  # interrupted between the two renames of --force: put the old package back
        if isinstance(e, OSError):
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise EdgeInferError(f"no space left to write {out} ({e.strerror}); nothing was written") from None
            raise EdgeInferError(f"could not write {out}: {e.strerror or e}") from None
        raise
    return out


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _remove_stale_partials(out: Path) -> None:
    """Removes hidden leftovers of conversions to OUT that were killed (SIGKILL leaves no cleanup)."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_package(source, tmp: Path, bits, group, command, progress, name, chat_template, requantize=False) -> None:
    notes: list[str] = []
    stored: list[tuple[str, np.ndarray]] = []
    qinfo: dict[str, tuple[int, int]] = {}
    requantized: Counter = Counter()
    t0 = time.time()
    bar = tqdm(desc="converting", unit="tensor", disable=None if progress else True, leave=False, file=sys.stderr)
    for tname, t in source.tensors():
        s = _store(tname, t, bits, group, notes, requantize)
        if isinstance(t, QuantizedTensor) and s is not t:  # _store kept it, or stored it anew
            requantized[f"{t.bits}-bit groups of {t.group_size}"] += 1
        if isinstance(s, QuantizedTensor):
            base = tname[: -len(".weight")]
            qinfo[base] = (s.bits, s.group_size)
            stored += [(f"{base}.weight", s.weight), (f"{base}.scales", s.scales), (f"{base}.biases", s.biases)]
        else:
            stored.append((tname, s))
        bar.update(1)
    bar.close()
    notes = list(getattr(source, "notes", [])) + notes  # the source adds notes while it streams tensors
    if requantized:
        what = ", ".join(f"{n} in {k}" for k, n in sorted(requantized.items()))
        notes.append(f"re-quantized to {bits} bits in groups of {group} from the source's dequantized values ({what})")
    names = {n for n, _ in stored}
    if "embed.weight" not in names:
        raise EdgeInferError(f"{source.path} has no token embedding tensor")

    write_safetensors(tmp / WEIGHTS, stored)
    del stored

    if qinfo:
        (dbits, dgroup), _ = Counter(qinfo.values()).most_common(1)[0]
        quant = {"mode": "affine", "bits": dbits, "group_size": dgroup}
        extra = {k: {"bits": b, "group_size": g} for k, (b, g) in qinfo.items() if (b, g) != (dbits, dgroup)}
        if extra:
            quant["tensors"] = extra
    else:
        quant = {"mode": "none", "bits": 16 if bits == 16 else 32}
    if notes:
        quant["notes"] = notes

    tok = _write_tokenizer(source, tmp, chat_template)
    files = {}
    for f in sorted(tmp.iterdir()):
        files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or source.name,
        "arch": source.spec.to_dict(),
        "quantization": quant,
        "tokenizer": tok,
        "files": files,
        "source": _source_record(source),
        "created_by": {
            "command": command or f"edgeinfer convert {source.path}",
            "edgeinfer_version": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - t0, 2),
        },
    }
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write_tokenizer(source, tmp: Path, chat_template: str | None) -> dict:
    if source.kind == "gguf":
        (tmp / "tokenizer.json").write_text(source.tokenizer_json)
        tok = {"file": "tokenizer.json", "kind": "tokenizers"}
    else:
        dst = "tokenizer.json" if source.tokenizer_kind == "tokenizers" else "tokenizer.model"
        shutil.copyfile(source.tokenizer_file, tmp / dst)
        tok = {"file": dst, "kind": source.tokenizer_kind}
    tok.update(bos_token_id=source.bos_token_id, eos_token_ids=list(source.eos_token_ids), add_bos=bool(source.add_bos))
    template = source.chat_template or chat_template
    if template:
        (tmp / "chat_template.jinja").write_text(template)
        tok["chat_template_file"] = "chat_template.jinja"
    return tok
