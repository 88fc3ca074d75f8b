"""The speculation shape chooser (fasteagle.autotune), the draft vocabulary and per-round adaptation.

The chooser is checked on synthetic costs whose right answer is known; the draft vocabulary and the adaptive
policy are checked for losslessness against plain greedy decoding (fp32, tiny models), including draft
vocabularies that leave out tokens the target chooses."""
import random

import pytest
import torch

from fasteagle.autotune import Adaptive, Shape, ar_step_cost, choose_shape, rank_shapes, round_cost
from fasteagle.engine import SpecEngine
from fasteagle.errors import FastEagleError
from tiny import predictable_pair, random_head, random_target, with_draft_vocab

GRID = (1, 2, 4, 8, 16, 32, 64)


def costs(verify_per_token: float, draft: float = 0.02, ar: float = 1.0) -> dict:
    """AR step = 1; verify(N) = 1 + verify_per_token * (N - 1); draft(m) and extend(m) = draft each."""
    return {"ar": ar, "verify": {n: ar * (1 + verify_per_token * (n - 1)) for n in GRID},
            "draft": {m: draft for m in (1, 2, 4, 8, 16)}, "extend": {m: draft for m in (1, 2, 4, 8, 16)}}


# tau grows with the tree, slowly for a weak head
WEAK = {Shape(1, 1, 2): 1.3, Shape(3, 1, 4): 1.4, Shape(4, 4, 12): 1.5, Shape(6, 10, 60): 1.6}
STRONG = {Shape(1, 1, 2): 1.8, Shape(3, 1, 4): 2.6, Shape(4, 4, 12): 3.2, Shape(6, 10, 60): 4.0}


def test_chooses_ar_when_verify_is_expensive():
    c = choose_shape(costs(verify_per_token=1.0), STRONG)  # verify(N) = N AR steps: nothing can win
    assert c.shape is None and c.speedup == 1.0
    assert all(row[3] < 1 for row in c.table)


def test_chooses_a_chain_when_acceptance_is_low():
    c = choose_shape(costs(verify_per_token=0.05), WEAK)
    assert c.shape is not None and c.shape.top_k == 1, c.table


def test_chooses_a_wide_tree_when_verify_is_nearly_free():
    c = choose_shape(costs(verify_per_token=0.001), STRONG)
    assert c.shape == Shape(6, 10, 60), c.table


def test_round_cost_adds_the_phases():
    s = Shape(4, 4, 12)
    # verify(12) by interpolation between 8 and 16, the root's draft step, 3 levels of 4, extend over 5
    assert round_cost(costs(0.1, draft=0.01), s) == pytest.approx(1 + 0.1 * 11 + 0.01 + 3 * 0.01 + 0.01)


def test_round_cost_takes_the_timed_tree_when_there_is_one():
    s, c = Shape(4, 4, 12), costs(0.1, draft=0.01)
    c["tree"] = {"4,4,12": 0.5}
    assert round_cost(c, s) == pytest.approx(1 + 0.1 * 11 + 0.5 + 0.01)
    assert round_cost(c, Shape(3, 1, 4)) == pytest.approx(1 + 0.1 * 3 + 0.01 + 2 * 0.01 + 0.01)  # not timed


def test_max_tokens_excludes_bigger_trees():
    table = rank_shapes(costs(0.001), STRONG, max_tokens=12)
    assert {row[0] for row in table} == {Shape(1, 1, 2), Shape(3, 1, 4), Shape(4, 4, 12)}


def test_adaptive_moves_with_acceptance():
    table = rank_shapes(costs(0.05), STRONG)
    pol = Adaptive(table, keep=3, alpha=0.5, probe=4)
    first = pol.next()
    assert first == table[0][0]
    for _ in range(20):  # nothing is ever accepted: expected tau -> 1, so AR with a probe every 4th step
        s = pol.next()
        if s is not None:
            pol.update(s, 1)
    picks = [pol.next() for _ in range(8)]
    assert picks.count(None) == 6 and all(p == table[0][0] for p in picks if p is not None), picks
    for _ in range(30):  # everything is accepted: back to the shape with the best expected speed
        s = pol.next() or table[0][0]
        pol.update(s, s.depth + 1)
    assert pol.next() is not None


