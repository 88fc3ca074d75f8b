"""Choosing the speculation shape: measured costs x measured acceptance -> the fastest tree, or plain AR.

A speculative round with an EAGLE-2 tree of shape (depth D, tree top-k k, N tokens with the root) costs

    round(D, k, N) = verify(N) + tree(D, k, N) + extend(D + 1)

where verify(N) is one target forward over N tokens (with the LM head), tree(D, k, N) building the tree (the
root's draft step, D - 1 levels of k queries with their top-k, the selection), accepting and committing it, and
extend(m) the head's forward over the accepted path. tree() is timed whole for the candidate shapes (the glue
between the head's steps is a fifth of it on a CPU); for other shapes it is draft(1) + (D - 1) * draft(k), draft(m)
one head step over m queries with its top-k. A round emits tau(D, k, N) tokens on average, so

    speedup(D, k, N) = tau(D, k, N) * ar / round(D, k, N)          (ar = one plain decode step)

The costs are timed on the actual device, dtype and head (draft vocabulary included), compiled when the engine
will be (each timed phase is then its own compiled graph, as the engine's are: fewer widths, and tree() from its
draft steps), and cached per machine and model shape in the user cache, so a run pays for them once. tau comes from
the head's calibration: greedy runs of each candidate shape on held-out prompts (`python -m fasteagle.train
calibrate`), stored with the head as calibration.json. Without calibration the chooser falls back to a default
table measured for the bundled head. When no shape beats plain decoding, the choice is AR.

While generating, `Adaptive` keeps a few of the best shapes (each its own fixed-shape graph) and switches between
them per round: the recent acceptance relative to the calibration scales every shape's expected tau alike, so an
easy stretch moves to a deeper tree and a hard one to a smaller tree or to AR (with a probe round now and then).
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fasteagle.compiling import compile_phase, cpp_wrapper_on
from fasteagle.download import DEFAULT_HEAD
from fasteagle.draft import cpu_fast_paths
from fasteagle.kernels.kv_commit import kv_commit, kv_commit_reference
from fasteagle.linear import is_skinny, packed_min_rows
from fasteagle.model import MIN_WINDOW, buckets, causal_mask, kv_caches
from fasteagle.tp import from_rank0
from fasteagle.tree import build_dynamic_tree
from fasteagle.verify import accept

CALIBRATION = "calibration.json"
VERIFY_GRID = (1, 2, 4, 8, 12, 16, 32, 64)
DRAFT_GRID = (1, 2, 4, 8, 16)
# compiled, every width is a graph to compile (~20 s each for SmolLM2 on 2 CPU cores): a coarser grid, the rest
# interpolated (round_cost)
VERIFY_GRID_COMPILED = (1, 2, 4, 8, 16, 32)
DRAFT_GRID_COMPILED = (1, 2, 4, 8)
COSTS_VERSION = "10"  # bump when what the cached timings measure changes (10: compiled int8 heads, key windows)
# shapes calibrated (and their trees timed) by default: chains, one-level fans and small trees (what a CPU can
# afford) up to the reference's 60-token tree
CANDIDATES = ((1, 1, 2), (2, 1, 3), (3, 1, 4), (4, 1, 5), (1, 2, 3), (1, 3, 4), (1, 4, 5), (1, 6, 7), (2, 2, 4),
              (2, 2, 5), (2, 3, 6), (2, 4, 8), (3, 2, 6), (3, 3, 8), (4, 4, 12), (5, 4, 16), (6, 8, 32), (6, 10, 60))


@dataclass(frozen=True)
class Shape:
    depth: int
    top_k: int
    total_tokens: int  # verify width N, root included

    def __str__(self):
        return f"depth {self.depth}, tree top-k {self.top_k}, {self.total_tokens} tokens"


# --- costs -----------------------------------------------------------------------------------------------------------


def _timeit(fns: dict, device, reps: int) -> dict:
    """{key: seconds} for {key: fn}: the minimum over reps, the fns interleaved round-robin, so that other work on
    a shared machine disturbs every entry alike rather than a few of them."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {k: float("inf") for k in fns}
    for rep in range(reps + 1):  # the first pass warms up
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if rep:
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


