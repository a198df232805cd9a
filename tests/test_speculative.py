"""Speculative decoding (edgeinfer/speculative.py) on tiny random models (conftest.py), both backends.

- Greedy output is plain greedy decoding's, token for token, over long generations: draft models (the
  target itself, which is always right, and its 4-bit copy, which is right about half the time), prompt
  lookup, chains and trees, including sliding-window rings (Gemma 3's window of 8 in a ring of 72 slots,
  which a 200-token generation wraps around several times).
- The KV cache after a speculative generation is the one plain decoding leaves: continuing both gives
  the same logits.
- Sampling keeps the target's distribution: the joint distribution of the first generated tokens over
  a fixed set of seeds, against the target's own softmax, by a chi-square test.
- Bad input through the CLI: one line, exit status 2.

The ONNX graphs are the exact ones (accuracy_level 1), so their logits match MLX's and greedy paths agree.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import cli_env

import edgeinfer
from edgeinfer.converters.onnx_export import add_onnx_graph
from edgeinfer.model import GenerationConfig
from edgeinfer.sampling import SamplingParams
from edgeinfer.speculative import Backoff, NgramDraft, Speculator, parse_tree

PROMPT = list(b"The quick brown fox jumps over the lazy dog; the quick brown fox")
GEN = 160  # the tiny models' context is 256


@pytest.fixture(scope="module")
def package(tiny_package, tmp_path_factory):
    """package(arch, bits, group) -> a copy of the tiny package with the exact ONNX graph."""
    root = tmp_path_factory.mktemp("spec")
    cache: dict = {}

    def get(arch: str, bits: int = 8, group: int = 64):
        key = (arch, bits, group)
        if key not in cache:
            dst = root / f"{arch}-b{bits}-g{group}"
            shutil.copytree(tiny_package(arch, bits, group), dst)
            add_onnx_graph(dst, accuracy_level=1, progress=False)
            cache[key] = dst
        return cache[key]

    return get


@pytest.fixture(scope="module")
def loaded(package):
    cache: dict = {}

    def get(arch: str, backend: str, bits: int = 8, group: int = 64):
        key = (arch, backend, bits, group)
        if key not in cache:
            cache[key] = edgeinfer.load(package(arch, bits, group), backend=backend)
        return cache[key]

    return get


def generate(m, n: int, spec=False, prompt=PROMPT, **sampling) -> list[int]:
    m.reset()
    cfg = GenerationConfig(max_tokens=n, ignore_eos=True, sampling=SamplingParams(**sampling), speculative=spec)
    return list(m.stream_ids(prompt, cfg))


def draft_path(package, arch, which):
    return {"self": str(package(arch, 8, 64)), "4bit": str(package(arch, 4, 32)), "ngram": "ngram"}[which]


CASES = [
    # (arch, backend, draft, num_draft, tree)
    ("llama", "mlx", "self", 4, None),
    ("llama", "mlx", "4bit", 5, None),
    ("llama", "mlx", "4bit", 1, "2x3"),
    ("llama", "mlx", "self", 1, "3x3"),
    ("llama", "mlx", "ngram", 4, None),
    ("llama", "mlx", "ngram", 1, "3x4"),
    ("llama", "onnx", "self", 4, None),
    ("llama", "onnx", "4bit", 5, None),
    ("llama", "onnx", "4bit", 1, "2x3"),
    ("llama", "onnx", "ngram", 1, "3x4"),
    ("qwen3", "onnx", "4bit", 1, "3x2"),
    ("mistral", "mlx", "4bit", 1, "2x3"),  # sliding window of 16: the tree mask counts from each node's position
    ("mistral", "onnx", "4bit", 4, None),
    ("gemma3", "mlx", "4bit", 1, "2x4"),  # sliding ring of 72 slots, wrapped by the generation
    ("gemma3", "mlx", "self", 6, None),
]


@pytest.mark.parametrize("arch,backend,draft,num_draft,tree", CASES)
def test_greedy_identical_to_plain(loaded, package, arch, backend, draft, num_draft, tree):
    m = loaded(arch, backend)
    plain = generate(m, GEN)
    spec = Speculator(m, draft=draft_path(package, arch, draft), num_draft=num_draft, tree=tree)
    got = generate(m, GEN, spec)
    assert got == plain
    st = spec.stats
    # every verification yields its tokens; only the last one's may run past the length
    assert len(got) - 1 <= st.emitted <= len(got) - 1 + (num_draft if tree is None else int(tree.split("x")[1]))
    if draft == "self" and tree is None:  # the target drafting for itself is always right
        assert st.accepted == st.drafted and st.acceptance_length > num_draft
    if draft == "4bit":  # a real draft: some accepted, some not
        assert 0 < st.accepted < st.drafted


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_cache_after_speculation_is_plain_decodings(loaded, package, backend):
    """Both caches continue identically: the same logits for 12 more tokens fed as a chunk."""
    m = loaded("llama", backend)
    more = list(b" over the hill")[:12]

    def continued(spec):
        out = generate(m, 90, spec)
        assert m.cache.offset == len(PROMPT) + len(out) - 1 == len(m.cache_tokens)
        return out, np.array(m.backend.forward([out[-1]] + more, m.cache))[0]

    plain, ref = continued(False)
    spec = Speculator(m, draft="ngram")
    assert generate(m, 0, spec) == [] and m.cache.offset == len(PROMPT)  # a chat's prefill: the prompt, all of it
    for tree in (None, "2x3"):
        spec = Speculator(m, draft=draft_path(package, "llama", "4bit"), num_draft=4, tree=tree)
        out, got = continued(spec)
        assert out == plain
        # on ONNX, plain decoding and chain verification run the native step (int16 activations), tree
        # verification the graph (float): keys and values ~1e-4 apart, which the later tokens then read
        np.testing.assert_allclose(got, ref, atol=1e-4 if backend == "mlx" else 2e-3, rtol=0)


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_eos_stops_where_plain_decoding_stops(loaded, package, backend):
    """A token of the plain greedy output made the end-of-sequence token: both stop right before it, and
    the caches hold the same tokens (a drafted, accepted EOS ends the answer like a sampled one)."""
    m = loaded("llama", backend)
    eos = generate(m, 80)[50]
    saved = m.tokenizer.eos_token_ids
    m.tokenizer.eos_token_ids = {eos}
    try:
        def run(spec):
            m.reset()
            out = list(m.stream_ids(PROMPT, GenerationConfig(max_tokens=80, speculative=spec)))
            return out, m.stats.finish_reason, list(m.cache_tokens), m.cache.offset

        plain = run(False)
        assert plain[0][-1] != eos and len(plain[0]) <= 50 and plain[1] == "stop"
        for draft in ("self", "4bit"):
            assert run(Speculator(m, draft=draft_path(package, "llama", draft), num_draft=6)) == plain
    finally:
        m.tokenizer.eos_token_ids = saved


def test_ngram_lookup_continues_the_latest_match():
    ctx = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    d = NgramDraft()
    assert d.continuations(ctx, 1, 3) == [[7, 8, 5]]  # the most recent earlier "1 2 3"
    assert d.continuations(ctx, 3, 2) == [[7, 8], [9, 9]]  # then the older one; no third
    t = d.propose(ctx, 2, 3, True, SamplingParams(), None)
    assert t.tokens == [7, 9, 8, 9, 5, 1] and t.parents == [-1, -1, 0, 1, 2, 3]
    assert d.continuations([4, 5, 6], 1, 3) == []
    assert d.continuations([4, 5, 6, 9, 5, 7, 5], 1, 6) == [[7, 5]]  # a 1-gram match drafts depth/3 tokens


def test_backoff_pauses_longer_after_each_miss_and_resumes_on_an_accept():
    b = Backoff(max_pause=16, cost_share=None)  # by acceptance only
    pauses = []
    for i in range(7):  # misses in a row: a draft with nothing accepted, or nothing to draft
        assert b.drafting()
        b.record(3 if i % 2 else 0, 0)
        n = 0
        while not b.drafting():
            n += 1
        pauses.append(n)
    assert pauses == [1, 2, 4, 8, 16, 16, 16]
    b.record(4, 1)  # one token accepted: no pause, and the next miss starts again from 1
    assert b.drafting()
    b.record(2, 0)
    assert not b.drafting() and b.drafting()


def test_backoff_pays_back_a_step_that_was_slower_than_plain_decoding():
    b = Backoff(cost_share=0.02)
    assert not b.drafting() and not b.drafting() and b.drafting()  # two plain steps first, timed
    b.plain(0.010)
    b.plain(0.010)
    assert b.step_seconds == pytest.approx(0.010)
    # a verification that gave 2 tokens in 150 ms, where plain steps give them in 20 ms: 130 ms lost, paid back
    # at 2% of the plain steps' time after it, 650 steps
    b.record(4, 1, 0.150)
    assert abs(b.wait - 650) <= 1 and b.misses == 1
    b.wait = 0
    b.record(4, 2, 0.025)  # 3 tokens in 25 ms: faster than plain, a hit
    assert b.wait == 0 and b.misses == 0 and b.drafting()
    b.record(4, 0, 0.013)  # nothing accepted: a miss, 3 ms lost (less than a step): the doubling pause alone
    assert b.wait == 1
    b.wait = 0
    b.record(0, 0, 0.011)  # nothing to draft from: a plain step's time, and a miss without a loss
    assert b.wait == 2 and b.step_seconds == pytest.approx(0.7 * 0.010 + 0.3 * 0.011)
    b.wait = 0
    b.record(4, 1, 1.0)  # one huge loss is paid back within max_wait
    assert b.wait == b.max_wait


@pytest.mark.parametrize("arch, backend", [("llama", "mlx"), ("llama", "onnx"), ("qwen3", "mlx"), ("mistral", "onnx"), ("qwen2", "mlx")])
def test_ngram_backoff_drafts_less_where_nothing_is_accepted(loaded, arch, backend):
    """A random model's bytes after a prompt they have nothing to do with: most lookups find a short match
    whose draft is rejected. Backing off (by acceptance alone, and with the cost rule too, which can only
    pause more) drafts less than half as many tokens, and the greedy output stays plain decoding's."""
    m = loaded(arch, backend)
    prompt = list(b"Pack my box with five dozen liquor jugs.")
    plain = generate(m, GEN, prompt=prompt)
    eager = Speculator(m, draft="ngram", num_draft=4, backoff=False)
    assert generate(m, GEN, eager, prompt=prompt) == plain
    e = eager.stats
    assert e.drafted > 40 and e.accepted < e.drafted / 2 and e.paused == 0  # lookup rarely right here
    for backoff in (lambda: Backoff(cost_share=None), True):
        spec = Speculator(m, draft="ngram", num_draft=4, backoff=backoff)
        assert generate(m, GEN, spec, prompt=prompt) == plain
        b = spec.stats
        assert b.drafted < e.drafted / 2 and b.paused > GEN / 3, (b.to_dict(), e.to_dict())
        assert b.verifications + b.accepted >= len(plain) - 1  # every token still comes out of a step
        assert "steps without a draft (lookup backing off)" in b.line() and b.to_dict()["paused"] == b.paused


