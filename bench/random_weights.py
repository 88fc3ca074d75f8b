"""--random-weights: each engine phase timed alone at a real model size, weights random (nothing to download).

Phases: one AR decode step; one verify forward of N tokens (a random tree's mask) with the LM head and argmax; the
draft tree build (EAGLE-1 static, EAGLE-2 dynamic); a whole speculative round (tree, verify, accept, commit). Each is
timed over --reps calls at every committed cache length in --context-lens (median reported). Acceptance is
meaningless with random weights and is not reported; break_even_tau = round time / AR step time is the number of
tokens a round must emit for speculative decoding to beat AR at that size. On CUDA, AR steps and verifies also get
their achieved memory bandwidth as a fraction of the device's peak.
"""
import sys
import time

import torch

from bench.env import DTYPES, csv_ints, default_out, device_info, header, sync, write_json_atomic
from bench.report import TREES, plot_random
from fasteagle.errors import FastEagleError


def _random_init(module: torch.nn.Module, std: float = 0.02):
    """In place: norms at 1, biases at 0, every other weight N(0, std) (on the module's device: fast on GPU)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)


def build_random(args_m, device, dtype, max_seq_len, backend):
    from fasteagle.draft import DraftHead
    from fasteagle.model import ModelArgs, Transformer

    with torch.device("meta"):
        target = Transformer(args_m)
        head = DraftHead(ModelArgs(**{**args_m.to_dict(), "n_layers": 1}))
    target = target.to(dtype).to_empty(device=device)
    head = head.to(dtype).to_empty(device=device)
    _random_init(target)
    _random_init(head)
    target.setup_cache(max_seq_len, attn_backend=backend)
    return target.eval(), head.eval().bind(target)


def time_calls(fn, device, warmup: int, reps: int, before=None) -> list[float]:
    """Per-call wall times in ms (each call synchronised on CUDA)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(reps):
        if before:
            before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@torch.no_grad()
