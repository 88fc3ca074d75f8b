"""SpecEngine: prefill, draft, verify, accept, commit. Plain AR decoding when no draft head is given.

One speculative round, all on device with fixed shapes (one compiled graph, CUDA-graph captured on GPU):

    tree    = build_tree(head, root, root_out, L)                      # N tokens, depths, ancestor mask
    hidden  = target(tree.tokens, L + tree.depth, L, tree.mask)        # one verify forward over the tree
    choice  = argmax or sample of the target's logits at every node
    accept_len, path, emitted = accept(tree, choice)                   # verify.py: the lossless part
    commit: target K/V of the accepted path -> slots L .. L + accept_len; draft extends on (hidden[path], emitted)
    L += accept_len + 1; the bonus token becomes the next root

State between rounds lives in three device tensors updated in place (see __init__). The host reads one small
tensor per round: the number of emitted tokens and the tokens.
"""
import time
from dataclasses import dataclass, field

import torch

from fasteagle.autotune import Shape
from fasteagle.compiling import compile_phase
from fasteagle.draft import cpu_fast_paths
from fasteagle.errors import FastEagleError
from fasteagle.kernels.kv_commit import kv_commit, kv_commit_reference
from fasteagle.model import MIN_WINDOW, buckets, causal_mask, kv_caches
from fasteagle.sampling import DeviceParams, SamplingParams, choose_tokens, sampling_noise
from fasteagle.tp import same_seed
from fasteagle.tree import MC_SIM_7B_63, StaticTreeShape, build_dynamic_tree, build_static_tree, dynamic_tree_size
from fasteagle.verify import accept

# EAGLE-2 defaults of the reference's evaluation scripts (total_token=60, depth=5 -> 6 levels here, top_k=10)
DEFAULT_DEPTH, DEFAULT_TOP_K, DEFAULT_TOTAL_TOKENS = 6, 10, 60
MIN_PROMPT_BUCKET = 16


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens (an EOS that stopped generation included)
    accept_lens: list[int] = field(default_factory=list)  # tokens emitted per speculative round (before cuts)
    stop_reason: str = ""  # "eos" | "max_new_tokens" | "cache_full"
    seconds: float = 0.0

    @property
    def mean_accepted(self) -> float | None:
        """tau: mean tokens emitted per target forward over the speculative rounds (None without any)."""
        return sum(self.accept_lens) / len(self.accept_lens) if self.accept_lens else None


def check_dynamic_shape(s: "Shape", vocab_size: int):
    if s.depth < 1 or s.top_k < 1 or s.total_tokens < 1:
        raise FastEagleError(f"bad tree shape ({s}): --depth, --tree-top-k and --total-tokens must be >= 1")
    if s.top_k > vocab_size:
        raise FastEagleError(f"--tree-top-k {s.top_k} exceeds the draft's vocabulary ({vocab_size} tokens)")


def draft_vocab_size(draft) -> int:
    """How many tokens the draft proposes among: its draft vocabulary in use, else the target's vocabulary."""
    return draft.args.vocab_size if draft.vocab_ids is None else draft.vocab_ids.shape[0]


@torch.no_grad()
def auto_total_tokens(target, candidates=(40, 48, 50, 56, 60), gains=(1.0, 1.05, 1.07, 1.1, 1.13), reps=10) -> int:
    """Pick the EAGLE-2 verify width from measured verify latency, as the reference's total_token=-1 does:
    the candidate minimising latency / expected gain (a wider tree accepts a little more; the gains are the
    reference's). Uses the cache slots [0, N) as scratch: call it before generating."""
    dev = target.embed.weight.device
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    costs = []
    for n, gain in zip(candidates, gains):
        n = min(n, target.max_seq_len)
        tokens = torch.zeros(1, n, dtype=torch.long, device=dev)
        pos = torch.arange(n, device=dev)[None]
        mask = causal_mask(n, dev)
        target.logits(target(tokens, pos, zero, mask))  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            target.logits(target(tokens, pos, zero, mask))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        costs.append((time.perf_counter() - t0) / gain)
    return min(candidates[costs.index(min(costs))], target.max_seq_len)