def test_adaptive_weighs_ar_at_its_own_cost():
    """An AR step of the speculative engine also extends the head: AR is taken only when the best shape's expected
    speed is below 1 / that cost, not below 1."""
    c = costs(0.05, draft=0.1)
    assert ar_step_cost(c) == pytest.approx(1.1)
    table = rank_shapes(c, WEAK)
    s, tau, cost, _ = table[0]
    for r, ar_cost, want_ar in [(0.0, 1.0, True), (0.0, 1.01 * cost, False), (1.0, 1.0, False)]:
        pol = Adaptive(table, keep=1, ar_cost=ar_cost)
        pol.r = r  # expected tau 1 at r = 0: speed 1 / cost, beating an AR step that costs a little more
        assert (pol.next() is None) == want_ar, (r, ar_cost)


# --- losslessness ------------------------------------------------------------------------------------------------


def prompts(n, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(1, 10))] for _ in range(n)]


@pytest.mark.parametrize("alpha", [0.0, 2.0])
@pytest.mark.parametrize("vocab_size", [3, 8, 40])
def test_draft_vocabulary_greedy_equals_ar(alpha, vocab_size):
    target, head = predictable_pair(alpha, vocab=64)
    # a draft vocabulary of random ids: the target often chooses tokens outside it
    ids = torch.randperm(64, generator=torch.Generator().manual_seed(vocab_size))[:vocab_size]
    small = with_draft_vocab(head, target, ids)
    ar, spec = SpecEngine(target), SpecEngine(target, small, depth=4, top_k=3, total_tokens=12)
    outside = 0
    for p in prompts(4, 64, seed=vocab_size):
        ref, out = ar.generate(p, 40), spec.generate(p, 40)
        assert out.tokens == ref.tokens
        outside += sum(t not in set(ids.tolist()) for t in ref.tokens)
    assert outside > 0  # the test did exercise target choices outside the draft vocabulary


def test_draft_vocabulary_only_proposes_its_tokens():
    target, head = predictable_pair(0.0, vocab=64)
    ids = torch.tensor([5, 9, 17, 33])
    small = with_draft_vocab(head, target, ids)
    logp, tok = small.topk(torch.randn(3, target.args.dim), 4)
    assert set(tok.flatten().tolist()) <= set(ids.tolist())
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3))  # a distribution over the draft vocabulary
    small.use_draft_vocab(2)
    assert set(small.topk(torch.randn(3, target.args.dim), 2)[1].flatten().tolist()) <= {5, 9}
    with pytest.raises(FastEagleError, match="draft vocabulary"):
        small.use_draft_vocab(5)
    with pytest.raises(FastEagleError, match="--tree-top-k 3 exceeds the draft's vocabulary"):
        SpecEngine(target, small, depth=2, top_k=3, total_tokens=5)


def test_adaptive_policy_greedy_equals_ar():
    target, head = predictable_pair(2.0, vocab=64)
    taus = {Shape(1, 1, 2): 1.5, Shape(3, 2, 6): 2.2, Shape(5, 4, 16): 3.0}
    table = rank_shapes(costs(0.02), taus)
    pol = Adaptive(table, keep=3, alpha=0.5, probe=3)
    ar, spec = SpecEngine(target), SpecEngine(target, head, policy=pol)
    used = set()
    for p in prompts(6, 64, seed=3):
        ref = ar.generate(p, 48)
        out = spec.generate(p, 48)
        assert out.tokens == ref.tokens
        used.add(pol.next())
    # a random head: acceptance falls below the calibration, so the policy visits AR and shapes
    bad = SpecEngine(target, random_head(target, seed=9), policy=Adaptive(table, keep=3, alpha=0.5, probe=3))
    for p in prompts(3, 64, seed=4):
        assert bad.generate(p, 48).tokens == ar.generate(p, 48).tokens
    assert None in {bad.policy.next() for _ in range(6)}