def test_backoff_lasts_from_one_answer_to_the_next(loaded):
    """A chat's turns share the model's Speculator: what the back-off learned (a pause, the plain step's time)
    carries over instead of being paid for again."""
    m = loaded("llama", "mlx")
    made = []

    def factory():
        made.append(Backoff())
        return made[-1]

    prompt = list(b"Pack my box with five dozen liquor jugs.")
    plain = generate(m, 40, prompt=prompt)
    spec = Speculator(m, draft="ngram", num_draft=4, backoff=factory)
    assert generate(m, 40, spec, prompt=prompt) == plain
    assert generate(m, 40, spec, prompt=prompt) == plain
    assert len(made) == 1 and made[0].step_seconds is not None and spec.stats.paused > 0


def test_backoff_leaves_a_repetitive_text_drafted(loaded):
    """Where lookup is right (the tiny Gemma 3 repeats itself after this prompt: 69 of 81 drafts accepted),
    the back-off keeps nearly all of what drafting at every step gains."""
    m = loaded("gemma3", "mlx")
    prompt = list(b"Pack my box with five dozen liquor jugs.")
    plain = generate(m, GEN, prompt=prompt)
    # by acceptance only, so that the counts do not depend on this machine's timing (the cost rule's own test
    # is above)
    spec = Speculator(m, draft="ngram", num_draft=4, backoff=lambda: Backoff(cost_share=None))
    assert generate(m, GEN, spec, prompt=prompt) == plain
    eager = Speculator(m, draft="ngram", num_draft=4, backoff=False)
    assert generate(m, GEN, eager, prompt=prompt) == plain
    assert eager.stats.accepted > 0.7 * eager.stats.drafted
    # measured: 65 of 69 accepted tokens kept, 95 target passes against 91 (pauses mostly where nothing matched)
    assert spec.stats.accepted >= 0.9 * eager.stats.accepted, spec.stats.to_dict()
    assert spec.stats.verifications <= 1.1 * eager.stats.verifications, spec.stats.to_dict()


