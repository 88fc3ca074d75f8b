"""Commit an accepted tree path into contiguous KV-cache slots (Triton), with its PyTorch reference.

    kv_commit(k_cache_all, v_cache_all, cache_len, path, accept_len)

k/v_cache_all: [n_layers, 1, Hkv, S, D] (the model's single cache buffers); cache_len: [1] int64; path: [P] int64,
the accepted root-to-node tree indices padded to a fixed P (path[0] = 0, path[d] >= d); accept_len: [1] int64,
the number of valid path entries (>= 1). All on the device, never read on the host.

For every d in [0, P) (padding included: it lands beyond the new length and is overwritten later), slot
cache_len + d receives the K/V that were at slot cache_len + path[d], in every layer and head; then
cache_len += accept_len. One launch: one program per (layer, KV head) loads its P source rows, waits at a
CTA barrier (sources and destinations overlap: path[d] >= d, so a destination row may be another row's source),
then stores them. The cache_len update must not race with other programs still reading the old value, so
each program takes a ticket from a small device counter (acq_rel atomic) after its reads, and the last one
writes cache_len and resets the counter to 0 for the next call. The counter is one int32 per device, created on
first use (do a warm-up call before CUDA-graph capture, as for any kernel); two kv_commit calls must not run
concurrently on different streams of the same device.
"""
import torch
import triton
import triton.language as tl

from fasteagle.errors import FastEagleError
from fasteagle.kernels._common import next_pow2, use_kernels


def kv_commit_reference(k_cache_all, v_cache_all, cache_len, path, accept_len):
    """Gather the path's rows, then scatter them to the contiguous slots (the gather copies, so overlap is safe)."""
    src = cache_len + path  # [P]
    dst = cache_len + torch.arange(path.shape[0], device=path.device)
    for cache in (k_cache_all, v_cache_all):
        cache.index_copy_(3, dst, cache.index_select(3, src))
    cache_len += accept_len


@triton.jit
def _kv_commit_kernel(
    K, V, CacheLen, Path, Accept, Counter, P, S, HKV, n_programs,
    skl, skh, sks, skd, svl, svh, svs, svd,
    PPAD: tl.constexpr, HEAD_DIM: tl.constexpr, DPAD: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = (pid // HKV).to(tl.int64)
    head = (pid % HKV).to(tl.int64)
    cl = tl.load(CacheLen)
    accepted = tl.load(Accept)
    d = tl.arange(0, PPAD)
    d_ok = d < P
    src = cl + tl.load(Path + d, mask=d_ok, other=0)
    dst = cl + d
    src_ok = d_ok & (src < S)
    dst_ok = d_ok & (dst < S)
    offs = tl.arange(0, DPAD)
    col_ok = offs < HEAD_DIM
    k_base = K + layer * skl + head * skh
    v_base = V + layer * svl + head * svh
    load_ok = src_ok[:, None] & col_ok[None, :]
    k_rows = tl.load(k_base + src[:, None] * sks + offs[None, :] * skd, mask=load_ok, other=0.0)
    v_rows = tl.load(v_base + src[:, None] * svs + offs[None, :] * svd, mask=load_ok, other=0.0)
    tl.debug_barrier()  # every source row of this (layer, head) is read before any destination is written
    store_ok = dst_ok[:, None] & col_ok[None, :]
    tl.store(k_base + dst[:, None] * sks + offs[None, :] * skd, k_rows, mask=store_ok)
    tl.store(v_base + dst[:, None] * svs + offs[None, :] * svd, v_rows, mask=store_ok)
    ticket = tl.atomic_add(Counter, 1, sem="acq_rel")  # after this program's read of cache_len
    if ticket == n_programs - 1:  # every program has read the old cache_len
        tl.store(CacheLen, cl + accepted)
        tl.store(Counter, 0)


_counters: dict = {}


def _counter(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    if key not in _counters:
        _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _counters[key]


@torch.library.custom_op(
    "fasteagle::kv_commit", mutates_args=("k_cache_all", "v_cache_all", "cache_len")
)
def _kv_commit_op(
    k_cache_all: torch.Tensor, v_cache_all: torch.Tensor, cache_len: torch.Tensor, path: torch.Tensor,
    accept_len: torch.Tensor,
) -> None:
    if not use_kernels(k_cache_all):
        kv_commit_reference(k_cache_all, v_cache_all, cache_len, path, accept_len)
        return
    n_layers, _, Hkv, S, D = k_cache_all.shape
    P = path.shape[0]
    n_programs = n_layers * Hkv
    k, v = k_cache_all[:, 0], v_cache_all[:, 0]  # [n_layers, Hkv, S, D] views
    _kv_commit_kernel[(n_programs,)](
        k, v, cache_len, path, accept_len, _counter(k.device), P, S, Hkv, n_programs,
        *k.stride(), *v.stride(),
        PPAD=max(2, next_pow2(P)), HEAD_DIM=D, DPAD=max(16, next_pow2(D)), num_warps=4,
    )


@_kv_commit_op.register_fake
def _(k_cache_all, v_cache_all, cache_len, path, accept_len):
    return None


def kv_commit(k_cache_all, v_cache_all, cache_len, path, accept_len):
    """Move the accepted path's K/V into slots cache_len + [0, P) and advance cache_len by accept_len, in place."""
    if k_cache_all.dim() != 5 or v_cache_all.shape != k_cache_all.shape or k_cache_all.shape[1] != 1:
        raise FastEagleError(f"kv_commit: caches must be [n_layers, 1, Hkv, S, D], got {tuple(k_cache_all.shape)} "
                             f"and {tuple(v_cache_all.shape)}")
    if path.dim() != 1 or path.shape[0] < 1 or path.dtype != torch.int64:
        raise FastEagleError(f"kv_commit: path must be int64 [P>=1], got {path.dtype} {tuple(path.shape)}")
    for name, t in (("cache_len", cache_len), ("accept_len", accept_len)):
        if t.shape != (1,) or t.dtype != torch.int64:
            raise FastEagleError(f"kv_commit: {name} must be int64 [1], got {t.dtype} {tuple(t.shape)}")
    _kv_commit_op(k_cache_all, v_cache_all, cache_len, path, accept_len)