# --- building the draft vocabulary and the calibration -------------------------------------------------------------


def test_vocab_cli_and_calibration(tmp_path, capsys, monkeypatch):
    import json

    from fasteagle.autotune import auto_policy, read_calibration
    from fasteagle.checkpoint import write_checkpoint
    from fasteagle.draft import load_draft, save_draft
    from fasteagle.train.__main__ import main
    from fasteagle.train.calibrate import calibrate, write_calibration
    from fasteagle.train.data import gen_data
    from fasteagle.train.vocab import draft_vocab

    target, head = predictable_pair(1.0, vocab=64)
    ckpt, head_dir, data = tmp_path / "target", tmp_path / "head", tmp_path / "data"
    ckpt.mkdir()
    write_checkpoint(ckpt, {"kind": "target", "model": target.args.to_dict(), "eos_token_ids": [0]},
                     target.state_dict())
    save_draft(head, head_dir)
    gen_data(target, prompts(24, 64, seed=5), data, max_new_tokens=24, batch_size=8, eos_ids=[0], progress=False)
    target.setup_cache(256)  # gen_data left a batched cache behind
    out = tmp_path / "head-v"
    assert main(["vocab", "--checkpoint", str(ckpt), "--draft", str(head_dir), "--out", str(out), "--data",
                 str(data), "--size", "16", "--device", "cpu"]) == 0
    assert "covering" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 16 and cfg["draft_vocab"]["source"] == ["data"]
    small = load_draft(out, target)
    assert small.vocab_ids.shape == (16,) and 0 in small.vocab_ids.tolist()  # EOS always in
    assert main(["vocab", "--checkpoint", str(ckpt), "--draft", str(head_dir), "--out", str(tmp_path / "x"),
                 "--size", "16"]) == 1
    assert "either --data" in capsys.readouterr().err
    # losslessness with the stored vocabulary, and the calibration round trip
    ar, spec = SpecEngine(target), SpecEngine(target, small, depth=3, top_k=2, total_tokens=6)
    for p in prompts(3, 64, seed=8):
        assert spec.generate(p, 30).tokens == ar.generate(p, 30).tokens
    rows = calibrate(target, small, prompts(2, 64, seed=9), 16, shapes=((1, 1, 2), (3, 2, 6)))
    assert [r["total_tokens"] for r in rows] == [2, 6] and all(1 <= r["tau"] <= r["depth"] + 1 for r in rows)
    write_calibration(out, rows, {"prompts": ["synthetic"]})
    assert read_calibration(out) == {Shape(r["depth"], r["top_k"], r["total_tokens"]): r["tau"] for r in rows}
    policy, choice, costs = auto_policy(target, small, out, cache_dir=tmp_path / "cache")
    assert set(costs) == {"ar", "verify", "draft", "extend", "tree"}
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1
    # read back from the cache (the start-up probe's check of a cached table is timing: tested on its own, not here)
    monkeypatch.setattr("fasteagle.autotune.STALE", 0.0)
    assert auto_policy(target, small, out, cache_dir=tmp_path / "cache")[2] == costs
    assert (policy is None) == (choice.shape is None)
    assert draft_vocab(torch.tensor([5, 0, 9, 9]), 2, always=[1]).tolist() == [1, 2]


