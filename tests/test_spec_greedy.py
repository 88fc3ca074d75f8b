"""EAGLE-1 (static tree) and EAGLE-2 (dynamic tree) greedy decoding equals plain greedy decoding token for token.

fp32 on CPU, tiny models: random heads (acceptance near nothing) and heads built to agree with the target often
(tests/tiny.py), over many prompts and tree configurations; EOS and max_new_tokens landing inside an accepted path;
the end of the KV cache."""
import random
from collections import Counter

import pytest

import fasteagle.engine as engine_mod
from conftest import fe_greedy
from fasteagle.engine import SpecEngine
from fasteagle.errors import FastEagleError
from tiny import predictable_pair, random_head, random_target

CONFIGS = [  # (depth, top_k, total_tokens)
    (1, 1, 1), (1, 1, 2), (1, 3, 4), (2, 2, 5), (3, 10, 64), (4, 4, 20), (5, 10, 60), (6, 8, 64), (6, 2, 7),
    (3, 1, 64), (2, 5, 64),
]


def prompts(n, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(1, 12))] for _ in range(n)]


@pytest.fixture(scope="module")
def pairs():
    return {alpha: predictable_pair(alpha, vocab=64) for alpha in (0.0, 1.0, 2.0, 4.0)}


@pytest.mark.parametrize("depth,top_k,total", CONFIGS)
def test_dynamic_tree_equals_greedy(pairs, depth, top_k, total):
    lens = Counter()
    for alpha, (target, head) in pairs.items():
        ar = SpecEngine(target)
        spec = SpecEngine(target, head, tree="dynamic", depth=depth, top_k=top_k, total_tokens=total)
        for prompt in prompts(3, 64, seed=int(alpha * 10) + depth):
            ref = ar.generate(prompt, 40)
            out = spec.generate(prompt, 40)
            assert out.tokens == ref.tokens, (alpha, prompt)
            lens.update(out.accept_lens)
    assert max(lens) <= depth + 1
    if total > depth:  # enough nodes for a full-depth path: the agreeing heads reach it
        assert lens[depth + 1] > 0, lens


STATIC_TREES = {
    "default": None,  # the reference's mc_sim_7b_63
    "chain": [[0], [0, 0], [0, 0, 0]],
    "wide": [[0], [1], [2], [3], [4], [0, 0], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1]],
}


@pytest.mark.parametrize("name", STATIC_TREES)
def test_static_tree_equals_greedy(pairs, name):
    lens = Counter()
    for alpha, (target, head) in pairs.items():
        ar = SpecEngine(target)
        spec = SpecEngine(target, head, tree="static", static_choices=STATIC_TREES[name])
        for prompt in prompts(3, 64, seed=7):
            assert spec.generate(prompt, 40).tokens == ar.generate(prompt, 40).tokens
            lens.update(spec.generate(prompt, 40).accept_lens)
    assert lens[spec.depth + 1] > 0


def test_random_head_equals_greedy_and_accepts_little():
    target = random_target(seed=3, vocab=96, n_kv_heads=4)
    head = random_head(target, seed=4)
    ar = SpecEngine(target)
    spec = SpecEngine(target, head, depth=5, top_k=4, total_tokens=24)
    taus = []
    for prompt in prompts(6, 96, seed=3):
        out = spec.generate(prompt, 48)
        assert out.tokens == ar.generate(prompt, 48).tokens
        taus.append(out.mean_accepted)
    assert sum(taus) / len(taus) < 1.6  # a random head rarely guesses right


def test_accepted_lengths_span_one_to_depth_plus_one(pairs):
    depth, lens = 5, Counter()
    for alpha in (1.0, 2.0, 4.0):
        target, head = pairs[alpha]
        spec = SpecEngine(target, head, depth=depth, top_k=4, total_tokens=30)
        for prompt in prompts(4, 64, seed=11):
            lens.update(spec.generate(prompt, 60).accept_lens)
    assert set(lens) == set(range(1, depth + 2)), lens


