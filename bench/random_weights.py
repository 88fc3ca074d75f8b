"""--random-weights: each engine phase timed alone at a real model size, weights random (nothing to download).

    python -m bench.latency --random-weights --shape llama-3-8b [--context-lens 512,4096] [--max-seq-len 8192]
        [--verify-tokens 1,4,8,16,32,64] [--reps 20] [--compile] [--device cuda --dtype bfloat16]
    python -m bench.random_weights [--draft-vocab 16384] [--draft-k 1,4,10] [--phases ar,verify,draft,rounds] ...
        # the same, plus these flags (bench.latency's parser does not have them)

The component table: at every committed cache length L in --context-lens (median of --reps calls, min recorded)

- ar_step: one plain decode step (SpecEngine's compiled phase);
- verify N=n: one target forward over n tokens (a random tree's ancestor mask) with the LM head and argmax;
- draft_level_kK: one draft level, the head's forward over K queries plus head.topk(out, K) over the whole target
  vocabulary; draft_level_kK_dv: the same ranking over a draft vocabulary of --draft-vocab ids (V_d rows of the LM
  head instead of V). These are the terms of autotune's round cost: verify(N) + draft(1) + (D-1) draft(K) + extend;
- draft_tree_eagle1/2: the whole tree build; round_eagle1/2: a whole speculative round (tree, verify, accept,
  commit), both over the full vocabulary.

Attention reads a key window, the power-of-two bucket covering L plus the step's tokens (the engine's own choice,
`window` in each row), not the whole --max-seq-len cache; context_ratio = median(largest L) / median(smallest L) per
op says how much of a phase's cost grows with the live context. Acceptance is meaningless with random weights and is
not reported; break_even_tau = round time / AR step time is the number of tokens a round must emit for speculative
decoding to beat AR at that size. On CUDA, AR steps, verifies and draft levels also get their achieved memory
bandwidth as a fraction of the device's peak. An interrupted run (Ctrl-C, SIGTERM) still writes the rows it timed,
marked "incomplete".
"""
import argparse
import shlex
import sys
import time

import torch

from bench.env import csv_ints, default_out, device_info, header, sync, write_json_atomic
from fasteagle.cli import torch_dtype
from bench.report import TREES, plot_random
from fasteagle.errors import FastEagleError

DRAFT_KS = "1,4,10"  # tree top-k values a draft level is timed at
DRAFT_VOCAB = 16384  # default draft vocabulary size (capped at the shape's vocabulary)
PHASES = ("ar", "verify", "draft", "rounds")  # --phases: rounds = the tree builds and whole rounds
DEFAULTS = {"draft_vocab": None, "draft_k": DRAFT_KS, "phases": ",".join(PHASES), "quantize": None, "argv": None}
OPTIONS = dict(DEFAULTS)  # this module's own flags, set by its entry point (see main)


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


def build_random(args_m, device, dtype, max_seq_len, backend, draft_vocab: int = 0):
    """Target + head with random weights and the target's cache set up. With draft_vocab, the head stores V_d random
    target ids as its draft vocabulary, but starts with the full vocabulary in use (use_draft_vocab switches)."""
    from fasteagle.draft import DraftHead
    from fasteagle.model import Transformer

    torch.manual_seed(0)
    with torch.device("meta"):
        target = Transformer(args_m)
        head = DraftHead(args_m.draft_layer(), draft_vocab_size=draft_vocab)
    target = target.to(dtype).to_empty(device=device)
    head = head.to(dtype).to_empty(device=device)
    _random_init(target)
    _random_init(head)
    if draft_vocab:
        head.draft_vocab.copy_(torch.randperm(args_m.vocab_size)[:draft_vocab])
    target.setup_cache(max_seq_len, attn_backend=backend)
    return target.eval(), head.eval().bind(target).use_draft_vocab(None)


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


