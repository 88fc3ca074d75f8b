"""Sampling is lossless: speculative decoding emits exactly the target's (warped) distribution.

The statistical test. fp32 on CPU, a vocabulary of V = 8 tokens, prompts of 3 tokens. The exact joint distribution
of the first 3 generated tokens (V^3 = 512 cells) is enumerated from teacher-forced target forwards: for every
(t1, t2), one forward over prompt + [t1, t2] gives p(t1), p(t2 | t1), p(t3 | t1, t2) through
`sampling.target_probs`, and a cell's probability is their product. Each configuration draws N_SAMPLES = 20,000
independent `SpecEngine.generate(prompt, 3, params, seed=s)` samples (seeds fixed, so every run sees the same
samples). Token 1 comes from the prefill, tokens 2-3 from the first round's tree (accepted at depth 1 or 2, or the
bonus) or from a second round: every accept/bonus path is exercised (checked on the accepted-length histogram).
Test: Pearson's chi-square goodness of fit at ALPHA = 0.001 on the joint counts. Pooling: cells of probability 0
(outside top-k / top-p) are left out of the statistic and must have no sample at all (checked exactly); cells with
expected count < 5 are pooled into one cell; if that pooled cell's expected count is itself < 5 (but > 0) it is
merged into the smallest remaining cell; df = cells - 1; the p-value is the chi-square survival function,
Q(df/2, X^2/2) = torch.special.gammaincc (checked against known quantiles below, no scipy needed).

Configurations cover temperatures 0.7 / 0.8 / 1.0 / 1.3, top-k, top-p, both together, the dynamic (EAGLE-2,
pruned) and a static (EAGLE-1) tree, a head built to agree with the target ("good") and a random one ("bad"), and
draft temperatures 0.5 and 2 (the draft's temperature may change how much is accepted, never what is emitted), and
the good head with a draft vocabulary of 5 of the 8 tokens (target samples outside it end the accepted path), and
an EAGLE-3 head (random, over the same 5 tokens, fed the target's residual streams).
Negative controls run the same test on the same configurations with a deliberately wrong acceptance rule patched
into the engine (greedy acceptance: take a child whenever it is the target's argmax; and the bonus token drawn
from the full p instead of the residual, i.e. rejection sampling without renormalising); both must be rejected,
which shows the test has power.

Speed: eager decoding costs ~2.5-3.5 ms of CPU per sample (one or two rounds; per-op overhead dominates at this
size), ~7 CPU-minutes for the 8 x 20,000 samples, so they run in two worker processes (spawned, one thread each:
the 2 cores CI has; the parent also runs single-threaded), in chunks, all submitted when the first statistical
test starts. About 3 minutes on 2 otherwise idle cores.
"""
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import fasteagle.engine as engine_mod
from conftest import fe_greedy, fe_logits
from fasteagle.engine import SpecEngine
from fasteagle.errors import FastEagleError
from fasteagle.eagle3 import Eagle3Head
from fasteagle.model import ModelArgs, Transformer
from fasteagle.sampling import (DeviceParams, SamplingParams, choose_tokens, sampling_noise, target_probs,
                                 warp_logits)
from tiny import random_head, tiny_args, with_draft_vocab

V = 8
N_TOKENS = 3
N_SAMPLES = 20_000
CHUNK = 2_500
ALPHA = 0.001
WORKERS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))

DYNAMIC = dict(tree="dynamic", depth=2, top_k=3, total_tokens=7)  # 3 + 9 candidates, the best 6 kept
STATIC = dict(tree="static", static_choices=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0]])

