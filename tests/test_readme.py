"""The README is true (issue 20): its Python snippet runs as written, on SmolLM2, and prints the stats line on
a line of its own (item 6: it was glued onto the streamed answer)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

README = ROOT / "README.md"
README_MODEL = "models/smollm2-135m-instruct"  # the snippet's package path; a fresh clone has none, so the test's own
STATS = re.compile(r"prompt \d+ tok \([\d.]+ tok/s\), TTFT \d+ ms, decode \d+ tok at [\d.]+ tok/s, peak memory \d+ MiB.*")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


@pytest.mark.slow
def test_the_python_snippet_runs_and_ends_with_the_stats_on_their_own_line(smollm2_package, tmp_path):
    blocks = [b for b in python_blocks(README.read_text(encoding="utf-8")) if "import edgeinfer" in b]
    assert len(blocks) == 1  # the other one is the server's client, run by tests/test_serve.py
    code = blocks[0]
    assert f'"{README_MODEL}"' in code
    script = tmp_path / "snippet.py"
    script.write_text(code.replace(f'"{README_MODEL}"', repr(str(smollm2_package))), encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.rstrip("\n").split("\n")
    assert len(lines) >= 3, r.stdout
    assert STATS.fullmatch(lines[-1]), lines[-1]  # the stats, alone on the last line
    assert lines[0].strip() and not STATS.search(lines[0])  # generate()'s text
    streamed = "\n".join(lines[1:-1])
    assert streamed.strip() and not STATS.search(streamed)  # the joke, without the stats glued on


@pytest.mark.slow
def test_the_prompt_lookup_example_pays_and_keeps_greedy_output(smollm2_package):
    """Issue 20, item 7: the README's --draft ngram example is a code edit, where prompt lookup drafts most of
    the answer; on MLX (exact) its greedy output is plain decoding's."""
    import shlex

    import edgeinfer
    from edgeinfer.model import GenerationConfig
    from edgeinfer.speculative import Backoff, Speculator

    line = next(ln for ln in README.read_text(encoding="utf-8").splitlines() if "--draft ngram" in ln and "< " in ln)
    words = shlex.split(line.split("#")[0])
    prompt = (ROOT / words[words.index("<") + 1]).read_text(encoding="utf-8")
    assert {"--chat", "-p", "-"} <= set(words) and "def moving_average" in prompt
    m = edgeinfer.load(smollm2_package, backend="mlx")
    ids = m.tokenizer.encode_chat([{"role": "user", "content": prompt}])

    def run(spec):
        m.reset()
        return list(m.stream_ids(ids, GenerationConfig(max_tokens=40, speculative=spec)))

    plain = run(False)
    spec = Speculator(m, draft="ngram", num_draft=4, backoff=lambda: Backoff(cost_share=None))  # not timed: deterministic
    assert run(spec) == plain
    assert spec.stats.acceptance_length > 2.0, spec.stats.line()
