"""``edgeinfer serve``: an OpenAI-compatible HTTP server for one model, on starlette + uvicorn.

    POST /v1/chat/completions, POST /v1/completions   streaming (SSE, ``data: [DONE]``) or not
    GET  /v1/models, GET /health, GET /metrics        (Prometheus text)
    GET  /                                            a chat page (apps/static/chat.html, self-contained)

One model per server. Generations run one at a time on a single worker thread (the model and its KV
cache are not thread-safe); requests wait their turn in arrival order. The model keeps the previous
answer's cache, so a request that extends the last conversation prefills only its new tokens
(``usage.prompt_tokens_details.cached_tokens`` says how many were reused). A client that disconnects
stops its generation at the next token. Errors are OpenAI's JSON (``{"error": {"message", "type",
"param", "code"}}``) with the status a client expects, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgeinfer.errors import EdgeInferError

MAX_BODY_BYTES = 4 << 20
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and code, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after: int | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.retry_after = status, param, code, kind, retry_after


@dataclass
class Metrics:
    requests: dict = field(default_factory=dict)  # (endpoint, status) -> count
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft: list = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))
    ttft_sum: float = 0.0
    decode_seconds: float = 0.0
    queued: int = 0

    def count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def text(self, model) -> str:
        lines = ["# HELP edgeinfer_requests_total HTTP requests by endpoint and status.",
                 "# TYPE edgeinfer_requests_total counter"]
        for (ep, status), n in sorted(self.requests.items()):
            lines.append(f'edgeinfer_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
        for name, v, what in (("prompt_tokens_total", self.prompt_tokens, "prompt tokens of finished requests"),
                              ("cached_prompt_tokens_total", self.cached_tokens, "prompt tokens reused from the KV cache"),
                              ("completion_tokens_total", self.completion_tokens, "generated tokens"),
                              ("decode_seconds_total", round(self.decode_seconds, 6), "seconds spent decoding")):
            lines += [f"# HELP edgeinfer_{name} {what[0].upper() + what[1:]}.", f"# TYPE edgeinfer_{name} counter",
                      f"edgeinfer_{name} {v}"]
        lines += ["# HELP edgeinfer_ttft_seconds Time to the first token.", "# TYPE edgeinfer_ttft_seconds histogram"]
        cum = 0
        for le, n in zip(TTFT_BUCKETS + ("+Inf",), self.ttft):
            cum += n
            lines.append(f'edgeinfer_ttft_seconds_bucket{{le="{le}"}} {cum}')
        lines += [f"edgeinfer_ttft_seconds_sum {round(self.ttft_sum, 6)}", f"edgeinfer_ttft_seconds_count {cum}",
                  "# HELP edgeinfer_queue_depth Requests waiting for or running a generation.",
                  "# TYPE edgeinfer_queue_depth gauge", f"edgeinfer_queue_depth {self.queued}"]
        from edgeinfer.model import peak_rss_bytes

        lines += ["# HELP edgeinfer_peak_rss_bytes Peak resident memory of the server process.",
                  "# TYPE edgeinfer_peak_rss_bytes gauge", f"edgeinfer_peak_rss_bytes {peak_rss_bytes()}"]
        return "\n".join(lines) + "\n"


# -- request parsing -----------------------------------------------------------------------------------
def _number(body: dict, name: str, default, lo=None, hi=None, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(400, f"'{name}' must be between {lo} and {hi}, not {v}", name)
    return v


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones here
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise RequestError(400, f"{where}: only text content parts are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise RequestError(400, f"{where}: 'content' must be a string or a list of text parts", "messages")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(400, f"messages[{i}] needs a 'role' of system, user or assistant", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_content(m.get("content"), f"messages[{i}]")})
    return out


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    return [s for s in stop if s]


@dataclass
class Job:
    """One generation: what to run, and what the worker reports back."""

    ids: list
    config: object
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: dict = field(default_factory=dict)


class Server:
    def __init__(self, model, name: str | None = None, max_body: int = MAX_BODY_BYTES, max_queue: int = 16):
        self.model = model
        # the package's folder name (models/NAME): what -m takes, and what a client can type
        self.name = name or Path(model.package.path).name
        self.aliases = {self.name, model.name}
        self.max_body = max_body
        self.max_queue = max_queue  # requests waiting or running; past it, 503 with a Retry-After
        self.metrics = Metrics()
        self.busy_seconds: list[float] = []  # recent requests' time on the worker, for Retry-After
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeinfer-generate")
        self.created = int(time.time())

    # -- the worker thread -------------------------------------------------------------------------
    def _run(self, job: Job, emit) -> None:
        """On the worker thread: streams the job's text through ``emit(kind, value)``."""
        if job.cancel.is_set():  # its client left while it waited
            emit("done", None)
            return
        m = self.model
        try:
            gen = m.stream_text(job.ids, job.config)
            try:
                for delta in gen:
                    emit("delta", delta)
                    if job.cancel.is_set():
                        break
            finally:
                gen.close()
            s = m.stats
            job.stats = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
                         "cached_tokens": s.reused_tokens, "finish_reason": s.finish_reason,
                         "ttft": s.ttft, "decode_seconds": s.decode_seconds, "decode_tps": s.decode_tps,
                         "joules": s.energy_joules, "energy_source": s.energy_source}
            emit("done", None)
        except EdgeInferError as e:
            emit("error", RequestError(400, str(e)))
        except Exception as e:  # noqa: BLE001 - reported to the client as a 500, the server keeps serving
            emit("error", RequestError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error"))

    async def generate(self, job: Job):
        """Yields the job's text deltas as the worker produces them; cancels the job if the consumer
        stops early (a client that disconnected)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind, value):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                job.cancel.set()

        if self.metrics.queued >= self.max_queue:
            recent = self.busy_seconds[-16:]
            wait = max(1, round(self.metrics.queued * (sum(recent) / len(recent) if recent else 1.0)))
            raise RequestError(503, f"the server is busy: {self.metrics.queued} requests are queued (at most {self.max_queue}); "
                               f"retry in about {wait} s", code="server_busy", kind="server_error", retry_after=wait)
        self.metrics.queued += 1
        self.pool.submit(self._run, job, emit)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            job.cancel.set()
            self.metrics.queued -= 1
        st = job.stats
        if st:
            self.busy_seconds = self.busy_seconds[-63:] + [st["ttft"] + st["decode_seconds"]]
        if st:
            mt = self.metrics
            mt.prompt_tokens += st["prompt_tokens"]
            mt.cached_tokens += st["cached_tokens"]
            mt.completion_tokens += st["completion_tokens"]
            mt.decode_seconds += st["decode_seconds"]
            mt.ttft_sum += st["ttft"]
            mt.ttft[next((i for i, b in enumerate(TTFT_BUCKETS) if st["ttft"] <= b), len(TTFT_BUCKETS))] += 1

    # -- requests ----------------------------------------------------------------------------------
    def job(self, body: dict, chat: bool) -> Job:
        from edgeinfer.model import GenerationConfig
        from edgeinfer.sampling import SamplingParams

        model = body.get("model")
        if model is not None and model not in self.aliases:
            raise RequestError(404, f"the model '{model}' does not exist; this server has '{self.name}'", "model",
                               "model_not_found")
        if _number(body, "n", 1, 1, 1, integer=True) != 1:
            raise RequestError(400, "'n' must be 1", "n")
        for name in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias"):
            if body.get(name) not in (None, False, [], {}):
                raise RequestError(400, f"'{name}' is not supported by this server", name)
        fmt = body.get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise RequestError(400, "'response_format' other than text is not supported by this server", "response_format")
        tok = self.model.tokenizer
        if chat:
            ids = tok.encode_chat(_messages(body))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
            ids = tok.encode(prompt)
        context = self.model.cache.max_tokens
        room = context - len(ids)
        if room < 1:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this model's context holds {context}", "messages"
                               if chat else "prompt", "context_length_exceeded")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": limit}, "max_tokens", room, 1, None, integer=True)
        if max_tokens > room:
            raise RequestError(400, f"max_tokens is {max_tokens}, but the prompt's {len(ids)} tokens leave {room} of this "
                               f"model's {context}-token context", "max_tokens", "context_length_exceeded")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, "'seed' must be an integer", "seed")
        sampling = SamplingParams(temp=float(_number(body, "temperature", 1.0, 0, 2)),
                                  top_p=float(_number(body, "top_p", 1.0, 0, 1)), seed=seed)
        if sampling.top_p <= 0:
            raise RequestError(400, "'top_p' must be above 0", "top_p")
        return Job(ids=ids, config=GenerationConfig(max_tokens=max_tokens, sampling=sampling, stop=_stops(body)))


def _finish(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"


def _usage(st: dict) -> dict:
    return {"prompt_tokens": st.get("prompt_tokens", 0), "completion_tokens": st.get("completion_tokens", 0),
            "total_tokens": st.get("prompt_tokens", 0) + st.get("completion_tokens", 0),
            "prompt_tokens_details": {"cached_tokens": st.get("cached_tokens", 0)}}


def _timing(st: dict, backend: str) -> dict:
    """edgeinfer's own figures of an answer, beside OpenAI's fields (clients ignore what they do not know)."""
    n, j = st.get("completion_tokens", 0), st.get("joules")
    return {"ttft_ms": round(1000 * st.get("ttft", 0.0), 1), "decode_tokens_per_second": round(st.get("decode_tps", 0.0), 2),
            "joules": None if j is None else round(j, 4), "joules_per_token": None if j is None or not n else round(j / n, 5),
            "energy_source": st.get("energy_source") or None, "backend": backend}


PAGE = Path(__file__).resolve().parent / "static" / "chat.html"


def build_app(server: Server):
    """The starlette application around ``server``."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: RequestError, endpoint: str) -> JSONResponse:
        server.metrics.count(endpoint, e.status)
        return JSONResponse({"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers={"Retry-After": str(e.retry_after)} if e.retry_after else None)

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > server.max_body:
            raise RequestError(413, f"the request body is larger than {server.max_body} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > server.max_body:
                raise RequestError(413, f"the request body is larger than {server.max_body} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return data

    def completion_handler(chat: bool):
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, reason: str | None, delta: bool) -> dict:
            if chat:
                body = {"delta": {} if text is None else {"content": text}} if delta else \
                    {"message": {"role": "assistant", "content": text}}
            else:
                body = {"text": text or "", "logprobs": None}
            return {"index": 0, **body, "finish_reason": reason}

        async def handle(request: Request):
            try:
                body = await read_json(request)
                job = server.job(body, chat)
            except RequestError as e:
                return error(e, endpoint)
            except ClientDisconnect:
                return PlainTextResponse("", status_code=499)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            head = {"id": rid, "created": int(time.time()), "model": server.name}
            if not body.get("stream"):
                try:
                    text = "".join([d async for d in server.generate(job)])
                except RequestError as e:
                    return error(e, endpoint)
                server.metrics.count(endpoint, 200)
                return JSONResponse({**head, "object": kind, "choices": [choice(text, _finish(job.stats.get("finish_reason")), False)],
                                     "usage": _usage(job.stats), "edgeinfer": _timing(job.stats, server.model.backend_name)})
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"

            def event(obj) -> str:
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

            # the first delta is awaited before the headers go out, so that a refusal (503 when the queue is
            # full) or an error before any text still gets its own status
            deltas = server.generate(job)
            try:
                first = [await deltas.__anext__()]
            except StopAsyncIteration:
                first = []
            except RequestError as e:
                return error(e, endpoint)

            async def events():
                try:
                    if chat:
                        yield event({**head, "object": chunk_kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                                                 "finish_reason": None}]})
                    for delta in first:
                        yield event({**head, "object": chunk_kind, "choices": [choice(delta, None, True)]})
                    async for delta in deltas:
                        yield event({**head, "object": chunk_kind, "choices": [choice(delta, None, True)]})
                    yield event({**head, "object": chunk_kind, "choices": [choice(None, _finish(job.stats.get("finish_reason")), True)],
                                 "edgeinfer": _timing(job.stats, server.model.backend_name)})
                    if include_usage:
                        yield event({**head, "object": chunk_kind, "choices": [], "usage": _usage(job.stats)})
                    yield "data: [DONE]\n\n"
                    server.metrics.count(endpoint, 200)
                except RequestError as e:  # after the headers: the error goes in the stream, as OpenAI's does
                    server.metrics.count(endpoint, e.status)
                    yield event({"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}})
                finally:
                    await deltas.aclose()  # a client that left: the worker stops at its next token

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        return handle

    async def models(request: Request):
        server.metrics.count("/v1/models", 200)
        return JSONResponse({"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                                         "owned_by": "edgeinfer"}]})

    async def page(request: Request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": server.name, "backend": server.model.backend_name})

    async def metrics(request: Request):
        return PlainTextResponse(server.metrics.text(server.model), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc):
        return JSONResponse({"error": {"message": f"no route {request.method} {request.url.path}",
                                       "type": "invalid_request_error", "param": None, "code": "not_found"}},
                            status_code=getattr(exc, "status_code", 404))

    routes = [Route("/", page, methods=["GET"]),
              Route("/v1/chat/completions", completion_handler(True), methods=["POST"]),
              Route("/v1/completions", completion_handler(False), methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def serve(model, host: str = "127.0.0.1", port: int = 8080, max_body: int = MAX_BODY_BYTES, max_queue: int = 16,
          quiet: bool = False) -> int:
    """Runs the server until SIGINT/SIGTERM; in-flight requests get a few seconds to finish."""
    import socket
    import sys

    import uvicorn

    server = Server(model, max_body=max_body, max_queue=max_queue)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bound here, so that a taken port is one plain error rather than uvicorn's log and exit
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EdgeInferError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(server), log_level="warning" if quiet else "info",
                            timeout_graceful_shutdown=5, access_log=not quiet)
    print(f"edgeinfer: serving {server.name} ({model.backend_name}) on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it found: this one,
    # so that a stop by a service manager is a clean exit rather than a death by signal
    terminated: list = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: terminated.append(sig)) if main else None
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.pool.shutdown(wait=False, cancel_futures=True)
        sock.close()
        if main:
            signal.signal(signal.SIGTERM, previous)
    if terminated:
        print("edgeinfer: stopped (SIGTERM)", file=sys.stderr)
    return 0
