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

from fasteagle.errors import FastEagleError
from fasteagle.kernels.kv_commit import kv_commit, kv_commit_reference
from fasteagle.model import causal_mask
from fasteagle.sampling import SamplingParams, choose_tokens, exponential_race
from fasteagle.tree import MC_SIM_7B_63, StaticTreeShape, build_dynamic_tree, build_static_tree, dynamic_tree_size
from fasteagle.verify import accept

# EAGLE-2 defaults of the reference's evaluation scripts (total_token=60, depth=5 -> 6 levels here, top_k=10)
DEFAULT_DEPTH, DEFAULT_TOP_K, DEFAULT_TOTAL_TOKENS = 6, 10, 60


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
                 draft_temperature: float = 1.0, compile: bool = False):
        self.target, self.draft = target, draft
        self.device = target.embed.weight.device
        self.max_seq_len = target.max_seq_len
        self.tree_kind = tree
        self.draft_temperature = draft_temperature
        if draft is not None:
            if tree not in ("dynamic", "static"):
                raise FastEagleError(f"unknown tree kind {tree!r} (dynamic or static)")
            if tree == "dynamic":
                if depth < 1 or top_k < 1 or total_tokens < 1:
                    raise FastEagleError("depth, top-k and total-tokens must be >= 1")
                if top_k > target.args.vocab_size:
                    raise FastEagleError(f"top-k {top_k} exceeds the vocabulary ({target.args.vocab_size})")
                self.depth, self.top_k = depth, top_k
                self.tree_size = dynamic_tree_size(depth, top_k, total_tokens)
                draft_block = max(depth - 1, 1) * top_k
            else:
                try:
                    self.static_shape = StaticTreeShape.from_choices(static_choices or MC_SIM_7B_63)
                except ValueError as e:
                    raise FastEagleError(str(e)) from None
                self.depth, self.tree_size = self.static_shape.depth, self.static_shape.size
                draft_block = self.tree_size
            if not draft_temperature > 0:
                raise FastEagleError("draft temperature must be > 0")
            # the draft writes up to max(tree block, D+1) slots past L; give it that much headroom
            draft.setup_cache(self.max_seq_len + max(draft_block, self.depth + 1), attn_backend=target.attn_backend)
        # Round-to-round state, updated in place by the phases so that captured graphs always read and write the
        # same addresses: L (committed cache length, shared by target and draft), the root (last emitted token,
        # not yet in the cache) and root_out (the draft's output at L - 1, its guess of the root's feature).
        dev = self.device
        self.cache_len = torch.zeros(1, dtype=torch.long, device=dev)
        self.root = torch.zeros(1, dtype=torch.long, device=dev)
        self.root_out = torch.zeros(target.args.dim, dtype=target.embed.weight.dtype, device=dev)
        # the Triton backend (CUDA) commits in one kernel launch; the reference is the same gather/scatter in PyTorch
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
        # reduce-overhead = inductor + CUDA graphs: one graph replay per round on GPU. fullgraph so that a graph
        # break (which would split the round and add host syncs) fails loudly instead of silently slowing down.
        mode = "reduce-overhead" if cuda else "default"
        self._round_fn = torch.compile(self._round, mode=mode, fullgraph=True)
        self._decode_fn = torch.compile(self._decode, mode=mode, fullgraph=True)
        # prefill runs once per prompt at a bucketed length: one graph per bucket, no CUDA graph needed
        self._prefill_fn = torch.compile(self._prefill, fullgraph=True, dynamic=False)

    def _prefill(self, tokens, length, params: SamplingParams, race):
        """tokens [1, Tb] (the prompt padded to a bucket), length [1] = the real prompt length T.
        Sets the state (L = T, root = the first new token, root_out) and returns the first token [1]."""
        Tb = tokens.shape[1]
        pos = torch.arange(Tb, device=tokens.device)[None]
        zero = torch.zeros(1, dtype=torch.long, device=tokens.device)
        hidden = self.target(tokens, pos, zero, causal_mask(Tb, tokens.device))  # [1, Tb, dim]
        last = hidden[0].index_select(0, length - 1)  # [1, dim]
        first = choose_tokens(self.target.logits(last), params, race)  # [1]
        self.cache_len.copy_(length)
        self.root.copy_(first)
        if self.draft is not None:
            # draft pairs (feature t, token t+1): tokens shifted left, the new token placed after the prompt
            nxt = torch.cat([tokens[0, 1:], tokens.new_zeros(1)]).scatter(0, length - 1, first)
            out = self.draft(nxt[None], hidden, pos, zero, causal_mask(Tb, tokens.device))[0]
            self.root_out.copy_(out.index_select(0, length - 1)[0])
        return first

    def _decode(self, params: SamplingParams, race):
        """Plain AR step: the root at position L -> the next token [1]."""
        L = self.cache_len
        hidden = self.target(self.root[None], L[None], L, causal_mask(1, L.device))
        nxt = choose_tokens(self.target.logits(hidden[0]), params, race)
        L.add_(1)
        self.root.copy_(nxt)
        return nxt

    def _round(self, params: SamplingParams, race):
        """One speculative round. Returns packed [D+2] = (number of emitted tokens, the tokens, padding)."""
        L, root = self.cache_len, self.root
        if self.tree_kind == "dynamic":
            tree = build_dynamic_tree(self.draft, root, self.root_out, L, self.depth, self.top_k,
                                      self.tree_size, self.draft_temperature)
        else:
            tree = build_static_tree(self.draft, self.static_shape, root, self.root_out, L, self.draft_temperature)
        hidden = self.target(tree.tokens[None], (L + tree.depth)[None], L, tree.mask)[0]  # [N, dim]
        choice = choose_tokens(self.target.logits(hidden), params, race)  # [N]
        accept_len, path, emitted = accept(tree, choice)
        P = path.shape[0]
        # draft extend on the accepted path: (target feature at path[d], the token that followed it)
        pos = L + torch.arange(P, device=L.device)
        out = self.draft(emitted[None], hidden[path][None], pos[None], L, causal_mask(P, L.device))[0]
        n = accept_len + 1
        self._kv_commit(self.target.k_cache, self.target.v_cache, L, path, n)  # L += n
        self.root.copy_(emitted.index_select(0, accept_len))
        self.root_out.copy_(out.index_select(0, accept_len)[0])
        return torch.cat([n, emitted])

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
        if not self.compiled:
            return T
        b = 16
        while b < T:
            b *= 2
        return min(b, self.max_seq_len)

    def _race(self, rows: int, params: SamplingParams, generator):
        # exponential noise for sampling, drawn outside the compiled graph (generators don't trace)
        if params.greedy:
            return None
        return exponential_race(rows, self.target.args.vocab_size, generator, self.device)

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
            generator.manual_seed(seed if seed is not None else torch.seed())
        eos = set(eos_ids)
        T, dev = len(prompt_ids), self.device
        Tb = self._bucket(T)
        tokens = torch.zeros(1, Tb, dtype=torch.long, device=dev)
        tokens[0, :T] = torch.tensor(prompt_ids, dtype=torch.long)
        first = self._prefill_fn(tokens, torch.tensor([T], device=dev), params, self._race(1, params, generator))
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
        speculative = self.draft is not None
        while not result.stop_reason:
            if speculative and L + self.tree_size > self.max_seq_len:
                speculative = False  # too close to the end of the cache for a whole tree: finish token by token
            if speculative:
                packed = self._round_fn(params, self._race(self.tree_size, params, generator))
                vals = packed.tolist()  # the one host sync of the round
                n = vals[0]
                result.accept_lens.append(n)
                L += n
                yield emit(vals[1 : 1 + n])
            elif L < self.max_seq_len:
                nxt = self._decode_fn(params, self._race(1, params, generator))
                L += 1
                yield emit(nxt.tolist())
            else:
                result.stop_reason = "cache_full"

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