def key_window(backend: str, cap: int, end: int) -> int | None:
    """The key window a step reaching slot `end` reads (the engine's rule: the smallest power-of-two bucket from
    MIN_WINDOW covering it, clamped to the cache `cap`); None on the triton backend, which reads the live slots."""
    from fasteagle.engine import MIN_WINDOW, buckets

    if backend == "triton":
        return None
    return next(b for b in buckets(MIN_WINDOW, cap) if b >= min(end, cap))


def label(row: dict) -> str:
    return f"verify N={row['tokens']}" if row["op"] == "verify" else row["op"]


class Table:
    """The timed rows, printed as they come."""

    def __init__(self, peak: float | None):
        self.rows, self.peak = [], peak

    def add(self, op, L, tokens, times, bytes_read=None, **extra):
        times = sorted(times)
        med = times[len(times) // 2]
        frac = round(bytes_read / (med / 1e3) / self.peak, 4) if self.peak and bytes_read else None
        self.rows.append({"op": op, "context_len": L, "tokens": tokens, **extra, "median_ms": round(med, 4),
                          "min_ms": round(times[0], 4), "reps": len(times), "bandwidth_fraction": frac})
        print(f"  L={L:<6} {op:<22} N={tokens:<4} {med:9.3f} ms" + (f"  ({frac:.2f} of peak bandwidth)"
                                                                    if frac is not None else ""), file=sys.stderr)


# --- the phases ------------------------------------------------------------------------------------------------------


def time_ar(target, a, lens, dparams, table, cost, op: str = "ar_step"):
    """ar_step: SpecEngine's own (compiled) decode phase."""
    from fasteagle.engine import SpecEngine

    eng = SpecEngine(target, None, compile=a.compile)
    eng.root.fill_(1)
    for L in lens:
        w = eng._window(L, False)
        t = time_calls(lambda: eng._decode_fn(dparams, None, w), cost.dev, cost.warm, a.reps,
                       lambda: eng.cache_len.fill_(L))  # each call starts from L
        table.add(op, L, 1, t, cost.target(L + 1, w), window=w)


def time_quantized(margs, a, lens, dparams, table, modes, dtype, max_seq_len, backend):
    """ar_step_int8 / ar_step_int4: the AR step of the target quantized to each mode (fasteagle.quant: random weights
    quantized on the device, then run as generate --quantize runs them), its bandwidth fraction counted over the
    bytes the quantized forward reads (int8 / packed int4 weights and their scales)."""
    from fasteagle import quant

    for mode in modes:
        target, head = build_random(margs, a.device, dtype, max_seq_len, backend)
        quant.quantize_model(target, mode)
        quant.prepare_model(target.to(a.device, dtype))
        time_ar(target, a, lens, dparams, table, Cost(a, target, head, backend), op=f"ar_step_{mode}")
        del target, head
        if a.device == "cuda":
            torch.cuda.empty_cache()


def time_rounds(target, head, a, lens, dparams, table, cost):
    """round_eagle1/2 (SpecEngine's compiled round) and draft_tree_eagle1/2 (the tree build alone)."""
    from fasteagle.engine import SpecEngine
    from fasteagle.tree import build_dynamic_tree, build_static_tree

    for method in ("eagle1", "eagle2"):
        eng = SpecEngine(target, head, tree=TREES[method], depth=a.depth, top_k=a.tree_top_k,
                         total_tokens=a.total_tokens, compile=a.compile)
        eng.root.fill_(1)
        for L in lens:
            reset = lambda: eng.cache_len.fill_(L)  # noqa: E731 (each call starts from L)
            w = eng._window(L, True)
            t = time_calls(lambda: eng._round_fn(dparams, None, eng.shape, w).tolist(), cost.dev, cost.warm, a.reps,
                           reset)
            table.add(f"round_{method}", L, eng.tree_size, t, window=w)
            if method == "eagle2":
                s = eng.shape
                build = lambda: build_dynamic_tree(head, eng.root, eng.root_out, eng.cache_len, s.depth,  # noqa
                                                   s.top_k, s.total_tokens, 1.0, w)
            else:
                build = lambda: build_static_tree(head, eng.static_shape, eng.root, eng.root_out,  # noqa: E731
                                                  eng.cache_len, 1.0, w)
            tree_fn = cost.compiled(lambda: (lambda tr: (tr.tokens, tr.mask, tr.paths))(build()))
            t = time_calls(tree_fn, cost.dev, cost.warm, a.reps, reset)
            table.add(f"draft_tree_{method}", L, eng.tree_size, t, window=w)


def time_verify(target, margs, lens, widths, a, table, cost):
    """One verify forward of N tokens (a random tree's ancestor mask) + logits + argmax, per (N, L)."""
    from fasteagle.model import causal_mask
    from fasteagle.tree import ancestor_mask

    def verify(tokens, pos, cache_len, mask, window):
        return target.logits(target(tokens, pos, cache_len, mask, window)[0]).argmax(-1)

    verify_fn = cost.compiled(verify)
    gen = torch.Generator().manual_seed(0)
    for N in widths:
        parent = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, N)])
        mask = ancestor_mask(parent, N).to(cost.dev) if N > 1 else causal_mask(1, cost.dev)
        depth = mask.sum(-1) - 1
        tokens = torch.randint(0, margs.vocab_size, (1, N), generator=gen).to(cost.dev)
        for L in lens:
            cl = torch.tensor([L], device=cost.dev)
            pos = (L + depth)[None]
            w = key_window(cost.backend, target.max_seq_len, L + N)
            t = time_calls(lambda: verify_fn(tokens, pos, cl, mask, w), cost.dev, cost.warm, a.reps)
            table.add("verify", L, N, t, cost.target(L + N, w, N), window=w)


