"""Fused draft-head ops (Triton), each with its PyTorch reference.

fused_embed_fc(tokens[M], features[M, F], embed_weight[V, E], fc_weight[N, E + F], fc_bias[N] | None) -> [M, N]
    = fc(cat([embed[tokens], features], -1)), the EAGLE-1/2 head's input projection, in one kernel: the K loop
    reads its A operand from the gathered embedding rows for k < E and from the features for k >= E, so the
    concatenation (and the embedding lookup) never touch global memory.

lm_head_topk(hidden[M, D], weight[V, D], k, temperature=1.0) -> (logprobs[M, k] fp32, ids[M, k] int64)
    the LM-head GEMV fused with top-k and the log-softmax normaliser; [M, V] logits never reach global memory.
    Pass 1: each program owns a contiguous range of vocab tiles for BLOCK_M rows; per tile it computes the logits
    (fp32 accumulation), folds them into a running (max, sumexp) and merges them into a running top-k list by k
    rounds of "take the max, lowest id first". Pass 2 (one program per row) merges the per-range lists and
    (max, sumexp) pairs. logprobs = logit / temperature - logsumexp(logits / temperature).
    Guarantee: results sorted by descending logit; equal logits (as computed by the kernel, in fp32) are ordered
    by ascending token id, i.e. the first k entries of a stable descending sort. Requires k <= V and k <= 128.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fasteagle.errors import FastEagleError
from fasteagle.kernels._common import Launcher, cdiv, dot, dot_precision, next_pow2, num_sms, use_kernels

# ----------------------------------------------------------------------------------------------------------------
# fused_embed_fc


def fused_embed_fc_reference(tokens, features, embed_weight, fc_weight, fc_bias=None):
    return F.linear(torch.cat([F.embedding(tokens, embed_weight), features], dim=-1), fc_weight, fc_bias)


@triton.jit
def _embed_fc_kernel(
    Tok, Feat, Emb, W, Bias, Out, M, N, KE, KF,
    sfm, sfk, sev, sek, swn, swk, som, son,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    tok = tl.load(Tok + rows, mask=row_ok, other=0).to(tl.int64)
    w_cols = W + cols[None, :].to(tl.int64) * swn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, KE, BLOCK_K):  # first half of the concat: the token embeddings, gathered in place
        ks = k0 + offs_k
        k_ok = ks < KE
        a = tl.load(Emb + tok[:, None] * sev + ks[None, :] * sek, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None] * swk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        acc += dot(a, w, DOT_PREC)
    for k0 in range(0, KF, BLOCK_K):  # second half: the features, against fc columns KE + k
        ks = k0 + offs_k
        k_ok = ks < KF
        a = tl.load(Feat + rows[:, None].to(tl.int64) * sfm + ks[None, :] * sfk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + (KE + ks)[:, None] * swk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += dot(a, w, DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptr = Out + rows[:, None].to(tl.int64) * som + cols[None, :] * son
    tl.store(out_ptr, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_EMBED_FC_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_embed_fc = Launcher(_embed_fc_kernel, _EMBED_FC_CONFIGS, ["BLOCK_M", "N", "KE", "KF", "HAS_BIAS"],
                     triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}))


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


@torch.library.custom_op("fasteagle::fused_embed_fc", mutates_args=())
def _fused_embed_fc_op(
    tokens: torch.Tensor, features: torch.Tensor, embed_weight: torch.Tensor, fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
) -> torch.Tensor:
    if not use_kernels(features):
        return fused_embed_fc_reference(tokens, features, embed_weight, fc_weight, fc_bias).contiguous()
    M, KF = features.shape
    KE = embed_weight.shape[1]
    N = fc_weight.shape[0]
    out = torch.empty((M, N), dtype=fc_weight.dtype, device=features.device)
    if M == 0:
        return out
    block_m = _block_m(M)
    grid = lambda meta: (cdiv(M, block_m), cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _embed_fc[grid](
        tokens, features, embed_weight, fc_weight, fc_bias if fc_bias is not None else out, out, M, N, KE, KF,
        *features.stride(), *embed_weight.stride(), *fc_weight.stride(), *out.stride(),
        HAS_BIAS=fc_bias is not None, BLOCK_M=block_m, DOT_PREC=dot_precision(features.dtype),
    )
    return out


@_fused_embed_fc_op.register_fake
def _(tokens, features, embed_weight, fc_weight, fc_bias):
    return features.new_empty((features.shape[0], fc_weight.shape[0]), dtype=fc_weight.dtype)


def fused_embed_fc(tokens, features, embed_weight, fc_weight, fc_bias=None):
    """fc(cat([embed[tokens], features], -1)). tokens [...]; features [..., F]; returns [..., N] in fc's dtype.
    All float inputs must share one dtype (fp16, bf16 or fp32)."""
    if tokens.shape != features.shape[:-1]:
        raise FastEagleError(f"fused_embed_fc: tokens {tuple(tokens.shape)} vs features {tuple(features.shape)}")
    E, Fd = embed_weight.shape[1], features.shape[-1]
    if fc_weight.dim() != 2 or fc_weight.shape[1] != E + Fd:
        raise FastEagleError(f"fused_embed_fc: fc weight {tuple(fc_weight.shape)} must be [N, {E} + {Fd}]")
    if fc_bias is not None and fc_bias.shape != (fc_weight.shape[0],):
        raise FastEagleError(f"fused_embed_fc: fc bias {tuple(fc_bias.shape)} must be [{fc_weight.shape[0]}]")
    dtypes = {features.dtype, embed_weight.dtype, fc_weight.dtype} | ({fc_bias.dtype} if fc_bias is not None else set())
    if len(dtypes) != 1 or features.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise FastEagleError(f"fused_embed_fc: inputs must share one float dtype, got {sorted(map(str, dtypes))}")
    lead = features.shape[:-1]
    out = _fused_embed_fc_op(tokens.reshape(-1), features.reshape(-1, Fd), embed_weight, fc_weight, fc_bias)
    return out.view(*lead, fc_weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# lm_head_topk

MAX_TOPK = 128
_ID_NONE = tl.constexpr(2**31 - 1)  # "no id": larger than any token id, so a real id always wins a tie against it


def lm_head_topk_reference(hidden, weight, k, temperature=1.0):
    """fp32 logits (like the kernel's fp32 accumulation), then a stable descending sort (ties: lower id first)."""
    logits = (hidden.float() @ weight.float().t()) / temperature
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    vals, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    return (vals[:, :k] - lse), ids[:, :k]


@triton.jit
def _merge_topk(vals, ids, top_v, top_i, kcol, K: tl.constexpr):
    """Top-K of the union of (vals, ids) [R, C] and the current list (top_v, top_i) [R, KPAD], by K rounds of
    "largest value, lowest id among equals". Ids are unique across the two sets (disjoint vocab ranges)."""
    new_v = tl.full(top_v.shape, float("-inf"), tl.float32)
    new_i = tl.full(top_i.shape, _ID_NONE, tl.int32)
    for i in range(K):
        best = tl.maximum(tl.max(vals, 1), tl.max(top_v, 1))
        pick = tl.minimum(
            tl.min(tl.where(vals == best[:, None], ids, _ID_NONE), 1),
            tl.min(tl.where(top_v == best[:, None], top_i, _ID_NONE), 1),
        )
        new_v = tl.where(kcol[None, :] == i, best[:, None], new_v)
        new_i = tl.where(kcol[None, :] == i, pick[:, None], new_i)
        vals = tl.where(ids == pick[:, None], float("-inf"), vals)
        top_v = tl.where(top_i == pick[:, None], float("-inf"), top_v)
    return new_v, new_i


@triton.jit
def _lm_head_topk_partial(
    H, W, PartV, PartI, PartM, PartS, M, V, D, shm, shd, swv, swd, inv_temp, tiles_per_split,
    NSPLIT: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    kcol = tl.arange(0, KPAD)
    h_rows = H + rows[:, None].to(tl.int64) * shm
    top_v = tl.full([BLOCK_M, KPAD], float("-inf"), tl.float32)
    top_i = tl.full([BLOCK_M, KPAD], _ID_NONE, tl.int32)
    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_run = tl.zeros([BLOCK_M], tl.float32)
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        cols = tile * BLOCK_V + offs_v
        col_ok = cols < V
        w_rows = W + cols[None, :].to(tl.int64) * swv
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            d_ok = ds < D
            h = tl.load(h_rows + ds[None, :] * shd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_rows + ds[:, None] * swd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # [BD, BV]
            acc += dot(h, w, DOT_PREC)
        logits = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))
        # Running log-sum-exp; every tile has at least one valid column, so m_new is finite.
        m_new = tl.maximum(m_run, tl.max(logits, 1))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_run = m_new
        # Merge only if the tile beats some row's current k-th value (ties lose: this tile's ids are larger than
        # any already in the list). Once the list has settled, most tiles skip the K selection rounds.
        kth = tl.min(tl.where(kcol[None, :] < K, top_v, float("inf")), 1)
        if tl.max(((tl.max(logits, 1) > kth) & row_ok).to(tl.int32), 0) > 0:
            ids = tl.where(col_ok[None, :], cols[None, :], _ID_NONE - 1 - offs_v[None, :])  # padding: unique, huge
            top_v, top_i = _merge_topk(logits, ids, top_v, top_i, kcol, K)
    part = rows.to(tl.int64) * NSPLIT + pid_s  # [M, NSPLIT] index
    tl.store(PartM + part, m_run, mask=row_ok)
    tl.store(PartS + part, s_run, mask=row_ok)
    tl.store(PartV + part[:, None] * KPAD + kcol[None, :], top_v, mask=row_ok[:, None])
    tl.store(PartI + part[:, None] * KPAD + kcol[None, :], top_i, mask=row_ok[:, None])


@triton.jit
def _lm_head_topk_merge(
    PartV, PartI, PartM, PartS, OutV, OutI,
    NSPLIT: tl.constexpr, SPAD: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPAD)
    s_ok = offs_s < NSPLIT
    pm = tl.load(PartM + row * NSPLIT + offs_s, mask=s_ok, other=float("-inf"))
    ps = tl.load(PartS + row * NSPLIT + offs_s, mask=s_ok, other=0.0)
    gmax = tl.max(pm, 0)
    lse = gmax + tl.log(tl.sum(ps * tl.exp(pm - gmax), 0))
    # Candidates as a [SPAD, KPAD] tile (one list per vocab range); reduce it to one [1, KPAD] list.
    kcol = tl.arange(0, KPAD)
    cand = (row * NSPLIT + offs_s)[:, None] * KPAD + kcol[None, :]
    vals = tl.load(PartV + cand, mask=s_ok[:, None], other=float("-inf"))
    ids = tl.load(PartI + cand, mask=s_ok[:, None], other=_ID_NONE)
    best_v = tl.full([KPAD], float("-inf"), tl.float32)
    best_i = tl.full([KPAD], _ID_NONE, tl.int32)
    for i in range(K):
        best = tl.max(tl.max(vals, 1), 0)
        pick = tl.min(tl.min(tl.where(vals == best, ids, _ID_NONE), 1), 0)
        best_v = tl.where(kcol == i, best, best_v)
        best_i = tl.where(kcol == i, pick, best_i)
        vals = tl.where(ids == pick, float("-inf"), vals)
    k_ok = kcol < K
    tl.store(OutV + row * K + kcol, best_v - lse, mask=k_ok)
    tl.store(OutI + row * K + kcol, best_i.to(tl.int64), mask=k_ok)


_TOPK_CONFIGS = [
    triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_D": 256}, num_warps=8, num_stages=3),
]
_topk_partial = Launcher(_lm_head_topk_partial, _TOPK_CONFIGS, ["BLOCK_M", "D", "NSPLIT", "K"],
                         triton.Config({"BLOCK_D": 32}))
BLOCK_V = 128  # fixed: the number of vocab ranges (and so the partial buffers) depends on it


def topk_splits(V: int, device: torch.device) -> tuple[int, int]:
    """(number of vocab ranges, tiles per range): about two ranges per SM, whole tiles each."""
    n_tiles = cdiv(V, BLOCK_V)
    per = cdiv(n_tiles, min(n_tiles, 2 * num_sms(device)))
    return cdiv(n_tiles, per), per


@torch.library.custom_op("fasteagle::lm_head_topk", mutates_args=())
def _lm_head_topk_op(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_kernels(hidden):
        vals, ids = lm_head_topk_reference(hidden, weight, k, temperature)
        return vals.contiguous(), ids.contiguous()
    M, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    out_v = torch.empty((M, k), dtype=torch.float32, device=dev)
    out_i = torch.empty((M, k), dtype=torch.int64, device=dev)
    if M == 0:
        return out_v, out_i
    nsplit, per = topk_splits(V, dev)
    kpad = max(2, next_pow2(k))
    part_v = torch.empty((M, nsplit, kpad), dtype=torch.float32, device=dev)
    part_i = torch.empty((M, nsplit, kpad), dtype=torch.int32, device=dev)
    part_m = torch.empty((M, nsplit), dtype=torch.float32, device=dev)
    part_s = torch.empty((M, nsplit), dtype=torch.float32, device=dev)
    block_m = _block_m(M)
    _topk_partial[(cdiv(M, block_m), nsplit)](
        hidden, weight, part_v, part_i, part_m, part_s, M, V, D, *hidden.stride(), *weight.stride(),
        1.0 / temperature, per,
        NSPLIT=nsplit, K=k, KPAD=kpad, BLOCK_M=block_m, BLOCK_V=BLOCK_V, DOT_PREC=dot_precision(hidden.dtype),
    )
    _lm_head_topk_merge[(M,)](
        part_v, part_i, part_m, part_s, out_v, out_i, NSPLIT=nsplit, SPAD=max(2, next_pow2(nsplit)), K=k, KPAD=kpad,
    )
    return out_v, out_i


@_lm_head_topk_op.register_fake
def _(hidden, weight, k, temperature):
    M = hidden.shape[0]
    return hidden.new_empty((M, k), dtype=torch.float32), hidden.new_empty((M, k), dtype=torch.int64)


def lm_head_topk(hidden, weight, k, temperature=1.0):
    """Top-k log-probabilities of softmax(hidden @ weight.T / temperature) and their token ids, sorted descending
    (ties: lower id first). hidden [..., D]; weight [V, D]; returns ([..., k] fp32, [..., k] int64)."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise FastEagleError(f"lm_head_topk: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise FastEagleError(f"lm_head_topk: dtypes {hidden.dtype} / {weight.dtype} (need one float dtype)")
    k = int(k)
    if not 1 <= k <= min(MAX_TOPK, weight.shape[0]):
        raise FastEagleError(f"lm_head_topk: k={k} must be in [1, min({MAX_TOPK}, vocab {weight.shape[0]})]")
    if not temperature > 0:
        raise FastEagleError(f"lm_head_topk: temperature must be > 0, got {temperature}")
    lead = hidden.shape[:-1]
    vals, ids = _lm_head_topk_op(hidden.reshape(-1, hidden.shape[-1]), weight, k, float(temperature))
    return vals.view(*lead, k), ids.view(*lead, k)
