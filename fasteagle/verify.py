"""Acceptance over a verified draft tree: the lossless guarantee lives here.

After the target's one forward over the tree, node i's logits are the target's next-token distribution given the
prefix ending at node i. `target_choice[i]` is the token the target itself emits after node i: the argmax
(greedy) or one sample from the warped distribution (sampling), drawn independently for every node.
"""
import torch

from fasteagle.tree import Tree


def accept(tree: Tree, target_choice: torch.Tensor):
    """Walk the tree along the target's own choices.

    Starting at the root, move to the child whose token equals the target's choice at the current node; stop when
    no child matches. Returns (accept_len [1], path [D+1], emitted [D+1]): accept_len drafted tokens were accepted,
    path[0..accept_len] are the tree indices of the root and the accepted nodes, and emitted[0..accept_len] are the
    tokens this round emits (the accepted drafted tokens, then the target's own choice at the last accepted node,
    the "bonus" token). Entries past accept_len are padding. Fixed shapes, no host sync.

    Why this is lossless. Greedy: every emitted token is the target's argmax after the tokens before it, exactly as
    plain greedy decoding. Sampling: the EAGLE-2 tree (and our static trees) take each node's children
    deterministically (top-k of the draft), so every child is a point-mass proposal. The rule "accept child x with
    probability p(x) under the current residual, else zero p(x) and renormalise; after the last child, sample the
    bonus from the residual" (recursive rejection sampling with point-mass proposals) picks each child x with
    probability p(x) and each non-child y with probability p(y): it is one draw y ~ p at the node, and it continues
    iff y is a child. We draw that y directly (target_choice, one independent sample per node). Along the walk,
    the token emitted after node c is y_c ~ p_c, independent of everything that led to c, because y_c is only ever
    looked at once c has been reached. So the emitted sequence is distributed exactly as sampling the target token
    by token; the tree only decides how many of those tokens one forward can vouch for. The draft's scores,
    temperature and tree shape change how often the walk continues, never what it emits.
    """
    N = tree.tokens.shape[0]
    # node i continues the walk iff its token is the target's choice at its parent
    match = tree.tokens == target_choice[tree.parent.clamp(min=0)]
    match[0] = True
    reachable = ~(tree.mask & ~match[None, :]).any(-1)  # every ancestor-or-self matches
    # the deepest reachable node (siblings carry distinct tokens, so at most one reachable node per depth)
    # (index_select with a [1] tensor, not t[best]: a 0-d tensor index would be read on the host)
    best = torch.argmax(torch.where(reachable, tree.depth, -1)).reshape(1)
    accept_len = tree.depth.index_select(0, best)
    path = tree.paths.index_select(0, best)[0]  # [D+1], -1 padded
    D1 = path.shape[0]
    next_nodes = torch.cat([path[1:], path.new_full((1,), -1)])
    emitted = torch.where(
        torch.arange(D1, device=path.device) < accept_len,
        tree.tokens[next_nodes.clamp(0, N - 1)],
        target_choice.index_select(0, best),
    )
    return accept_len, path.clamp(min=0), emitted
