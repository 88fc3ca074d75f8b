"""Draft-head training (fasteagle/train): data generation, the EAGLE loss loop, resume, and the tau evaluation.

The target is tests/tiny.py's `predictable_pair` target (vocab 64, dim 32, 2 layers) with alpha = 3: its next
token is mostly a function of the current token, but its attention/MLP weights are scaled up enough that context
often changes the answer, so a head must learn something real. fp32 on CPU throughout."""
import json
import random

import pytest
import torch

from fasteagle.checkpoint import write_checkpoint
from fasteagle.draft import load_draft
from fasteagle.engine import SpecEngine
from fasteagle.errors import FastEagleError
from fasteagle.model import causal_mask, rope_cache
from fasteagle.train import data as data_mod
from fasteagle.train.__main__ import main
from fasteagle.train.data import data_taps, gen_data, generate_batch, load_dataset, load_prompts, read_manifest
from fasteagle.train.evaluate import evaluate_prompts, summarize
from fasteagle.train.forward import train_forward
from fasteagle.train.loop import TrainConfig, fit, new_eagle3_head, new_head, split, validate
from tiny import predictable_pair

VOCAB, EOS, NEW = 64, 0, 48
TAPS = (0, 1)  # EAGLE-3 heads here read the inputs of both target layers


def rand_prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 16))] for _ in range(n)]


@pytest.fixture(scope="module")
def target():
    return predictable_pair(3.0, vocab=VOCAB, dim=32)[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, target):
    d = tmp_path_factory.mktemp("train") / "data"
    gen_data(target, rand_prompts(256, 0), d, max_new_tokens=NEW, batch_size=32, eos_ids=[EOS], progress=False)
    return d


def test_load_prompts(tmp_path):
    sharegpt = [{"id": "a", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]},
                {"id": "b", "conversations": [{"from": "human", "value": ""}]},  # empty: skipped
                {"id": "c", "conversations": [{"from": "human", "value": "hello"}]}]  # duplicate: dropped
    (tmp_path / "sg.json").write_text(json.dumps(sharegpt))
    (tmp_path / "mt.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["first", "second"]}) + "\n\n" +
                                       json.dumps({"messages": [{"role": "system", "content": "s"},
                                                                {"role": "user", "content": "u"}]}) + "\n")
    assert load_prompts([tmp_path / "sg.json", tmp_path / "mt.jsonl"]) == ["hello", "first", "u"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FastEagleError, match="not valid JSON"):
        load_prompts([tmp_path / "bad.json"])
    (tmp_path / "none.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(FastEagleError, match="no user prompts"):
        load_prompts([tmp_path / "none.json"])
    with pytest.raises(FastEagleError, match="not found"):
        load_prompts([tmp_path / "missing.json"])


@torch.no_grad()
def test_generate_batch_matches_ar_and_features(target):
    """Batched right-padded generation (rows finishing at different times, the batch shrinking) gives exactly the
    B=1 engine's greedy tokens, and features equal to one forward over the whole sequence."""
    prompts = rand_prompts(9, 1)
    # an EOS id that some answers contain and some do not, so rows end at different times or run to the limit
    answers = [set(t[len(p) :].tolist()) for p, (t, _) in zip(prompts, generate_batch(target, prompts, 30))]
    eos = next(i for i in range(VOCAB) if 2 <= sum(i in a for a in answers) <= 6)
    out = generate_batch(target, prompts, 30, eos_ids=[eos])
    target.setup_cache(256)
    ar = SpecEngine(target)
    stops = set()
    for p, (toks, feats) in zip(prompts, out):
        ref = ar.generate(p, 30, eos_ids=[eos])
        stops.add(ref.stop_reason)
        assert toks.tolist() == p + ref.tokens
        N = len(toks)
        h = target(toks[None], torch.arange(N)[None], torch.zeros(1, dtype=torch.long), causal_mask(N))[0]
        torch.testing.assert_close(feats[:-1], h[:-1], atol=1e-5, rtol=1e-5)
        assert not feats[-1].any()  # the last token never went through the target
    assert stops == {"eos", "max_new_tokens"}  # both endings exercised


def test_gen_data_resumes(tmp_path, target, monkeypatch):
    prompts = rand_prompts(40, 2)
    kw = dict(max_new_tokens=12, batch_size=8, eos_ids=[EOS], progress=False)
    gen_data(target, prompts, tmp_path / "ref", **kw)
    calls = {"n": 0}
    real = data_mod.generate_batch

    def dies_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "generate_batch", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        gen_data(target, prompts, tmp_path / "cut", **kw)
    assert len(read_manifest(tmp_path / "cut")["shards"]) == 2
    monkeypatch.setattr(data_mod, "generate_batch", real)
    gen_data(target, prompts, tmp_path / "cut", **kw)
    ref, cut = load_dataset(tmp_path / "ref"), load_dataset(tmp_path / "cut")
    assert len(ref) == len(cut) == 40
    for a, b in zip(ref, cut):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.features, b.features) and a.prompt_len == b.prompt_len
    with pytest.raises(FastEagleError, match="other settings"):
        gen_data(target, prompts, tmp_path / "cut", **{**kw, "max_new_tokens": 13})