@pytest.mark.parametrize("shape", [Shape(2, 1, 3), Shape(1, 4, 5), Shape(3, 2, 6), Shape(4, 3, 9)])
def test_calibration_replays_the_engines_rounds(shape):
    """calibrate replays greedy rounds against the target's greedy answer instead of running the engine: it must
    find the very accept lengths the engine's rounds have (the last round: the replay stops at the answer's end)."""
    from fasteagle.train.calibrate import replay
    from fasteagle.train.data import generate_batch

    target, head = predictable_pair(0.5, vocab=64)
    engine, n = SpecEngine(target, head, depth=shape.depth, top_k=shape.top_k, total_tokens=shape.total_tokens), 40
    rounds = 0
    for p in prompts(3, 64, seed=11):
        ran = engine.generate(p, n)
        (toks, feats), = generate_batch(target, [p], n)
        target.setup_cache(256)  # generate_batch left its own cache behind
        assert toks[len(p):].tolist() == ran.tokens
        replayed = replay(head, toks, feats, len(p), [shape])[shape]
        assert replayed[:-1] == ran.accept_lens[:-1] and replayed[-1] <= ran.accept_lens[-1]
        rounds += len(replayed)
    assert rounds < 3 * (n - 1)  # drafts were accepted: the comparison covered rounds longer than one token


