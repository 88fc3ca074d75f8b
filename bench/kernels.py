"""Micro-benchmarks of the Triton kernels against their PyTorch counterparts (GPU only).

    python bench/kernels.py [--quick] [--out FILE.json]

- tree_attention vs SDPA with the dense [T, S] mask over the whole static cache (what the sdpa backend does), vs
  SDPA over the sliced cache [0, L) (needs L on the host: a lower bound the engine cannot use without a sync),
  and vs flex_attention (compiled, block mask built outside the timing), at Llama-3-8B shapes: 32 query heads,
  8 KV heads, head dim 128, bf16, batch 1; tree sizes 1, 16, 64; cache lengths 256 .. 8192.
- lm_head_topk vs torch (linear + topk + logsumexp) at V = 128256 and 32000, D = 4096, bf16, k = 10.
- kv_commit vs the PyTorch gather/scatter reference at Llama-3-8B cache shapes.
Times are medians of triton.testing.do_bench (ms). Each comparison also records the max abs difference to the
baseline. Results: bench/results/kernels-<device>-<date>.json, or --out FILE.
"""
import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def random_tree_mask(T: int, device) -> torch.Tensor:
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        mask[i, i] = True
        if i > 0:
            mask[i] |= mask[int(torch.randint(0, i, (1,)))]
    return mask.to(device)


def bench_tree_attention(tree_sizes, cache_lens, dev):
    from fasteagle.kernels.tree_attention import tree_attention
    from fasteagle.model import visible_keys

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per (T, block mask); name varies
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
    except ImportError:
        flex = None
    Hq, Hkv, D, dtype = 32, 8, 128, torch.bfloat16
    S = max(cache_lens) + 128  # the static cache, sized for the longest run plus one tree
    k = torch.randn(1, Hkv, S, D, device=dev, dtype=dtype)
    v = torch.randn(1, Hkv, S, D, device=dev, dtype=dtype)
    rows = []
    for T in tree_sizes:
        q = torch.randn(1, Hq, T, D, device=dev, dtype=dtype)
        tree = random_tree_mask(T, dev)
        for L in cache_lens:
            cache_len = torch.tensor([L], device=dev)
            visible = visible_keys(cache_len, tree, S)  # built once per forward in the model, outside the timing
            ours = tree_attention(q, k, v, cache_len, tree)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
            row = {"T": T, "cache_len": L, "S": S,
                   "triton_ms": bench_ms(lambda: tree_attention(q, k, v, cache_len, tree)),
                   "sdpa_dense_ms": bench_ms(
                       lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)),
                   "max_abs_diff_vs_sdpa": (ours.float() - ref.float()).abs().max().item()}
            ks, vs, vis = k[:, :, :L + T], v[:, :, :L + T], visible[..., :L + T]
            row["sdpa_sliced_ms"] = bench_ms(
                lambda: F.scaled_dot_product_attention(q, ks, vs, attn_mask=vis, enable_gqa=True))
            if flex is not None:
                try:
                    def mask_mod(b, h, q_idx, kv_idx):
                        rel = kv_idx - cache_len[b]
                        in_block = (rel >= 0) & (rel < T)
                        return (rel < 0) | (in_block & tree[q_idx, rel.clamp(0, T - 1)])

                    block_mask = create_block_mask(mask_mod, 1, None, T, S, device=dev)
                    out = flex(q, k, v, block_mask=block_mask, enable_gqa=True)
                    row["flex_ms"] = bench_ms(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
                    row["flex_max_abs_diff_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
                except Exception as e:  # noqa: BLE001 - record why flex could not run this shape, keep going
                    row["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(f"tree_attention T={T:3d} L={L:5d}: triton {row['triton_ms']:.4f} ms  "
                  f"sdpa dense {row['sdpa_dense_ms']:.4f}  sdpa sliced {row['sdpa_sliced_ms']:.4f}  "
                  f"flex {row.get('flex_ms', float('nan')):.4f}  diff {row['max_abs_diff_vs_sdpa']:.2e}", flush=True)
    return rows


def bench_lm_head_topk(vocabs, rows_list, dev, k=10, D=4096):
    from fasteagle.kernels.draft_ops import lm_head_topk

    def torch_topk(h, w):
        logits = F.linear(h, w).float()
        vals, ids = torch.topk(logits, k, dim=-1)
        return vals - torch.logsumexp(logits, -1, keepdim=True), ids

    out = []
    for V in vocabs:
        w = torch.randn(V, D, device=dev, dtype=torch.bfloat16) / D**0.5
        for M in rows_list:
            h = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
            ours, ref = lm_head_topk(h, w, k), torch_topk(h, w)
            row = {"V": V, "D": D, "M": M, "k": k,
                   "triton_ms": bench_ms(lambda: lm_head_topk(h, w, k)),
                   "torch_ms": bench_ms(lambda: torch_topk(h, w)),
                   "max_abs_diff_logprob": (ours[0] - ref[0]).abs().max().item()}
            row["weight_GB_per_s"] = w.numel() * w.element_size() / 1e9 / (row["triton_ms"] / 1e3)  # roofline
            out.append(row)
            print(f"lm_head_topk V={V:6d} M={M:2d}: triton {row['triton_ms']:.4f} ms  torch {row['torch_ms']:.4f} ms  "
                  f"({row['weight_GB_per_s']:.0f} GB/s)  diff {row['max_abs_diff_logprob']:.2e}", flush=True)
    return out


def bench_kv_commit(dev, P=8):
    from fasteagle.kernels.kv_commit import kv_commit, kv_commit_reference

    n_layers, Hkv, S, D = 32, 8, 8192, 128
    caches = [(torch.randn(1, Hkv, S, D, device=dev, dtype=torch.bfloat16),
               torch.randn(1, Hkv, S, D, device=dev, dtype=torch.bfloat16)) for _ in range(n_layers)]
    cache_len = torch.tensor([1000], device=dev)
    path = torch.tensor([0, 1, 3, 7, 12, 20, 33, 50][:P], device=dev)

    def commit(fn):  # a round commits every layer (one launch each)
        for k, v in caches:
            fn(k, v, cache_len, path)

    row = {"n_layers": n_layers, "Hkv": Hkv, "S": S, "D": D, "P": P,
           "triton_ms": bench_ms(lambda: commit(kv_commit)),
           "torch_ms": bench_ms(lambda: commit(kv_commit_reference))}
    print(f"kv_commit P={P}, {n_layers} layers: triton {row['triton_ms']:.4f} ms  torch {row['torch_ms']:.4f} ms",
          flush=True)
    return [row]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--out", type=Path, help="result JSON (default: bench/results/kernels-DEVICE-DATE.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (the Triton kernels are benchmarked on the device); "
                 "none is available here. The CPU interpreter tests are in tests/test_kernels.py.")
    import triton

    dev = torch.device("cuda")
    torch.manual_seed(0)
    tree_sizes = [1, 16, 64]
    cache_lens = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    results = {
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "tree_attention": bench_tree_attention(tree_sizes, cache_lens, dev),
        "lm_head_topk": bench_lm_head_topk([128256, 32000], [1, 10], dev),
        "kv_commit": bench_kv_commit(dev),
    }
    name = re.sub(r"[^A-Za-z0-9]+", "-", results["device"]).strip("-")
    path = args.out or RESULTS / f"kernels-{name}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