@torch.no_grad()
def measure_costs(target, head, context: int = 256, reps: int = 3, compiled: bool = False,
                  draft_int8: bool = True) -> dict:
    """Seconds per AR step, verify(N) over VERIFY_GRID, draft(m) and extend(m) over DRAFT_GRID, at `context` cached
    tokens; compiled: each through compile_phase, as the engine runs them, over the _COMPILED grids, without the
    timed tree phases, and "probe": the eager AR step that probe_ar compares with later. Uses cache slots
    [context, context + 64) as scratch: call it before generating."""
    dev = target.embed.weight.device
    if dev.type == "cpu":  # as a SpecEngine runs them
        cpu_fast_paths(target, head, draft_int8, compiled=compiled)
    size = target.max_seq_len
    if size < key_window(context):  # a cache sized for a short generation: time with a big enough one
        target.setup_cache(key_window(context), attn_backend=target.attn_backend)
    if head is not None:
        block = max(max(d - 1, 1) * k for d, k, _ in CANDIDATES)  # a candidate tree's draft slots past L
        head.setup_cache(target.max_seq_len + max(max(DRAFT_GRID), block), attn_backend=target.attn_backend)
    try:
        if not compiled:
            return _measure(target, head, context, reps, dev, lambda fn: fn, VERIFY_GRID, DRAFT_GRID)
        # every width is a variant of the same few code objects: room for them under dynamo's per-object limit
        with torch._dynamo.config.patch(recompile_limit=64):
            costs = _measure(target, head, context, reps, dev, lambda fn: compile_phase(fn, dev),
                             VERIFY_GRID_COMPILED, DRAFT_GRID_COMPILED, tree=False)
        return {**costs, "probe": _ar_step(target, context, reps)}
    finally:
        if target.max_seq_len != size:
            target.setup_cache(size, attn_backend=target.attn_backend)


def key_window(context: int) -> int:
    """The key window (model.py's kv_len) of the timed steps at `context` cached tokens: as the engine picks one
    (SpecEngine._window), the smallest bucket covering the context and the widest step timed. Attention then reads
    what it reads in a real step, whatever the size of the cache the timings run in (over bench's whole 4,096-slot
    cache, SmolLM2's compiled verify(8) timed 1.7-1.8x the AR step instead of 1.2x, and the chooser predicted 1.15x
    AR for its best shape, a 4-token tree, instead of 1.43x for an 8-token one)."""
    return next(b for b in buckets(MIN_WINDOW, 1 << 30) if b >= context + max(VERIFY_GRID))


def _verify_fn(target, n, L):
    """One target forward over n tokens at cached length L, with the LM head: verify(n); n = 1 is the AR step."""
    dev = L.device
    tok = torch.zeros(1, n, dtype=torch.long, device=dev)
    pos = L[:, None] + torch.arange(n, device=dev)[None]
    mask = causal_mask(n, dev)
    window = key_window(int(L[0]))
    return lambda: target.logits(target(tok, pos, L, mask, window)).argmax(-1)


def _ar_step(target, context, reps) -> float:
    L = torch.full((1,), context, dtype=torch.long, device=target.embed.weight.device)
    return _timeit({1: _verify_fn(target, 1, L)}, L.device, reps)[1]


def _measure(target, head, context, reps, dev, run_as, verify_grid, draft_grid, tree: bool = True):
    """run_as(fn): how each phase runs (eager: as is; compiled: its own graph)."""
    L = torch.full((1,), context, dtype=torch.long, device=dev)
    window = key_window(context)
    # the verify grid decides most: thrice the repetitions (a shared machine's noise moved it by ~10% at 3)
    costs = {"verify": _timeit({n: run_as(_verify_fn(target, n, L)) for n in verify_grid}, dev, 3 * reps)}
    costs["ar"] = costs["verify"][1]
    if head is not None:
        feat = torch.zeros(1, 1, target.args.dim, dtype=target.embed.weight.dtype, device=dev)

        def step(m, topk):
            """A tree level (topk: the head's own outputs in, top-k out) or the extend (the target's features in:
            EAGLE-3 reads its tapped layers, len(taps) * dim wide)."""
            tok = torch.zeros(1, m, dtype=torch.long, device=dev)
            pos = L[:, None].expand(1, m)
            f = feat.expand(1, m, -1) if topk or not head.taps else feat.repeat(1, m, len(head.taps))

            eye = torch.eye(m, dtype=torch.bool, device=dev)

            def run():
                out = head(tok, f, pos, L, eye, window)
                return head.topk(out[0], min(10, head.args.vocab_size)) if topk else out
            return run

        costs["draft"] = _timeit({m: run_as(step(m, True)) for m in draft_grid}, dev, reps)
        costs["extend"] = _timeit({m: run_as(step(m, False)) for m in draft_grid}, dev, reps)
        if tree:
            costs["tree"] = _timeit({_key(Shape(*s)): tree_phase(target, head, Shape(*s), L, feat[0, 0], window)
                                     for s in CANDIDATES}, dev, reps)
    return costs