def make_head(target, arch, seed):
    """A fresh EAGLE-1/2 head, or an EAGLE-3 head tapping both layers over a shuffled 40-token draft vocabulary,
    and the width of the target features it reads."""
    if arch == "eagle":
        return new_head(target, seed=seed), 32
    torch.manual_seed(seed)
    return new_eagle3_head(target, TAPS, torch.randperm(VOCAB)[:40], seed=seed), 32 * len(TAPS)


@pytest.mark.parametrize("arch", ["eagle", "eagle3"])
def test_train_forward_matches_cached_head(target, arch):
    head, width = make_head(target, arch, 3)
    B, T = 3, 20
    tokens, feats = torch.randint(0, VOCAB, (B, T)), torch.randn(B, T, width)
    (out,) = train_forward(head, tokens, feats, rope_cache(head.args, T))
    head.setup_cache(T)
    with torch.no_grad():
        for b in range(B):
            ref = head(tokens[b : b + 1], feats[b : b + 1], torch.arange(T)[None], torch.zeros(1, dtype=torch.long),
                       causal_mask(T))
            torch.testing.assert_close(out[b], ref[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["eagle", "eagle3"])
def test_train_forward_deeper_steps_match_drafting(target, arch):
    """Step k of train_forward at pair t equals drafting k levels deep with the cached head: pairs 0..t-k+1 on
    real features, then k-1 single-token steps, each fed the previous step's output (as the draft tree does)."""
    head, width = make_head(target, arch, 4)
    T, steps = 12, 3
    tokens, feats = torch.randint(0, VOCAB, (1, T)), torch.randn(1, T, width)
    with torch.no_grad():
        outs = train_forward(head, tokens, feats, rope_cache(head.args, T), steps=steps)
        for k in range(2, steps + 1):
            for t in (k - 1, 5, T - 1):
                head.setup_cache(T)
                n = t - k + 2  # real pairs 0..t-k+1
                out = head(tokens[:, :n], feats[:, :n], torch.arange(n)[None], torch.zeros(1, dtype=torch.long),
                           causal_mask(n))[:, -1:]
                for p in range(n, t + 1):
                    out = head(tokens[:, p : p + 1], out, torch.tensor([[p]]), torch.tensor([p]), causal_mask(1))
                torch.testing.assert_close(outs[k - 1][0, t], out[0, 0], atol=1e-5, rtol=1e-5, msg=f"k={k} t={t}")


def test_trained_head_beats_untrained(target, data_dir, tmp_path):
    """A few hundred CPU steps: validation top-1 accuracy and EAGLE-2 tau far above an untrained head's, and the
    speculative output still equals plain greedy output."""
    cfg = TrainConfig(steps=300, lr=3e-3, warmup=20, batch_tokens=2048, eval_every=100, ckpt_every=100)
    summary = fit(target, data_dir, tmp_path / "head", cfg, progress=False)
    assert summary["steps"] == 300 and len(summary["val_history"]) == 3
    trained = load_draft(tmp_path / "head", target)
    untrained = new_head(target, seed=0).eval()
    _, val = split(load_dataset(data_dir), cfg)
    rope = rope_cache(trained.args, cfg.max_len + 1)
    acc_t, acc_u = validate(trained, val, rope, cfg)["acc"], validate(untrained, val, rope, cfg)["acc"]
    assert acc_t == pytest.approx(summary["val_acc"])
    assert acc_u < 0.1 and acc_t > 0.6, (acc_u, acc_t)  # measured: ~0.00 vs ~0.84

    items = [{"question_id": i, "category": "c%d" % (i % 2), "ids": p} for i, p in enumerate(rand_prompts(6, 99))]
    taus = {}
    ar_cache = tmp_path / "ar.jsonl"
    for name, head in (("trained", trained), ("untrained", untrained)):
        results = evaluate_prompts(target, head, items, max_new_tokens=NEW, eos_ids=[EOS], ar_cache=ar_cache,
                                   progress=False)
        assert len(ar_cache.read_text().splitlines()) == len(items)  # the second head reused the AR outputs
        s = summarize(results)
        assert s["all_equal"], (name, [r["question_id"] for r in results if not r["equal"]])
        assert set(s["per_category"]) == {"c0", "c1"}
        taus[name] = s["tau"]
    assert taus["untrained"] < 1.5 and taus["trained"] > 3.0, taus  # measured: ~1.05 vs ~5.4 (max 7)
    # a cached AR output that differs from the real one is caught as a mismatch, not trusted blindly
    lines = [json.loads(x) for x in ar_cache.read_text().splitlines()]
    lines[0]["tokens"] = lines[0]["tokens"][:-1] + [(lines[0]["tokens"][-1] + 1) % VOCAB]
    ar_cache.write_text("".join(json.dumps(x) + "\n" for x in lines))
    results = evaluate_prompts(target, trained, items[:1], max_new_tokens=NEW, eos_ids=[EOS], ar_cache=ar_cache,
                               progress=False)
    assert not results[0]["equal"]


def test_fit_resume_is_exact(target, data_dir, tmp_path):
    cfg = TrainConfig(steps=40, lr=1e-3, warmup=5, batch_tokens=1024, eval_every=0, ckpt_every=10, max_val_seqs=4)
    fit(target, data_dir, tmp_path / "a", cfg, progress=False)
    assert fit(target, data_dir, tmp_path / "b", cfg, stop_at=25, progress=False) is None
    assert not (tmp_path / "b").exists()
    with pytest.raises(FastEagleError, match="--resume"):
        fit(target, data_dir, tmp_path / "b", cfg, progress=False)
    fit(target, data_dir, tmp_path / "b", cfg, resume=True, progress=False)
    a, b = load_draft(tmp_path / "a", target).state_dict(), load_draft(tmp_path / "b", target).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # fine-tuning starts from the given head: with a vanishing learning rate it stays where it started
    tiny_lr = TrainConfig(steps=3, lr=1e-12, warmup=1, batch_tokens=1024, eval_every=0, ckpt_every=0, max_val_seqs=4)
    summary = fit(target, data_dir, tmp_path / "c", tiny_lr, init=tmp_path / "a", progress=False)
    assert summary["init"] == str(tmp_path / "a")
    c = load_draft(tmp_path / "c", target).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=1e-6, msg=k)


