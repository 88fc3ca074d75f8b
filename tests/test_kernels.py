"""The Triton kernels against their PyTorch references, on CPU under the Triton interpreter (TRITON_INTERPRET=1).

Shapes are small but deliberately odd (tree sizes 1/7/61/64/100, key blocks wider than the tree, cache lengths off
the block size, vocabularies off the tile size): the interpreter is slow, so the cases are a chosen cross-product,
not the full one.
Tolerances: fp32 outputs within 2e-5 of the reference (exact same products, different summation order);
bf16 outputs within 2e-2 abs + 2e-2 rel of an fp32 reference computed from the same bf16 inputs (the kernels
round P and the output to bf16).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (triton.jit reads it when decorating)

import pytest  # noqa: E402
import torch  # noqa: E402

from fasteagle.draft import DraftHead  # noqa: E402
from fasteagle.errors import FastEagleError  # noqa: E402
from fasteagle.kernels import _common  # noqa: E402
from fasteagle.kernels.draft_ops import (  # noqa: E402
    fused_embed_fc, fused_embed_fc_reference, lm_head_topk, lm_head_topk_reference,
)
from fasteagle.kernels.kv_commit import kv_commit, kv_commit_reference  # noqa: E402
from fasteagle.kernels.tree_attention import tree_attention, tree_attention_reference  # noqa: E402
from fasteagle.model import ModelArgs, Transformer, causal_mask  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreted():
    # Without the interpreter the wrappers would silently run the references on CPU and every test would be vacuous.
    assert _common.INTERPRET, (
        "fasteagle.kernels was imported before TRITON_INTERPRET=1 was set (or with TRITON_INTERPRET=0); "
        "run this file with TRITON_INTERPRET=1"
    )


def tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def random_tree_mask(T: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestor mask of a random tree: node 0 is the root, parent[i] < i; mask[i, j] iff j is i or an ancestor."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        mask[i, i] = True
        if i > 0:
            p = int(torch.randint(0, i, (1,), generator=gen))
            mask[i] |= mask[p]
    return mask


def random_block_mask(T: int, W: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """[T, W] mask over a key block whose last T slots hold the queries. "tree": the last T nodes of a random
    W-node tree (each sees its ancestors, including ones in the first W - T slots); "random": independent coin
    flips. Either way query i sees its own slot W - T + i, as every mask the model builds does."""
    if kind == "tree":
        return random_tree_mask(W, gen)[W - T:]
    mask = torch.rand(T, W, generator=gen) < 0.5
    mask[:, W - T:] |= torch.eye(T, dtype=torch.bool)
    return mask


# ----------------------------------------------------------------------------------------------------------------
# tree_attention

# (T, cache lens per batch row, Hq, Hkv, head dim, dtype, num_splits or None for the default heuristic)
ATTN_CASES = [
    (1, [0, 37], 8, 1, 64, torch.float32, None),  # decode, GQA 8, an empty cache row
    (1, [300], 4, 4, 128, torch.bfloat16, 5),  # decode, MHA, splits over a long-ish cache
    (7, [37, 1], 8, 2, 128, torch.float32, 3),  # GQA 4, tiny and unaligned caches
    (7, [300], 4, 1, 64, torch.bfloat16, None),  # GQA 4, default splits
    (61, [300, 0], 2, 2, 64, torch.float32, 1),  # non-power-of-two tree, no split (direct store)
    (64, [1, 37], 8, 1, 64, torch.bfloat16, 4),  # GQA 8, 512 rows; row 0 leaves most chunks empty
    (64, [300], 4, 1, 128, torch.float32, 2),
    (61, [1, 300], 8, 1, 128, torch.bfloat16, 3),  # GQA 8 at head dim 128
    (1, [0], 2, 1, 128, torch.float32, 6),  # all chunks but the first are empty
    (16, [300], 8, 2, 64, torch.float32, None),
    (7, [37], 4, 2, 64, torch.float16, 2),
]


def _attn_inputs(T, lens, Hq, Hkv, D, dtype, seed, pad=13, W=None, kind="tree"):
    """Random q, caches and a [T, W] mask (W defaults to T) with the key block ending `pad` slots before S."""
    W = T if W is None else W
    gen = torch.Generator().manual_seed(seed)
    B = len(lens)
    S = max(lens) + W + pad
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    cache_len = torch.tensor(lens, dtype=torch.int64)
    return q, k, v, cache_len, random_block_mask(T, W, kind, gen)


def _poison_beyond(k, v, cache_len, W):
    """Copies of k, v with NaN in every slot >= cache_len + W: reading one would poison the output."""
    k, v = k.clone(), v.clone()
    for b, n in enumerate(cache_len.tolist()):
        k[b, :, n + W:] = float("nan")
        v[b, :, n + W:] = float("nan")
    return k, v


@pytest.mark.parametrize("T,lens,Hq,Hkv,D,dtype,splits", ATTN_CASES)
def test_tree_attention_matches_sdpa(T, lens, Hq, Hkv, D, dtype, splits):
    q, k, v, cache_len, mask = _attn_inputs(T, lens, Hq, Hkv, D, dtype, seed=T * 1000 + D + Hq)
    ref = tree_attention_reference(q.float(), k.float(), v.float(), cache_len, mask)
    kp, vp = _poison_beyond(k, v, cache_len, T)
    out = tree_attention(q, kp, vp, cache_len, mask, num_splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


# Key blocks wider than the query block (the draft head's tree steps): (T, W, cache lens, Hq, Hkv, head dim, dtype,
# num_splits, mask kind). With the interpreter's 32-key blocks, blocks at cache_len 37 span 2-3 key blocks.
WIDE_CASES = [
    (10, 30, [37], 8, 2, 64, torch.float32, None, "tree"),  # EAGLE-2 level 3 with top_k 10
    (10, 40, [300, 5], 4, 1, 128, torch.bfloat16, 3, "random"),  # GQA 4, block split across chunks
    (10, 40, [0], 4, 2, 64, torch.float32, 2, "tree"),  # empty cache: only the block is visible
    (7, 7, [37, 64], 4, 2, 64, torch.float32, 2, "random"),  # W == T with a non-ancestor mask
    (1, 5, [0, 37], 8, 1, 64, torch.float32, 2, "random"),  # one query over earlier levels, GQA 8
    (1, 5, [31], 2, 2, 128, torch.float16, 1, "tree"),  # block straddles a key-block edge, direct store
]


@pytest.mark.parametrize("T,W,lens,Hq,Hkv,D,dtype,splits,kind", WIDE_CASES)
def test_tree_attention_wide_key_block(T, W, lens, Hq, Hkv, D, dtype, splits, kind):
    q, k, v, cache_len, mask = _attn_inputs(T, lens, Hq, Hkv, D, dtype, seed=T * 1000 + W + D, W=W, kind=kind)
    assert mask.shape == (T, W)
    ref = tree_attention_reference(q.float(), k.float(), v.float(), cache_len, mask)
    kp, vp = _poison_beyond(k, v, cache_len, W)
    out = tree_attention(q, kp, vp, cache_len, mask, num_splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


def test_tree_attention_wide_batched_mask():
    """A [B, T, W] mask, one per row; flipping the mask over the earlier levels (columns < W - T) must matter."""
    q, k, v, cache_len, _ = _attn_inputs(6, [40, 9], 4, 2, 64, torch.float32, seed=21, W=18)
    gen = torch.Generator().manual_seed(22)
    mask = torch.stack([random_block_mask(6, 18, "tree", gen), random_block_mask(6, 18, "random", gen)])
    out = tree_attention(q, k, v, cache_len, mask, num_splits=2)
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, cache_len, mask), **tol(q.dtype))
    flipped = mask.clone()
    flipped[:, :, :12] = ~flipped[:, :, :12]
    assert not torch.allclose(tree_attention(q, k, v, cache_len, flipped, num_splits=2), out, atol=1e-3)


def test_tree_attention_batched_mask_scale_and_strided_q():
    """A [B, T, T] mask (one per row), a custom scale and a non-contiguous q (the model's transposed layout)."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, D, S = 2, 4, 2, 9, 64, 60
    q = torch.randn(B, T, Hq, D, generator=gen).transpose(1, 2)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    cache_len = torch.tensor([40, 3])
    mask = torch.stack([random_tree_mask(T, gen), causal_mask(T)])
    out = tree_attention(q, k, v, cache_len, mask, scale=0.3, num_splits=2)
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, cache_len, mask, scale=0.3), **tol(q.dtype))
    # A wrong mask must change the result (the tree mask is really applied on the new block).
    wrong = torch.ones(T, T, dtype=torch.bool)
    assert not torch.allclose(tree_attention(q, k, v, cache_len, wrong, num_splits=2), out, atol=1e-3)