def mid_round_stop(spec, prompt):
    """Run spec once without stops: (the result, an index of its tokens where a cut lands inside an accepted path),
    or None when no round emitted 3 or more tokens."""
    free = spec.generate(prompt, 60)
    pos = 0
    for n in free.accept_lens:
        if n >= 3:
            return free, pos + 1 + 1  # index in free.tokens of the 2nd token of a round emitting >= 3 (+1: prefill)
        pos += n
    return None


def find_mid_round_stop(target, head, prompt):
    found = mid_round_stop(SpecEngine(target, head, depth=5, top_k=4, total_tokens=30), prompt)
    assert found is not None, "no long round"
    return found


def test_eos_inside_accepted_path(pairs):
    target, head = pairs[0.0]
    prompt = [5, 9, 2]
    free, cut = find_mid_round_stop(target, head, prompt)
    eos = free.tokens[cut]
    first = free.tokens.index(eos)  # the first occurrence is where generation must stop
    ref = SpecEngine(target).generate(prompt, 60, eos_ids=[eos])
    out = SpecEngine(target, head, depth=5, top_k=4, total_tokens=30).generate(prompt, 60, eos_ids=[eos])
    assert out.tokens == ref.tokens == free.tokens[: first + 1]
    assert out.stop_reason == ref.stop_reason == "eos"
    assert 1 + sum(out.accept_lens) > len(out.tokens)  # the last round emitted tokens past the EOS: cut there


def test_max_new_tokens_inside_accepted_path(pairs):
    target, head = pairs[0.0]
    prompt = [5, 9, 2]
    free, cut = find_mid_round_stop(target, head, prompt)
    out = SpecEngine(target, head, depth=5, top_k=4, total_tokens=30).generate(prompt, cut + 1)
    assert out.tokens == free.tokens[: cut + 1]
    assert out.stop_reason == "max_new_tokens"
    assert 1 + sum(out.accept_lens) > cut + 1


@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_cache_end(tree):
    target, head = predictable_pair(2.0, vocab=64, max_seq_len=61)
    prompt = [3, 1, 4, 1, 5]
    ref = SpecEngine(target).generate(prompt, 500)
    assert ref.stop_reason == "cache_full" and len(ref.tokens) == 1 + 61 - len(prompt)
    out = SpecEngine(target, head, tree=tree, depth=5, top_k=4, total_tokens=24).generate(prompt, 500)
    assert out.tokens == ref.tokens
    assert out.stop_reason == "cache_full"
    assert out.accept_lens  # it did speculate before finishing token by token


@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_key_windows_change_mid_generation(monkeypatch, tree):
    """Decode steps and rounds attend over a bucketed key window [0, W) that grows with the context, not the whole
    cache: with small windows (16, 32, 64, ...) generation crosses several of them, and AR and speculative output
    still equal greedy decoding over the whole cache (conftest.fe_greedy: no window)."""
    monkeypatch.setattr(engine_mod, "MIN_WINDOW", 16)
    target, head = predictable_pair(2.0, vocab=64, max_seq_len=100)
    ar, spec = SpecEngine(target), SpecEngine(target, head, tree=tree, depth=4, top_k=3, total_tokens=12)
    assert [ar._window(L, False) for L in (0, 15, 16, 40, 63, 64, 99)] == [16, 16, 32, 64, 64, 100, 100]
    prompt = [3, 1, 4, 1, 5]
    ref = fe_greedy(target, prompt, 90)
    assert ar.generate(prompt, 90).tokens == ref
    out = spec.generate(prompt, 90)
    assert out.tokens == ref and max(out.accept_lens) > 1


def test_bad_inputs():
    target = random_target()
    head = random_head(target)
    with pytest.raises(FastEagleError, match="does not fit the KV cache"):
        SpecEngine(target).generate(list(range(10)) * 30, 4)
    with pytest.raises(FastEagleError, match="out of range"):
        SpecEngine(target).generate([1, 2, 999], 4)
    with pytest.raises(FastEagleError, match="empty prompt"):
        SpecEngine(target).generate([], 4)
    with pytest.raises(FastEagleError, match="top-k"):
        SpecEngine(target, head, top_k=1000)
    with pytest.raises(FastEagleError, match="unknown tree"):
        SpecEngine(target, head, tree="bushy")
    other = random_target(vocab=48)
    with pytest.raises(FastEagleError, match="does not fit the target"):
        random_head(other).bind(target)
