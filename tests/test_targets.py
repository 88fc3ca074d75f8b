"""The other target families run every decoding path losslessly: Mixtral (mixture of experts), Mistral's sliding
window (shorter than the prompts and the generations here), Qwen3 (per-head q/k norm). Conversion parity with
transformers for each is in test_convert_hf.py; here:
- tree verification gives each node the logits plain decoding of its path gives (what lossless sampling rests on),
  with the tree crossing the window edge;
- EAGLE-1 (static tree), EAGLE-2 and EAGLE-3 greedy equal AR, token for token, with heads that agree often
  (tiny.predictable_pair) and random heads.
The compiled engine on these families: test_compile.py (inductor must run after the Triton interpreter tests)."""
from collections import Counter

import pytest
import torch

from fasteagle.eagle3 import Eagle3Head
from fasteagle.engine import SpecEngine
from fasteagle.model import causal_mask
from fasteagle.moe import MoEFeedForward
from tiny import predictable_pair, random_head, random_target

FAMILIES = {
    "mixtral": dict(n_experts=4, n_experts_per_tok=2),
    "mistral_window": dict(sliding_window=5),
    "qwen3": dict(qk_norm=True),
    "mixtral_window_qk_norm": dict(n_experts=8, n_experts_per_tok=2, sliding_window=9, qk_norm=True),
}


def prompts(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def random_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".q_norm." in name or ".k_norm." in name:
                p.uniform_(0.5, 1.5)  # q/k norms that are not the identity
    return model


@torch.no_grad()
def decode_logits(model, prompt, path):
    """Plain decoding: prefill the prompt, then the path one token at a time; the logits after the last token."""
    model.setup_cache(64)
    n = len(prompt)
    h = model(torch.tensor([prompt]), torch.arange(n)[None], torch.zeros(1, dtype=torch.long), causal_mask(n))
    for i, tok in enumerate(path):  # one token: the MoE's gathered path
        h = model(torch.tensor([[tok]]), torch.tensor([[n + i]]), torch.tensor([n + i]), causal_mask(1))
    return model.logits(h[:, -1])[0]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_tree_verify_logits_equal_path_decoding(family):
    target = random_norms(random_target(seed=5, vocab=48, max_seq_len=64, **FAMILIES[family]))
    prompt = list(range(3, 16))  # 13 tokens: longer than the windows
    parent = [-1, 0, 0, 1, 1, 3, 2, 5, 7]  # a 9-node tree, 5 levels below the root
    tokens = [7, 11, 2, 30, 5, 19, 44, 1, 8]
    mask = torch.zeros(9, 9, dtype=torch.bool)
    depth = []
    for i, p in enumerate(parent):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
        depth.append(int(mask[i].sum()) - 1)
    target.setup_cache(64)
    n = len(prompt)
    target(torch.tensor([prompt]), torch.arange(n)[None], torch.zeros(1, dtype=torch.long), causal_mask(n))
    h = target(torch.tensor([tokens]), n + torch.tensor([depth]), torch.tensor([n]), mask)
    tree_logits = target.logits(h)[0]
    for i in range(9):
        path = [tokens[j] for j in range(9) if mask[i, j]]
        torch.testing.assert_close(tree_logits[i], decode_logits(target, prompt, path), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_moe_paths_agree():
    from tiny import tiny_args

    moe = MoEFeedForward(tiny_args(n_experts=8, n_experts_per_tok=2))
    x = torch.randn(3, 32)
    w, e = moe.route(x)
    assert torch.allclose(moe._gathered(x, w, e), moe._dense(x, w, e), atol=1e-6)
    assert torch.allclose(moe._grouped(x, w, e), moe._dense(x, w, e), atol=1e-6)
    # the reference: each token through its own two experts, weighted
    ref = torch.stack([sum(float(w[n, j]) * (moe.w2[e[n, j]] @ (torch.nn.functional.silu(moe.w1[e[n, j]] @ x[n])
                                                               * (moe.w3[e[n, j]] @ x[n]))) for j in range(2))
                       for n in range(3)])
    assert torch.allclose(moe(x[None])[0], ref, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_eagle_greedy_equals_ar(family):
    kw = FAMILIES[family]
    lens = Counter()
    for alpha in (0.0, 2.0):
        target, head = predictable_pair(alpha, vocab=64, **kw)
        random_norms(target)
        ar = SpecEngine(target)
        engines = [SpecEngine(target, head, tree="dynamic", depth=5, top_k=4, total_tokens=16),
                   SpecEngine(target, head, tree="static", static_choices=[[0], [1], [0, 0], [0, 0, 0], [1, 0]])]
        for prompt in prompts(3, 64, seed=int(alpha) + 1):
            ref = ar.generate(prompt, 40).tokens
            for kind, spec in zip(("dynamic", "static"), engines):
                out = spec.generate(prompt, 40)
                assert out.tokens == ref, (alpha, prompt, kind)
                lens.update(out.accept_lens)
    assert max(lens) >= 4  # long accepted paths: the window edge and MoE routing were crossed inside rounds
    # random EAGLE-1/2 and EAGLE-3 heads (the heads are dense LLaMA layers whatever the target)
    target = random_norms(random_target(seed=3, vocab=64, n_layers=4, **kw))
    head = random_head(target)
    assert not head.args.n_experts and not head.args.sliding_window and not head.args.qk_norm
    torch.manual_seed(4)
    head3 = Eagle3Head(target.args.draft_layer(), 24, (1, 2, 3)).eval()
    head3.draft_vocab.copy_(torch.randperm(64)[:24])
    head3.bind(target)
    ar = SpecEngine(target)
    for h in (head, head3):
        spec = SpecEngine(target, h, depth=4, top_k=3, total_tokens=10)
        for prompt in prompts(2, 64, seed=9):
            assert spec.generate(prompt, 32).tokens == ar.generate(prompt, 32).tokens