def test_tree_attention_prefill_chunk_longer_than_64():
    q, k, v, cache_len, _ = _attn_inputs(100, [37], 2, 1, 64, torch.float32, seed=11, pad=0)
    mask = causal_mask(100)
    out = tree_attention(q, k, v, cache_len, mask)
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, cache_len, mask), **tol(torch.float32))


def test_tree_attention_rejects_bad_input():
    q, k, v, cache_len, mask = _attn_inputs(3, [5], 4, 2, 64, torch.float32, seed=0)
    with pytest.raises(FastEagleError, match="head dims"):
        tree_attention(q[..., :48], k[..., :48], v[..., :48], cache_len, mask)
    with pytest.raises(FastEagleError, match="attn_mask"):
        tree_attention(q, k, v, cache_len, mask[:2, :2])
    with pytest.raises(FastEagleError, match="attn_mask"):  # W < T
        tree_attention(q, k, v, cache_len, mask[:, :2])
    with pytest.raises(FastEagleError, match="attn_mask"):  # batch of masks != batch of q
        tree_attention(q, k, v, cache_len, mask[None].expand(2, 3, 3))
    with pytest.raises(FastEagleError, match="key block"):  # W > cache slots
        tree_attention(q, k, v, cache_len, torch.ones(3, k.shape[2] + 1, dtype=torch.bool))
    with pytest.raises(FastEagleError, match="cache_len"):
        tree_attention(q, k, v, cache_len.int(), mask)