# name: (tree, head, sampling params, draft temperature, prompt, wrong rule or None)
CONFIGS = {
    "dynamic-good-T1": (DYNAMIC, "good", SamplingParams(1.0), 1.0, [1, 5, 2], None),
    "dynamic-bad-T0.7-topp0.9-draftT0.5": (DYNAMIC, "bad", SamplingParams(0.7, top_p=0.9), 0.5, [3, 0, 6], None),
    "static-good-T1.3-topk5-draftT2": (STATIC, "good", SamplingParams(1.3, top_k=5), 2.0, [4, 4, 7], None),
    "static-bad-T0.8-topk6-topp0.8": (STATIC, "bad", SamplingParams(0.8, top_k=6, top_p=0.8), 1.0, [2, 6, 1], None),
    # the good head drafting among 5 of the 8 tokens only: the target's samples outside them end the accepted path
    "dynamic-good-vocab5-T1": (DYNAMIC, "good-vocab", SamplingParams(1.0), 1.0, [1, 5, 2], None),
    # an EAGLE-3 head (random; its own LM head over the same 5 tokens, features from the target's residual stream)
    "dynamic-eagle3-T1.3-topp0.95": (DYNAMIC, "eagle3", SamplingParams(1.3, top_p=0.95), 1.0, [1, 5, 2], None),
}
DRAFT_VOCAB = [2, 5, 0, 7, 3]
NEGATIVE = {
    "argmax-acceptance": ("dynamic-good-T1", "argmax"),
    "bonus-from-full-p": ("static-good-T1.3-topk5-draftT2", "full_p_bonus"),
}
ALL = {**CONFIGS, **{f"wrong-{n}": (*CONFIGS[base][:5], rule) for n, (base, rule) in NEGATIVE.items()}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # like the workers: tiny ops gain nothing from a second thread, and it competes with the workers for the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models ---------------------------------------------------------------------------------------------------


def build_models(max_seq_len):
    """(target, good head, bad head), deterministic. tests/tiny.py's predictable pair, with one target layer (the
    sampling below is dominated by per-op overhead) and the LM head drawn small so that the target's next-token
    distributions are spread (joint entropy ~3-4 nats over the 512 cells at T = 1) rather than nearly certain.
    The good head computes the target's bigram map, so its top-k usually holds the token the target samples;
    the bad one is random (seed chosen so that it still gets a depth-2 acceptance now and then)."""
    torch.manual_seed(0)
    target = Transformer(tiny_args(vocab=V, dim=16, n_layers=1)).eval()
    with torch.no_grad():
        target.embed.weight.normal_()
        target.output.weight.normal_(std=0.35)
    target.setup_cache(max_seq_len)
    good = random_head(target, seed=1)
    with torch.no_grad():
        good.fc.weight.zero_()
        good.fc.weight[:, :16] = torch.eye(16)  # out = the embedding of the next token
        good.fc.bias.zero_()
        good.layers[0].attn.wo.weight.zero_()
        good.layers[0].mlp.w2.weight.zero_()
    return target, good, random_head(target, seed=2)


def weights_checksum(target, *heads) -> float:
    return sum(float(p.detach().double().sum()) for m in (target, *heads) for p in m.parameters())


def eagle3_head(target):
    """A random EAGLE-3 head drafting among DRAFT_VOCAB, reading the one-layer target's residual stream before and
    after its layer (taps 0 and 1), deterministic."""
    torch.manual_seed(3)
    head = Eagle3Head(ModelArgs(**{**target.args.to_dict(), "n_layers": 1}), len(DRAFT_VOCAB), (0, 1)).eval()
    head.draft_vocab.copy_(torch.tensor(DRAFT_VOCAB))
    return head.bind(target)


def make_engine(models, tree, head, draft_temperature):
    target, good, bad = models
    if head == "eagle3":
        return SpecEngine(target, eagle3_head(target), draft_temperature=draft_temperature, **tree)
    if head == "good-vocab":
        good = with_draft_vocab(good, target, DRAFT_VOCAB)
    return SpecEngine(target, good if head.startswith("good") else bad, draft_temperature=draft_temperature, **tree)


# --- wrong acceptance rules (negative controls) ---------------------------------------------------------------


def patch_wrong_rule(rule):
    """Install a wrong rule in the engine's module globals (read at call time by the eager round); returns undo."""
    real_choose, real_accept = engine_mod.choose_tokens, engine_mod.accept
    seen = {}

    def choose(logits, params, noise=None):
        seen["argmax"] = logits.argmax(-1)
        if noise is not None:  # an independent second draw from the full p at every node
            seen["fresh"] = real_choose(logits, params, sampling_noise(noise.shape[0], None, noise.device))
        return real_choose(logits, params, noise)

    def accept_argmax(tree, choice):
        # wrong: at a node, take the child that is the target's argmax whenever there is one
        top = seen["argmax"]
        par = tree.parent[1:]  # the parent of each non-root node
        has = torch.zeros_like(choice).index_add_(0, par, (tree.tokens[1:] == top[par]).long()) > 0
        return real_accept(tree, torch.where(has, top, choice))

    def accept_full_p_bonus(tree, choice):
        # wrong: the bonus is a fresh draw from p at the last accepted node, not the residual (rejected) draw
        accept_len, path, emitted = real_accept(tree, choice)
        last = path.index_select(0, accept_len)
        return accept_len, path, emitted.scatter(0, accept_len, seen["fresh"].index_select(0, last))

    engine_mod.choose_tokens = choose
    engine_mod.accept = {"argmax": accept_argmax, "full_p_bonus": accept_full_p_bonus}[rule]

    def undo():
        engine_mod.choose_tokens, engine_mod.accept = real_choose, real_accept

    return undo


# --- sampling (runs in the worker processes) -------------------------------------------------------------------

_WORKER_MODELS = None


def sample_chunk(name, first_seed, n):
    """n speculative samples of the first N_TOKENS tokens for configuration `name`, seeds first_seed + [0, n).
    Returns (joint counts [V**N_TOKENS], Counter of the first round's emitted-token count, weights checksum,
    CPU seconds)."""
    global _WORKER_MODELS
    t0 = time.process_time()
    torch.set_num_threads(1)
    if _WORKER_MODELS is None:
        _WORKER_MODELS = build_models(max_seq_len=16)  # prompt 3 + 3 tokens + an 8-node tree fit
    tree, head, params, draft_temperature, prompt, rule = ALL[name]
    eng = make_engine(_WORKER_MODELS, tree, head, draft_temperature)
    counts = [0] * V**N_TOKENS
    first_round = Counter()
    undo = patch_wrong_rule(rule) if rule else None
    torch.manual_seed(first_seed)  # the wrong rule's extra draws use the global generator
    try:
        with torch.inference_mode():
            for seed in range(first_seed, first_seed + n):
                out = eng.generate(prompt, N_TOKENS, params, seed=seed)
                t = out.tokens
                # every token after the prefill's came out of a speculative round (no fallback to plain decoding)
                assert len(t) == N_TOKENS and 1 + sum(out.accept_lens) >= N_TOKENS, out
                counts[(t[0] * V + t[1]) * V + t[2]] += 1
                first_round[out.accept_lens[0]] += 1
    finally:
        if undo:
            undo()
    return counts, first_round, weights_checksum(*_WORKER_MODELS), time.process_time() - t0


def _selected_configs(request):
    names = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is sys.modules[__name__] and "config" in params:
            names.add(params["config"])
    return [n for n in ALL if n in names]


@pytest.fixture(scope="module")
def samples(request):
    """Start the sampling of every selected configuration at once (two processes, chunks spread over them);
    returns {name: callable that waits for that configuration and returns its summed results}."""
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=WORKERS, mp_context=ctx)
    futures = {}
    for i, name in enumerate(_selected_configs(request)):
        base = 1_000_000 * (i + 1)
        futures[name] = [pool.submit(sample_chunk, name, base + s, CHUNK) for s in range(0, N_SAMPLES, CHUNK)]

    def result(name):
        counts, first_round, seconds = torch.zeros(V**N_TOKENS, dtype=torch.long), Counter(), 0.0
        for f in futures[name]:
            c, fr, checksum, s = f.result()
            assert checksum == weights_checksum(*reference_models())  # the workers built the same models
            counts += torch.tensor(c)
            first_round.update(fr)
            seconds += s
        return counts, first_round, seconds

    yield result
    pool.shutdown(cancel_futures=True)