def time_draft_levels(head, cap, lens, ks, draft_vocab, a, table, cost):
    """One draft level: the head over k queries (as a tree level: each at the next position, seeing the committed
    context and itself) + head.topk(out, k); over the full vocabulary and over the draft vocabulary."""
    dev, dim = cost.dev, head.args.dim
    V = head.args.vocab_size
    # a draft cache like the engine's (the target's size plus headroom): the same key windows as in a round
    head.setup_cache(cap + max(ks), attn_backend=cost.backend)
    gen = torch.Generator().manual_seed(1)

    def level(tokens, feats, pos, cache_len, mask, window, k):
        out = head(tokens, feats, pos, cache_len, mask, window)[0]
        return head.topk(out, k)

    level_fn = cost.compiled(level)
    variants = [(None, V, "")] + ([(draft_vocab, draft_vocab, "_dv")] if draft_vocab else [])
    for size, rows, suffix in variants:
        head.use_draft_vocab(size)
        for k in ks:
            tokens = torch.randint(0, V, (1, k), generator=gen).to(dev)
            feats = torch.randn(1, k, dim, generator=gen).to(dev, head.fc.weight.dtype)
            mask = torch.eye(k, dtype=torch.bool, device=dev)
            for L in lens:
                cl = torch.tensor([L], device=dev)
                pos = cl[:, None].expand(1, k)
                w = key_window(cost.backend, head.max_seq_len, L + k)
                t = time_calls(lambda: level_fn(tokens, feats, pos, cl, mask, w, k), dev, cost.warm, a.reps)
                table.add(f"draft_level_k{k}{suffix}", L, k, t, cost.head(rows, L + k, w), window=w, vocab=rows)
    head.use_draft_vocab(None)


