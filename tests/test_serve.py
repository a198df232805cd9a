"""``edgeinfer serve`` as clients use it: a real server process on 127.0.0.1 (a free port), driven with
the official ``openai`` client and raw HTTP, on a tiny random model and on SmolLM2. Answers at
temperature 0 are checked against the same request run in this process on the same package."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import cli_env

import edgeinfer

openai = pytest.importorskip("openai")
SERVING = re.compile(r"serving (\S+) \((\w+)\) on (http://127\.0\.0\.1:\d+)/v1")


class Served:
    """``edgeinfer serve -m PKG --port 0 ARGS`` in its own process; ``url`` once it listens."""

    def __init__(self, pkg: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeinfer.cli", "serve", "-m", str(pkg), "--port", "0", "-q",
                                      *args], stderr=subprocess.PIPE, text=True, env=cli_env())
        self.log: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = SERVING.search(line)
            if m:
                self.name, self.backend, self.url = m.groups()
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.proc.kill()
        raise AssertionError("the server did not start: " + "".join(self.log))

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^edgeinfer_{name} (\S+)$", text, re.M).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny(tiny_package):
    return tiny_package("llama", 4, 32)


@pytest.fixture(scope="module")
def served(tiny):
    s = Served(tiny)
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def local(tiny):
    return edgeinfer.load(tiny)


def _chat(local, messages, max_tokens):
    local.reset()
    return local.generate(messages, max_tokens=max_tokens)


def test_chat_completion_equals_the_same_request_in_process(served, local):
    c = served.client()
    messages = [{"role": "user", "content": "hello there"}]
    r = c.chat.completions.create(model=served.name, messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == served.name
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _chat(local, messages, 24)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(local.tokenizer.encode_chat(messages))
    assert r.usage.completion_tokens == local.stats.generated_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in c.models.list().data] == [served.name]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_streaming_gives_the_same_text_and_usage(served, local):
    c = served.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count to five"}]
    chunks = list(c.chat.completions.create(model=served.name, messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == _chat(local, messages, 20)
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == local.stats.generated_tokens
    raw = httpx.post(served.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_completions_endpoint(served, local):
    c = served.client()
    r = c.completions.create(model=served.name, prompt="Once upon a time", max_tokens=16, temperature=0)
    local.reset()
    assert r.choices[0].text == local.generate("Once upon a time", max_tokens=16)
    parts = list(c.completions.create(model=served.name, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text


def test_a_second_turn_prefills_only_its_new_tokens(served):
    c = served.client()
    first = [{"role": "user", "content": "tell me about the sea"}]
    r1 = c.chat.completions.create(model=served.name, messages=first, max_tokens=12, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "and the sky?"}]
    r2 = c.chat.completions.create(model=served.name, messages=second, max_tokens=12, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens and cached < r2.usage.prompt_tokens


def test_concurrent_clients_get_the_answers_they_would_get_alone(served):
    c = served.client()
    prompts = [f"question number {i}" for i in range(4)]
    alone = {p: c.chat.completions.create(model=served.name, messages=[{"role": "user", "content": p}], max_tokens=10,
                                          temperature=0).choices[0].message.content for p in prompts}
    got, errors = [], []

    def client_loop(p):
        try:
            for _ in range(3):
                r = served.client().chat.completions.create(model=served.name, messages=[{"role": "user", "content": p}],
                                                            max_tokens=10, temperature=0, stream=p.endswith(("1", "3")))
                text = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices) if p.endswith(("1", "3")) \
                    else r.choices[0].message.content
                got.append((p, text))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(got) == 12
    assert all(text == alone[p] for p, text in got)


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model_not_found"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, None),
    (json.dumps({"messages": []}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode(), 413, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, code):
    r = httpx.post(served.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"] and err["code"] == code
    assert httpx.get(served.url + "/nope").status_code == 404
    ok = httpx.post(served.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_the_openai_client_sees_the_errors_too(served):
    c = served.client()
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model=served.name, messages=[{"role": "user", "content": "hi"}], max_tokens=100000)


def test_a_client_that_disconnects_stops_its_generation(served):
    before = served.metric("completion_tokens_total")
    body = {"messages": [{"role": "user", "content": "write forever"}], "max_tokens": 200, "stream": True, "temperature": 1.0,
            "seed": 1}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
    deadline = time.time() + 30  # the worker notices at its next token and records what it made
    while served.metric("queue_depth") and time.time() < deadline:
        time.sleep(0.05)
    made = served.metric("completion_tokens_total") - before
    assert served.metric("queue_depth") == 0
    whole = httpx.post(served.url + "/v1/chat/completions", json=dict(body, stream=False), timeout=60).json()
    assert whole["usage"]["completion_tokens"] == 200 and made < 100  # left alone, the same request runs to the end
    r = served.client().chat.completions.create(model=served.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_sigterm_during_a_stream_ends_cleanly(tiny):
    s = Served(tiny)
    body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 220, "stream": True, "temperature": 1.0, "seed": 3}
    got = []

    def reader():
        try:
            with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    got.append(line)
        except httpx.HTTPError:
            got.append("<closed>")

    t = threading.Thread(target=reader)
    t.start()
    deadline = time.time() + 30
    while not any(x.startswith("data:") for x in got) and time.time() < deadline:
        time.sleep(0.01)
    t0 = time.time()
    assert s.stop() == 0, "".join(s.log)
    t.join(timeout=30)
    assert not t.is_alive() and time.time() - t0 < 20
    assert any(x.startswith("data:") for x in got) and "Traceback" not in "".join(s.log)
    assert "stopped (SIGTERM)" in "".join(s.log)


def test_a_full_queue_is_503_with_retry_after(tiny):
    s = Served(tiny, "--max-queue", "1")
    try:
        body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 200, "stream": True, "temperature": 1.0, "seed": 5}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            busy = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
            assert busy.json()["error"]["code"] == "server_busy"
            assert sum(1 for line in r.iter_lines() if line.startswith("data:")) > 2
        deadline = time.time() + 30
        while s.metric("queue_depth") and time.time() < deadline:
            time.sleep(0.05)
        ok = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        assert s.stop() == 0


def test_an_impossible_budget_is_refused_before_serving(tiny):
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "serve", "-m", str(tiny), "--port", "0", "--memory-budget", "1MB"],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 2 and "serving" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgeinfer: ")


def test_a_taken_port_is_one_clear_error(served, tiny):
    port = served.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "serve", "-m", str(tiny), "--port", port],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"edgeinfer: cannot listen on 127.0.0.1:{port}")


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@contextlib.contextmanager
def _page(url: str):
    """The chat page at ``url`` in a real headless Chromium (playwright driving the system's browser)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium here (apt-get install chromium; make setup-test installs it as root)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').options.length > 0")
            yield page
        finally:
            browser.close()


