"""The real models a scenario can run; importing this package registers their kinds.

- ``silero-vad`` (vad.py): Silero VAD on 16 kHz audio, speech start/end events;
- ``ocr-det`` / ``ocr-rec`` (ocr.py): PP-OCRv4 text detection and recognition;
- ``llm`` (llm.py): an edgeinfer package, streamed answers with per-token times;
- ``onnx`` (onnx_plain.py): any ONNX file on random inputs of its declared shapes.

The ONNX models come from PyPI wheels (assets.py); the inputs are generated (inputs.py).
"""

from . import llm, ocr, onnx_plain, vad  # noqa: F401
