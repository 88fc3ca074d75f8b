"""The target's and the head's CPU fast paths (linear.pack_linears, FusedInput, quantize_linears): the stacked q/k/v
and gate/up weights, packed for the skinny GEMM kernel or for oneDNN, compute what the separate projections compute, for one row and for tree-sized inputs, with
and without a bias; the members then carry no packed copy of their own; int8 stacks and can be dropped again."""
import pytest
import torch

from fasteagle import linear
from fasteagle.linear import FusedInput, can_pack, can_quantize
from fasteagle.model import Attention, FeedForward, causal_mask
from tiny import random_head, random_target

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="no oneDNN packed linear on this build")


def forward(model, T, threads):
    torch.set_num_threads(threads)
    try:
        tokens = torch.arange(3, 3 + T)[None] % model.args.vocab_size
        zero = torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            return model.logits(model(tokens, torch.arange(T)[None], zero, causal_mask(T)))
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("packing", ["skinny", "onednn"])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("T,threads", [(1, 1), (1, 2), (3, 1), (7, 2)])
def test_stacked_projections_compute_the_separate_ones(qkv_bias, T, threads, packing, monkeypatch):
    monkeypatch.setattr(linear, "USE_SKINNY", packing == "skinny")
    if packing == "skinny" and not linear.skinny_available():
        pytest.skip("the skinny GEMM kernel does not build here")
    plain = random_target(seed=3, qkv_bias=qkv_bias)
    fast = random_target(seed=3, qkv_bias=qkv_bias)
    assert fast.pack()
    groups = [m for m in fast.modules() if isinstance(m, FusedInput)]
    assert {type(m) for m in groups} == {Attention, FeedForward}
    for m in groups:
        assert m.group_packed is not None and all(lin.packed is None for lin in m.group())
        assert linear.is_skinny(m.group_packed) == (packing == "skinny")
    assert (fast.layers[0].attn.group_bias is not None) == qkv_bias
    torch.testing.assert_close(forward(fast, T, threads), forward(plain, T, threads), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not can_quantize(torch.zeros(1)), reason="no x86/fbgemm quantized engine")
def test_int8_head_stacks_its_groups_and_drops_them():
    target = random_target()
    head = random_head(target)
    assert head.quantize(min_numel=0)
    attn, mlp = head.layers[0].attn, head.layers[0].mlp
    assert attn.group_qpacked is not None and mlp.group_qpacked is not None
    assert all(lin.qpacked is None for lin in attn.group() + mlp.group())  # the stack replaces them
    assert head.layers[0].attn.wo.qpacked is not None and head.fc.qpacked is None  # fc stays fp32 (DraftHead.quantize)
    x = torch.randn(1, 5, target.args.dim)
    q, k, v = attn.group_outputs(x)
    torch.testing.assert_close(torch.cat([q, k, v], -1), torch.cat([lin(x) for lin in attn.group()], -1),
                               atol=0.05 * x.abs().max().item(), rtol=0)  # int8 vs fp32: close, not equal
    assert not head.quantize(False)
    assert attn.group_qpacked is None and mlp.group_qpacked is None and head.fc.qpacked is None
    torch.testing.assert_close(torch.cat(attn.group_outputs(x), -1), torch.cat([lin(x) for lin in attn.group()], -1))