def test_cli_fit_and_errors(target, data_dir, tmp_path, capsys):
    ckpt = tmp_path / "target"
    ckpt.mkdir()
    write_checkpoint(ckpt, {"kind": "target", "model": target.args.to_dict()}, target.state_dict())
    head_dir = tmp_path / "head"
    argv = ["fit", "--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(head_dir), "--steps", "20",
            "--eval-every", "0", "--ckpt-every", "0", "--device", "cpu"]
    assert main(argv) == 0
    cfg = json.loads((head_dir / "config.json").read_text())
    assert cfg["kind"] == "draft" and cfg["training"]["steps"] == 20
    load_draft(head_dir, target)  # --draft loads it directly
    capsys.readouterr()
    assert main(argv) == 1  # the output directory is taken now
    assert "not empty" in capsys.readouterr().err
    # fine-tune that head with training-time test: the depth-2 accuracy is validated and recorded
    argv_ttt = ["fit", "--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(tmp_path / "ttt"), "--steps",
                "4", "--eval-every", "0", "--ckpt-every", "0", "--init", str(head_dir), "--ttt-steps", "3"]
    assert main(argv_ttt) == 0
    training = json.loads((tmp_path / "ttt" / "config.json").read_text())["training"]
    assert training["config"]["ttt_steps"] == 3 and training["init"] == str(head_dir)
    assert 0 < training["val_history"][-1]["acc2"] <= 1
    capsys.readouterr()
    base = ["fit", "--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(tmp_path / "ttt2"), "--steps", "4"]
    assert main(base + ["--ttt-steps", "0"]) == 1
    assert "ttt-steps" in capsys.readouterr().err
    assert main(base + ["--init", str(tmp_path)]) == 1  # not a draft head
    assert "config.json" in capsys.readouterr().err
    assert main(["fit", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "h2")]) == 1
    assert "manifest.json" in capsys.readouterr().err
    assert main(["gen-data", "--checkpoint", str(ckpt), "--prompts", str(tmp_path / "none.json"), "--out",
                 str(tmp_path / "d")]) == 1
    assert "not found" in capsys.readouterr().err