@pytest.mark.parametrize("window", [None, 6], ids=["full", "window-6"])
@torch.no_grad()
def test_tree_attention_in_model_matches_sdpa_backend(window):
    """The model's "triton" attention backend against its "sdpa" backend: prefill of 11 tokens, then a 7-node
    tree-verify step; also with a Mistral-style sliding window shorter than the prompt."""
    args = ModelArgs(vocab_size=61, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                     intermediate_size=96, max_position_embeddings=64, sliding_window=window)
    torch.manual_seed(0)
    model = Transformer(args)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 61, (1, 11), generator=gen)
    tree = torch.randint(0, 61, (1, 7), generator=gen)
    tree_mask = random_tree_mask(7, gen)
    depth = tree_mask.sum(-1, keepdim=True).T - 1  # [1, 7]
    outs = []
    for backend in ("sdpa", "triton"):
        model.setup_cache(40, attn_backend=backend)
        cache_len = torch.zeros(1, dtype=torch.int64)
        h1 = model(prompt, torch.arange(11)[None], cache_len, causal_mask(11))
        h2 = model(tree, 11 + depth, cache_len + 11, tree_mask)
        outs.append((h1, h2))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


# (T, cache lens, Hq, Hkv, D, dtype, splits, window, kind): kind "tree" = a random tree verified at positions
# cache_len + depth, "causal" = a prefill chunk at positions cache_len + i (longer than the window)
WINDOW_CASES = [
    (7, [37, 300], 4, 2, 64, torch.float32, 3, 5, "tree"),  # window shorter than the tree's depth spread
    (7, [300], 8, 1, 64, torch.float32, None, 100, "tree"),  # whole blocks below the window skipped
    (1, [0, 90], 4, 1, 128, torch.float32, 2, 33, "tree"),  # decode; an empty row; a window off the block size
    (45, [3, 70], 2, 2, 64, torch.float32, 2, 17, "causal"),  # prefill longer than the window
    (16, [300], 4, 1, 64, torch.bfloat16, 4, 64, "tree"),
]


