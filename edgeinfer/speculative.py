"""Speculative decoding: a cheap drafter proposes tokens, the target model checks all of them in one
forward pass, and the KV cache is rolled back to what was accepted.

Drafters: another package with the same tokenizer (``DraftModel``, with its own KV cache), or prompt
lookup (``NgramDraft``: the continuations of earlier occurrences of the context's last n-gram, as
llama.cpp's lookup decoding and transformers' ``prompt_lookup_num_tokens`` do). Shapes: a chain of N
tokens, or a tree WIDTH x DEPTH (WIDTH candidates per depth: the draft model's best-scoring nodes, or
up to WIDTH distinct n-gram continuations), verified with a tree attention mask and per-node positions.

Prompt lookup backs off where its drafts do not pay (``Backoff``): after a step whose draft had no token
accepted, found nothing to look up, or took longer than plain steps for the tokens it gave, it drafts
nothing for 1, 2, 4, ... up to 16 steps (longer after a step that lost more than a plain step's time: that
loss is paid back at 2% of the plain steps after it), which are then plain one-token steps; a step that
pays ends the back-off. Text it cannot predict then decodes within a few percent of plain decoding.

Acceptance keeps the target's output exact. Greedy: a drafted token is kept while it is the target's
argmax, so the output is plain greedy decoding's. Sampling: the rule of Leviathan et al. and Chen et al.
(2023), taken over several candidates per node as SpecInfer does: candidate c proposed from q is accepted
with probability min(1, p(c)/q(c)); on rejection p becomes norm(max(0, p - q)) and the next candidate is
tried; when none is left a token is drawn from p. Deterministic proposals (n-gram, the draft's top-W tree
children) have a one-hot q. p and q go through the same temperature / top-k / top-p / min-p / repetition
penalty, with the history each position would have had.

"Identical" assumes the target computes a token's logits the same in a multi-token pass as in a one-token
step: true on MLX and on the ONNX backend's exact graph (accuracy level 1), not quite on its fast graph,
whose int8 activations round differently in the two (SmolLM2: up to 0.86 on logits of scale 29), so a
near-tie there may go the other way than in plain decoding.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgeInferError
from .sampling import SamplingParams

MAX_DRAFT = 64  # drafted tokens per verification: a sliding-window ring keeps this much slack for rollback


# -- the sampling distribution, in numpy -----------------------------------------------------------
def filtered_logits(row: np.ndarray, sp: SamplingParams, history: list[int]) -> np.ndarray:
    """The logits ``Sampler`` samples from (float64, -inf where filtered out): repetition penalty, then
    for temp > 0 temperature, top-k, min-p and top-p, in Sampler's order."""
    x = np.array(row, dtype=np.float64).reshape(-1)
    if sp.repetition_penalty != 1.0 and history:
        ids = np.asarray(history[-sp.repetition_context:], np.int64)
        ids = ids[ids < len(x)]
        picked = x[ids]
        x[ids] = np.where(picked > 0, picked / sp.repetition_penalty, picked * sp.repetition_penalty)
    if sp.temp == 0:
        return x
    x = x / sp.temp
    if sp.top_k and sp.top_k < len(x):
        kth = np.sort(x)[-sp.top_k]
        x[x < kth] = -np.inf
    if sp.min_p > 0:
        logp = x - _logsumexp(x)
        x[logp < logp.max() + np.log(sp.min_p)] = -np.inf
    if sp.top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        probs = _softmax(x[order])
        before = np.cumsum(probs) - probs  # mass strictly above each token
        x[order[before >= sp.top_p]] = -np.inf
    return x


def probabilities(row: np.ndarray, sp: SamplingParams, history: list[int]) -> np.ndarray:
    return _softmax(filtered_logits(row, sp, history))


