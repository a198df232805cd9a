"""The input-major weight layout of the fast sparse decode path (``PKG/sparse/weights_t.safetensors``).

Every projection of every layer, and the head, holds the package's own quantized values, transposed:
row j is input channel j's m values (4-bit: m/2 bytes, low nibbles outputs 0..m/2-1, high nibbles
m/2..m-1; any other width up to 8 bits widened to one byte, losslessly), and the scales and biases of
input group G are rows ``[G, m]``, kept in float16 when the package's values are exactly float16, else
float32. Nothing is quantized a second time, so the sparse decode at "keep every channel" is the
package's dense linear up to summation order. Modules reading the same input (q|k|v, gate|up) store their
rows side by side (version 2): input channel j of all of them is one contiguous run, so a kept channel is
one read and a skipped one a longer hole for the hardware prefetchers to run into.

One file for all sparsity levels, flat arrays plus a table (``meta``) of where each module's bytes are:
one mapped file and no per-module Python objects at run time. The manifest records it under
``sparsity.layout`` with its SHA-256 and the SHA-256 of the ``model.safetensors`` it was made from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..decode_tables import module_names
from ..errors import EdgeInferError
from ..package import MANIFEST, WEIGHTS, Package, open_package, sha256_file
from ..safetensors_map import map_safetensors, unpack as _unpack
from .kernels import BITS, GROUP, M_OUT, META_COLS, N_IN, OFF_BIAS, OFF_Q, OFF_S, PROJECTIONS, ROW_BYTES, S32

LAYOUT_FILE = "sparse/weights_t.safetensors"
LAYOUT_FORMAT = "edgeinfer-input-major"
LAYOUT_VERSION = 2  # 2: rows of q|k|v and gate|up interleaved (ROW_BYTES is the stride)
MERGED = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def _scales(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """[m, G] -> ([G, m], is_float32): float16 whenever that is exact."""
    t = np.ascontiguousarray(np.asarray(a).T)
    if t.dtype == np.float16:
        return t, False
    t32 = t.astype(np.float32)
    h = t32.astype(np.float16)
    if np.array_equal(h.astype(np.float32), t32):
        return h, False
    return t32, True


def interleaved(meta: np.ndarray, nlayer_mods: int) -> list[list[int]]:
    """The modules whose rows are stored side by side, in file order: per layer q|k|v and gate|up (they
    read the same input, so an input channel's rows of all of them are one contiguous run), o, down, and
    last the head. Modules of a merged set must have the same number of inputs."""
    sets = []
    for base in range(0, nlayer_mods, len(PROJECTIONS)):
        for part in MERGED:
            mods = [base + PROJECTIONS.index(p) for p in part]
            if len({int(meta[mi, N_IN]) for mi in mods}) == 1:
                sets.append(mods)
            else:
                sets.extend([mi] for mi in mods)
    return sets + [[nlayer_mods]]


def build_layout(pkg: Package, progress: bool = True) -> dict[str, np.ndarray]:
    """The layout's arrays, from the package's weights."""
    from tqdm import tqdm

    w = map_safetensors(pkg.weights_path)
    quant = pkg.quantization
    per = quant.get("tensors", {})
    names = module_names(pkg)
    meta = np.zeros((len(names), META_COLS), np.int64)
    wq, s16, z16, s32, z32, lbias = [], [], [], [], [], []
    sizes = {"wq": 0, "s16": 0, "s32": 0, "lbias": 0}
    rows_of: dict[int, np.ndarray] = {}
    for mi, name in enumerate(tqdm(names, desc="sparse layout", unit="linear", disable=None if progress else True,
                                   leave=False, file=sys.stderr)):
        if f"{name}.scales" not in w:
            raise EdgeInferError(f"the fast sparse path needs quantized weights (4/8-bit affine); {name} in {pkg.path} is "
                                 f"stored in float")
        bits = int(per.get(name, quant).get("bits", quant.get("bits")))
        group = int(per.get(name, quant).get("group_size", quant.get("group_size")))
        if bits > 8:
            raise EdgeInferError(f"the fast sparse path reads at most 8-bit weights; {name} has {bits} bits")
        q = _unpack(w[f"{name}.weight"], bits).T  # [n, m]
        n, m = q.shape
        if bits == 4:
            if m % 2:
                raise EdgeInferError(f"{name} has an odd number of outputs ({m}); the 4-bit layout pairs outputs")
            rows = (q[:, : m // 2] | (q[:, m // 2:] << 4)).astype(np.uint8)
        else:
            rows = q.astype(np.uint8)  # any width up to 8 bits: one byte per value, exactly
        s, f32 = _scales(w[f"{name}.scales"])
        z, zf32 = _scales(w[f"{name}.biases"])
        if f32 != zf32:  # keep the pair in one precision
            s, z, f32 = s.astype(np.float32), z.astype(np.float32), True
        meta[mi, [N_IN, M_OUT, BITS, GROUP]] = [n, m, 4 if bits == 4 else 8, group]
        meta[mi, S32] = int(f32)
        key = "s32" if f32 else "s16"
        meta[mi, OFF_S] = sizes[key]
        (s32 if f32 else s16).append(s.reshape(-1))
        (z32 if f32 else z16).append(z.reshape(-1))
        sizes[key] += s.size
        rows_of[mi] = rows
        meta[mi, OFF_BIAS] = -1
        if f"{name}.bias" in w:
            meta[mi, OFF_BIAS] = sizes["lbias"]
            lbias.append(np.asarray(w[f"{name}.bias"], np.float32))
            sizes["lbias"] += m

    for mods in interleaved(meta, len(names) - 1):
        # row j of every module in ``mods`` side by side: one run of bytes per input channel
        merged = np.concatenate([rows_of[mi] for mi in mods], axis=1)
        col = 0
        for mi in mods:
            meta[mi, OFF_Q] = sizes["wq"] + col
            meta[mi, ROW_BYTES] = merged.shape[1]
            col += rows_of[mi].shape[1]
        wq.append(merged.reshape(-1))
        sizes["wq"] += merged.size

    def cat(parts, dtype):  # one element of padding keeps every tensor non-empty
        return np.concatenate([np.asarray(p, dtype) for p in parts] + [np.zeros(1, dtype)])

    return {"wq": cat(wq, np.uint8), "s16": cat(s16, np.float16), "z16": cat(z16, np.float16),
            "s32": cat(s32, np.float32), "z32": cat(z32, np.float32), "lbias": cat(lbias, np.float32), "meta": meta}


def write_fast_layout(pkg_dir: str | Path, progress: bool = True) -> dict:
    """Writes ``PKG/sparse/weights_t.safetensors`` and records it in the manifest under ``sparsity.layout``
    (returned too, for a caller that rewrites the manifest itself afterwards). Temporary names, then the
    file, then the manifest: an interrupted run leaves the package as it was."""
    from safetensors.numpy import save_file

    pkg = open_package(pkg_dir)
    arrays = build_layout(pkg, progress=progress)
    final = pkg.path / LAYOUT_FILE
    final.parent.mkdir(exist_ok=True)
    tag = f".partial-{os.getpid()}"
    tmp = final.with_name(final.name + tag)
    tmp_manifest = pkg.path / (MANIFEST + tag)
    try:
        save_file(arrays, str(tmp), metadata={"format": LAYOUT_FORMAT, "version": str(LAYOUT_VERSION)})
        os.chmod(tmp, 0o644)  # as readable as the package's other files (the writer creates it 0600)
        info = {"file": LAYOUT_FILE, "format": LAYOUT_FORMAT, "version": LAYOUT_VERSION, "sha256": sha256_file(tmp),
                "bytes": tmp.stat().st_size, "package_sha256": _weights_sha(pkg)}
        manifest = json.loads((pkg.path / MANIFEST).read_text())
        manifest.setdefault("sparsity", {})["layout"] = info
        with open(tmp_manifest, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        os.replace(tmp_manifest, pkg.path / MANIFEST)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise EdgeInferError(f"could not write the sparse layout into {pkg.path}: {e.strerror or e}") from None
        raise
    return info


def _weights_sha(pkg: Package) -> str:
    return pkg.manifest["files"].get(WEIGHTS, {}).get("sha256") or sha256_file(pkg.weights_path)


def layout_bytes(pkg: Package) -> int:
    """Bytes of the layout file the package records (0 when it has none)."""
    info = (pkg.manifest.get("sparsity") or {}).get("layout") or {}
    return int(info.get("bytes", 0))


def load_fast_layout(pkg: Package) -> dict[str, np.ndarray]:
    """The layout's arrays, memory-mapped; refuses in one line when the package has none or a stale one."""
    info = (pkg.manifest.get("sparsity") or {}).get("layout")
    path = pkg.path / LAYOUT_FILE
    if not info or not path.is_file():
        raise EdgeInferError(f"{pkg.path} has no fast sparse layout ({LAYOUT_FILE}), which the ONNX backend's sparse "
                             f"decode needs; make it with: edgeinfer sparsify {pkg.path} --sparsity LEVEL")
    if info.get("format") != LAYOUT_FORMAT or info.get("version") != LAYOUT_VERSION:
        raise EdgeInferError(f"{path} has format {info.get('format')} v{info.get('version')}; this edgeinfer reads "
                             f"{LAYOUT_FORMAT} v{LAYOUT_VERSION} (run edgeinfer sparsify again)")
    if info.get("package_sha256") != _weights_sha(pkg):
        raise EdgeInferError(f"{path} was made from other weights than {pkg.weights_path}; run edgeinfer sparsify again")
    if path.stat().st_size != info.get("bytes"):
        raise EdgeInferError(f"{path} has {path.stat().st_size} bytes but the manifest says {info.get('bytes')}: "
                             f"the package is damaged")
    arrays = map_safetensors(path)
    missing = {"wq", "s16", "z16", "s32", "z32", "lbias", "meta"} - set(arrays)
    names = module_names(pkg)
    if missing or arrays["meta"].shape != (len(names), META_COLS):
        raise EdgeInferError(f"{path} is damaged (tensors or module table do not match the package)")
    return arrays