def test_generate_uses_the_automatic_shape(tmp_path, monkeypatch, capsys):
    """No shape flag: generate asks the chooser; --json reports the shapes and the predicted speedup, and the
    output equals plain decoding. Costs are synthetic here (verify nearly free), so a tree must be chosen."""
    import json

    import fasteagle.autotune as autotune
    from fasteagle.checkpoint import write_checkpoint
    from fasteagle.draft import save_draft
    from fasteagle.generate import main as generate
    from fasteagle.train.calibrate import write_calibration

    target, head = predictable_pair(1.0, vocab=64)
    ckpt, head_dir = tmp_path / "target", tmp_path / "head"
    ckpt.mkdir()
    write_checkpoint(ckpt, {"kind": "target", "model": target.args.to_dict(), "eos_token_ids": []},
                     target.state_dict())
    save_draft(head, head_dir)
    write_calibration(head_dir, [{"depth": 1, "top_k": 1, "total_tokens": 2, "tau": 1.5},
                                 {"depth": 3, "top_k": 2, "total_tokens": 6, "tau": 2.5}], {})
    monkeypatch.setattr(autotune, "cached_costs", lambda *a, **k: costs(0.01))

    def run(*flags):
        assert generate(["--checkpoint", str(ckpt), "--draft", str(head_dir), "--prompt-ids", "1,5,9",
                         "--max-new-tokens", "24", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    auto, plain = run(), run("--no-draft")
    assert auto["token_ids"] == plain["token_ids"]
    assert auto["shape"][0] == {"depth": 3, "tree_top_k": 2, "total_tokens": 6} and auto["predicted_speedup"] > 1
    fixed = run("--depth", "2")  # any shape flag fixes the shape (the others take the defaults)
    assert fixed["shape"] == [{"depth": 2, "tree_top_k": 10, "total_tokens": 60}] and fixed["predicted_speedup"] is None
    monkeypatch.setattr(autotune, "cached_costs", lambda *a, **k: costs(1.0))  # verify as dear as N AR steps
    slow = run()
    assert slow["shape"] is None and slow["mean_accepted"] is None and slow["token_ids"] == plain["token_ids"]


def test_rounds_after_ar_steps_draft_from_an_up_to_date_head():
    """AR steps between rounds (the policy's AR mode) must extend the draft head too: with a head that always
    agrees with the target, every round after them still accepts its full depth."""
    target, head = predictable_pair(0.0, vocab=64)

    class Alternate:  # 3 AR steps, then a round, and again
        shapes = [Shape(3, 2, 8)]
        i = 0

        def next(self):
            self.i += 1
            return self.shapes[0] if self.i % 4 == 0 else None

        def update(self, shape, n):
            pass

    spec = SpecEngine(target, head, policy=Alternate())
    for p in prompts(3, 64, seed=11):
        out = spec.generate(p, 40)
        assert out.tokens == SpecEngine(target).generate(p, 40).tokens
        assert out.accept_lens and min(out.accept_lens) >= 3, out.accept_lens  # a stale head: mostly 1


def test_cached_costs_are_rechecked_and_merged(tmp_path, monkeypatch):
    """A cached cost table is used as it is while one AR step now is no faster than it says; one timed under load
    (its AR step far slower than the machine runs it now) is measured again and merged entry by entry, keeping the
    smaller time."""
    import json

    from fasteagle import autotune

    from fasteagle.draft import cpu_fast_paths

    target = random_target(seed=1, vocab=64)
    head = random_head(target)
    cpu_fast_paths(target, head)  # as cached_costs does first: it measures the kernel choice the key names
    path = tmp_path / "costs" / f"{autotune.costs_key(target, head, False)}.json"
    path.parent.mkdir()

    def fresh(*a, **k):
        return {"ar": 0.5, "verify": {1: 0.5, 2: 0.7}, "tree": {"1,1,2": 0.2}}

    fast = {"ar": 1e-9, "verify": {1: 1e-9, 2: 1e-9}, "tree": {"1,1,2": 1e-9}}
    path.write_text(json.dumps(fast))
    monkeypatch.setattr(autotune, "measure_costs", lambda *a, **k: pytest.fail("a good table was measured again"))
    assert autotune.cached_costs(target, head, cache_dir=tmp_path) == fast

    path.write_text(json.dumps({"ar": 100.0, "verify": {1: 100.0, 2: 0.1}, "tree": {"1,1,2": 0.3}}))
    monkeypatch.setattr(autotune, "measure_costs", fresh)
    merged = {"ar": 0.5, "verify": {1: 0.5, 2: 0.1}, "tree": {"1,1,2": 0.2}}
    assert autotune.cached_costs(target, head, cache_dir=tmp_path) == merged
    assert autotune._read_costs(path) == merged  # written back


def test_compiled_costs_time_compiled_phases(tmp_path, monkeypatch):
    """With --compile the chooser's costs are those of compiled phases (each timed width through compile_phase, as
    the engine compiles its own), not of eager forwards; the table keeps the eager AR step as "probe", and the
    start-up check compares an eager step with that, so it compiles nothing."""
    from fasteagle import autotune

    target = random_target(seed=1, vocab=64)
    head = random_head(target)
    wrapped = []

    def counting(fn, device):
        wrapped.append(fn)
        return fn

    monkeypatch.setattr(autotune, "compile_phase", counting)
    costs = autotune.measure_costs(target, head, context=16, reps=1, compiled=True)
    grid_v, grid_d = autotune.VERIFY_GRID_COMPILED, autotune.DRAFT_GRID_COMPILED
    assert len(wrapped) == len(grid_v) + 2 * len(grid_d)  # verify widths, draft levels, extends
    assert sorted(costs["verify"]) == list(grid_v) and sorted(costs["draft"]) == list(grid_d)
    assert "tree" not in costs and costs["probe"] > 0 and costs["ar"] == costs["verify"][1]
    wrapped.clear()
    assert "tree" in autotune.measure_costs(target, head, context=16, reps=1) and not wrapped  # eager: as is

    path = tmp_path / "costs" / f"{autotune.costs_key(target, head, True)}.json"
    path.parent.mkdir()
    table = {**costs, "ar": 1e9, "probe": 1e-9}  # judged by its eager probe (by "ar" it would look stale)
    path.write_text(__import__("json").dumps(table))
    monkeypatch.setattr(autotune, "measure_costs", lambda *a, **k: pytest.fail("a good table was measured again"))
    assert autotune.cached_costs(target, head, compiled=True, cache_dir=tmp_path)["ar"] == 1e9
    assert not wrapped


def test_compiled_costs_compile(monkeypatch):
    """The compiled timings really run compiled graphs: a tiny target + head through torch.compile."""
    from fasteagle import autotune

    monkeypatch.setattr(autotune, "VERIFY_GRID_COMPILED", (1, 2))
    monkeypatch.setattr(autotune, "DRAFT_GRID_COMPILED", (1,))
    target = random_target(seed=2, vocab=64)
    costs = autotune.measure_costs(target, random_head(target), context=16, reps=1, compiled=True)
    assert set(costs["verify"]) == {1, 2} and set(costs["extend"]) == {1} and costs["probe"] > 0