def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# -- drafts ----------------------------------------------------------------------------------------
@dataclass
class Draft:
    """Drafted tokens in breadth-first order. ``parents[i]`` is the index of node i's parent, -1 for a
    child of the root (the last token, not yet in the target's cache); ``q[i]`` the distribution node i
    was sampled from, or None for a deterministic pick (one-hot q)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, q=None) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.q.append(q)
        return len(self.tokens) - 1

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> np.ndarray:
        d = np.zeros(len(self), np.int64)
        for i, p in enumerate(self.parents):
            d[i] = 1 if p < 0 else d[p] + 1
        return d

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def visible(self, with_root: bool = True) -> np.ndarray:
        """[n, n] (or [n+1, n+1] with the root first): which nodes each node sees (ancestors and itself)."""
        n, o = len(self), int(with_root)
        v = np.zeros((n + o, n + o), bool)
        if with_root:
            v[:, 0] = True
        for i, p in enumerate(self.parents):
            v[i + o, i + o] = True
            if p >= 0:
                v[i + o] |= v[p + o]
        return v


def parse_tree(spec: str) -> tuple[int, int]:
    """'WIDTHxDEPTH' -> (width, depth)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(spec))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise EdgeInferError(f"--tree takes WIDTHxDEPTH with both at least 1, e.g. 2x4; not {spec!r}")
    w, d = int(m.group(1)), int(m.group(2))
    if w * d > MAX_DRAFT:
        raise EdgeInferError(f"--tree {w}x{d} drafts {w * d} tokens per step; at most {MAX_DRAFT}")
    return w, d