def tree_phase(target, head, s: Shape, L, root_out, window: int | None = None):
    """A round's work besides the verify forward and the extend: build the tree, accept, commit (a chain skips the
    commit, as the engine does). window: the head's key window."""
    commit = kv_commit if target.attn_backend == "triton" else kv_commit_reference
    root = torch.zeros(1, dtype=torch.long, device=L.device)

    def run():
        tree = build_dynamic_tree(head, root, root_out, L, s.depth, s.top_k, s.total_tokens, kv_len=window)
        _, path, _ = accept(tree, tree.tokens)
        if s.top_k > 1:
            for cache in kv_caches(target):
                commit(cache.k, cache.v, L, path)
    return run


def _key(s: Shape) -> str:
    return f"{s.depth},{s.top_k},{s.total_tokens}"


def _interp(table: dict, x: int) -> float:
    """Piecewise-linear in x over a {int: seconds} table (linear extrapolation past its ends)."""
    xs = sorted(table)
    ys = [table[k] for k in xs]
    i = max(1, min(len(xs) - 1, next((j for j, v in enumerate(xs) if v >= x), len(xs) - 1)))
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def round_cost(costs: dict, s: Shape) -> float:
    tree = costs.get("tree", {}).get(_key(s))
    if tree is None:
        tree = _interp(costs["draft"], 1) + (s.depth - 1) * _interp(costs["draft"], s.top_k)
    return _interp(costs["verify"], s.total_tokens) + tree + _interp(costs["extend"], s.depth + 1)