# --- the exact reference and the test --------------------------------------------------------------------------

_REF_MODELS = None


def reference_models():
    global _REF_MODELS
    if _REF_MODELS is None:
        _REF_MODELS = build_models(max_seq_len=64)
    return _REF_MODELS


def check_margins(logits, params):
    """The engine's tree forward and the reference forward differ by float rounding (~1e-7): make sure no token
    sits so close to the top-k / top-p cut that rounding could move it across (which would break the exact check
    that zero-probability cells are never drawn)."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < V:
        top = torch.topk(x, params.top_k + 1, dim=-1).values
        assert (top[:, -2] - top[:, -1]).min() > 1e-5
    if params.top_p < 1:
        p = torch.softmax(warp_logits(logits, SamplingParams(params.temperature, params.top_k)), -1)
        sp = torch.sort(p, -1, descending=True).values
        before = torch.cumsum(sp, -1) - sp
        assert (before - params.top_p).abs().min() > 1e-5


@torch.no_grad()
def exact_joint(prompt, params) -> torch.Tensor:
    """[V**3] float64: the target's probability of each (t1, t2, t3), by enumeration."""
    target = reference_models()[0]
    P = torch.zeros(V, V, V, dtype=torch.float64)
    for a in range(V):
        for b in range(V):
            logits = fe_logits(target, prompt + [a, b])[-3:]  # the distributions of t1, t2 | t1, t3 | t1 t2
            check_margins(logits, params)
            p = target_probs(logits, params).double()
            P[a, b] = p[0, a] * p[1, b] * p[2]
    assert abs(float(P.sum()) - 1) < 1e-6  # fp32 conditionals
    return (P / P.sum()).flatten()


