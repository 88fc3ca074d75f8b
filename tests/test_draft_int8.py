"""The draft head's int8 CPU path (DraftHead.quantize, the engine's default on CPU): its proposals stay close to
the fp32 head's, it can be switched off again exactly, it follows a change of draft vocabulary, and decoding
through it equals plain greedy decoding token for token (only the proposals change, never the output)."""
import pytest
import torch

from fasteagle.draft import cpu_fast_paths
from fasteagle.engine import SpecEngine
from fasteagle.linear import can_quantize, int8_copies, is_weight_only, skinny_available
from test_spec_greedy import prompts
from tiny import predictable_pair, with_draft_vocab

pytestmark = pytest.mark.skipif(not can_quantize(torch.zeros(1)), reason="no x86/fbgemm quantized engine")


@pytest.fixture(scope="module")
def pair():
    return predictable_pair(1.0, vocab=64, dim=64)


def head_outputs(head, target):
    head.setup_cache(64)
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (1, 6))
    feats = torch.randn(1, 6, target.args.dim)
    pos = torch.arange(6)[None]
    zero = torch.zeros(1, dtype=torch.long)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        out = head(tokens, feats, pos, zero, mask)[0]
        return out, head.topk(out, 4)


def test_int8_head_proposes_like_fp32_and_switches_back_exactly(pair):
    target, head = pair
    head.quantize(False)
    out32, (logp32, ids32) = head_outputs(head, target)
    cpu_fast_paths(target, head, int8=False)
    assert not head.quantize()  # a tiny head stays fp32 by default: int8 would cost more than it saves
    assert head.quantize(min_numel=0)
    out8, (logp8, ids8) = head_outputs(head, target)
    assert not torch.equal(logp8, logp32)  # the int8 path really ran (the ranking; this head's layer adds nothing)
    torch.testing.assert_close(out8, out32, atol=0.05 * out32.abs().max().item(), rtol=0)
    assert (ids8[:, 0] == ids32[:, 0]).float().mean() >= 0.8
    assert not head.quantize(False)
    out, (logp, ids) = head_outputs(head, target)
    torch.testing.assert_close(out, out32, atol=1e-5, rtol=1e-5)  # packed fp32 vs plain: rounding only
    assert torch.equal(ids, ids32)


def test_int8_head_keeps_the_token_beside_a_large_feature(pair):
    """fc stays fp32: its input puts the token embedding (SmolLM2: RMS 0.12) beside the target's feature (channels
    up to ~18), and int8 activations with one scale per call round much of the embedding half to 0, so the head
    partly loses the token it drafts from (bundled SmolLM2 head, MT-bench, 2/4/8: tau 1.80 vs 1.86)."""
    target, head = pair
    head.quantize(False)
    torch.manual_seed(0)
    feats = torch.randn(1, 8, target.args.dim)
    feats[..., 5] = 18.0  # one large channel, as the real feature has
    tokens_a, tokens_b = torch.randint(0, 64, (2, 1, 8))
    scale = 0.12 / head.embed_weight.pow(2).mean().sqrt()  # the real model's embedding scale

    def token_effect():
        with torch.no_grad():
            return head.layer_input(tokens_a, feats) - head.layer_input(tokens_b, feats)

    embed = head.embed_weight.detach().clone()
    try:
        head.embed_weight.data.mul_(scale)
        ref = token_effect()
        assert head.quantize(min_numel=0) and head.fc.qpacked is None
        torch.testing.assert_close(token_effect(), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    finally:
        head.quantize(False)
        head.embed_weight.data.copy_(embed)


def test_int8_ranking_follows_the_draft_vocabulary(pair):
    target, head = pair
    vocab = list(range(0, 64, 2))  # even ids only
    small = with_draft_vocab(head, target, vocab)
    assert small.quantize(min_numel=0)
    _, (_, ids) = head_outputs(small, target)
    assert set(ids.flatten().tolist()) <= set(vocab)
    small.use_draft_vocab(8)
    assert small.head_qpacked is not None
    _, (_, ids) = head_outputs(small, target)
    assert set(ids.flatten().tolist()) <= set(vocab[:8])
    small.use_draft_vocab(None)
    _, (_, ids) = head_outputs(small, target)
    assert ids.max() >= 0 and small.head_qpacked is not None


@pytest.mark.parametrize("draft_int8", [True, False])
@pytest.mark.parametrize("tree,shape", [("dynamic", (4, 4, 12)), ("dynamic", (3, 1, 4)), ("static", None)])
def test_greedy_equal_with_and_without_int8(pair, draft_int8, tree, shape):
    target, head = pair
    depth, top_k, total = shape or (6, 10, 60)
    head.quantize(draft_int8, min_numel=0)  # tiny weights: int8 only when asked for every size
    ar = SpecEngine(target)
    spec = SpecEngine(target, head, tree=tree, depth=depth, top_k=top_k, total_tokens=total, draft_int8=draft_int8)
    assert (head.head_qpacked is not None) == draft_int8
    taus = []
    for prompt in prompts(4, 64, seed=5):
        out = spec.generate(prompt, 40)
        assert out.tokens == ar.generate(prompt, 40).tokens, prompt
        taus.append(out.mean_accepted)
    assert sum(taus) / len(taus) > 1.5  # the int8 head still agrees with the target often


def test_cost_cache_keys_the_int8_path(pair):
    from fasteagle.autotune import costs_key

    target, head = pair
    assert costs_key(target, head, False, True) != costs_key(target, head, False, False)
    assert costs_key(target, head, True, True) != costs_key(target, head, True, False)  # compiled: weight-only int8
    assert costs_key(target, head, True, True) != costs_key(target, head, False, True)


@pytest.mark.skipif(not skinny_available(), reason="the skinny GEMM kernel does not build here")
def test_weight_only_int8_head_proposes_like_fp32_and_replaces_the_other_kind(pair):
    """Compiled engines quantize the head weight-only (the skinny kernel's int8 variant: fp32 activations, no
    per-call scale), fc included in the rule that keeps it fp32; a head quantized the other way is requantized."""
    target, head = pair
    head.quantize(False)
    out32, (logp32, ids32) = head_outputs(head, target)
    try:
        assert head.quantize(min_numel=0)  # fbgemm's kind first
        assert not is_weight_only(head.head_qpacked)
        assert head.quantize(min_numel=0, weight_only=True)
        copies = int8_copies(head) + [head.head_qpacked]
        assert len(copies) >= 4 and all(is_weight_only(q) for q in copies) and head.fc.qpacked is None
        out8, (logp8, ids8) = head_outputs(head, target)
        assert not torch.equal(logp8, logp32)
        torch.testing.assert_close(out8, out32, atol=0.02 * out32.abs().max().item(), rtol=0)
        assert (ids8[:, 0] == ids32[:, 0]).float().mean() >= 0.8
        assert cpu_fast_paths(target, head, int8=True, compiled=True)  # the engine's compiled choice: the same kind
        assert all(is_weight_only(q) for q in int8_copies(head) + [head.head_qpacked])
    finally:
        head.quantize(False)
    out, (_, ids) = head_outputs(head, target)
    torch.testing.assert_close(out, out32, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, ids32)