@pytest.mark.parametrize("T,lens,Hq,Hkv,D,dtype,splits,window,kind", WINDOW_CASES)
def test_tree_attention_sliding_window(T, lens, Hq, Hkv, D, dtype, splits, window, kind):
    q, k, v, cache_len, mask = _attn_inputs(T, lens, Hq, Hkv, D, dtype, seed=T + window)
    if kind == "causal":
        mask = causal_mask(T)
        positions = cache_len[:, None] + torch.arange(T)[None, :]
    else:
        positions = cache_len[:, None] + mask.sum(-1)[None, :] - 1  # the root at cache_len, depth d at + d
    k, v = _poison_beyond(k, v, cache_len, T)
    for b, lo in enumerate((positions.min(1).values - window + 1).tolist()):
        k[b, :, :max(lo, 0) // 128 * 128] = float("nan")  # whole blocks below every window: must not be read
        v[b, :, :max(lo, 0) // 128 * 128] = float("nan")
    out = tree_attention(q, k, v, cache_len, mask, num_splits=splits, positions=positions, window=window)
    ref = tree_attention_reference(q.float(), k.float().nan_to_num(), v.float().nan_to_num(), cache_len, mask,
                                   positions=positions, window=window)
    torch.testing.assert_close(out.float(), ref, **tol(dtype))
    if window < min(lens) + 1:  # the window changes the result (negative control)
        full = tree_attention_reference(q.float(), k.float().nan_to_num(), v.float().nan_to_num(), cache_len, mask)
        assert not torch.allclose(full, ref, atol=1e-3)


def test_tree_attention_window_rejects_bad_input():
    q, k, v, cache_len, mask = _attn_inputs(3, [5], 2, 1, 64, torch.float32, seed=0, W=5)
    with pytest.raises(FastEagleError, match="window needs"):
        tree_attention(q, k, v, cache_len, mask, positions=torch.zeros(1, 3, dtype=torch.long), window=4)  # W > T
    with pytest.raises(FastEagleError, match="window needs"):
        tree_attention(q, k, v, cache_len, mask[:, 2:], window=4)  # no positions


@torch.no_grad()
def test_tree_attention_in_draft_head_matches_sdpa_backend():
    """The draft head on both backends: a causal prefill, then two EAGLE-2 tree levels (top_k 4), the second with
    a [4, 8] mask over the first level's entries and its own (W > T, as fasteagle.tree.build_dynamic_tree builds)."""
    args = ModelArgs(vocab_size=61, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64,
                     intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    target = Transformer(args)
    head = DraftHead(args, fc_bias=True).bind(target)
    gen = torch.Generator().manual_seed(2)
    P, k = 9, 4
    prompt = torch.randint(0, 61, (1, P), generator=gen)
    feats = torch.randn(1, P + 2 * k, 128, generator=gen)
    lvl1, lvl2 = torch.randint(0, 61, (1, k), generator=gen), torch.randint(0, 61, (1, k), generator=gen)
    src = torch.randint(0, k, (k,), generator=gen)  # each level-2 query's parent among level 1
    eye = torch.eye(k, dtype=torch.bool)
    mask2 = torch.cat([eye[src], eye], dim=1)  # [k, 2k]
    assert not mask2[:, :k].all() and mask2[:, :k].any()
    L = torch.tensor([P])
    outs = []
    for backend in ("sdpa", "triton"):
        head.setup_cache(32, attn_backend=backend)
        o0 = head(prompt, feats[:, :P], torch.arange(P)[None], torch.zeros(1, dtype=torch.int64), causal_mask(P))
        o1 = head(lvl1, feats[:, P:P + k], L.expand(1, k), L, eye)
        o2 = head(lvl2, feats[:, P + k:], (L + 1).expand(1, k), L, mask2)
        outs.append((o0, o1, o2))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # The level-2 queries do read level 1: without those columns the result changes.
    head.setup_cache(32, attn_backend="triton")
    head(prompt, feats[:, :P], torch.arange(P)[None], torch.zeros(1, dtype=torch.int64), causal_mask(P))
    head(lvl1, feats[:, P:P + k], L.expand(1, k), L, eye)
    alone = head(lvl2, feats[:, P + k:], (L + 1).expand(1, k), L, torch.cat([eye & False, eye], dim=1))
    assert not torch.allclose(alone, outs[1][2], atol=1e-3)


def test_tree_attention_under_torch_compile():
    """The custom op traces into one fullgraph (fake impl for shapes) and runs the kernel inside the graph."""
    q, k, v, cache_len, mask = _attn_inputs(5, [20], 4, 2, 64, torch.float32, seed=3)

    def f(q, k, v, cache_len, mask):
        return tree_attention(q, k, v, cache_len, mask, num_splits=2) * 2.0

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cache_len, mask)
    torch.testing.assert_close(out, 2.0 * tree_attention_reference(q, k, v, cache_len, mask), **tol(q.dtype))


# ----------------------------------------------------------------------------------------------------------------
# fused_embed_fc


@pytest.mark.parametrize("M,dtype,bias", [(1, torch.float32, True), (13, torch.float32, False),
                                          (37, torch.bfloat16, True)])
def test_fused_embed_fc(M, dtype, bias):
    gen = torch.Generator().manual_seed(M)
    V, D = 101, 48  # D not a multiple of the K tile
    tokens = torch.randint(0, V, (M,), generator=gen)
    feats = torch.randn(M, D, generator=gen).to(dtype)
    emb = torch.randn(V, D, generator=gen).to(dtype)
    w = (torch.randn(D, 2 * D, generator=gen) / 8).to(dtype)
    b = torch.randn(D, generator=gen).to(dtype) if bias else None
    out = fused_embed_fc(tokens, feats, emb, w, b)
    ref = fused_embed_fc_reference(tokens, feats.float(), emb.float(), w.float(), b.float() if bias else None)
    assert out.dtype == dtype and out.shape == (M, D)
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


def test_fused_embed_fc_leading_dims_and_errors():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (2, 3), generator=gen)
    feats, emb = torch.randn(2, 3, 32, generator=gen), torch.randn(20, 16, generator=gen)
    w = torch.randn(24, 48, generator=gen)  # E=16 embedding + F=32 features -> N=24
    out = fused_embed_fc(tokens, feats, emb, w)
    torch.testing.assert_close(out, fused_embed_fc_reference(tokens, feats, emb, w), **tol(torch.float32))
    with pytest.raises(FastEagleError, match="fc weight"):
        fused_embed_fc(tokens, feats, emb, w[:, :40])


# ----------------------------------------------------------------------------------------------------------------
# lm_head_topk


@pytest.mark.parametrize("M,V,k,temperature", [(1, 1000, 1, 1.0), (5, 4099, 8, 0.7), (17, 1000, 10, 1.0)])
def test_lm_head_topk_fp32(M, V, k, temperature):
    gen = torch.Generator().manual_seed(V + k)
    D = 40  # not a multiple of the D tile
    hidden, weight = torch.randn(M, D, generator=gen), torch.randn(V, D, generator=gen)
    vals, ids = lm_head_topk(hidden, weight, k, temperature)
    ref_vals, ref_ids = lm_head_topk_reference(hidden, weight, k, temperature)
    assert vals.dtype == torch.float32 and ids.dtype == torch.int64 and vals.shape == ids.shape == (M, k)
    # Random Gaussian logits: ties are vanishingly unlikely, so torch.topk's order must match exactly.
    assert torch.equal(ids, torch.topk(hidden @ weight.T, k, dim=-1).indices)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(vals, ref_vals, **tol(torch.float32))


def test_lm_head_topk_bf16():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 64, generator=gen).bfloat16()
    weight = torch.randn(4099, 64, generator=gen).bfloat16()
    vals, ids = lm_head_topk(hidden, weight, 10)
    ref_vals, _ = lm_head_topk_reference(hidden, weight, 10)
    torch.testing.assert_close(vals, ref_vals, atol=1e-3, rtol=1e-3)  # fp32 accumulation on both sides
    # The returned ids carry the returned values (whatever the order of near-ties).
    logp = torch.log_softmax(hidden.float() @ weight.float().T, -1)
    torch.testing.assert_close(logp.gather(1, ids), vals, atol=1e-3, rtol=1e-3)
    assert (vals[:, :-1] >= vals[:, 1:]).all()