def run_random(args) -> int:
    from bench.shapes import kv_bytes_per_forward, shape_args, weight_bytes_per_forward
    from fasteagle.engine import SpecEngine
    from fasteagle.model import causal_mask
    from fasteagle.sampling import SamplingParams
    from fasteagle.tree import ancestor_mask

    if args.device == "cuda" and not torch.cuda.is_available():
        raise FastEagleError("--device cuda: no CUDA device available")
    if args.reps < 1 or args.warmup < 0:
        raise FastEagleError("--reps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    name, margs = shape_args(args.shape)
    lens = csv_ints(args.context_lens, "--context-lens")
    widths = csv_ints(args.verify_tokens, "--verify-tokens")
    dev, dtype = args.device, DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    backend = "triton" if dev == "cuda" else "sdpa"
    warm = max(args.warmup, 3 if args.compile else 1)  # CUDA graphs record on the third call
    if args.compile:
        for knob in ("recompile_limit", "cache_size_limit"):  # one graph per (N, L) verify shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
    params = SamplingParams()
    max_tree = max(60, args.total_tokens, 26)
    max_seq_len = max(lens) + max(max(widths), max_tree) + args.depth + 16
    target, head = build_random(margs, dev, dtype, max_seq_len, backend)
    wb = weight_bytes_per_forward(target)
    peak = device_info(dev)["peak_bandwidth_bytes_per_s"] if dev == "cuda" else None
    kv_slot = kv_bytes_per_forward(margs, target.embed.weight.element_size(), 1)
    rows = []

    def row(op, L, tokens, times, bytes_read=None):
        times = sorted(times)
        med = times[len(times) // 2]
        frac = round(bytes_read / (med / 1e3) / peak, 4) if peak and bytes_read else None
        rows.append({"op": op, "context_len": L, "tokens": tokens, "median_ms": round(med, 4),
                     "min_ms": round(times[0], 4), "reps": len(times), "bandwidth_fraction": frac})
        print(f"  L={L:<6} {op:<18} N={tokens:<4} {med:9.3f} ms" + (f"  ({frac:.2f} of peak bandwidth)"
                                                                    if frac is not None else ""), file=sys.stderr)

    print(f"{name}: {sum(p.numel() for p in target.parameters()) / 1e9:.2f}B target parameters, "
          f"{wb / 1e9:.2f} GB read per forward, on {device_info(dev)['name']}", file=sys.stderr)
    mode = "reduce-overhead" if dev == "cuda" else "default"

    def compiled(fn):
        return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False) if args.compile else fn

    # AR step and a whole round, through the engine's own (compiled) phases
    for method in ("ar", "eagle1", "eagle2"):
        eng = SpecEngine(target, None if method == "ar" else head, tree=TREES.get(method, "dynamic"),
                         depth=args.depth, top_k=args.tree_top_k, total_tokens=args.total_tokens,
                         compile=args.compile)
        eng.root.fill_(1)
        for L in lens:
            reset = lambda: eng.cache_len.fill_(L)  # noqa: E731 (each call starts from L)
            if method == "ar":
                t = time_calls(lambda: eng._decode_fn(params, None), dev, warm, args.reps, reset)
                row("ar_step", L, 1, t, wb + kv_slot * (L + 1 if backend == "triton" else max_seq_len))
                continue
            t = time_calls(lambda: eng._round_fn(params, None).tolist(), dev, warm, args.reps, reset)
            row(f"round_{method}", L, eng.tree_size, t)
            # the draft tree alone
            from fasteagle.tree import build_dynamic_tree, build_static_tree

            if method == "eagle2":
                build = compiled(lambda: (lambda tr: (tr.tokens, tr.mask, tr.paths))(build_dynamic_tree(
                    head, eng.root, eng.root_out, eng.cache_len, args.depth, args.tree_top_k, args.total_tokens)))
            else:
                build = compiled(lambda: (lambda tr: (tr.tokens, tr.mask, tr.paths))(build_static_tree(
                    head, eng.static_shape, eng.root, eng.root_out, eng.cache_len)))
            t = time_calls(build, dev, warm, args.reps, reset)
            row(f"draft_tree_{method}", L, eng.tree_size, t)

    # one verify forward of N tokens (a random tree's mask) + logits + argmax
    def verify(tokens, pos, cache_len, mask):
        return target.logits(target(tokens, pos, cache_len, mask)[0]).argmax(-1)

    verify_fn = compiled(verify)
    gen = torch.Generator().manual_seed(0)
    for N in widths:
        parent = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, N)])
        mask = ancestor_mask(parent, N).to(dev) if N > 1 else causal_mask(1, dev)
        depth = mask.sum(-1) - 1
        tokens = torch.randint(0, margs.vocab_size, (1, N), generator=gen).to(dev)
        for L in lens:
            cl = torch.tensor([L], device=dev)
            pos = (L + depth)[None]
            t = time_calls(lambda: verify_fn(tokens, pos, cl, mask), dev, warm, args.reps)
            row("verify", L, N, t, wb + kv_slot * (L + N if backend == "triton" else max_seq_len))

    ar_ms = {r["context_len"]: r["median_ms"] for r in rows if r["op"] == "ar_step"}
    res = header(args, "random-weights")
    res["params"].update({"dtype": str(dtype).replace("torch.", ""), "attn_backend": backend,
                          "max_seq_len": max_seq_len, "context_lens": lens, "verify_tokens": widths})
    res["shape"] = name
    res["model"] = {"args": margs.to_dict(), "weight_bytes_per_forward": wb,
                    "parameters": sum(p.numel() for p in target.parameters())}
    res["note"] = ("random weights: acceptance is meaningless and is not reported; break_even_tau = round time / AR "
                   "step time, the tokens a round must emit for speculative decoding to beat AR at this size")
    res["results"] = rows
    res["break_even_tau"] = {str(r["context_len"]): {} for r in rows if r["op"].startswith("round_")}
    for r in rows:
        if r["op"].startswith("round_"):
            res["break_even_tau"][str(r["context_len"])][r["op"][6:]] = round(r["median_ms"] / ar_ms[r["context_len"]], 3)
    out = args.out or default_out(args, name, "random-")
    png = out.with_suffix(".png")
    res["plot"] = png.name
    write_json_atomic(out, res)
    plot_random(res, png)
    print(f"break-even tau (round / AR step): {res['break_even_tau']}")
    print(f"wrote {out} and {png}", file=sys.stderr)
    return 0