def test_prompt_only_data_and_all_positions(target, data_dir, tmp_path):
    """gen-data with 0 new tokens keeps the prompts' (teacher-forced) features; fit with loss_positions="all"
    trains on them too, while validation still scores only self-distilled answers."""
    prompts = rand_prompts(16, 5)
    gen_data(target, prompts, tmp_path / "p", max_new_tokens=0, batch_size=8, progress=False)
    seqs = load_dataset(tmp_path / "p")
    assert sorted(s.tokens.tolist() for s in seqs) == sorted(prompts)
    assert all(s.prompt_len == len(s.tokens) for s in seqs)
    with torch.no_grad():
        s = seqs[0]
        N = len(s.tokens)
        target.setup_cache(N)
        h = target(s.tokens[None], torch.arange(N)[None], torch.zeros(1, dtype=torch.long), causal_mask(N))[0]
        torch.testing.assert_close(s.features.float(), h, atol=2e-3, rtol=2e-3)  # fp16 on disk
    cfg = TrainConfig(steps=5, batch_tokens=1024, eval_every=0, ckpt_every=0, loss_positions="all")
    train, val = split(load_dataset([data_dir, tmp_path / "p"]), cfg)
    assert all(len(v.tokens) > v.prompt_len for v in val)
    assert sum(len(t.tokens) == t.prompt_len for t in train) == sum(len(p) >= 3 for p in prompts)
    # the same prompts again, with answers this time: each prompt is kept once, with its answer
    gen_data(target, prompts[:6], tmp_path / "a", max_new_tokens=8, batch_size=8, eos_ids=[EOS], progress=False)
    both = load_dataset([tmp_path / "p", tmp_path / "a", tmp_path / "a"])
    assert len(both) == len(prompts)
    assert [s.tokens[: s.prompt_len].tolist() for s in both] == [s.tokens.tolist() for s in seqs]
    assert sum(len(s.tokens) > s.prompt_len for s in both) == 6
    summary = fit(target, [data_dir, tmp_path / "p"], tmp_path / "head", cfg, progress=False)
    assert summary["train_tokens"] > summary["train_answer_tokens"]
    with pytest.raises(FastEagleError, match="with answers"):
        fit(target, tmp_path / "p", tmp_path / "head2", cfg, progress=False)


# --- EAGLE-3 ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data3_dir(tmp_path_factory, target):
    d = tmp_path_factory.mktemp("train3") / "data"
    gen_data(target, rand_prompts(256, 0), d, max_new_tokens=NEW, batch_size=32, eos_ids=[EOS], taps=TAPS,
             progress=False)
    return d


def test_eagle3_data_taps_layers_and_keeps_the_hidden_state(target, data_dir, data3_dir):
    """EAGLE-3 data: the inputs of the tapped layers, then the final-normed hidden state (what EAGLE-1/2 data
    holds alone); the same tokens as EAGLE-1/2 data of the same prompts."""
    assert read_manifest(data3_dir)["settings"]["taps"] == list(TAPS) and data_taps(data3_dir) == TAPS
    assert data_taps(data_dir) == ()
    with pytest.raises(FastEagleError, match="different target layers"):
        data_taps([data_dir, data3_dir])
    plain, tapped = load_dataset(data_dir), load_dataset(data3_dir)
    assert [s.tokens.tolist() for s in plain] == [s.tokens.tolist() for s in tapped]
    for a, b in zip(plain[:5], tapped[:5]):
        assert b.features.shape == (len(b.tokens), 32 * (len(TAPS) + 1))
        torch.testing.assert_close(b.features[:, -32:], a.features, atol=0, rtol=0)
        N = len(b.tokens)
        with torch.no_grad():
            target.setup_cache(N)
            _, ref = target(b.tokens[None], torch.arange(N)[None], torch.zeros(1, dtype=torch.long), causal_mask(N),
                            taps=TAPS)
        torch.testing.assert_close(b.features[:-1, :-32].float(), ref[0, :-1], atol=2e-3, rtol=2e-3)  # fp16