def test_lm_head_topk_ties_lower_id_first():
    """Integer-valued inputs give exact fp32 logits and many exact ties, across tiles and vocab ranges."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randint(-2, 3, (4, 16), generator=gen).float()
    base = torch.randint(-2, 3, (37, 16), generator=gen).float()
    weight = base[torch.randint(0, 37, (1500,), generator=gen)]  # every row repeated ~40 times
    vals, ids = lm_head_topk(hidden, weight, 10)
    ref_vals, ref_ids = lm_head_topk_reference(hidden, weight, 10)  # stable descending sort
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(vals, ref_vals, **tol(torch.float32))


def test_lm_head_topk_rejects_bad_input():
    h, w = torch.randn(2, 16), torch.randn(5, 16)
    with pytest.raises(FastEagleError, match="k=6"):
        lm_head_topk(h, w, 6)
    with pytest.raises(FastEagleError, match="temperature"):
        lm_head_topk(h, w, 2, temperature=0.0)


def test_draft_ops_under_torch_compile():
    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(3, 32, generator=gen), torch.randn(300, 32, generator=gen)
    tokens, emb, fc = torch.randint(0, 300, (3,), generator=gen), w, torch.randn(32, 64, generator=gen)

    def f(h, w, tokens, emb, fc):
        x = fused_embed_fc(tokens, h, emb, fc)
        return lm_head_topk(x, w, 4)

    vals, ids = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w, tokens, emb, fc)
    ref_vals, ref_ids = lm_head_topk_reference(fused_embed_fc_reference(tokens, h, emb, fc), w, 4)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(vals, ref_vals, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# kv_commit


def _random_path(n_nodes: int, P: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Root-to-node path of a random tree (indices strictly increase, so path[d] >= d), padded to P with
    arbitrary node indices >= d."""
    parent = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n_nodes)]
    depth = [0] * n_nodes
    for i in range(1, n_nodes):
        depth[i] = depth[parent[i]] + 1
    candidates = [i for i in range(n_nodes) if depth[i] < P]
    node = candidates[int(torch.randint(0, len(candidates), (1,), generator=gen))]
    path = []
    while node >= 0:
        path.append(node)
        node = parent[node]
    path.reverse()
    accept = len(path)
    path += [int(torch.randint(d, n_nodes, (1,), generator=gen)) for d in range(accept, P)]
    return torch.tensor(path, dtype=torch.int64), accept