class Cost:
    """What the phases share: device, warm-up calls, compilation, and the bytes a forward reads (for CUDA's
    bandwidth fraction): the weights plus the K/V of the live slots (triton) or of the key window (sdpa)."""

    def __init__(self, a, target, head, backend):
        from bench.shapes import kv_bytes_per_forward, weight_bytes_per_forward

        self.dev, self.backend, self.compile = a.device, backend, a.compile
        self.warm = max(a.warmup, 3 if a.compile else 1)  # CUDA graphs record on the third call
        self.mode = "reduce-overhead" if a.device == "cuda" else "default"
        el = target.embed.weight.element_size()
        self.model, self.weight_bytes = target, weight_bytes_per_forward
        self.kv_slot = kv_bytes_per_forward(target.args, el, 1)
        self.head_kv_slot = kv_bytes_per_forward(head.args, el, 1)
        self.head_bytes = sum(p.numel() * p.element_size() for p in head.parameters())
        self.row_bytes = target.args.dim * el  # one LM-head row

    def _slots(self, live, window):
        return live if self.backend == "triton" or window is None else window

    def target(self, live, window, tokens=1):
        return self.weight_bytes(self.model, tokens) + self.kv_slot * self._slots(live, window)

    def head(self, vocab_rows, live, window):
        return self.head_bytes + vocab_rows * self.row_bytes + self.head_kv_slot * self._slots(live, window)

    def compiled(self, fn):
        return torch.compile(fn, mode=self.mode, fullgraph=True, dynamic=False) if self.compile else fn


# --- the run ---------------------------------------------------------------------------------------------------------


def check_args(a, margs, lens, widths, ks, draft_vocab, tree_max):
    if a.device == "cuda" and not torch.cuda.is_available():
        raise FastEagleError("--device cuda: no CUDA device available")
    if a.reps < 1 or a.warmup < 0:
        raise FastEagleError("--reps must be >= 1 and --warmup >= 0")
    if not 0 <= draft_vocab <= margs.vocab_size:
        raise FastEagleError(f"--draft-vocab {draft_vocab}: must be 0 (off) .. the vocabulary ({margs.vocab_size})")
    if max(ks) > (draft_vocab or margs.vocab_size):
        raise FastEagleError(f"--draft-k {max(ks)} exceeds the draft vocabulary ({draft_vocab or margs.vocab_size})")
    need = max(lens) + max(max(widths), tree_max, a.depth + 1, max(ks))
    if a.max_seq_len is not None and a.max_seq_len < need:
        raise FastEagleError(f"--max-seq-len {a.max_seq_len} is too small: context {max(lens)} plus a "
                             f"{need - max(lens)}-token step needs at least {need} slots")


def context_ratio(rows: list[dict], lens: list[int]) -> dict:
    """median(largest L) / median(smallest L) per op: how a phase's cost grows with the live context."""
    lo, hi = min(lens), max(lens)
    at = {(label(r), r["context_len"]): r["median_ms"] for r in rows}
    ratios = {lab: round(at[(lab, hi)] / at[(lab, lo)], 3) for lab, L in at if L == lo and (lab, hi) in at}
    return {"from_context": lo, "to_context": hi, "ratios": ratios}


def format_table(res: dict) -> str:
    """The component table: ms per op and context, verify and draft levels also in AR steps, and the ratio."""
    lens = res["params"]["context_lens"]
    ar = {r["context_len"]: r["median_ms"] for r in res["results"] if r["op"] == "ar_step"}
    at = {(label(r), r["context_len"]): r["median_ms"] for r in res["results"]}
    ratios = res["context_ratio"]["ratios"]
    head = f"{'op (median ms; x AR step)':<28}" + "".join(f"{'L=' + str(L):>20}" for L in lens)
    head += f"{res['context_ratio']['to_context']}/{res['context_ratio']['from_context']}".rjust(14)
    where = res["device"]["name"] + (f", {res['params']['threads']} threads" if res["device"]["type"] == "cpu" else "")
    lines = [f"component table: {res['shape']}, {res['params']['dtype']}, {where}, "
             f"{res['params']['max_seq_len']}-slot cache", head]
    for lab in dict.fromkeys(label(r) for r in res["results"]):
        cells = ""
        for L in lens:
            ms = at.get((lab, L))
            rel = f" ({ms / ar[L]:5.2f}x)" if ms is not None and L in ar and lab != "ar_step" else " " * 9
            cells += (f"{ms:11.3f}{rel}" if ms is not None else " " * 20)
        lines.append(f"{lab:<28}{cells}{ratios.get(lab, float('nan')):14.2f}")
    return "\n".join(lines)