def costs_key(target, head, compiled: bool, draft_int8: bool = True) -> str:
    """What the timings depend on: device, model and head shapes, dtype, the target's quantization, threads, compile
    mode (and C++ wrapper), torch version, the draft's int8 path."""
    dev = target.embed.weight.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{os.cpu_count()}"
    parts = [COSTS_VERSION, name, torch.__version__, str(target.embed.weight.dtype), str(torch.get_num_threads()),
             str(compiled), json.dumps(target.args.to_dict(), sort_keys=True), target.attn_backend,
             str(target.max_seq_len >= 64)]
    if target.quantization:
        parts.append(json.dumps(target.quantization, sort_keys=True))
    if target.tp is not None:
        parts.append(f"tp={target.tp.world}")
    if is_skinny(target.lm_head_packed):
        parts.append("skinny")
    elif not compiled and dev.type == "cpu":
        parts.append(f"packed_from={packed_min_rows()}")
    if compiled and cpp_wrapper_on():
        parts.append("cpp_wrapper")  # the measured kernel choice the timings ran with
    if head is not None:
        parts += [json.dumps(head.args.to_dict(), sort_keys=True), str(None if head.vocab_ids is None else
                                                                       head.vocab_ids.shape[0]),
                  f"int8={draft_int8 and dev.type == 'cpu'}"]
        if head.arch != "eagle":  # an EAGLE-3 head drafts through wider q/k/v and its own LM head
            parts += [head.arch, str(head.taps)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


STALE = 0.85  # a start-up AR step faster than this share of the cached one: the table was timed under load


@torch.no_grad()
def probe_ar(target, head, context: int = 256, reps: int = 5, compiled: bool = False, draft_int8: bool = True):
    """Seconds of one AR step at `context` cached tokens (the minimum over reps, after a warm-up), as measure_costs
    times it: the start-up check of a cached cost table. Always eager (compiled, a table's "probe" is the eager
    step timed with it), so the check compiles nothing."""
    dev = target.embed.weight.device
    if not compiled and dev.type == "cpu":
        cpu_fast_paths(target, head, draft_int8)
    size = target.max_seq_len
    if size < key_window(context):
        target.setup_cache(key_window(context), attn_backend=target.attn_backend)
    try:
        return _ar_step(target, context, reps)
    finally:
        if target.max_seq_len != size:
            target.setup_cache(size, attn_backend=target.attn_backend)


def merge_costs(old: dict, new: dict) -> dict:
    """Entry by entry, the smaller time: load on a shared machine only ever inflates a timing, so the minimum over
    measurements converges to the machine's own costs."""
    return {k: {n: min(t, old.get(k, {}).get(n, t)) for n, t in v.items()} if isinstance(v, dict)
            else min(v, old.get(k, v)) for k, v in new.items()}


def _read_costs(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())  # JSON keys are strings: back to ints
        return {k: v if not isinstance(v, dict) or k == "tree" else {int(n): t for n, t in v.items()}
                for k, v in data.items()}
    except (OSError, ValueError, AttributeError):
        return None


def cached_costs(target, head, compiled: bool = False, cache_dir: Path | None = None,
                 draft_int8: bool = True) -> dict:
    """measure_costs, read from / written to the user cache (one small JSON per machine and model shape).

    A cached table is checked at start-up with one AR step (probe_ar): when that runs faster than STALE x the
    cached AR step, the table was timed while the machine was busy, and wrong where the load hit some phases more
    than others (measured: an adaptive set chosen from such a table ran 5% slower on MT-bench). It is then
    measured again and merged with the old one entry by entry (merge_costs)."""
    from fasteagle.download import cache_dir as user_cache

    if target.embed.weight.device.type == "cpu":  # the kernel choice (costs_key) is made here
        cpu_fast_paths(target, head, draft_int8, compiled=compiled)
    path = (cache_dir or user_cache()) / "costs" / f"{costs_key(target, head, compiled, draft_int8)}.json"
    tp = target.tp  # tensor parallelism: every rank times the same forwards together and takes rank 0's table
    cached = from_rank0(_read_costs(path), tp)
    if cached is not None and "ar" in cached and from_rank0(
            probe_ar(target, head, compiled=compiled, draft_int8=draft_int8)
            >= STALE * cached.get("probe", cached["ar"]), tp):
        return cached
    costs = from_rank0(measure_costs(target, head, compiled=compiled, draft_int8=draft_int8), tp)
    if cached is not None:
        costs = merge_costs(cached, costs)
    if tp is not None and tp.rank != 0:
        return costs
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(costs))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the measurement next time
    return costs


# --- acceptance --------------------------------------------------------------------------------------------------