# -- sampling keeps the target's distribution --------------------------------------------------------------
def _chi2_sf(x: float, k: int) -> float:
    """P(chi2_k >= x), Wilson-Hilferty: accurate to ~1e-3 for k >= 3, enough for a 1e-3 threshold."""
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("num_draft,tree", [(2, None), (1, "2x2")])
def test_sampling_keeps_the_target_distribution(loaded, package, num_draft, tree):
    """The joint of the first three sampled tokens (the second and third come out of verification) over
    1200 fixed seeds, against the target's softmax under the same top-k / temperature: a chi-square test
    at 1e-3. The draft is the target's 4-bit copy, whose probabilities differ from the target's by tens of
    percent on these random weights, so acceptances, rejections and residual draws all happen. The chain
    samples its drafts from q; the tree's children are the draft's top-2 (a deterministic, one-hot q, the
    rule n-gram drafts take too), tried in turn against the residual."""
    m = loaded("llama", "mlx")
    sp = dict(temp=1.3, top_k=3)
    prompt = PROMPT[:24]
    spec = Speculator(m, draft=str(package("llama", 4, 32)), num_draft=num_draft, tree=tree)
    params = SamplingParams(**sp)

    def dist(ids):  # softmax(logits / temp) over the top k, written out independently of the runtime
        x = m.logits(ids)[-1].astype(np.float64) / params.temp
        x[x < np.sort(x)[-params.top_k]] = -np.inf
        return np.exp(x - x.max())

    def norm(x):
        return x / x.sum()

    # exact joint distribution of (t0, t1, t2)
    expected: dict = {}
    p0 = norm(dist(prompt))
    for a in np.nonzero(p0)[0]:
        p1 = norm(dist(prompt + [int(a)]))
        for b in np.nonzero(p1)[0]:
            p2 = norm(dist(prompt + [int(a), int(b)]))
            for c in np.nonzero(p2)[0]:
                expected[(int(a), int(b), int(c))] = p0[a] * p1[b] * p2[c]
    n = 1200
    counts: dict = {}
    drafted = accepted = 0
    for seed in range(n):
        out = tuple(generate(m, 3, spec, prompt=prompt, seed=seed, **sp))
        counts[out] = counts.get(out, 0) + 1
        drafted, accepted = drafted + spec.stats.drafted, accepted + spec.stats.accepted
    assert set(counts) <= set(expected)
    assert 0 < accepted < drafted  # both branches of the rule were taken
    cells = [k for k in expected if expected[k] * n >= 5]
    rest = [k for k in expected if k not in cells]
    obs = [counts.get(k, 0) for k in cells] + ([sum(counts.get(k, 0) for k in rest)] if rest else [])
    exp = [expected[k] * n for k in cells] + ([sum(expected[k] for k in rest) * n] if rest else [])
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    assert _chi2_sf(chi2, len(obs) - 1) > 1e-3, (chi2, len(obs))