class NgramDraft:
    """Prompt lookup: the tokens that followed the most recent earlier occurrences of the context's last
    n tokens (the longest n from ``max_n`` down to ``min_n`` that occurred before). A tree merges up to
    ``width`` distinct continuations into a trie.

    A continuation found by a shorter n-gram is drafted shorter (``depth * n / max_n`` tokens, at least
    one): single-token matches are common in prose and rarely right for long, and every drafted token
    costs the verification pass compute (measured on SmolLM2, a chat answer: 8 tokens drafted from any
    match made decoding 28% slower, for 4 of 145 accepted)."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def continuations(self, context: list[int], count: int, length: int) -> list[list[int]]:
        arr = np.asarray(context, np.int64)
        out: list[list[int]] = []
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(arr) <= n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # starts 0 .. len-1-n
            hits = np.nonzero((windows == arr[-n:]).all(axis=1))[0]
            take = max(1, length * n // self.max_n)
            for i in hits[::-1]:  # the most recent first
                cont = arr[i + n : i + n + take].tolist()
                if cont and not any(c[: len(cont)] == cont for c in out):  # nothing new for the trie
                    out.append(cont)
                    if len(out) == count:
                        return out
        return out

    def propose(self, context: list[int], width: int, depth: int, tree: bool, sp: SamplingParams, rng) -> Draft:
        d = Draft()
        nodes: dict[tuple, int] = {}
        conts = self.continuations(context, width if tree else 1, depth)
        # breadth first: every node's parent comes before it
        for level in range(depth):
            for c in conts:
                if level < len(c):
                    key = tuple(c[: level + 1])
                    if key not in nodes:
                        nodes[key] = d.add(c[level], nodes[key[:-1]] if level else -1)
        return d


class Backoff:
    """When to draft, for prompt lookup. A step that drafts and misses pauses drafting: for 1 step, then 2,
    4, ... ``max_pause`` after each further miss in a row; a hit ends the pause for good. llama.cpp's
    n-gram drafters do the like (a minimum draft, a reset after a run of low acceptance).

    A miss is a draft with no token accepted, nothing to draft from, or a step that took longer than plain
    decoding would have for the tokens it gave (its time against that many plain steps, whose time is an
    average of the steps that did not draft). Where verifying is a little dearer than a one-token step
    (MLX: 1.3x for 2 tokens, 1.8x for 5), the doubling pauses alone keep rejected drafts to a few percent.
    A step that lost more than a whole plain step's time is paid back as well: the pause lasts until the
    plain steps after it add up to 1/``cost_share`` times the loss. That bounds the cost where a
    verification pass is much dearer than a step (the ONNX backend's one-token steps are the native
    step's, a verification is a graph run: 10-15x a step for SmolLM2 on 2 busy cores). The first
    ``warmup`` steps do not draft, to time plain steps first. ``cost_share=None``: misses by acceptance
    only (deterministic). A Speculator keeps its Backoff from one answer to the next (chat turns, bench
    repetitions), so that a loss learned in one is not paid again in the next."""

    def __init__(self, max_pause: int = 16, cost_share: float | None = 0.02, max_wait: int = 4096, warmup: int = 2):
        self.max_pause, self.cost_share, self.max_wait = max_pause, cost_share, max_wait
        self.misses = 0  # in a row
        self.wait = warmup if cost_share else 0  # steps left without drafting
        self.step_seconds: float | None = None  # a plain step, averaged

    def drafting(self) -> bool:
        """Whether this step drafts; a step that does not counts down the pause."""
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def plain(self, seconds: float) -> None:
        """A step that drafted nothing took ``seconds``."""
        t = self.step_seconds
        self.step_seconds = seconds if t is None else 0.7 * t + 0.3 * seconds

    def record(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """The outcome of a step that drafted (``drafted`` may be 0: nothing matched) and took ``seconds``."""
        if drafted == 0 and seconds is not None:
            self.plain(seconds)
            seconds = None
        lost = 0.0
        if seconds is not None and self.cost_share and self.step_seconds:
            lost = seconds - (accepted + 1) * self.step_seconds  # against plain decoding of the same tokens
        if accepted > 0 and lost <= 0:
            self.misses = 0
            return
        self.misses += 1
        self.wait = min(1 << (self.misses - 1), self.max_pause)
        if lost > 0 and lost > self.step_seconds:
            self.wait = max(self.wait, min(self.max_wait, math.ceil(lost / (self.cost_share * self.step_seconds))))


class DraftModel:
    """Another package as the drafter: it runs on the target's backend with its own KV cache, which is
    brought to the target's context (reusing the common prefix) before every draft."""

    def __init__(self, path: str | Path, target, **opts):
        from .model import Model

        self.model = Model(path, backend=target.backend_name, context=target.cache.max_tokens, **opts)
        self.name = str(path)
        check_same_tokenizer(target, self.model)
        self.vocab = target.spec.vocab_size

    def _rows(self, logits) -> np.ndarray:
        rows = np.asarray(logits, dtype=np.float32).reshape(-1, np.shape(logits)[-1])
        n = self.vocab
        if rows.shape[1] >= n:  # a padded embedding: ids past the tokenizer never come up
            return rows[:, :n]
        return np.concatenate([rows, np.full((len(rows), n - rows.shape[1]), -np.inf, np.float32)], axis=1)

    def _sync(self, context: list[int]) -> np.ndarray:
        m = self.model
        last, _ = m._prefill(context, 512)
        return self._rows(last)[0]

    def propose(self, context: list[int], width: int, depth: int, tree: bool, sp: SamplingParams, rng) -> Draft:
        m, d = self.model, Draft()
        row = self._sync(context)
        if not tree:  # a chain: sampled from q when sampling, the argmax when greedy
            hist = list(context)
            for i in range(depth):
                if sp.temp == 0:
                    tok, q = int(np.argmax(filtered_logits(row, sp, hist))), None
                else:
                    q = probabilities(row, sp, hist)
                    tok = int(rng.choice(len(q), p=q))
                d.add(tok, i - 1, q)
                hist.append(tok)
                if i + 1 < depth:
                    row = self._rows(m.backend.forward([tok], m.cache, last_only=True))[0]
                    m.cache_tokens.append(tok)
            return d
        # A tree: per depth, the ``width`` best nodes by the draft's cumulative log-probability among
        # the top-``width`` children of the previous depth's nodes; each depth is one draft forward.
        base = m.cache.offset
        frontier, rows = [(-1, 0.0)], [row]
        paths = {-1: []}
        for level in range(depth):
            cands = []
            for (node, score), r in zip(frontier, rows):
                hist = list(context) + paths[node]
                logp = filtered_logits(r, sp, hist)
                logp = logp - _logsumexp(logp)
                for tok in np.argsort(-logp, kind="stable")[:width]:
                    if np.isfinite(logp[tok]):
                        cands.append((score + float(logp[tok]), node, int(tok)))
            cands.sort(key=lambda c: -c[0])
            frontier = []
            for score, parent, tok in cands[:width]:
                i = d.add(tok, parent)
                paths[i] = paths[parent] + [tok]
                frontier.append((i, score))
            if level + 1 < depth and frontier:
                new = [i for i, _ in frontier]
                vis = d.visible(with_root=False)[new]
                depths = d.depths()
                out = m.backend.forward([d.tokens[i] for i in new], m.cache, positions=base - 1 + depths[new], visible=vis)
                rows = list(self._rows(out))
        m.cache.trim_to(base)  # the tree's nodes leave the draft's cache; accepted ones come back in the next sync
        m.cache_tokens = m.cache_tokens[: m.cache.offset]  # (a ring may have kept less)
        return d


def _vocab(tok) -> dict | list:
    if tok.kind == "tokenizers":
        return tok._tok.get_vocab(with_added_tokens=True)
    return [tok._sp.id_to_piece(i) for i in range(tok._sp.get_piece_size())]


def check_same_tokenizer(target, draft) -> None:
    """Speculation compares token ids, so the draft must map text to the same ids: the same tokenizer
    file (by its hash in the manifests), or failing that the same vocabulary."""
    def digest(m):
        return m.package.manifest.get("files", {}).get(m.package.tokenizer_info["file"], {}).get("sha256")

    if digest(target) and digest(target) == digest(draft):
        return
    if _vocab(target.tokenizer) != _vocab(draft.tokenizer):
        raise EdgeInferError(f"the draft {draft.package.path} has another tokenizer than {target.package.path}; "
                             f"a draft model must share the target's tokenizer")


# -- verification ----------------------------------------------------------------------------------
@dataclass
class SpecStats:
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced by verifications (accepted drafts + one of the target's own each)
    paused: int = 0  # verifications with no draft because prompt lookup was backing off (Backoff)
    # per verification of an MoE model: distinct experts per layer (requested, kept under the budget)
    experts_per_step: list = field(default_factory=list)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per verification: accepted drafts plus the target's own token."""
        return self.emitted / self.verifications if self.verifications else 0.0

    def to_dict(self) -> dict:
        d = dict(verifications=self.verifications, drafted=self.drafted, accepted=self.accepted,
                 acceptance_length=round(self.acceptance_length, 3), paused=self.paused)
        if self.experts_per_step:
            req, kept = np.mean(self.experts_per_step, axis=0)
            d["experts_per_layer_requested"], d["experts_per_layer_kept"] = round(float(req), 2), round(float(kept), 2)
        return d

    def line(self) -> str:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        s = (f"speculative: {self.acceptance_length:.2f} tok/verification over {self.verifications}, "
             f"accepted {self.accepted}/{self.drafted} drafts ({rate:.0%})")
        if self.paused:
            s += f", {self.paused} steps without a draft (lookup backing off)"
        if self.experts_per_step:
            req, kept = np.mean(self.experts_per_step, axis=0)
            s += f", experts/layer/verification {req:.1f} requested, {kept:.1f} kept"
        return s


class Speculator:
    """Speculative decoding for one target model: ``decode`` replaces the plain decode loop of
    ``Model.stream_ids``. ``draft``: "ngram" or a package folder; ``num_draft``: the chain's length at
    most (it adapts, see ``decode``); ``tree``: (width, depth) instead of a chain; ``expert_budget``: passed to the target's verification
    forwards only (MoE expert budgeting; prefill is never capped); ``backoff``: prompt lookup pauses after
    drafts that do not pay (``Backoff``: True for the default one, a factory of Backoff objects for
    others, False to draft at every step)."""

    def __init__(self, target, draft: str = "ngram", num_draft: int = 4, tree: tuple[int, int] | str | None = None,
                 expert_budget=None, backoff=True, **draft_opts):
        check_options(draft, num_draft, tree if isinstance(tree, str) else None)
        self.num_draft = int(num_draft)
        self.tree = parse_tree(tree) if isinstance(tree, str) else tree
        if getattr(target.cache, "rotating", False):
            raise EdgeInferError("speculative decoding rolls the KV cache back, which a rotating cache cannot; "
                                 "use --kv-overflow refuse")
        if self.tree is not None and hasattr(target.backend, "check_tree"):
            target.backend.check_tree()
        self.target = target
        self.drafter = NgramDraft() if draft == "ngram" else DraftModel(draft, target, **draft_opts)
        if self.tree is not None and isinstance(self.drafter, DraftModel) and hasattr(self.drafter.model.backend, "check_tree"):
            self.drafter.model.backend.check_tree()
        self.expert_budget = expert_budget
        self.backoff = (Backoff if backoff is True else backoff) if isinstance(self.drafter, NgramDraft) else None
        self._backoff = None  # made at the first decode and kept: what it learned holds for the next answers
        self.stats = SpecStats()

    def describe(self) -> str:
        shape = f"tree {self.tree[0]}x{self.tree[1]}" if self.tree else f"chain of {self.num_draft}"
        return f"{self.drafter.name} draft, {shape}"

    # The target's forward over [root] + draft: one pass, tree-masked when the draft branches.
    def _verify(self, root: int, d: Draft) -> np.ndarray:
        m = self.target
        opts = {} if self.expert_budget is None else {"expert_budget": self.expert_budget}
        start = m.cache.offset
        if d.is_chain:
            out = m.backend.forward([root] + d.tokens, m.cache, **opts)
        else:
            positions = start + np.concatenate([[0], d.depths()])
            out = m.backend.forward([root] + d.tokens, m.cache, positions=positions, visible=d.visible(), **opts)
        moe = getattr(m.backend, "moe_stats", None)  # per MoE layer of this forward (edgeinfer.moe)
        if moe:
            self.stats.experts_per_step.append((float(np.mean([x["requested"] for x in moe])),
                                                float(np.mean([x["kept"] for x in moe]))))
        return np.asarray(out, dtype=np.float32)[0]

    def _accept(self, logits: np.ndarray, d: Draft, history: list[int], sp: SamplingParams, rng) -> tuple[list[int], int]:
        """Walks the draft from the root: returns (accepted node indices, the target's next token)."""
        path: list[int] = []
        row, node = 0, -1
        hist = list(history)
        while True:
            kids = d.children(node)
            x = filtered_logits(logits[row], sp, hist)
            if sp.temp == 0:
                best = int(np.argmax(x))
                nxt = next((k for k in kids if d.tokens[k] == best), None)
                if nxt is None:
                    return path, best
            else:
                p = _softmax(x)
                nxt = None
                for k in kids:
                    tok, q = d.tokens[k], d.q[k]
                    ratio = p[tok] if q is None else (min(1.0, p[tok] / q[tok]) if q[tok] > 0 else 0.0)
                    if rng.random() < ratio:
                        nxt = k
                        break
                    if q is None:
                        p[tok] = 0.0
                    else:
                        p = np.maximum(p - q, 0.0)
                    total = p.sum()
                    if total <= 0:  # p was entirely covered by q; Leviathan's rule then keeps p
                        p = _softmax(x)
                        break
                    p = p / total
                if nxt is None:
                    return path, int(rng.choice(len(p), p=p))
            path.append(nxt)
            hist.append(d.tokens[nxt])
            node, row = nxt, nxt + 1

    def decode(self, model, y, history: list[int], budget: int, config, st):
        """Yields up to ``budget`` tokens after the prefill's first token ``y`` (an mx array), as the
        plain loop does, and leaves the cache as the plain loop would (everything but the last token)."""
        sp = config.sampling
        rng = np.random.default_rng(sp.seed)
        eos = set() if config.ignore_eos else model.tokenizer.eos_token_ids
        stats = self.stats = SpecStats()
        st.speculative = stats
        width, depth = self.tree if self.tree else (1, self.num_draft)
        # The draft's depth adapts as in transformers' assisted generation: 2 deeper after a draft accepted
        # whole, 1 shallower otherwise. Verifying costs compute per drafted token (SmolLM2 on 2 CPU cores:
        # 9 tokens in one pass take 2.8x one token's time), so long drafts only pay while they are accepted.
        deep = depth
        if self.backoff and self._backoff is None:
            self._backoff = self.backoff()
        backoff = self._backoff
        tok, n = int(y.item()), 0
        try:
            while n < budget:
                if tok in eos:
                    st.finish_reason = "stop"
                    return
                st.generated_tokens += 1
                history.append(tok)
                n += 1
                yield tok
                room = budget - n
                if room <= 0:
                    return
                # near the end of the budget (and of the context) draft no more than may still be kept
                now = min(deep, room) if self.tree is None else min(deep, max(1, room // width))
                t_step = time.perf_counter()
                drafting = backoff is None or backoff.drafting()
                # backing off: a plain one-token step (the target's forward of the last token, as below)
                d = self.drafter.propose(history, width, now, self.tree is not None, sp, rng) if drafting else Draft()
                if len(d) > room:  # breadth-first order: a prefix is still a tree
                    d = Draft(d.tokens[:room], d.parents[:room], d.q[:room])
                start = model.cache.offset
                logits = self._verify(tok, d)
                path, nxt = self._accept(logits, d, history, sp, rng)
                if len(d):
                    deep = min(depth, deep + 2) if len(path) == int(d.depths().max()) else max(1, deep - 1)
                if backoff is not None:
                    seconds = time.perf_counter() - t_step
                    if drafting:
                        backoff.record(len(d), len(path), seconds)
                    else:
                        backoff.plain(seconds)
                        stats.paused += 1
                kept = model.cache.compact(start, [0] + [i + 1 for i in path])
                stats.verifications += 1
                stats.drafted += len(d)
                stats.accepted += len(path)
                stats.emitted += len(path) + 1
                ctx = model.cache_tokens + [tok] + [d.tokens[i] for i in path]
                model.cache_tokens = ctx[:kept]
                if kept != len(ctx):  # a ring lost what the shorter context needs: recompute it
                    model._prefill(ctx, 512)
                for t in [d.tokens[i] for i in path]:
                    if t in eos:
                        st.finish_reason = "stop"
                        return
                    if n >= budget:
                        return
                    st.generated_tokens += 1
                    history.append(t)
                    n += 1
                    yield t
                tok = nxt
        finally:
            # as the plain loop leaves it: every token in the cache, but for the last generated one when the
            # length ran out (it was never fed)
            want = len(history) - (st.finish_reason != "stop" and st.generated_tokens > 0)
            if model.cache.offset > want:
                model.cache.trim_to(want)
            model.cache_tokens = model.cache_tokens[: model.cache.offset]


def check_options(draft: str | None, num_draft: int = 4, tree: str | None = None) -> None:
    """The CLI's --draft/--num-draft/--tree, checked before any model loads."""
    if draft is None and tree is not None:
        raise EdgeInferError("--tree needs --draft PKG|ngram")
    if not 1 <= int(num_draft) <= MAX_DRAFT:
        raise EdgeInferError(f"--num-draft must be between 1 and {MAX_DRAFT}, not {num_draft}")
    if tree is not None:
        parse_tree(tree)


def make_speculator(model, draft: str | None, num_draft: int = 4, tree: str | None = None, **opts):
    """The CLI's --draft/--num-draft/--tree: a Speculator, or None without --draft. ``draft`` is "ngram"
    or a package folder."""
    check_options(draft, num_draft, tree)
    if draft is None:
        return None
    return Speculator(model, draft=draft, num_draft=num_draft, tree=tree, **opts)