@torch.no_grad()
def run_random(args) -> int:
    from bench.shapes import shape_args, weight_bytes_per_forward
    from fasteagle.sampling import DeviceParams, SamplingParams
    from fasteagle.tree import MC_SIM_7B_63, StaticTreeShape, dynamic_tree_size

    name, margs = shape_args(args.shape)
    lens = csv_ints(args.context_lens, "--context-lens")
    widths = csv_ints(args.verify_tokens, "--verify-tokens")
    ks = csv_ints(getattr(args, "draft_k", None) or OPTIONS["draft_k"], "--draft-k")
    phases = [x.strip() for x in (getattr(args, "phases", None) or OPTIONS["phases"]).split(",") if x.strip()]
    if not phases or set(phases) - set(PHASES):
        raise FastEagleError(f"--phases: choose from {','.join(PHASES)}, got {','.join(phases) or 'nothing'}")
    modes = [x.strip() for x in (getattr(args, "quantize", None) or OPTIONS["quantize"] or "").split(",") if x.strip()]
    if set(modes) - {"int8", "int4"}:
        raise FastEagleError(f"--quantize: choose from int8,int4, got {','.join(modes)}")
    draft_vocab = getattr(args, "draft_vocab", None)
    if draft_vocab is None:
        draft_vocab = OPTIONS["draft_vocab"]
    draft_vocab = min(DRAFT_VOCAB, margs.vocab_size) if draft_vocab is None else draft_vocab
    tree_max = max(StaticTreeShape.from_choices(MC_SIM_7B_63).size,
                   dynamic_tree_size(args.depth, args.tree_top_k, args.total_tokens))
    check_args(args, margs, lens, widths, ks, draft_vocab, tree_max)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = args.device, torch_dtype(args.dtype, args.device)
    backend = "triton" if dev == "cuda" else "sdpa"
    if args.compile:
        cfg = torch._dynamo.config  # one graph per (N, window) verify shape, per (k, window, vocab) draft level
        for knob, n in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 4096)):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(n, getattr(cfg, knob)))
    max_seq_len = args.max_seq_len or max(lens) + max(max(widths), tree_max) + args.depth + 16
    target, head = build_random(margs, dev, dtype, max_seq_len, backend, draft_vocab)
    wb = weight_bytes_per_forward(target)
    n_params = sum(p.numel() for p in target.parameters())
    print(f"{name}: {n_params / 1e9:.2f}B target parameters, {wb / 1e9:.2f} GB read per forward, {max_seq_len}-slot "
          f"cache, draft vocabulary {draft_vocab or 'off'}, on {device_info(dev)['name']}", file=sys.stderr)
    cost = Cost(args, target, head, backend)
    table = Table(device_info(dev)["peak_bandwidth_bytes_per_s"] if dev == "cuda" else None)
    dparams = DeviceParams.of(SamplingParams(), margs.vocab_size, dev)  # greedy
    incomplete = None
    try:
        # the components first (what autotune's round cost adds up), then the whole tree builds and rounds
        if "ar" in phases:
            time_ar(target, args, lens, dparams, table, cost)
        if "verify" in phases:
            time_verify(target, margs, lens, widths, args, table, cost)
        if "draft" in phases:
            time_draft_levels(head, max_seq_len, lens, ks, draft_vocab, args, table, cost)
        if "rounds" in phases:
            time_rounds(target, head, args, lens, dparams, table, cost)
        if modes:
            del target, head  # room for the quantized copies
            time_quantized(margs, args, lens, dparams, table, modes, dtype, max_seq_len, backend)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (a timeout): keep what was measured
        incomplete = e
        if not table.rows:
            raise
        print(f"interrupted: writing the {len(table.rows)} rows timed so far", file=sys.stderr)

    res = header(args, "random-weights")
    if OPTIONS.get("argv") is not None:
        res["command"] = shlex.join(["python", "-m", "bench.random_weights", *OPTIONS["argv"]])
    res["params"].update({"dtype": str(dtype).replace("torch.", ""), "attn_backend": backend,
                          "max_seq_len": max_seq_len, "context_lens": lens, "verify_tokens": widths,
                          "draft_k": ks, "draft_vocab": draft_vocab, "phases": phases, "quantize": modes,
                          "threads": torch.get_num_threads()})
    res["shape"] = name
    res["model"] = {"args": margs.to_dict(), "weight_bytes_per_forward": wb, "parameters": n_params}
    res["note"] = ("random weights: acceptance is meaningless and is not reported; break_even_tau = round time / AR "
                   "step time, the tokens a round must emit for speculative decoding to beat AR at this size")
    res["timing_note"] = (f"median_ms of {args.reps} timed calls after {cost.warm} warm-up calls (min_ms: the fastest)"
                          + (f"; on {torch.get_num_threads()} CPU threads of a machine shared with other jobs, "
                             "single timings are noisy (tens of percent between runs); ratios within one run hold "
                             "up better" if dev == "cpu" else ""))
    if incomplete is not None:
        res["incomplete"] = f"{type(incomplete).__name__}: interrupted after {len(table.rows)} rows"
    rows = table.rows
    res["results"] = rows
    ar_ms = {r["context_len"]: r["median_ms"] for r in rows if r["op"] == "ar_step"}
    res["break_even_tau"] = {str(L): {r["op"][6:]: round(r["median_ms"] / ar_ms[L], 3) for r in rows
                                      if r["op"].startswith("round_") and r["context_len"] == L}
                             for L in lens if L in ar_ms}
    res["verify_over_ar"] = {str(L): {str(r["tokens"]): round(r["median_ms"] / ar_ms[L], 3) for r in rows
                                      if r["op"] == "verify" and r["context_len"] == L} for L in lens if L in ar_ms}
    res["context_ratio"] = context_ratio(rows, lens)
    out = args.out or default_out(args, name, "random-")
    png = out.with_suffix(".png")
    res["plot"] = png.name
    write_json_atomic(out, res)
    plot_random(res, png)
    if incomplete is not None:
        raise incomplete
    print(format_table(res))
    print(f"break-even tau (round / AR step): {res['break_even_tau']}")
    print(f"wrote {out} and {png}", file=sys.stderr)
    return 0


