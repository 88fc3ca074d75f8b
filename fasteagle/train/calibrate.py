"""A head's acceptance per tree shape, measured once and stored with it (calibration.json), for the shape chooser.

Greedy acceptance needs no speculative run. Given the target's own greedy answer to a prompt (its features come
with it), a round that starts at committed length L drafts a tree from exactly the state a real run would have
there (the head's cache holds the pairs (feature t, token t+1) for t < L, its root output is the one at L - 1),
and greedy verification accepts the deepest tree node whose path spells the answer's next tokens. So we replay
the rounds a real run would make, L -> L + accepted + 1, drafting each round's tree and checking it against the
answer, without ever running the target on a tree: one batched greedy generation serves every shape. tau = tokens
emitted per round, pooled over all rounds (as the engine's accept lengths count them).

Calibrate on held-out prompts, never the benchmark's questions. fasteagle.autotune combines tau with the
machine's measured costs.
"""
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from fasteagle.autotune import CALIBRATION, CANDIDATES, Shape
from fasteagle.model import causal_mask, kv_caches
from fasteagle.tree import build_dynamic_tree


def accepted(tree, answer: torch.Tensor, L: int) -> int:
    """Drafted tokens greedy verification accepts at committed length L: the depth of the deepest tree node whose
    root-to-node path spells answer[L + 1 : L + 1 + depth] (answer: the whole greedy sequence, prompt included)."""
    D = tree.paths.shape[1] - 1
    avail = min(D, answer.shape[0] - 1 - L)  # reference tokens past the root
    if avail <= 0:
        return 0
    ref = answer[L + 1 : L + 1 + avail]
    toks = tree.tokens[tree.paths[:, 1 : 1 + avail].clamp(min=0)]  # [N, avail]: the path's token at each depth
    level = torch.arange(1, avail + 1)
    ok = (toks == ref[None]) | (level[None] > tree.depth[:, None])  # past a node's own depth nothing is checked
    hit = ok.all(-1) & (tree.depth <= avail)
    return int(tree.depth[hit].max())


@torch.no_grad()
def replay(head, tokens: torch.Tensor, features: torch.Tensor, prompt_len: int, shapes) -> dict:
    """{shape: [emitted tokens per round]} of greedy EAGLE-2 runs of each shape, replayed against one greedy answer.
    tokens [T]: prompt + answer; features [T, width]: the head's input feature of each token (generate_batch)."""
    T = tokens.shape[0]
    headroom = max(max(max(s.depth - 1, 1) * s.top_k for s in shapes), max(s.depth for s in shapes) + 1)
    head.setup_cache(T + headroom)
    # the head's pairs (feature t, token t + 1), t < T - 1, in its cache: the state every round starts from
    feats = features[:-1].to(head.fc.weight.dtype)[None]
    pos = torch.arange(T - 1)[None]
    out = head(tokens[1:][None], feats, pos, torch.zeros(1, dtype=torch.long), causal_mask(T - 1, feats.device))[0]
    caches = [(c.k, c.v) for c in kv_caches(head)]
    runs = {}
    for s in shapes:
        L, lens = prompt_len, []
        while L < T - 1:
            saved = [(k[:, :, L : L + headroom].clone(), v[:, :, L : L + headroom].clone()) for k, v in caches]
            tree = build_dynamic_tree(head, tokens[L : L + 1], out[L - 1], torch.tensor([L]), s.depth, s.top_k,
                                      s.total_tokens)
            for (k, v), (sk, sv) in zip(caches, saved):  # the tree's draft entries overwrite slots >= L: restore
                k[:, :, L : L + headroom] = sk
                v[:, :, L : L + headroom] = sv
            a = accepted(tree, tokens, L)
            lens.append(a + 1)
            L += a + 1
        runs[s] = lens
    return runs


def calibrate(target, head, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), shapes=CANDIDATES,
              batch_size: int = 16) -> list:
    """[{"depth", "top_k", "total_tokens", "tau", "rounds"}] for each shape, greedy, on the given prompt ids."""
    from fasteagle.train.data import generate_batch

    shapes = [s if isinstance(s, Shape) else Shape(*s) for s in shapes]
    lens = {s: [] for s in shapes}
    size, backend = target.max_seq_len, target.attn_backend
    with tqdm(total=len(prompts), desc="calibrate", unit="prompt") as bar:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            for p, (toks, feats) in zip(batch, generate_batch(target, batch, max_new_tokens, eos_ids, head.taps)):
                if toks.shape[0] - len(p) >= 2:  # an answer of one token leaves no round to replay
                    for s, l in replay(head, toks, feats, len(p), shapes).items():
                        lens[s] += l
                bar.update(1)
    target.setup_cache(size, attn_backend=backend)  # generate_batch left a batched cache behind
    return [{"depth": s.depth, "top_k": s.top_k, "total_tokens": s.total_tokens,
             "tau": round(sum(lens[s]) / max(len(lens[s]), 1), 4), "rounds": len(lens[s])} for s in shapes]


def write_calibration(head_dir, rows: list, provenance: dict):
    path = Path(head_dir) / CALIBRATION
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"shapes": rows, **provenance}, indent=1) + "\n")
    os.replace(tmp, path)
    return {Shape(r["depth"], r["top_k"], r["total_tokens"]): r["tau"] for r in rows}