def test_fit_eagle3_head(target, data3_dir, tmp_path):
    """An EAGLE-3 head trained with training-time test over a draft vocabulary smaller than the target's: loads as
    an EAGLE-3 head, guesses far better than an untrained one, and its greedy drafts stay lossless (target choices
    outside the draft vocabulary included)."""
    cfg = TrainConfig(steps=300, lr=3e-3, warmup=20, batch_tokens=2048, eval_every=150, ckpt_every=0, arch="eagle3",
                      draft_vocab_size=48, ttt_steps=2, noise=0.0)
    summary = fit(target, data3_dir, tmp_path / "head", cfg, progress=False)
    head = load_draft(tmp_path / "head", target)
    assert head.arch == "eagle3" and head.taps == TAPS and summary["ce_vocab_size"] == 48
    vocab = head.draft_vocab.tolist()
    assert EOS in vocab and len(set(vocab)) == 48
    train, val = split(load_dataset(data3_dir), cfg)
    counts = torch.bincount(torch.cat([s.tokens[s.prompt_len :] for s in train]), minlength=VOCAB)
    assert vocab[0] == EOS  # always in it (rare here: most answers run to the length limit), then by frequency
    assert counts[vocab[1:]].min() >= counts[[i for i in range(VOCAB) if i not in vocab]].max()
    rope = rope_cache(head.args, cfg.max_len + 1)
    untrained = new_eagle3_head(target, TAPS, head.draft_vocab, seed=0).eval()
    acc_t, acc_u = validate(head, val, rope, cfg)["acc"], validate(untrained, val, rope, cfg)["acc"]
    assert acc_t == pytest.approx(summary["val_acc"])
    assert acc_u < 0.3 and acc_t > 0.6, (acc_u, acc_t)
    items = [{"question_id": i, "category": "c", "ids": p} for i, p in enumerate(rand_prompts(6, 99))]
    results = evaluate_prompts(target, head, items, max_new_tokens=NEW, eos_ids=[EOS], ar_cache=tmp_path / "ar.jsonl",
                               progress=False)
    s = summarize(results)
    assert s["all_equal"] and s["tau"] > 2.0, s
    emitted = {t for line in (tmp_path / "ar.jsonl").read_text().splitlines() for t in json.loads(line)["tokens"]}
    assert emitted - set(vocab)  # the target chose tokens the draft could not propose


def test_cli_eagle3_arch_checks(target, data_dir, data3_dir, tmp_path, capsys):
    ckpt = tmp_path / "target"
    ckpt.mkdir()
    write_checkpoint(ckpt, {"kind": "target", "model": target.args.to_dict()}, target.state_dict())
    fit_cmd = ["fit", "--checkpoint", str(ckpt), "--out", str(tmp_path / "h"), "--steps", "3", "--eval-every", "0",
               "--ckpt-every", "0", "--device", "cpu"]
    assert main(fit_cmd + ["--data", str(data_dir), "--arch", "eagle3"]) == 1
    assert "--arch eagle3" in capsys.readouterr().err
    assert main(fit_cmd + ["--data", str(data3_dir)]) == 1
    assert "taps layers [0, 1]" in capsys.readouterr().err
    assert main(fit_cmd + ["--data", str(data3_dir), "--arch", "eagle3", "--draft-vocab-size", "16"]) == 0
    assert load_draft(tmp_path / "h", target).draft_vocab.shape == (16,)
    capsys.readouterr()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["hello there"]}) + "\n")
    gen = ["gen-data", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "d")]
    for bad, msg in ((["--arch", "eagle3", "--taps", "1,0"], "increasing order"), (["--arch", "eagle3", "--taps", "x"],
                     "comma-separated"), (["--taps", "0,1"], "--taps is for --arch eagle3"),
                     (["--arch", "eagle3", "--taps", "0,3"], "within 0..2")):
        assert main(gen + bad) == 1
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