def test_engine_on_the_triton_backend_equals_sdpa():
    """The whole engine on the kernels (tree attention, fused draft ops, one kv_commit per layer and round): the
    same greedy tokens and accepted lengths as on the sdpa backend."""
    from fasteagle.engine import SpecEngine
    from tiny import predictable_pair

    outs = {}
    for backend in ("sdpa", "triton"):
        target, head = predictable_pair(2.0, vocab=64, dim=64, max_seq_len=48)  # head_dim 16
        target.setup_cache(48, attn_backend=backend)
        outs[backend] = SpecEngine(target, head, depth=3, top_k=3, total_tokens=8).generate([3, 1, 4, 1, 5], 16)
    assert (outs["triton"].tokens, outs["triton"].accept_lens) == (outs["sdpa"].tokens, outs["sdpa"].accept_lens)
    assert max(outs["triton"].accept_lens) > 1


@pytest.mark.parametrize("D,dtype", [(64, torch.float32), (128, torch.bfloat16)])
def test_kv_commit_random_paths(D, dtype):
    gen = torch.Generator().manual_seed(D)
    Hkv, S, n_nodes, P = 2, 64, 12, 5
    k = torch.randn(1, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(1, Hkv, S, D, generator=gen).to(dtype)
    k_ref, v_ref = k.clone(), v.clone()
    cache_len = torch.tensor([0], dtype=torch.int64)
    for _ in range(4):  # consecutive rounds, as the engine commits them
        path, accept = _random_path(n_nodes, P, gen)
        kv_commit(k, v, cache_len, path)
        kv_commit_reference(k_ref, v_ref, cache_len, path)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        cache_len += accept
    assert int(cache_len) > 4  # paths were accepted and committed


def test_kv_commit_moves_the_right_rows():
    """Spelled-out semantics: slot L + d gets the old slot L + path[d], in every head; cache_len is left alone."""
    S, D = 20, 64
    k = torch.arange(S, dtype=torch.float32)[None, None, :, None].expand(1, 2, S, D).contiguous()
    v = -k
    cache_len, path = torch.tensor([4]), torch.tensor([0, 2, 5, 5])
    kv_commit(k, v, cache_len, path)
    assert k[0, 0, :, 0].tolist()[:10] == [0, 1, 2, 3, 4, 6, 9, 9, 8, 9]
    assert torch.equal(k[0, 1], k[0, 0]) and torch.equal(v, -k) and cache_len.tolist() == [4]


def test_kv_commit_under_torch_compile():
    gen = torch.Generator().manual_seed(9)
    k, v = torch.randn(1, 2, 30, 64, generator=gen), torch.randn(1, 2, 30, 64, generator=gen)
    cache_len, path, accept_len = torch.tensor([6]), torch.tensor([0, 1, 4]), torch.tensor([3])
    k_ref, v_ref, len_ref = k.clone(), v.clone(), cache_len.clone()

    def f(k, v, cache_len, path, accept_len):
        kv_commit(k, v, cache_len, path)
        cache_len += accept_len
        return cache_len + 0

    new_len = torch.compile(f, fullgraph=True, backend="aot_eager")(k, v, cache_len, path, accept_len)
    kv_commit_reference(k_ref, v_ref, len_ref, path)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert new_len.tolist() == cache_len.tolist() == [9]