class SpecEngine:
    def __init__(self, target, draft=None, *, tree: str = "dynamic", depth: int = DEFAULT_DEPTH,
                 top_k: int = DEFAULT_TOP_K, total_tokens: int = DEFAULT_TOTAL_TOKENS, static_choices=None,
                 draft_temperature: float = 1.0, compile: bool = False, policy=None, draft_int8: bool = True):
        """policy: an autotune.Adaptive choosing the tree shape (or AR) per round among its few fixed shapes;
        without it every round uses the one shape given by tree / depth / top_k / total_tokens.
        draft_int8: on CPU (fp32) the draft head runs through int8 copies of its weights, eager and compiled
        (draft.cpu_fast_paths)."""
        self.target, self.draft = target, draft
        self.device = target.embed.weight.device
        self.max_seq_len = target.max_seq_len
        self.tree_kind = tree
        self.draft_temperature = draft_temperature
        self.policy = policy if draft is not None else None
        self.taps = draft.taps if draft is not None else ()  # EAGLE-3: the target layers the head reads
        self.shape = None  # the dynamic tree's shape when fixed (None: AR, the static tree, or chosen by the policy)
        if draft is not None:
            if tree not in ("dynamic", "static"):
                raise FastEagleError(f"unknown tree kind {tree!r} (dynamic or static)")
            if not draft_temperature > 0:
                raise FastEagleError("draft temperature must be > 0")
            if tree == "dynamic":
                shapes = self.policy.shapes if self.policy else [Shape(depth, top_k, total_tokens)]
                for s in shapes:
                    check_dynamic_shape(s, draft_vocab_size(draft))
                self.shape = shapes[0]
                self.tree_size = max(self._size(s) for s in shapes)
                self.depth = max(s.depth for s in shapes)
                draft_block = max(max(s.depth - 1, 1) * s.top_k for s in shapes)
            else:
                try:
                    self.static_shape = StaticTreeShape.from_choices(static_choices or MC_SIM_7B_63)
                except ValueError as e:
                    raise FastEagleError(str(e)) from None
                if self.static_shape.max_rank >= draft_vocab_size(draft):
                    raise FastEagleError(f"the static tree takes rank {self.static_shape.max_rank} of the draft's "
                                         f"top-k, beyond its vocabulary ({draft_vocab_size(draft)} tokens)")
                self.shape, self.policy = None, None
                self.depth, self.tree_size = self.static_shape.depth, self.static_shape.size
                draft_block = self.tree_size
            # the draft writes up to max(tree block, D+1) slots past L; give it that much headroom
            draft.setup_cache(self.max_seq_len + max(draft_block, self.depth + 1), attn_backend=target.attn_backend)
        if self.device.type == "cpu":  # packed fp32 weights (linear.Linear), eager: the draft's int8 copies
            cpu_fast_paths(target, draft, draft_int8, compiled=compile)
        # Round-to-round state, updated in place by the phases so that captured graphs always read and write the
        # same addresses: L (committed cache length, shared by target and draft), the root (last emitted token,
        # not yet in the cache) and root_out (the draft's output at L - 1, its guess of the root's feature).
        dev = self.device
        self.cache_len = torch.zeros(1, dtype=torch.long, device=dev)
        self.root = torch.zeros(1, dtype=torch.long, device=dev)
        self.root_out = torch.zeros(target.args.dim, dtype=target.embed.weight.dtype, device=dev)
        # the Triton backend (CUDA) commits a layer in one kernel launch; the reference: the same gather/copy in PyTorch
        self._kv_commit = kv_commit if target.attn_backend == "triton" else kv_commit_reference
        self.compiled = compile
        self._round_fn, self._decode_fn, self._prefill_fn = self._round, self._decode, self._prefill
        if compile:
            self._compile()

    # --- compiled phases -------------------------------------------------------------------------------------

    def _compile(self):
        cuda = self.device.type == "cuda"
        if cuda:  # state mutated in place must keep its address for CUDA-graph replay
            for t in (self.cache_len, self.root, self.root_out):
                torch._dynamo.mark_static_address(t)
        if self.draft is not None and self.tree_kind == "static":
            self.static_shape.on(self.device)  # its index tensors, made before tracing: the round only reads them
        # Static shapes (dynamic=False), as CUDA graphs need: one graph per variant. Variants of one engine:
        #   prefill: prompt bucket (16, 32, ..., max_seq_len)                  x sampling kind
        #   decode:  key window (128, 256, ..., the largest cache; triton: one) x sampling kind
        #   round:   key window x tree shape                                   x sampling kind
        # A sampling kind is DeviceParams' (greedy, top_k_max, top_p_on), DeviceParams.kinds(V) of them (37 for
        # V = 49,152); temperature, top-k and top-p values are data. So nothing unbounded (a prompt length, a
        # temperature) makes new graphs. Dynamo caches per code object and every engine adds its variants to the
        # same three, so each engine raises the per-code-object limit (8 by default; fullgraph=True fails past it)
        # by its largest count and the process-wide limit by its total.
        kinds = DeviceParams.kinds(self.target.args.vocab_size)
        n_prefill = len(buckets(MIN_PROMPT_BUCKET, self.max_seq_len))
        n_window = 1 if self.target.attn_backend == "triton" else len(buckets(MIN_WINDOW, self._cache_cap()))
        n_round = n_window * (len(self.policy.shapes) if self.policy else 1) if self.draft is not None else 0
        cfg = torch._dynamo.config
        cfg.recompile_limit += kinds * max(n_prefill, n_window, n_round)
        cfg.accumulated_recompile_limit += kinds * (n_prefill + n_window + n_round)
        self._round_fn = compile_phase(self._round, self.device)  # on GPU one CUDA-graph replay per round
        self._decode_fn = compile_phase(self._decode, self.device)
        # prefill runs once per prompt at a bucketed length: one graph per bucket, no CUDA graph needed
        self._prefill_fn = compile_phase(self._prefill, self.device, cuda_graph=False)

    def _prefill(self, tokens, length, params: DeviceParams, noise):
        """tokens [1, Tb] (the prompt padded to a bucket), length [1] = the real prompt length T.
        Sets the state (L = T, root = the first new token, root_out) and returns the first token [1]."""
        Tb = tokens.shape[1]  # also the key window: slots [0, Tb)
        pos = torch.arange(Tb, device=tokens.device)[None]
        zero = torch.zeros(1, dtype=torch.long, device=tokens.device)
        hidden, feats = self._target(tokens, pos, zero, causal_mask(Tb, tokens.device), Tb)  # [1, Tb, dim]
        last = hidden[0].index_select(0, length - 1)  # [1, dim]
        first = choose_tokens(self.target.logits(last), params, noise)  # [1]
        self.cache_len.copy_(length)
        self.root.copy_(first)
        if self.draft is not None:
            # draft pairs (feature t, token t+1): tokens shifted left, the new token placed after the prompt
            nxt = torch.cat([tokens[0, 1:], tokens.new_zeros(1)]).scatter(0, length - 1, first)
            out = self.draft(nxt[None], feats, pos, zero, causal_mask(Tb, tokens.device), Tb)[0]
            self.root_out.copy_(out.index_select(0, length - 1)[0])
        return first

    def _decode(self, params: DeviceParams, noise, window: int | None):
        """Plain AR step: the root at position L -> the next token [1]. window: the key window (_window).
        With a draft head (AR steps between rounds, chosen by the policy) the head extends by the pair (feature L,
        next token), as after a round, so that the next round drafts from an up-to-date state."""
        L = self.cache_len
        hidden, feats = self._target(self.root[None], L[None], L, causal_mask(1, L.device), window)
        nxt = choose_tokens(self.target.logits(hidden[0]), params, noise)
        if self.draft is not None:
            out = self.draft(nxt[None], feats, L[None], L, causal_mask(1, L.device), window)[0]
            self.root_out.copy_(out[0])
        L.add_(1)
        self.root.copy_(nxt)
        return nxt

    def _target(self, tokens, positions, L, mask, window):
        """The target's forward: its final-normed hidden state and the draft's features (EAGLE-1/2: the same
        tensor; EAGLE-3: the inputs of the head's tapped layers, concatenated)."""
        if self.taps:
            return self.target(tokens, positions, L, mask, window, self.taps)
        hidden = self.target(tokens, positions, L, mask, window)
        return hidden, hidden

    def _size(self, shape) -> int:
        """Verify width of a round with `shape` (None: the static tree)."""
        if shape is None:
            return self.static_shape.size
        return dynamic_tree_size(shape.depth, shape.top_k, shape.total_tokens)

    def _round(self, params: DeviceParams, noise, shape, window: int | None):
        """One speculative round with the dynamic tree `shape` (None: the static tree); window: the key window of
        the target and the draft (_window). Returns packed [D+2] = (number of emitted tokens, the tokens, padding)."""
        L, root = self.cache_len, self.root
        if shape is not None:
            tree = build_dynamic_tree(self.draft, root, self.root_out, L, shape.depth, shape.top_k,
                                      shape.total_tokens, self.draft_temperature, window)
        else:
            tree = build_static_tree(self.draft, self.static_shape, root, self.root_out, L, self.draft_temperature,
                                     window)
        hidden, feats = self._target(tree.tokens[None], (L + tree.depth)[None], L, tree.mask, window)  # [1, N, dim]
        hidden, feats = hidden[0], feats[0]
        choice = choose_tokens(self.target.logits(hidden), params, noise)  # [N]
        accept_len, path, emitted = accept(tree, choice)
        P = path.shape[0]
        # draft extend on the accepted path: (target feature at path[d], the token that followed it)
        pos = L + torch.arange(P, device=L.device)
        out = self.draft(emitted[None], feats[path][None], pos[None], L, causal_mask(P, L.device), window)[0]
        n = accept_len + 1
        if shape is None or shape.top_k > 1:  # a chain's accepted path is already in place: node d at slot L + d
            self._commit(path, n)
        L.add_(n)
        self.root.copy_(emitted.index_select(0, accept_len))
        self.root_out.copy_(out.index_select(0, accept_len)[0])
        return torch.cat([n, emitted])

    def _commit(self, path, n):
        """Move the K/V of the accepted path's nodes to slots L + [0, n) in every target layer (each layer owns its
        buffers, model.py). Eager on CPU, where reading a value on the host costs nothing, only when some accepted
        node is not in place already (often all are: the top-ranked child sits right after its parent), and only
        the n live rows; otherwise the fixed-shape commit of the whole padded path, no host sync."""
        if self.device.type == "cpu" and not self.compiled:
            k = int(n)
            if bool((path[:k] == torch.arange(k)).all()):
                return
            path = path[:k]
        for cache in kv_caches(self.target):
            self._kv_commit(cache.k, cache.v, self.cache_len, path)

    # --- the host loop ---------------------------------------------------------------------------------------

    def _check_prompt(self, prompt_ids):
        if len(prompt_ids) == 0:
            raise FastEagleError("empty prompt")
        V = self.target.args.vocab_size
        bad = [t for t in prompt_ids if not (0 <= int(t) < V)]
        if bad:
            raise FastEagleError(f"prompt token id {bad[0]} is out of range for the vocabulary of size {V}")
        if len(prompt_ids) > self.max_seq_len:
            raise FastEagleError(
                f"prompt of {len(prompt_ids)} tokens does not fit the KV cache (max_seq_len {self.max_seq_len}); "
                f"shorten it or raise --max-seq-len"
            )

    def _bucket(self, T: int) -> int:
        """The prompt length prefill runs at (compiled: a bucket, so that prompts share graphs)."""
        if not self.compiled:
            return T
        return next(b for b in buckets(MIN_PROMPT_BUCKET, self.max_seq_len) if b >= T)

    def _cache_cap(self) -> int:
        return self.max_seq_len if self.draft is None else self.draft.max_seq_len

    def _window(self, L: int, speculative: bool) -> int | None:
        """The key window of a decode step or a speculative round at committed length L: the smallest of
        buckets(MIN_WINDOW, largest cache) covering every slot the step writes (the draft's cache, with its
        headroom, is the largest; each model clamps the window to its own), so attention reads O(L) keys, not
        max_seq_len. Also in eager mode: eager and compiled runs compute the same thing. None on the triton
        backend, which reads only the live slots by itself (and then needs no window variants)."""
        if self.target.attn_backend == "triton":
            return None
        # a round writes up to L + tree size in the target, up to L + its headroom (tree block, path) in the draft
        reach = max(self.tree_size, self.draft.max_seq_len - self.max_seq_len) if speculative else 1
        return next(b for b in buckets(MIN_WINDOW, self._cache_cap()) if b >= min(L + reach, self._cache_cap()))

    def _noise(self, rows: int, params: SamplingParams, generator):
        # the sampling's random numbers, drawn outside the compiled graph (generators don't trace)
        if params.greedy:
            return None
        return sampling_noise(rows, generator, self.device)

    @torch.no_grad()
    def stream(self, prompt_ids, max_new_tokens: int, params: SamplingParams = SamplingParams(), seed: int | None = None,
               eos_ids=(), result: GenerationResult | None = None):
        """Yield lists of new tokens as they are produced (one list per target forward). Fills `result`
        (accepted lengths, stop reason) when given."""
        self._check_prompt(prompt_ids)
        if max_new_tokens < 1:
            raise FastEagleError("max_new_tokens must be >= 1")
        result = result if result is not None else GenerationResult([])
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(same_seed(seed))  # tensor parallelism: every rank draws the same noise
        eos = set(eos_ids)
        T, dev = len(prompt_ids), self.device
        params = DeviceParams.of(params, self.target.args.vocab_size, dev)  # the numbers as data (see _compile)
        Tb = self._bucket(T)
        tokens = torch.zeros(1, Tb, dtype=torch.long, device=dev)
        tokens[0, :T] = torch.tensor(prompt_ids, dtype=torch.long)
        first = self._prefill_fn(tokens, torch.tensor([T], device=dev), params, self._noise(1, params, generator))
        L, produced = T, 0

        def emit(new):
            nonlocal produced
            out = []
            for t in new:
                out.append(t)
                produced += 1
                if t in eos:
                    result.stop_reason = "eos"
                    break
                if produced >= max_new_tokens:
                    result.stop_reason = "max_new_tokens"
                    break
            result.tokens.extend(out)
            return out

        yield emit(first.tolist())
        while not result.stop_reason:
            shape = self.policy.next() if self.policy else self.shape
            speculative = self.draft is not None and (shape is not None or self.policy is None)
            if speculative and L + self._size(shape) > self.max_seq_len:
                speculative = False  # too close to the end of the cache for a whole tree: finish token by token
            if speculative:
                packed = self._round_fn(params, self._noise(self._size(shape), params, generator), shape,
                                        self._window(L, True))
                vals = packed.tolist()  # the one host sync of the round
                n = vals[0]
                result.accept_lens.append(n)
                if self.policy:
                    self.policy.update(shape, n)
                L += n
                yield emit(vals[1 : 1 + n])
            elif L < self.max_seq_len:
                nxt = self._decode_fn(params, self._noise(1, params, generator), self._window(L, False))
                L += 1
                yield emit(nxt.tolist())
            else:
                result.stop_reason = "cache_full"

    @torch.no_grad()
    def warmup(self, prompt_ids, max_new_tokens: int, params: SamplingParams = SamplingParams()):
        """Run, untimed, every graph a generation of this prompt with these sampling settings can use: the prompt's
        prefill bucket, then for each key window it can reach the decode step and every tree shape's round (each
        from the state prefill left: the next generation's prefill resets it). On CUDA each runs three times, so
        that CUDA graphs are recorded here and only replayed later."""
        self._check_prompt(prompt_ids)
        T, dev, reps = len(prompt_ids), self.device, 3 if self.device.type == "cuda" else 1
        generator = None if params.greedy else torch.Generator(device=dev).manual_seed(0)
        dparams = DeviceParams.of(params, self.target.args.vocab_size, dev)
        tokens = torch.zeros(1, self._bucket(T), dtype=torch.long, device=dev)
        tokens[0, :T] = torch.tensor(prompt_ids, dtype=torch.long)
        for _ in range(reps):
            self._prefill_fn(tokens, torch.tensor([T], device=dev), dparams, self._noise(1, params, generator))
        reach = range(T, min(T + max_new_tokens, self.max_seq_len))
        shapes = ([] if self.draft is None else self.policy.shapes if self.policy else [self.shape])
        for w in sorted({self._window(L, False) for L in reach}, key=str):
            for _ in range(reps):
                self.cache_len.fill_(T)
                self._decode_fn(dparams, self._noise(1, params, generator), w)
        for shape in shapes:
            fits = [L for L in reach if L + self._size(shape) <= self.max_seq_len]
            for w in sorted({self._window(L, True) for L in fits}, key=str):
                for _ in range(reps):
                    self.cache_len.fill_(T)
                    self._round_fn(dparams, self._noise(self._size(shape), params, generator), shape, w).tolist()
        if self.policy:  # warm-up rounds say nothing about acceptance
            self.policy.reset()

    def generate(self, prompt_ids, max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 seed: int | None = None, eos_ids=()) -> GenerationResult:
        result = GenerationResult([])
        t0 = time.perf_counter()
        for _ in self.stream(prompt_ids, max_new_tokens, params, seed, eos_ids, result):
            pass
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        result.seconds = time.perf_counter() - t0
        return result