def _ask(page, text: str, temperature: float, max_tokens: int) -> None:
    page.fill("#temperature", str(temperature))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


STATS_LINE = re.compile(r"\d+ tokens · TTFT \d+ ms · [\d.]+ tok/s(?: · [\d.]+ J/token \([\w-]+\))? · \d+ of \d+ prompt tokens cached")


def test_the_chat_page_in_chromium(served, local):
    """Ask on the page (Enter sends): the streamed answer is the API's at temperature 0, the stats line
    follows it, and a second question in the same chat reuses the cache."""
    with _page(served.url) as page:
        assert page.input_value("#model") == served.name
        _ask(page, "hello there", 0, 24)
        page.wait_for_selector(".assistant[data-done=complete]", timeout=60000)
        assert page.evaluate("messages[1].content") == _chat(local, [{"role": "user", "content": "hello there"}], 24)
        assert STATS_LINE.fullmatch(page.inner_text(".assistant .stats").strip())
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        _ask(page, "and then?", 0, 8)
        page.wait_for_selector(".assistant:nth-of-type(4)[data-done=complete]", timeout=60000)
        cached = int(re.search(r"(\d+) of \d+ prompt tokens cached", page.inner_text(".assistant:nth-of-type(4) .stats")).group(1))
        assert cached > 0
        assert page.inner_text("#error") == ""


@pytest.mark.slow
def test_smollm2_over_http_and_on_the_page(smollm2_package, tmp_path):
    """SmolLM2 answers the API, and on the page a long answer stops mid-way at Stop: the server's
    generation ends too, and the page takes the next question. The screenshot is the docs' picture."""
    s = Served(smollm2_package)
    try:
        r = s.client().chat.completions.create(model=s.name, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                               max_tokens=16, temperature=0)
        assert "Paris" in r.choices[0].message.content
        with _page(s.url) as page:
            _ask(page, "Write a Python function that reverses a string, with a short explanation.", 0, 160)
            page.wait_for_selector(".assistant[data-done=complete]", timeout=120000)
            assert page.locator(".assistant pre code").count() >= 1  # the answer's code block, rendered
            page.screenshot(path=str(tmp_path / "chat.png"))
            _ask(page, "Now tell me a very long story about a dragon.", 0.7, 400)
            page.wait_for_function("document.querySelectorAll('.assistant')[1].querySelector('.body').textContent.length > 20",
                                   timeout=60000)
            page.click("#stop")
            page.wait_for_selector(".assistant[data-done=stopped]", timeout=30000)
            assert "stopped" in page.inner_text(".assistant[data-done=stopped] .stats")
            deadline = time.time() + 30
            while s.metric("queue_depth") and time.time() < deadline:
                time.sleep(0.05)
            assert s.metric("queue_depth") == 0 and page.is_enabled("#send")
        assert (tmp_path / "chat.png").stat().st_size > 10000
    finally:
        assert s.stop() == 0


def test_the_readme_client_example_runs_against_the_server(served, tmp_path):
    from test_readme import README, python_blocks

    (code,) = [b for b in python_blocks(README.read_text(encoding="utf-8")) if "from openai import OpenAI" in b]
    assert '"http://127.0.0.1:8080/v1"' in code and 'model="smollm2-135m-instruct"' in code
    script = tmp_path / "client.py"
    script.write_text(code.replace("http://127.0.0.1:8080", served.url).replace("smollm2-135m-instruct", served.name))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()

