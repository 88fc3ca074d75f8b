"""Tree-masked attention over the static KV cache (Triton), with its PyTorch reference.

    out = tree_attention(q, k_cache, v_cache, cache_len, attn_mask)        # [B, Hq, T, D]

q: [B, Hq, T, D], the T new query tokens (a draft tree / verify block, a decode step, or a prefill chunk).
k_cache, v_cache: [B, Hkv, S, D], the static cache. cache_len: [B] int64 on the device (never read on the host).
attn_mask: [T, W] (or [B, T, W]) bool, W >= T, over the key block: slots cache_len[b] + [0, W). The new queries'
K/V are already in its last T slots; W == T for target prefill/decode/verify, W > T for the draft head's tree steps
(earlier tree levels sit in the first W - T slots). Query i of row b sees every slot < cache_len[b] and slot
cache_len[b] + j iff attn_mask[i, j]; nothing past the block. This is exactly F.scaled_dot_product_attention with
fasteagle.model.visible_keys(...) as the mask (the reference).

Kernel layout (flash-decoding style):
- One program handles BLOCK_M "rows" of one (batch row b, KV head): row r = g * T + t is query token t of the g-th
  query head sharing that KV head, so GQA reads each K/V tile once for the whole group and never materialises
  repeated K/V. Decode (T=1) with 4 heads per group still fills a 16-row tile.
- Keys are read only from [0, L), L = cache_len[b] + W, with cache_len loaded on the device. [0, L) is cut into NSPLIT
  equal chunks of whole key blocks (the chunk size is computed on the device from L; NSPLIT is a static function
  of the shapes), one program per chunk; chunks past L run no iterations. A second small kernel merges the
  per-chunk (max, sum, acc) as log-sum-exp weights. NSPLIT == 1 (long prefill chunks) writes the output directly.
- Within a chunk, blocks entirely below cache_len (all visible) run without any masking; only the blocks that
  overlap the key block [cache_len, L) load the mask. The mask is passed as the caller's bool tensor (viewed as
  uint8), not packed to bits: it works for any T and W (prefill chunks > 64 included), costs no extra packing
  launch, and a [BLOCK_M, BLOCK_N] tile of a T x W byte matrix is an L2 hit on the few blocks that need it.
- Sliding window (window > 0, Mistral): a query at position p sees keys at positions > p - window only. A key's
  position is its slot below cache_len (the committed context sits in order) and the position of the token written
  there inside the block (W == T). Keys below every row's window are skipped whole (the chunks split [kv_lo, L)
  instead of [0, L)), blocks inside every row's window run unmasked, only blocks crossing a window edge are masked.
- Softmax in fp32 in the log2 domain (exp2), fp32 accumulation; P is cast to V's dtype for the PV product.
A query row that sees no key at all (impossible when the mask's last T columns hold the diagonal, as causal and
ancestor masks do) gets zeros, where SDPA would give NaN.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fasteagle.errors import FastEagleError
from fasteagle.kernels._common import Launcher, cdiv, dot, dot_precision, num_sms, use_kernels


def tree_attention_reference(q, k_cache, v_cache, cache_len, attn_mask, scale=None, positions=None, window=0):
    """Dense-mask SDPA over the whole cache: what fasteagle/model.py computes on the sdpa backend."""
    from fasteagle.model import visible_keys

    visible = visible_keys(cache_len, attn_mask, k_cache.shape[2], positions, window)
    return F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=visible, scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1]
    )


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, k_base, v_base, mask_base, start, cl, L, W, t, row_ok, offs_d,
    sks, skd, svs, svd, smq, smk, qk_scale, pos_base, spt, q_pos, window,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        key_ok = offs_n < L
        k = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd, mask=key_ok[None, :], other=0.0)
    else:
        k = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd)  # [D, BLOCK_N]
    s = dot(q, k, DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
    if MASKED:
        rel = offs_n - cl  # key position relative to the key block (a mask column when in [0, W))
        in_block = (rel >= 0) & (rel < W)
        bits = tl.load(
            mask_base + t[:, None] * smq + rel[None, :] * smk, mask=row_ok[:, None] & in_block[None, :], other=0
        )
        visible = ((rel < 0)[None, :] | (bits != 0)) & key_ok[None, :]
        if WINDOW:  # a key's position: its slot below cache_len, the position of the new token in the block (W == T)
            k_pos = tl.where(rel < 0, offs_n, tl.load(pos_base + rel * spt, mask=in_block, other=0))
            visible = visible & ((q_pos[:, None] - k_pos[None, :]) < window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: avoid inf - inf
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd)  # [BLOCK_N, D]
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _tree_attn_fwd(
    Q, K, V, CacheLen, Mask, Pos, Out, PartO, PartLse,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    smb, smq, smk,
    spb, spt,
    sob, soh, sot, sod,
    qk_scale, T, W, S, N_ROWS, HKV, window,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NSPLIT: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)
    hkv = (pid_bh % HKV).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row = g * T + t
    row_ok = rows < N_ROWS
    g = rows // T
    t = rows % T
    head = hkv * G + g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0
    )

    cl = tl.load(CacheLen + b).to(tl.int32)
    L = tl.minimum(cl + W, S)  # end of the key block; nothing past it is visible
    pos_base = Pos + b * spb
    kv_lo = 0  # keys below kv_lo are invisible to every row (outside all of their windows)
    win_full = 0  # blocks from win_full on are inside every row's window
    q_pos = t  # unused without a window
    if WINDOW:
        q_pos = tl.load(pos_base + t * spt, mask=row_ok, other=0).to(tl.int32)
        lo_pos = tl.min(tl.where(row_ok, q_pos, 2147483647), 0) - window + 1
        hi_pos = tl.max(tl.where(row_ok, q_pos, 0), 0) - window + 1
        kv_lo = (tl.minimum(tl.maximum(lo_pos, 0), cl) // BLOCK_N) * BLOCK_N  # below cl a key's position is its slot
        win_full = tl.cdiv(tl.maximum(hi_pos, 0), BLOCK_N) * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(L - kv_lo, BLOCK_N), NSPLIT) * BLOCK_N  # keys per chunk, whole blocks
    lo = kv_lo + pid_s * per_split
    hi = tl.minimum(lo + per_split, L)
    # [lo, hi) = masked [lo, u0) (window edge) + unmasked [u0, u1) + masked [u1, hi) (the key block)
    u0 = tl.minimum(tl.maximum(win_full, lo), hi)
    u1 = tl.minimum(tl.maximum((cl // BLOCK_N) * BLOCK_N, u0), hi)  # blocks below cl // BLOCK_N: entirely < cache_len

    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    mask_base = Mask + b * smb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, u0, BLOCK_N):  # blocks crossing some row's window edge
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, mask_base, start, cl, L, W, t, row_ok, offs_d,
            sks, skd, svs, svd, smq, smk, qk_scale, pos_base, spt, q_pos, window, BLOCK_N, True, WINDOW, DOT_PREC,
        )
    for start in range(u0, u1, BLOCK_N):  # everything visible: no mask work at all
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, mask_base, start, cl, L, W, t, row_ok, offs_d,
            sks, skd, svs, svd, smq, smk, qk_scale, pos_base, spt, q_pos, window, BLOCK_N, False, WINDOW, DOT_PREC,
        )
    for start in range(u1, hi, BLOCK_N):  # blocks overlapping the key block
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, mask_base, start, cl, L, W, t, row_ok, offs_d,
            sks, skd, svs, svd, smq, smk, qk_scale, pos_base, spt, q_pos, window, BLOCK_N, True, WINDOW, DOT_PREC,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if NSPLIT == 1:
        out_ptr = Out + b * sob + head[:, None] * soh + t[:, None] * sot + offs_d[None, :] * sod
        tl.store(out_ptr, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (pid_bh * NSPLIT + pid_s).to(tl.int64) * N_ROWS + rows  # [B*Hkv, NSPLIT, N_ROWS] index
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))  # empty chunk: weight 0
        tl.store(PartLse + part, lse, mask=row_ok)
        tl.store(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None])


@triton.jit
def _tree_attn_merge(
    PartO, PartLse, Out, sob, soh, sot, sod, T, N_ROWS, HKV,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, NSPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hkv = (pid_bh % HKV).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_ROWS
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for s in range(NSPLIT):
        part = (pid_bh * NSPLIT + s).to(tl.int64) * N_ROWS + rows
        lse = tl.load(PartLse + part, mask=row_ok, other=float("-inf"))
        live = row_ok & (lse > float("-inf"))  # skip reading the partial output of empty chunks
        o = tl.load(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o
        l = l * alpha + w
        m = m_new
    o = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    g = rows // T
    t = rows % T
    head = hkv * G + g
    out_ptr = Out + b * sob + head[:, None] * soh + t[:, None] * sot + offs_d[None, :] * sod
    tl.store(out_ptr, o.to(Out.dtype.element_ty), mask=row_ok[:, None])


# Tuned on the GPU per (rows per program, head dim, splits, group size, dtypes); BLOCK_M is chosen on the host
# because the grid and the split heuristic depend on it.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
]
# Under the interpreter: small key blocks, so short test caches still cross block and chunk boundaries.
_fwd = Launcher(_tree_attn_fwd, _FWD_CONFIGS, ["BLOCK_M", "HEAD_DIM", "NSPLIT", "G", "WINDOW"],
                triton.Config({"BLOCK_N": 32}))

MAX_SPLITS = 32
MIN_KEYS_PER_SPLIT = 256


def _block_m(n_rows: int) -> int:
    return 16 if n_rows <= 16 else 32 if n_rows <= 32 else 64


def default_num_splits(batch: int, n_kv_heads: int, n_rows: int, max_seq_len: int, device: torch.device) -> int:
    """Chunks of the key range per (row, KV head, row block): enough programs to fill the GPU about twice, but
    no chunk shorter than MIN_KEYS_PER_SPLIT keys when the cache is full. Static: a function of shapes only."""
    programs = batch * n_kv_heads * cdiv(n_rows, _block_m(n_rows))
    by_occupancy = (2 * num_sms(device)) // programs
    by_length = cdiv(max_seq_len, MIN_KEYS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


@torch.library.custom_op("fasteagle::tree_attention", mutates_args=())
def _tree_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor,
    attn_mask: torch.Tensor, scale: float, num_splits: int, positions: torch.Tensor | None, window: int,
) -> torch.Tensor:
    if not use_kernels(q):
        return tree_attention_reference(q, k_cache, v_cache, cache_len, attn_mask, scale, positions,
                                        window).contiguous()
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    W = attn_mask.shape[-1]
    G = Hq // Hkv
    n_rows = G * T
    block_m = _block_m(n_rows)
    nsplit = num_splits if num_splits > 0 else default_num_splits(B, Hkv, n_rows, S, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    mask = attn_mask.view(torch.uint8)  # same bytes; avoids i1 pointers
    smb = mask.stride(0) if mask.dim() == 3 else 0
    smq, smk = mask.stride(-2), mask.stride(-1)
    if nsplit > 1:
        part_o = torch.empty((B * Hkv, nsplit, n_rows, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B * Hkv, nsplit, n_rows), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    pos = cache_len if positions is None else positions.expand(B, T)  # a dummy pointer without a window
    spb, spt = (0, 0) if positions is None else pos.stride()
    grid = (cdiv(n_rows, block_m), B * Hkv, nsplit)
    _fwd[grid](
        q, k_cache, v_cache, cache_len, mask, pos, out, part_o, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), smb, smq, smk, spb, spt, *out.stride(),
        scale * math.log2(math.e), T, W, S, n_rows, Hkv, window,
        G=G, HEAD_DIM=D, BLOCK_M=block_m, NSPLIT=nsplit, WINDOW=window > 0, DOT_PREC=dot_precision(q.dtype),
    )
    if nsplit > 1:
        _tree_attn_merge[(cdiv(n_rows, block_m), B * Hkv)](
            part_o, part_lse, out, *out.stride(), T, n_rows, Hkv,
            G=G, HEAD_DIM=D, BLOCK_M=block_m, NSPLIT=nsplit,
        )
    return out


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, cache_len, attn_mask, scale, num_splits, positions, window):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def tree_attention(q, k_cache, v_cache, cache_len, attn_mask, scale=None, num_splits=None, positions=None, window=0):
    """Attention of q [B, Hq, T, D] over k/v_cache [B, Hkv, S, D] slots [0, cache_len[b] + W) with attn_mask
    [T, W] or [B, T, W] on the key block [cache_len[b], cache_len[b] + W) (see the module docstring).
    Returns a contiguous [B, Hq, T, D] tensor in q's dtype.
    num_splits: chunks of the key range (None: default_num_splits, a function of shapes only).
    window > 0 (sliding-window attention; positions [B or 1, T] int64, the queries' positions, W == T): a query at
    position p sees only keys at positions > p - window (see the module docstring)."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise FastEagleError(f"tree_attention: bad shapes q {tuple(q.shape)}, k {tuple(k_cache.shape)}, "
                             f"v {tuple(v_cache.shape)}")
    B, Hq, T, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or Hq % k_cache.shape[1] != 0:
        raise FastEagleError(f"tree_attention: q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    if D not in (16, 32, 64, 128, 256):
        raise FastEagleError(f"tree_attention supports head dims 16..256 (powers of two), not {D}; "
                             "use the sdpa attention backend")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype:
        raise FastEagleError(f"tree_attention: dtypes q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if attn_mask.dtype != torch.bool or attn_mask.dim() not in (2, 3) or attn_mask.shape[-2] != T \
            or attn_mask.shape[-1] < T or (attn_mask.dim() == 3 and attn_mask.shape[0] != B):
        raise FastEagleError(f"tree_attention: attn_mask must be bool [T, W] or [B, T, W] with T={T} <= W, B={B}, "
                             f"got {attn_mask.dtype} {tuple(attn_mask.shape)}")
    if cache_len.shape != (B,) or cache_len.dtype != torch.int64:
        raise FastEagleError(f"tree_attention: cache_len must be int64 [{B}], got {cache_len.dtype} "
                             f"{tuple(cache_len.shape)}")
    if k_cache.shape[2] < attn_mask.shape[-1]:
        raise FastEagleError(f"tree_attention: a key block of {attn_mask.shape[-1]} slots does not fit a cache of "
                             f"{k_cache.shape[2]} slots")
    if window:
        if positions is None or positions.dim() != 2 or positions.shape[-1] != T or positions.shape[0] not in (1, B) \
                or positions.dtype != torch.int64 or attn_mask.shape[-1] != T:
            raise FastEagleError(f"tree_attention: a window needs int64 positions [B, T] and W == T (T={T}), got "
                                 f"{None if positions is None else (positions.dtype, tuple(positions.shape))} and "
                                 f"W={attn_mask.shape[-1]}")
    else:
        positions = None
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _tree_attention_op(q, k_cache, v_cache, cache_len, attn_mask, scale, int(num_splits or 0), positions,
                              int(window))