# --- entry point: bench.latency's flags plus the draft-level ones -----------------------------------------------------


def main(argv=None) -> int:
    """python -m bench.random_weights [--draft-vocab N] [--draft-k 1,4,10] [--phases ...] [any bench.latency flag]:
    bench.latency --random-weights, plus the flags bench.latency's parser does not have."""
    from bench import latency, random_weights  # this module again: under -m, this file runs as __main__

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench.random_weights", add_help=False, allow_abbrev=False,
                                description="bench.latency --random-weights with the draft-level flags")
    p.add_argument("--draft-vocab", type=int, help=f"draft vocabulary size V_d for the draft-level rows (default: "
                                                   f"min({DRAFT_VOCAB}, vocab); 0: skip them)")
    p.add_argument("--draft-k", default=DRAFT_KS, help="tree top-k values K to time one draft level at")
    p.add_argument("--phases", default=DEFAULTS["phases"], help="which rows to time, from " + ",".join(PHASES))
    p.add_argument("--quantize", help="also time the AR step of the target quantized to these modes (int8,int4), "
                                      "after the other phases")
    own, rest = p.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        p.print_help()
        print("\nevery other flag is bench.latency's (--random-weights is implied):\n")
    random_weights.OPTIONS.update(draft_vocab=own.draft_vocab, draft_k=own.draft_k, phases=own.phases,
                                  quantize=own.quantize, argv=argv)
    try:
        return latency.main(["--random-weights", *rest])
    finally:
        random_weights.OPTIONS.update(DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
