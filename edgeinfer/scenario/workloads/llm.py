"""An edgeinfer package as a scenario model (``llm``): one streamed answer per job.

The prompt comes from upstream: a voice assistant's question (the VAD's speech end carries the
question that was spoken), or the text a camera read (``prompt`` template, default "Summarize ...").
A periodic LLM with no upstream asks questions from the fixed list, chosen by (seed, frame).

Each job is a chat turn, streamed token by token with the time of every token; it stops at EOS, at
``max_tokens``, or at the job's deadline, whichever comes first. The KV cache keeps the common
prefix of consecutive prompts (the chat template's system part), as a chat app would.

A package without a chat template gets edgeinfer's plain "User: ... Assistant:" format, and then
stops where the model starts the user's next line (``stop``, default "\nUser:").

Quality per answer: 1 when it is non-empty and fluent, else 0. Fluent means no loop: no word
trigram (lower-cased) occurs three times or more, and no 8-character sequence four times or more
(a loop without spaces, such as a run of digits). This is a floor, not a grader: it catches the
empty and degenerate answers that aggressive quantization or sparsity produce.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import EdgeInferError
from ..inputs import QUESTIONS
from ..workload import FrameResult, register_workload
from ._common import check_options, option

SUMMARY_PROMPT = "Summarize this text in one short sentence: {text}"


def fluent(text: str) -> bool:
    """Non-empty and free of repetition loops (see the module's docstring)."""
    words = text.lower().split()
    if not words:
        return False
    grams = Counter(zip(words, words[1:], words[2:]))
    chars = Counter(text[i : i + 8] for i in range(len(text) - 7))
    return max(grams.values(), default=0) < 3 and max(chars.values(), default=0) < 4


@register_workload("llm")
class LLMWorkload:
    kind = "llm"

    def __init__(self, model, scenario):
        self.name, self.kind = model.name, model.kind
        self.source = scenario.source
        check_options(model, scenario, {"backend", "sparsity", "memory_budget", "context", "prompt", "system",
                                        "temp", "seed", "stop"})
        if not model.package:
            raise EdgeInferError(f"{scenario.source}: models.{model.name}.package: missing (an edgeinfer package "
                                 f"folder, or a catalog name converted into models/)")
        self.path = Path(model.package)
        self.backend = option(model, scenario, "backend", "auto", str)
        self.sparsity = option(model, scenario, "sparsity", None, (int, float))
        self.memory_budget = option(model, scenario, "memory_budget", None, (str, int))
        self.context = int(option(model, scenario, "context", 1024, int))
        self.system = option(model, scenario, "system", None, str)
        self.temp = float(option(model, scenario, "temp", 0.0, (int, float)))
        self.seed = int(option(model, scenario, "seed", scenario.seed, int))
        self.max_tokens = int(model.max_tokens or 32)
        upstream = scenario.model(model.after).kind if model.after else None
        if upstream == "silero-vad" and model.when != "trigger":
            raise EdgeInferError(f"{scenario.source}: models.{model.name}.when: an LLM after a VAD answers when speech "
                                 f"ends: set when = \"trigger\" (the VAD's other frames carry no question)")
        default = SUMMARY_PROMPT if upstream in ("ocr-rec", "ocr-det") else "{text}"
        self.template = option(model, scenario, "prompt", default, str)
        if "{text}" not in self.template and model.after:
            raise EdgeInferError(f"{scenario.source}: models.{model.name}.prompt: must contain {{text}}, where the "
                                 f"upstream model's output goes")
        self.stop = option(model, scenario, "stop", None, list)
        if self.stop is not None and not all(isinstance(x, str) and x for x in self.stop):
            raise EdgeInferError(f"{scenario.source}: models.{model.name}.stop: expected a list of non-empty strings")
        self.scenario_seed = scenario.seed
        self.model = None

    def _package(self):
        from ...package import open_package

        if not (self.path / "manifest.json").is_file():
            raise EdgeInferError(f"{self.source}: models.{self.name}.package: {self.path} is not an edgeinfer package "
                                 f"(no manifest.json); convert one with `edgeinfer convert`")
        return open_package(self.path)

    def memory_bytes(self) -> int:
        """The memory planner's estimate for this package at this context, without the process itself:
        the plan ``load`` will make (the same budget, so the same choices of weight and KV precision)."""
        from ...backends import choose_backend
        from ...memory import plan_memory

        pkg = self._package()
        backend = choose_backend(pkg, self.backend)
        sparse = None
        if self.sparsity:  # the plan's factors and, on ONNX, the input-major layout count too
            from ...sparse.plan import load_plan

            sparse = load_plan(pkg, float(self.sparsity))
        plan = plan_memory(pkg, budget=self.memory_budget, context=self.context, backend=backend, baseline=0,
                           sparsity_plan=sparse)
        return int(plan.total_bytes)

    def load(self, threads: int | None) -> None:
        import edgeinfer
        from ...backends import choose_backend

        opts: dict[str, Any] = {"context": self.context}
        if self.memory_budget is not None:
            opts["memory_budget"] = self.memory_budget
        if self.sparsity:
            opts["sparsity"] = float(self.sparsity)
        if threads and choose_backend(self._package(), self.backend) == "onnx":
            opts["threads"] = int(threads)
        self.model = edgeinfer.load(self.path, backend=self.backend, **opts)
        if self.stop is None:
            self.stop = [] if self.model.tokenizer.chat_template else ["\nUser:"]
        self.run("Hello", 10.0, max_tokens=2)  # warm-up: first-call allocations and graph planning

    def input(self, frame: int, upstream: Any) -> str:
        if upstream is None:
            rng = np.random.default_rng([self.scenario_seed, zlib.crc32(self.name.encode()), frame])
            return QUESTIONS[int(rng.integers(len(QUESTIONS)))]
        text = upstream.get("text") if isinstance(upstream, dict) else upstream
        if not isinstance(text, str):
            raise EdgeInferError(f"models.{self.name}: the upstream model gave no text to answer "
                                 f"({type(upstream).__name__})")
        return self.template.replace("{text}", text)

    def run(self, inp: str, deadline_s: float, max_tokens: int | None = None) -> FrameResult:
        from ...model import GenerationConfig
        from ...sampling import SamplingParams
        from ...tokenizer import StreamingDetokenizer

        m = self.model
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": inp}]
        ids = m.tokenizer.encode_chat(messages)
        config = GenerationConfig(max_tokens=max_tokens or self.max_tokens,
                                  sampling=SamplingParams(temp=self.temp, seed=self.seed))
        detok = StreamingDetokenizer(m.tokenizer)
        text, times = "", []
        t0 = time.perf_counter()
        gen = m.stream_ids(ids, config)
        finish = None
        for tok in gen:
            now = time.perf_counter() - t0
            times.append(now)
            text += detok.add(tok)
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                gen.close()
                break
            if now >= deadline_s:
                finish = "deadline"
                gen.close()
                break
        else:
            text += detok.flush()
        finish = finish or m.stats.finish_reason
        text = text.strip()
        good = fluent(text)
        return FrameResult(ok=good, output={"text": text, "prompt": inp, "finish": finish}, trigger=bool(text),
                           quality=float(good), ttft=times[0] if times else None, tokens=len(times),
                           token_times=times)

    def close(self) -> None:
        self.model = None
