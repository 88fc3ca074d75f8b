"""Draft trees with fixed shapes: static EAGLE-1 trees (choice lists) and the dynamic EAGLE-2 tree.

A tree of N nodes (node 0 = the root, the last emitted token, already known) is described by device tensors
  tokens [N]       token of each node
  depth  [N]       0 for the root; the node's position is cache_len + depth
  parent [N]       parent index (-1 for the root); parents come before children (parent[i] < i)
  mask   [N, N]    mask[i, j]: j is i or an ancestor of i (the attention mask of the verify forward)
  paths  [N, D+1]  paths[i, d]: the ancestor of i at depth d (root-to-i path), -1 past depth[i];
                   the rows of the leaves are the root-to-leaf paths
Conventions: `depth` D = the most drafted tokens on one path (tree levels below the root), so a round emits
between 1 and D+1 tokens. `total_tokens` N counts the root, as the EAGLE reference's `total_token` does
(60 = 59 drafted nodes + the root, one verify forward of 60 tokens). The reference's `depth=5` expands five times
after the first level, i.e. D = 6 here.
"""
from dataclasses import dataclass, field

import torch

# The EAGLE reference's default static tree (mc_sim_7b_63): each path lists the top-k ranks taken at each level.
MC_SIM_7B_63 = [
    [0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
    [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
]


@dataclass
class Tree:
    tokens: torch.Tensor
    depth: torch.Tensor
    parent: torch.Tensor
    mask: torch.Tensor
    paths: torch.Tensor


def ancestor_mask(parent: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[N, N] bool, ancestor-or-self, from parent indices (-1 at the root); max_depth levels of propagation."""
    N = parent.shape[0]
    mask = torch.eye(N, dtype=torch.bool, device=parent.device)
    has_parent = (parent >= 0)[:, None]
    for _ in range(max_depth):
        mask = mask | (has_parent & mask[parent.clamp(min=0)])
    return mask


def root_paths(mask: torch.Tensor, depth: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[N, max_depth + 1]: the ancestor of each node at each depth, -1 past the node's own depth."""
    levels = torch.arange(max_depth + 1, device=mask.device)
    at_level = mask[:, None, :] & (depth[None, None, :] == levels[None, :, None])  # [N, D+1, N]
    idx = at_level.to(torch.int8).argmax(-1)
    return torch.where(at_level.any(-1), idx, -1)


def make_tree(tokens, parent, max_depth: int) -> Tree:
    mask = ancestor_mask(parent, max_depth)
    depth = mask.sum(-1) - 1
    return Tree(tokens, depth, parent, mask, root_paths(mask, depth, max_depth))


# --- static trees (EAGLE-1) ---------------------------------------------------------------------------------------


@dataclass
class StaticTreeShape:
    """The fixed structure of a static tree, derived once on the host from a choice list."""

    parent: list[int]  # [N], root first; nodes sorted by level, so parent[i] < i
    rank: list[int]  # [N], which top-k rank of its parent's draft distribution a node takes (root: 0)
    levels: list[list[int]]  # node indices per depth, levels[0] = [0]
    depth: int
    max_rank: int
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_choices(cls, choices: list[list[int]]) -> "StaticTreeShape":
        if not choices:
            raise ValueError("a static tree needs at least one path")
        paths = sorted({tuple(c) for c in choices}, key=lambda p: (len(p), p))
        index = {(): 0}
        parent, rank = [-1], [0]
        for p in paths:
            if not p or min(p) < 0:
                raise ValueError(f"bad tree path {list(p)}")
            if p[:-1] not in index:
                raise ValueError(f"tree path {list(p)} has no parent path {list(p[:-1])}")
            index[p] = len(parent)
            parent.append(index[p[:-1]])
            rank.append(p[-1])
        depth = max(len(p) for p in paths)
        levels = [[i for i, p in enumerate([()] + paths) if len(p) == d] for d in range(depth + 1)]
        return cls(parent, rank, levels, depth, max(rank))

    @property
    def size(self) -> int:
        return len(self.parent)

    def on(self, device) -> dict:
        """The structure as device tensors, made once per device (a round then copies nothing host-to-device):
        "tree" (a Tree with placeholder tokens: mask, depth, parent and paths never change), and per level d >= 1
        "level" (its node indices), "prev" (level d-1's), "par_local" (each node's parent within level d-1),
        "rank", "parent" and "block" (the level's mask over draft slots cache_len + [0, last node of the level))."""
        key = str(torch.device(device))
        if key not in self._on_device:
            def t(x):
                return torch.tensor(x, dtype=torch.long, device=device)

            lv = self.levels
            tree = make_tree(t([0] * self.size), t(self.parent), self.depth)
            self._on_device[key] = {
                "tree": tree,
                "level": [None] + [t(lv[d]) for d in range(1, self.depth + 1)],
                "prev": [None] + [t(lv[d - 1]) for d in range(1, self.depth + 1)],
                "par_local": [None] + [t([lv[d - 1].index(self.parent[n]) for n in lv[d]])
                                       for d in range(1, self.depth + 1)],
                "rank": [None] + [t([self.rank[n] for n in lv[d]]) for d in range(1, self.depth + 1)],
                "parent": [None] + [t([self.parent[n] for n in lv[d]]) for d in range(1, self.depth + 1)],
                "block": [None] + [tree.mask[t(lv[d])][:, 1 : lv[d][-1] + 1] for d in range(1, self.depth + 1)],
            }
        return self._on_device[key]


# --- building a tree with the draft head ----------------------------------------------------------------------------


def build_static_tree(head, shape: StaticTreeShape, root_token, root_out, cache_len, temperature: float = 1.0,
                      kv_len: int | None = None):
    """Fill a static tree level by level. root_token: [1]; root_out: [dim], the head's output at the last
    committed position (its guess of the root's feature); cache_len: [1], the draft's committed length;
    kv_len: the head's key window (model.py), >= cache_len + N - 1.
    The draft writes level d's entries at draft slots cache_len + (their tree index - 1)."""
    device = root_token.device
    N, k = shape.size, shape.max_rank + 1
    s = shape.on(device)
    tokens = torch.zeros(N, dtype=torch.long, device=device)
    tokens[0] = root_token[0]
    outs = root_out.new_zeros(N, root_out.shape[-1])  # draft output of each node (its guess of the next feature)
    outs[0] = root_out
    for d in range(1, shape.depth + 1):
        lvl = s["level"][d]
        _, ids = head.topk(outs[s["prev"][d]], k, temperature)  # children candidates of the previous level
        tokens[lvl] = ids[s["par_local"][d], s["rank"][d]]
        if d == shape.depth:
            break
        # Run the head on this level: input feature = the parent's draft output, token = the node's token.
        # Tree nodes 1..W (W: the level's last node) occupy draft slots cache_len + [0, W).
        pos = (cache_len + d - 1).expand(lvl.shape[0])
        outs[lvl] = head(tokens[lvl][None], outs[s["parent"][d]][None], pos[None], cache_len, s["block"][d], kv_len)[0]
    return Tree(tokens, s["tree"].depth, s["tree"].parent, s["tree"].mask, s["tree"].paths)


def dynamic_tree_size(depth: int, top_k: int, total_tokens: int) -> int:
    """Verify width N of an EAGLE-2 tree: total_tokens, unless fewer candidates exist."""
    return min(total_tokens, 1 + top_k + (depth - 1) * top_k * top_k)


def build_dynamic_tree(head, root_token, root_out, cache_len, depth: int, top_k: int, total_tokens: int,
                       temperature: float = 1.0, kv_len: int | None = None):
    """EAGLE-2: expand the top_k nodes of each level by cumulative draft log-probability, `depth` levels, then keep
    the best N-1 candidates (N = dynamic_tree_size) plus the root. Fixed shapes throughout; no host sync.

    Candidates are numbered level by level (level 1: top_k of them, deeper levels: top_k * top_k each), so a parent
    always precedes its children; a child's score (parent's + a log-prob <= 0) never exceeds its parent's, and the
    stable sort keeps the earlier of equal scores first, so the kept set always contains every kept node's parent.
    The head's level-d queries are written at draft slots cache_len + (d-1)*top_k + [0, top_k); kv_len: the head's
    key window (model.py), >= cache_len + (depth-1)*top_k."""
    device, k = root_token.device, top_k
    N = dynamic_tree_size(depth, k, total_tokens)
    logp, ids = head.topk(root_out[None], k, temperature)
    scores, tok = logp[0], ids[0]  # [k]: the expanded frontier
    cand_scores, cand_tokens = [scores], [tok]
    cand_parent = [torch.full((k,), -1, device=device)]  # candidate index of the parent, -1 = root
    frontier = torch.arange(k, device=device)  # candidate index of each frontier node
    feats = root_out[None].expand(k, -1)  # input feature of each frontier node = its parent's draft output
    # block_mask[i, j]: frontier node i sees draft tree entry j (entries of earlier levels, k per level)
    block_mask = torch.eye(k, dtype=torch.bool, device=device)
    for d in range(1, depth):
        pos = (cache_len + d - 1).expand(k)
        out = head(tok[None], feats[None], pos[None], cache_len, block_mask, kv_len)[0]  # [k, dim]
        logp, ids = head.topk(out, k, temperature)  # [k, k]
        cu = scores[:, None] + logp  # [k, k] cumulative scores of the k*k children
        cand_scores.append(cu.reshape(-1))
        cand_tokens.append(ids.reshape(-1))
        cand_parent.append(frontier.repeat_interleave(k))
        if d == depth - 1:
            break
        scores, best = torch.topk(cu.reshape(-1), k)
        src = best // k  # which frontier node each new frontier node descends from
        frontier = sum(c.shape[0] for c in cand_scores[:-1]) + best
        tok, feats = ids.reshape(-1)[best], out[src]
        block_mask = torch.cat([block_mask[src], torch.eye(k, dtype=torch.bool, device=device)], dim=1)
    cand_scores, cand_tokens, cand_parent = torch.cat(cand_scores), torch.cat(cand_tokens), torch.cat(cand_parent)
    order = torch.sort(cand_scores, descending=True, stable=True).indices[: N - 1]
    keep = torch.sort(order).values  # kept candidates in candidate order: parents first
    # parent's tree index: 0 for the root, else 1 + the parent's rank among the kept candidates
    par = cand_parent[keep]
    par_tree = torch.where(par < 0, 0, torch.searchsorted(keep, par.clamp(min=0)) + 1)
    tokens = torch.cat([root_token, cand_tokens[keep]])
    parent = torch.cat([torch.full((1,), -1, device=device), par_tree])
    return make_tree(tokens, parent, depth)
