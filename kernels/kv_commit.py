"""Commit an accepted tree path into contiguous KV-cache slots (Triton), with its PyTorch reference.

    kv_commit(k_cache, v_cache, cache_len, path)          # one layer; the caller then advances cache_len

k_cache, v_cache: [1, Hkv, S, D], one layer's cache buffers; cache_len: [1] int64; path: [P] int64, the accepted
root-to-node tree indices padded to a fixed P (path[0] = 0, path[d] >= d). All on the device, never read on the
host. For every d in [0, P) (padding included: it lands beyond the new length and is overwritten later), slot
cache_len + d receives the K/V that were at slot cache_len + path[d], in every head. cache_len is left alone: the
caller commits every layer (each layer owns its buffers, see fasteagle/model.py), then adds the accepted length.

One launch per layer and call: one program per KV head loads its P source rows, waits at a CTA barrier (sources
and destinations overlap: path[d] >= d, so a destination row may be another row's source), then stores them.
"""
import torch
import triton
import triton.language as tl

from fasteagle.errors import FastEagleError
from fasteagle.kernels._common import next_pow2, use_kernels


def kv_commit_reference(k_cache, v_cache, cache_len, path):
    """Gather the path's rows, then copy them to the contiguous slots (the gather copies, so overlap is safe).
    index_copy_, which inductor lowers in place."""
    src = cache_len + path  # [P]
    dst = cache_len + torch.arange(path.shape[0], device=path.device)
    for cache in (k_cache, v_cache):
        cache.index_copy_(2, dst, cache.index_select(2, src))


@triton.jit
def _kv_commit_kernel(
    K, V, CacheLen, Path, P, S, skh, sks, skd, svh, svs, svd,
    PPAD: tl.constexpr, HEAD_DIM: tl.constexpr, DPAD: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    cl = tl.load(CacheLen)
    d = tl.arange(0, PPAD)
    d_ok = d < P
    src = cl + tl.load(Path + d, mask=d_ok, other=0)
    dst = cl + d
    src_ok = d_ok & (src < S)
    dst_ok = d_ok & (dst < S)
    offs = tl.arange(0, DPAD)
    col_ok = offs < HEAD_DIM
    k_base = K + head * skh
    v_base = V + head * svh
    load_ok = src_ok[:, None] & col_ok[None, :]
    k_rows = tl.load(k_base + src[:, None] * sks + offs[None, :] * skd, mask=load_ok, other=0.0)
    v_rows = tl.load(v_base + src[:, None] * svs + offs[None, :] * svd, mask=load_ok, other=0.0)
    tl.debug_barrier()  # every source row of this head is read before any destination is written
    store_ok = dst_ok[:, None] & col_ok[None, :]
    tl.store(k_base + dst[:, None] * sks + offs[None, :] * skd, k_rows, mask=store_ok)
    tl.store(v_base + dst[:, None] * svs + offs[None, :] * svd, v_rows, mask=store_ok)


@torch.library.custom_op("fasteagle::kv_commit", mutates_args=("k_cache", "v_cache"))
def _kv_commit_op(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor, path: torch.Tensor) -> None:
    if not use_kernels(k_cache):
        kv_commit_reference(k_cache, v_cache, cache_len, path)
        return
    _, Hkv, S, D = k_cache.shape
    P = path.shape[0]
    k, v = k_cache[0], v_cache[0]  # [Hkv, S, D] views
    _kv_commit_kernel[(Hkv,)](
        k, v, cache_len, path, P, S, *k.stride(), *v.stride(),
        PPAD=max(2, next_pow2(P)), HEAD_DIM=D, DPAD=max(16, next_pow2(D)), num_warps=4,
    )


@_kv_commit_op.register_fake
def _(k_cache, v_cache, cache_len, path):
    return None


def kv_commit(k_cache, v_cache, cache_len, path):
    """Move the accepted path's K/V into slots cache_len + [0, P) of one layer's cache, in place."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != 1:
        raise FastEagleError(f"kv_commit: caches must be [1, Hkv, S, D], got {tuple(k_cache.shape)} "
                             f"and {tuple(v_cache.shape)}")
    if path.dim() != 1 or path.shape[0] < 1 or path.dtype != torch.int64:
        raise FastEagleError(f"kv_commit: path must be int64 [P>=1], got {path.dtype} {tuple(path.shape)}")
    if cache_len.shape != (1,) or cache_len.dtype != torch.int64:
        raise FastEagleError(f"kv_commit: cache_len must be int64 [1], got {cache_len.dtype} {tuple(cache_len.shape)}")
    _kv_commit_op(k_cache, v_cache, cache_len, path)
