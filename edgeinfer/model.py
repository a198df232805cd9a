"""``edgeinfer.load(PKG)``: a package, its tokenizer and a backend, with generation on top."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import EdgeInferError
from .package import open_package
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamingDetokenizer, Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens found already in the KV cache (chat turns)
    prefill_seconds: float = 0.0
    ttft: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: str = ""
    # Set by an energy meter attached to the model (issue 7); None when no meter measured the answer.
    energy_joules: float | None = None
    energy_source: str = ""  # the meter's kind, e.g. "gpu-nvml", "model-estimate"
    speculative: object = None  # edgeinfer.speculative.SpecStats of a speculative run
    # R-Sparse: the share of the seven projections' input channels the decode steps skipped (None: dense,
    # or a backend that does not count them)
    realized_sparsity: float | None = None
    # The MoE expert cache over this answer (edgeinfer/backends/expert_cache.py): hits, misses, bytes read,
    # tokens and the most experts a layer touched in one step; None when every expert is resident.
    expert_cache: dict | None = None

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from prefill; the rest are decode steps
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok ({self.prefill_tps:.1f} tok/s), TTFT {self.ttft * 1000:.0f} ms, "
            f"decode {self.generated_tokens} tok at {self.decode_tps:.1f} tok/s, "
            f"peak memory {self.peak_memory_bytes / 2**20:.0f} MiB"
            + (f", {self.energy_joules:.2f} J ({self.energy_source})" if self.energy_joules is not None else "")
            + (f"; {self.speculative.line()}" if self.speculative is not None else "")
            + (f", sparsity {self.realized_sparsity:.1%} of channels skipped" if self.realized_sparsity is not None else "")
            + (", experts cached {capacity}/{experts} per layer: {hit_rate:.0%} hits, {bytes_per_token:,.0f} B/token read, "
               "at most {max_touched} experts a layer in one step".format(**self.expert_cache) if self.expert_cache else "")
        )


def _notice(msg: str) -> None:
    print(f"edgeinfer: {msg}", file=sys.stderr)


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    prefill_chunk: int = 512
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens
    # an edgeinfer.speculative.Speculator; None: the model's own (``Model.speculative``), False: plain decoding
    speculative: object = None


class Model:
    def __init__(self, path: str | Path, backend: str = "auto", verify: bool = False, **backend_opts):
        self.package = open_package(path, verify=verify)
        self.spec = self.package.spec
        self.tokenizer = Tokenizer(self.package.path, self.package.tokenizer_info)
        from .backends import choose_backend, open_backend

        if backend_opts.get("moe_top_k") is not None:  # refused here, not as a backend load failure
            from .moe import check_moe

            check_moe(self.spec, None, backend_opts["moe_top_k"])
        self.backend_name = choose_backend(self.package, backend, notice=_notice)
        if backend == "auto" and self.backend_name == "onnx" and backend_opts.get("kv_overflow") == "rotate":
            _notice("a rotating KV cache needs the MLX backend; running on MLX")
            self.backend_name = "mlx"
        # R-Sparse: ``sparsity`` is a level the package holds a plan for (edgeinfer sparsify); 0/None is dense.
        self.sparsity = float(backend_opts.pop("sparsity", None) or 0.0)
        if self.sparsity:
            backend_opts["sparsity_plan"] = self._sparsity_plan(self.sparsity)
        requested = dict(backend_opts)
        try:
            self.plan, backend_opts = self._plan_memory(backend_opts)
        except EdgeInferError:
            # ONNX Runtime holds every expert in memory; only MLX can cache the hot ones when they do not fit
            if backend != "auto" or self.backend_name != "onnx" or not self.spec.num_experts:
                raise
            self.backend_name = "mlx"
            self.plan, backend_opts = self._plan_memory(dict(requested))
            cached = getattr(self.plan, "expert_cache", None)
            _notice("the model does not fit the memory budget on ONNX Runtime, which holds every expert; running on MLX"
                    + (f" with {cached} experts per layer cached" if cached else ""))
        try:
            self.backend = open_backend(self.package, self.backend_name, notice=_notice, **backend_opts)
        except EdgeInferError as e:
            if backend != "auto" or self.backend_name != "onnx":
                raise
            # auto never fails for want of ONNX Runtime: a broken graph or a missing provider falls back
            _notice(f"{e}; running on MLX instead")
            self.backend_name = "mlx"
            requested.pop("providers", None)
            self.plan, backend_opts = self._plan_memory(requested)
            self.backend = open_backend(self.package, self.backend_name, notice=_notice, **backend_opts)
        self.cache = self.backend.new_cache(max_tokens=self.plan.context_tokens)
        self.cache_tokens: list[int] = []  # the token ids whose keys/values the cache holds
        self.stats = GenerationStats()
        # An energy meter (edgeinfer.energy): ``begin() -> mark``, ``end(mark) -> joules`` and ``source``.
        self.meter = None
        self.speculative = None  # the default Speculator of generations (edgeinfer.speculative)

    def _plan_memory(self, opts: dict):
        """The memory plan (``edgeinfer.memory``) for ``memory_budget``/``context``/``kv_overflow`` in
        ``opts``: it fixes the backend's options before loading, or refuses in one line."""
        from .memory import plan_for_model

        return plan_for_model(self.package, self.backend_name, opts)

    @property
    def name(self) -> str:
        return self.package.name

    # -- low level --------------------------------------------------------------------------------
    def logits(self, ids: list[int]):
        """Logits [len(ids), vocab] of a fresh forward pass over ids (as numpy float32)."""
        import numpy as np

        cache = self.backend.new_cache()
        return np.array(self.backend.forward(ids, cache)[0])

    def reset(self) -> None:
        self.cache.reset()
        self.cache_tokens = []

    def _sparsity_plan(self, level: float):
        from .sparse.plan import load_plan

        return load_plan(self.package, level) if level else None

    def set_sparsity(self, level: float | None) -> None:
        """Switches the R-Sparse level (0 or None: dense) without reloading the weights; the cache is cleared
        because its keys and values were computed under the old plan."""
        plan = self._sparsity_plan(float(level or 0.0))
        if not hasattr(self.backend, "set_sparsity"):
            raise EdgeInferError(f"the {self.backend_name} backend cannot switch sparsity levels; reload the model")
        self.backend.set_sparsity(plan)
        self.sparsity = float(level or 0.0)
        self.reset()

    def _prefill(self, ids: list[int], chunk: int):
        """Brings the cache to hold exactly ``ids``, reusing the longest common prefix already there;
        returns the logits of the last position. At least one token is always run."""
        common = 0
        limit = min(len(ids) - 1, len(self.cache_tokens), self.cache.offset)
        while common < limit and self.cache_tokens[common] == ids[common]:
            common += 1
        kept = self.cache.trim_to(common)
        common = common if kept is None else kept  # a ring cache may have to recompute
        self.cache_tokens = self.cache_tokens[:common]
        rest = ids[common:]
        logits = None
        for i in range(0, len(rest), chunk):
            part = rest[i : i + chunk]
            logits = self.backend.forward(part, self.cache, last_only=True)
            self.cache_tokens += part
        return logits[:, -1, :], common

    # -- generation -------------------------------------------------------------------------------
    def stream_ids(self, ids: list[int], config: GenerationConfig) -> Iterator[int]:
        """Yields generated token ids (EOS excluded); stats land in ``self.stats``."""
        import mlx.core as mx

        if not ids:
            raise EdgeInferError("the prompt is empty")
        rotating = getattr(self.cache, "rotating", False)  # the plan's context rolls over instead of refusing
        if len(ids) >= self.cache.max_tokens and not rotating:
            raise EdgeInferError(
                f"the prompt has {len(ids)} tokens; this model's context holds {self.cache.max_tokens} under its memory plan "
                f"(more with --context or --memory-budget, or --kv-overflow rotate to keep only the last tokens)"
            )
        sampler = Sampler(config.sampling)
        st = self.stats = GenerationStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        if hasattr(mx, "reset_peak_memory"):
            mx.reset_peak_memory()
        mark = self.meter.begin() if self.meter is not None else None
        counted = getattr(self.backend, "sparse_counts", None)  # (active, total) channels so far, or None
        sparse0 = counted() if counted else None
        ec0 = getattr(self.backend, "expert_cache_stats", None)
        last, st.reused_tokens = self._prefill(ids, config.prefill_chunk)
        history = list(ids)
        y = sampler(last, history)
        if isinstance(y, mx.array):
            mx.eval(y)
        t1 = time.perf_counter()
        st.prefill_seconds = st.ttft = t1 - t0
        room = config.max_tokens if rotating else self.cache.max_tokens - self.cache.offset
        budget = min(config.max_tokens, room)
        st.finish_reason = "length"
        spec = self.speculative if config.speculative is None else config.speculative
        try:
            if spec:
                yield from spec.decode(self, y, history, budget, config, st)
                return
            for n in range(budget):
                tok = y.item()
                if tok in self.tokenizer.eos_token_ids and not config.ignore_eos:
                    st.finish_reason = "stop"
                    break
                st.generated_tokens += 1
                history.append(tok)
                if n + 1 < budget:
                    # Queue the next step before handing this token out, so the device works while
                    # the caller prints (mlx-lm's double buffering).
                    logits = self.backend.forward([tok], self.cache, lazy=True)
                    self.cache_tokens.append(tok)
                    y = sampler(logits[:, -1, :], history)
                    if isinstance(y, mx.array):
                        mx.async_eval(y)
                yield tok
        finally:
            st.decode_seconds = time.perf_counter() - t1
            if room <= config.max_tokens and st.finish_reason == "length":
                st.finish_reason = "context"
            mem = mx.get_peak_memory() if hasattr(mx, "get_peak_memory") else 0
            st.peak_memory_bytes = max(mem, peak_rss_bytes())
            if self.meter is not None:
                st.energy_joules, st.energy_source = self.meter.end(mark), self.meter.source
            sparse1 = counted() if counted else None
            ec1 = getattr(self.backend, "expert_cache_stats", None)
            if ec0 and ec1:  # this answer's share of the cache's counters
                d = {k: ec1[k] - ec0[k] for k in ("hits", "misses", "bytes_read", "tokens")}
                n = d["hits"] + d["misses"]
                st.expert_cache = {**ec1, **d, "hit_rate": d["hits"] / n if n else 0.0,
                                   "bytes_per_token": d["bytes_read"] / d["tokens"] if d["tokens"] else 0.0}
            if sparse0 is not None and sparse1 is not None and sparse1[1] > sparse0[1]:
                st.realized_sparsity = 1.0 - (sparse1[0] - sparse0[0]) / (sparse1[1] - sparse0[1])

    def stream_text(self, ids: list[int], config: GenerationConfig) -> Iterator[str]:
        """Yields text deltas; honours stop strings (the text before the first stop string is kept)."""
        detok = StreamingDetokenizer(self.tokenizer)
        stops = [s for s in config.stop if s]
        hold = max((len(s) for s in stops), default=0)
        pending = ""
        gen = self.stream_ids(ids, config)
        for tok in gen:
            pending += detok.add(tok)
            if stops:
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    if pending[:cut]:
                        yield pending[:cut]
                    self.stats.finish_reason = "stop"
                    gen.close()
                    return
                safe = len(pending) - (hold - 1)
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
            elif pending:
                yield pending
                pending = ""
        pending += detok.flush()
        if pending:
            yield pending

    def _ids(self, prompt: str | list[dict], chat: bool | None) -> list[int]:
        if isinstance(prompt, list):
            return self.tokenizer.encode_chat(prompt)
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def stream(self, prompt: str | list[dict], max_tokens: int = 256, chat: bool = False, stop=(), **sampling) -> Iterator[str]:
        """Streams the continuation of ``prompt`` (a string, or chat messages)."""
        config = GenerationConfig(max_tokens=max_tokens, sampling=SamplingParams(**sampling), stop=list(stop))
        yield from self.stream_text(self._ids(prompt, chat), config)

    def generate(self, prompt: str | list[dict], max_tokens: int = 256, chat: bool = False, stop=(), **sampling) -> str:
        return "".join(self.stream(prompt, max_tokens=max_tokens, chat=chat, stop=stop, **sampling))


def load(path: str | Path, backend: str = "auto", **opts) -> Model:
    """Loads an edgeinfer package folder."""
    return Model(path, backend=backend, **opts)