# -- bad input ---------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeinfer.cli", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=300)


@pytest.mark.parametrize("extra,message", [
    (["--draft", "ngram", "--num-draft", "0"], "--num-draft must be between 1 and 64, not 0"),
    (["--draft", "ngram", "--tree", "3"], "--tree takes WIDTHxDEPTH"),
    (["--draft", "ngram", "--tree", "0x4"], "--tree takes WIDTHxDEPTH"),
    (["--draft", "ngram", "--tree", "9x9"], "--tree 9x9 drafts 81 tokens per step; at most 64"),
    (["--tree", "2x2"], "--tree needs --draft PKG|ngram"),
])
def test_bad_options(package, extra, message):
    r = _cli("generate", "-m", str(package("llama")), "-p", "hi", "--backend", "mlx", "--meter", "none", *extra)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr
    assert r.stdout == ""


def test_draft_with_another_tokenizer_is_refused(package):
    r = _cli("generate", "-m", str(package("llama")), "-p", "hi", "--backend", "mlx", "--meter", "none",
             "--draft", str(package("gemma3")))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "has another tokenizer than" in r.stderr


def test_onnx_tree_needs_full_attention(package):
    r = _cli("generate", "-m", str(package("mistral")), "-p", "hi", "--backend", "onnx", "--meter", "none",
             "--draft", "ngram", "--tree", "2x2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "needs a model without sliding-window layers" in r.stderr


def test_cli_generate_reports_speculation(package):
    r = _cli("generate", "-m", str(package("llama")), "-p", "abcabcabcabcabc", "--backend", "onnx", "--meter", "none",
             "--max-tokens", "24", "--draft", "ngram", "--tree", "2x3")
    plain = _cli("generate", "-m", str(package("llama")), "-p", "abcabcabcabcabc", "--backend", "onnx", "--meter", "none",
                 "--max-tokens", "24", "--no-stats")
    assert r.returncode == 0 and plain.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    assert "speculative:" in r.stderr and "tok/verification" in r.stderr


def test_bench_reports_speculation(package):
    import json

    r = _cli("bench", "-m", str(package("llama")), "--backend", "mlx,onnx", "-p", "8", "-n", "16", "-r", "1", "--json",
             "--draft", str(package("llama")), "--num-draft", "3")
    assert r.returncode == 0, r.stderr
    for res in json.loads(r.stdout)["results"]:
        sp = res["speculative"]
        assert sp["accepted"] == sp["drafted"] > 0 and sp["acceptance_length"] > 3  # the model drafting for itself


def test_parse_tree():
    assert parse_tree("2x4") == (2, 4) and parse_tree(" 3X1 ") == (3, 1)


def test_piped_chat_with_a_draft_answers_as_without(package):
    """Several turns: the KV cache kept between turns stays consistent with what speculation rolled back."""
    args = ["chat", "-m", str(package("llama")), "--backend", "mlx", "--meter", "none", "--max-tokens", "40"]
    text = "hello there\nabc abc abc\nthe quick brown fox\n"

    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", *args, *extra], input=text, capture_output=True,
                           text=True, env=cli_env(), timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    plain = run()
    assert len(plain.splitlines()) == 3
    assert run("--draft", str(package("llama", 4, 32)), "--tree", "2x3") == plain
    assert run("--draft", "ngram", "--num-draft", "5") == plain


# -- Mixture of Experts: the same decoding, and expert budgets on verification only -----------------------
@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny random Qwen3-MoE (8 experts, top-2; test_moe.py's checkpoint) at 8 and 4 bits, exact ONNX graph."""
    from test_moe import _build

    from edgeinfer.converters.convert import convert

    root = tmp_path_factory.mktemp("spec-moe")
    hf = _build("qwen3_moe", root / "hf")
    return {bits: convert(str(hf), root / f"b{bits}", bits=bits, progress=False, accuracy_level=1) for bits in (8, 4)}


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_moe_speculation_and_expert_budget(moe, backend):
    from edgeinfer.moe import ExpertBudget

    m = edgeinfer.load(moe[8], backend=backend)
    plain = generate(m, 100)
    k, e = m.spec.num_experts_per_tok, m.spec.num_experts
    for draft, tree in (("ngram", None), (str(moe[4]), "2x3")):
        spec = Speculator(m, draft=draft, num_draft=4, tree=tree)
        assert generate(m, 100, spec) == plain
    # a budget of every expert is no budget; a budget of top_k keeps at most top_k experts per layer
    spec = Speculator(m, draft=str(moe[4]), num_draft=4, expert_budget=ExpertBudget(budget=e))
    assert generate(m, 100, spec) == plain
    requested, kept = np.mean(spec.stats.experts_per_step, axis=0)
    assert requested == kept and kept > k  # several drafted tokens route to more than one token's top-k
    spec = Speculator(m, draft=str(moe[4]), num_draft=4, expert_budget=ExpertBudget(budget=k))
    out = generate(m, 100, spec)
    assert len(out) == 100 and spec.stats.verifications > 0
    requested, kept = np.mean(spec.stats.experts_per_step, axis=0)
    assert kept <= k < requested
    assert "experts/layer/verification" in spec.stats.line()


def test_smollm2_prompt_lookup_on_a_code_edit(smollm2_package):
    """The real model rewriting code it was given: prompt lookup drafts much of the answer (about 1.7
    tokens per verification, against 1 for plain decoding), and the greedy output is plain decoding's (MLX; on ONNX's fast
    int8 graph a multi-token pass rounds differently from a one-token step, so near-ties may differ)."""
    m = edgeinfer.load(smollm2_package, backend="mlx")
    code = "def area(width, height):\n    result = width * height\n    return result\n\n" \
           "def volume(width, height, depth):\n    result = width * height * depth\n    return result\n"
    ids = m.tokenizer.encode_chat([{"role": "user", "content": "Rename `result` to `value` in this code and print all "
                                                                  "of it again:\n\n" + code}])
    plain = generate(m, 48, prompt=ids)
    # the back-off by acceptance only: its cost rule times the steps, which on a busy machine may pause more
    spec = Speculator(m, draft="ngram", num_draft=6, backoff=lambda: Backoff(cost_share=None))
    assert generate(m, 48, spec, prompt=ids) == plain
    assert spec.stats.acceptance_length > 1.4