def chi2_sf(x: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def chi_square_gof(counts: torch.Tensor, probs: torch.Tensor):
    """Pearson's chi-square of counts against probs, with the pooling rule of the module docstring.
    Returns (p-value, statistic, df). Asserts that impossible cells were never drawn."""
    n = int(counts.sum())
    impossible = probs == 0
    assert int(counts[impossible].sum()) == 0, f"{int(counts[impossible].sum())} samples in zero-probability cells"
    exp, obs = n * probs[~impossible], counts[~impossible].double()
    small = exp < 5
    e_cells, o_cells = list(exp[~small]), list(obs[~small])
    if small.any():
        e_pool, o_pool = exp[small].sum(), obs[small].sum()
        if e_pool >= 5 or not e_cells:
            e_cells.append(e_pool)
            o_cells.append(o_pool)
        else:  # the pool itself is too small: merge it into the smallest remaining cell
            i = min(range(len(e_cells)), key=lambda j: float(e_cells[j]))
            e_cells[i] += e_pool
            o_cells[i] += o_pool
    e, o = torch.stack(e_cells), torch.stack(o_cells)
    stat, df = float(((o - e) ** 2 / e).sum()), len(e_cells) - 1
    return chi2_sf(stat, df), stat, df


def test_chi2_survival_function():
    # known quantiles of the chi-square distribution: 95th percentiles at 1 and 10 df, 99.9th at 1 and 511 df,
    # the median at 100 df
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(18.307038, 10) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(10.827566, 1) == pytest.approx(0.001, abs=1e-7)
    assert chi2_sf(615.514863, 511) == pytest.approx(0.001, abs=1e-7)
    assert chi2_sf(99.334129, 100) == pytest.approx(0.5, abs=1e-6)


def test_chi_square_gof_pooling():
    # n = 100. Expected 3 + 1 pooled = 4 < 5: merged into the smallest remaining cell (16 -> 20); 3 cells, df 2
    probs = torch.tensor([0.5, 0.3, 0.16, 0.03, 0.01, 0.0], dtype=torch.float64)
    p, stat, df = chi_square_gof(torch.tensor([50, 30, 16, 1, 3, 0]), probs)
    assert df == 2 and stat < 1e-20 and p == pytest.approx(1.0)
    # expected 4 + 3 + 2 = 9 pooled into their own cell: 4 cells, df 3
    probs = torch.tensor([0.5, 0.3, 0.11, 0.04, 0.03, 0.02], dtype=torch.float64)
    p, stat, df = chi_square_gof(torch.tensor([50, 30, 11, 0, 0, 9]), probs)
    assert df == 3 and stat < 1e-20 and p == pytest.approx(1.0)
    with pytest.raises(AssertionError, match="zero-probability"):
        chi_square_gof(torch.tensor([50, 30, 16, 2, 1, 1]), torch.tensor([0.5, 0.3, 0.16, 0.03, 0.01, 0.0]))
    p, _, _ = chi_square_gof(torch.tensor([70, 20, 6, 3, 1, 0]), torch.tensor([0.5, 0.3, 0.16, 0.03, 0.01, 0.0]))
    assert p < ALPHA


def run_config(samples, name):
    tree, head, params, draft_temperature, prompt, rule = ALL[name]
    counts, first_round, seconds = samples(name)
    assert int(counts.sum()) == N_SAMPLES
    p, stat, df = chi_square_gof(counts, exact_joint(prompt, params))
    hist = {k: first_round[k] for k in sorted(first_round)}
    print(f"\n{name}: chi2 {stat:.1f}, df {df}, p = {p:.3g}; first-round emitted counts {hist}; "
          f"{seconds:.1f} s of CPU")
    return p, stat, df, first_round


@pytest.mark.parametrize("config", list(CONFIGS))
def test_speculative_sampling_matches_target(samples, config):
    p, stat, df, first_round = run_config(samples, config)
    # the first round emitted 1 (bonus at the root), 2 (depth 1 + bonus) and 3 (depth 1 and 2) tokens, often
    assert all(first_round[k] >= 200 for k in (1, 2, 3)), first_round
    assert p >= ALPHA, f"{config}: the generated tokens do not follow the target distribution (p = {p:.3g})"


@pytest.mark.parametrize("config", [f"wrong-{n}" for n in NEGATIVE])
def test_negative_control_is_detected(samples, config):
    p, stat, df, _ = run_config(samples, config)
    assert p < ALPHA, f"the test failed to detect the wrong rule {config} (p = {p:.3g})"


# --- cheaper checks ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return reference_models()


def test_good_head_accepts_more_than_bad(models):
    lens = {}
    for head in ("good", "bad"):
        eng = make_engine(models, DYNAMIC, head, 1.0)
        out = [eng.generate([1, 5, 2], 40, SamplingParams(1.0), seed=s) for s in range(8)]
        lens[head] = sum(o.mean_accepted for o in out) / len(out)
    assert lens["good"] > lens["bad"] + 0.3, lens


@pytest.mark.parametrize("tree", [DYNAMIC, STATIC], ids=["dynamic", "static"])
def test_temperature_zero_is_greedy(models, tree):
    target = models[0]
    for head in ("good", "bad"):
        for draft_temperature in (1.0, 0.5):
            eng = make_engine(models, tree, head, draft_temperature)
            lens = Counter()
            for prompt in ([1, 5, 2], [7], [3, 3, 0, 6, 2]):
                ref = fe_greedy(target, prompt, 30)
                for params in (SamplingParams(0.0), SamplingParams(0.0, top_k=2, top_p=0.3)):
                    out = eng.generate(prompt, 30, params, seed=5)
                    assert out.tokens == ref, (head, draft_temperature, prompt, params)
                    lens.update(out.accept_lens)
            # it did speculate: drafted tokens were accepted (down to depth 2 with the good head)
            assert max(lens) >= (3 if head == "good" else 2), lens


@pytest.mark.parametrize("tree", [DYNAMIC, STATIC], ids=["dynamic", "static"])
def test_seeded_runs_are_reproducible(models, tree):
    params = SamplingParams(0.9, top_k=6, top_p=0.95)
    eng = make_engine(models, tree, "good", 1.0)
    outs = []
    for seed in range(6):
        a = eng.generate([1, 5, 2], 20, params, seed=seed)
        b = make_engine(models, tree, "good", 1.0).generate([1, 5, 2], 20, params, seed=seed)
        assert (a.tokens, a.accept_lens) == (b.tokens, b.accept_lens)
        outs.append(tuple(a.tokens))
    assert len(set(outs)) > 1  # and the seed matters


def test_choose_tokens_samples_target_probs():
    """The inverse-CDF draw alone: many rows of the same logits, the same chi-square test."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=gen) * 2
    n = 200_000
    for params in (SamplingParams(1.0), SamplingParams(0.6, top_k=5), SamplingParams(1.7, top_p=0.7)):
        picks = choose_tokens(logits.expand(n, V), params, sampling_noise(n, gen, "cpu"))
        p, _, _ = chi_square_gof(torch.bincount(picks, minlength=V), target_probs(logits, params).double())
        assert p >= ALPHA, params
    assert (choose_tokens(logits.expand(4, V), SamplingParams(0.0)) == logits.argmax()).all()


def test_sampling_params_validation():
    for bad in (dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")),
                dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.2), dict(top_p=float("nan")),
                dict(top_k=-1), dict(top_k=2.5)):
        with pytest.raises(FastEagleError):
            SamplingParams(**bad)
    with pytest.raises(FastEagleError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(FastEagleError, match="top-p"):
        SamplingParams(1.0, top_p=0.0)
    with pytest.raises(FastEagleError, match="top-k"):
        SamplingParams(1.0, top_k=-3)
    SamplingParams(0.0, top_k=0, top_p=1.0)  # the boundaries are valid
    assert SamplingParams(0.0).greedy and not SamplingParams(0.5).greedy


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 10, 0.8), (2.0, 3, 0.5), (1.0, 64, 0.95), (0.9, 1, 1.0),
    (1.1, 0, 0.05),
])
def test_warp_logits_matches_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(int(temperature * 100) + top_k)
    logits = torch.randn(16, 48, generator=gen) * 3
    ids = torch.zeros(16, 1, dtype=torch.long)
    ref = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(ids, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(ids, ref)
    ours = warp_logits(logits, SamplingParams(temperature, top_k, top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(ref, -1), rtol=1e-5, atol=1e-7)
    # any leading shape
    torch.testing.assert_close(warp_logits(logits.view(2, 8, 48), SamplingParams(temperature, top_k, top_p)),
                               ours.view(2, 8, 48))


def test_top_p_among_candidates_equals_the_full_sort(monkeypatch):
    """top_p_mask decides the nucleus among the largest logits when their mass reaches top_p (no sort of the
    vocabulary: checked by making torch.sort fail), else sorts everything: the same tokens kept either way, for
    peaked rows, flat rows, -inf entries (after top-k) and both forms of top_p."""
    from fasteagle.sampling import top_p_mask

    gen = torch.Generator().manual_seed(5)
    V = 500
    peaked = torch.randn(4, V, generator=gen)
    peaked[:, :6] += torch.tensor([9.0, 8.0, 7.5, 7.0, 6.0, 5.0])
    flat = torch.randn(3, V, generator=gen) * 0.1
    holes = peaked.clone()
    holes[:, 200:] = float("-inf")
    real_sort = torch.sort
    for logits in (peaked, holes):
        for top_p in (0.5, 0.8, 0.9, torch.tensor(0.9)):  # the 6 leading tokens hold ~95% of the mass
            full = top_p_mask(logits, top_p, candidates=V)
            monkeypatch.setattr(torch, "sort", lambda *a, **k: pytest.fail("sorted the vocabulary"))
            fast = top_p_mask(logits, top_p, candidates=16)
            monkeypatch.setattr(torch, "sort", real_sort)
            assert torch.equal(fast, full), top_p
            assert 1 <= (fast > float("-inf")).sum(-1).min() and (fast > float("-inf")).sum(-1).max() < 16
    # a nucleus wider than the candidates: the full sort decides, with the same result
    for logits, top_p in ((flat, 0.3), (flat, 0.9), (peaked, 0.99)):
        assert torch.equal(top_p_mask(logits, top_p, candidates=16), top_p_mask(logits, top_p, candidates=V))
        assert (top_p_mask(logits, top_p, candidates=16) > float("-inf")).sum(-1).max() > 16


def test_device_params_warp_exactly_like_sampling_params():
    """The engine's form (numbers as a device tensor, top-k run at a power-of-two k): bit-identical warped logits,
    ties at the top-k boundary included, and the same variant key for settings of one kind."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 48, generator=gen).mul(2).round()  # many ties
    for temperature in (0.3, 0.7, 1.0, 1.7):
        for top_k in (0, 1, 2, 5, 8, 31, 47, 48, 100):
            for top_p in (1.0, 0.95, 0.6, 0.1):
                params = SamplingParams(temperature, top_k, top_p)
                dev = DeviceParams.of(params, 48, "cpu")
                assert torch.equal(warp_logits(logits, dev), warp_logits(logits, params)), params
    kind = DeviceParams.of(SamplingParams(0.7, 20, 0.9), 48, "cpu")
    assert kind.top_k_max == 32 and kind.top_p_on and not kind.greedy
    assert DeviceParams.of(SamplingParams(1.3, 17, 0.5), 48, "cpu").top_k_max == 32
    assert DeviceParams.of(SamplingParams(1.3, 48, 1.0), 48, "cpu").top_k_max == 0  # k >= V: off
    assert DeviceParams.of(SamplingParams(0.0, 5, 0.5), 48, "cpu") == DeviceParams(True, 0, False, None)
    assert DeviceParams.kinds(48) == 1 + 2 * (1 + 7)  # greedy; top-p on/off x top-k off, 1, 2, ..., 64