def read_calibration(head_dir) -> dict[Shape, float]:
    """{shape: greedy tau} from a head's calibration.json ({} when it has none)."""
    try:
        data = json.loads((Path(head_dir) / CALIBRATION).read_text())
        return {Shape(r["depth"], r["top_k"], r["total_tokens"]): float(r["tau"]) for r in data["shapes"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# --- choosing ------------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    shape: Shape | None  # None = plain AR
    speedup: float  # predicted tokens/s relative to AR
    table: list  # [(shape, tau, round cost in AR steps, predicted speedup)], best first


def ar_step_cost(costs: dict) -> float:
    """An AR step of the speculative engine, in plain AR steps: the target's step plus the head's extend by the new
    token (which keeps the head ready for the next round)."""
    return 1.0 + _interp(costs["extend"], 1) / costs["ar"] if "extend" in costs else 1.0


def rank_shapes(costs: dict, taus: dict[Shape, float], max_tokens: int | None = None) -> list:
    ar = costs["ar"]
    rows = []
    for s, tau in taus.items():
        if max_tokens is not None and s.total_tokens > max_tokens:
            continue
        c = round_cost(costs, s) / ar
        rows.append((s, tau, c, tau / c))
    return sorted(rows, key=lambda r: -r[3])


def choose_shape(costs: dict, taus: dict[Shape, float], max_tokens: int | None = None,
                 min_speedup: float = 1.0) -> Choice:
    """The shape with the highest predicted speedup, or AR (shape None) when none beats `min_speedup`."""
    table = rank_shapes(costs, taus, max_tokens)
    if not table or table[0][3] <= min_speedup:
        return Choice(None, 1.0, table)
    return Choice(table[0][0], table[0][3], table)


class Adaptive:
    """Per-round choice among a few fixed shapes (and AR) from the recent acceptance.

    r = EMA of (emitted - 1) / (tau_cal(shape) - 1) over recent rounds: 1 when the text is as easy as the
    calibration prompts. Each shape's expected tau is 1 + r * (tau_cal - 1); the round runs the shape with the
    best expected tau / cost. AR is chosen only when that is below 1 / ar_cost, ar_cost being what an AR step costs
    inside the speculative engine (in AR steps: the head still extends by every token, so > 1). In AR mode every
    `probe`-th step is a speculative round, so r keeps tracking.

    alpha: r's noise is about sqrt(alpha / 2) times one round's, and one round's outcome is nearly binary. At
    0.15, r crossed the AR threshold on noise alone: on six MT-bench answers (CPU, 2 cores) 22% of the tokens
    came from AR steps at 46-50 ms each, while the tree rounds around them produced a token per 31-39 ms; never
    taking AR made the same answers 11% faster. At 0.05 the noise is halved."""

    # acceptance levels r (relative to the calibration) whose best shape is always kept
    LEVELS = (1.0, 0.7, 1.5, 2.0)

    def __init__(self, table: list, keep: int = 3, alpha: float = 0.05, probe: int = 8, ar_cost: float = 1.0):
        """table: rank_shapes' rows, best first. Keeps the best shape at each of LEVELS (so that an easy stretch
        finds a deeper tree, a hard one a smaller one), then the next best up to `keep` shapes. ar_cost: an AR
        step of the speculative engine in plain AR steps (ar_step_cost)."""
        rows = [(s, tau, c) for s, tau, c, _ in table]
        kept = []
        for r in self.LEVELS:
            best = max(rows, key=lambda row: (1 + r * (row[1] - 1)) / row[2], default=None)
            if best is not None and best not in kept:
                kept.append(best)
        self.rows = kept + [row for row in rows if row not in kept][: max(keep - len(kept), 0)]
        self.alpha, self.probe, self.ar_cost = alpha, probe, ar_cost
        self.reset()

    def reset(self):
        self.r, self.ar_steps = 1.0, 0

    @property
    def shapes(self) -> list[Shape]:
        return [s for s, _, _ in self.rows]

    def expected(self, tau: float) -> float:
        return 1 + self.r * (tau - 1)

    def next(self) -> Shape | None:
        s, tau, c = max(self.rows, key=lambda row: self.expected(row[1]) / row[2])
        if self.expected(tau) / c > 1.0 / self.ar_cost:
            return s
        self.ar_steps += 1
        return self.rows[0][0] if self.ar_steps % self.probe == 0 else None

    def update(self, shape: Shape, emitted: int):
        tau = next(t for s, t, _ in self.rows if s == shape)
        self.r += self.alpha * ((emitted - 1) / max(tau - 1, 1e-3) - self.r)


def auto_policy(target, head, head_dir, compiled: bool = False, max_tokens: int | None = None, keep: int = 3,
                cache_dir: Path | None = None, draft_int8: bool = True):
    """The shape chooser for a loaded target + head: (Adaptive or None for AR, Choice, costs). Costs come from the
    user cache (measured on the first run); tau from the head's calibration.json, or, for a head without one,
    the bundled SmolLM2 head's (a rough prior: calibrate your head for a real choice)."""
    taus = read_calibration(head_dir) or read_calibration(BUNDLED_HEAD)
    costs = cached_costs(target, head, compiled, cache_dir, draft_int8)
    choice = choose_shape(costs, taus, max_tokens)
    if choice.shape is None:
        return None, choice, costs
    return Adaptive(choice.table, keep, ar_cost=ar_step_cost(costs)), choice, costs


BUNDLED_HEAD = DEFAULT_HEAD  # the prior for heads without a calibration
