"""Tree builders and acceptance against hand-worked examples."""

import torch

from fasteagle.tree import StaticTreeShape, build_dynamic_tree, build_static_tree, make_tree
from fasteagle.verify import accept

V = 5
# next-token distributions of the fake head, one row per token (row 0 also serves as the root's distribution)
PROBS = torch.tensor([
    [0.02, 0.50, 0.33, 0.10, 0.05],
    [0.02, 0.03, 0.10, 0.60, 0.25],
    [0.01, 0.90, 0.02, 0.04, 0.03],
    [0.50, 0.22, 0.15, 0.10, 0.03],
    [0.20, 0.20, 0.20, 0.20, 0.20],
])


class FakeHead:
    """A draft head whose output is the one-hot of its input token, so its next-token distribution is PROBS[token]."""

    def __init__(self):
        self.calls = []

    def __call__(self, tokens, features, positions, cache_len, attn_mask, kv_len=None):
        self.calls.append((tokens.clone(), positions.clone(), attn_mask.clone()))
        return torch.nn.functional.one_hot(tokens, V).float()

    def logits(self, out):
        return out @ PROBS.log()

    def topk(self, out, k, temperature=1.0):
        return torch.topk(torch.log_softmax(self.logits(out) / temperature, dim=-1), k, dim=-1)


def onehot(t):
    return torch.nn.functional.one_hot(torch.tensor(t), V).float()


def test_make_tree_mask_depth_paths():
    # root; 1=(0); 2=(1); 3=(0,0); 4=(0,1); 5=(1,0); 6=(0,0,0)
    shape = StaticTreeShape.from_choices([[1, 0], [0], [0, 0, 0], [1], [0, 1], [0, 0]])
    assert shape.parent == [-1, 0, 0, 1, 1, 2, 3]
    assert shape.rank == [0, 0, 1, 0, 1, 0, 0]
    assert shape.levels == [[0], [1, 2], [3, 4, 5], [6]]
    tree = make_tree(torch.arange(7), torch.tensor(shape.parent), shape.depth)
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    expected_rows = [{0}, {0, 1}, {0, 2}, {0, 1, 3}, {0, 1, 4}, {0, 2, 5}, {0, 1, 3, 6}]
    for i, row in enumerate(expected_rows):
        assert set(torch.nonzero(tree.mask[i]).flatten().tolist()) == row
    assert tree.paths[6].tolist() == [0, 1, 3, 6]
    assert tree.paths[5].tolist() == [0, 2, 5, -1]
    assert tree.paths[0].tolist() == [0, -1, -1, -1]


def test_static_tree_rejects_orphan_paths():
    try:
        StaticTreeShape.from_choices([[0], [1, 0]])
    except ValueError as e:
        assert "no parent" in str(e)
    else:
        raise AssertionError("orphan path accepted")


def test_dynamic_tree_hand_worked():
    """k=2, depth=3, N=6 (5 drafted + root). Scores (products of PROBS):
    level 1: A=tok1 .5, B=tok2 .33; level 2: A3 .3, A4 .125, B1 .297, B3 .0132 -> expand A3, B1;
    level 3: A3->0 .15, A3->1 .066, B1->3 .1782, B1->4 .07425. Best five: A, B, A3, B1, B1->3."""
    head = FakeHead()
    tree = build_dynamic_tree(head, torch.tensor([4]), onehot(0), torch.tensor([10]), depth=3, top_k=2,
                              total_tokens=6)
    assert tree.tokens.tolist() == [4, 1, 2, 3, 1, 3]
    assert tree.parent.tolist() == [-1, 0, 0, 1, 2, 4]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.paths[5].tolist() == [0, 2, 4, 5]
    # two draft steps: level 1 (A, B) at draft position 10, level 2 frontier (A3, B1) at position 11
    assert len(head.calls) == 2
    (tok1, pos1, m1), (tok2, pos2, m2) = head.calls
    assert tok1.tolist() == [[1, 2]] and pos1.tolist() == [[10, 10]]
    assert m1.tolist() == [[True, False], [False, True]]
    assert tok2.tolist() == [[3, 1]] and pos2.tolist() == [[11, 11]]
    # A3 sees A (entry 0) and itself (entry 2); B1 sees B (entry 1) and itself (entry 3)
    assert m2.tolist() == [[True, False, True, False], [False, True, False, True]]


def test_dynamic_tree_keeps_parents_on_ties():
    """A draft certain of its next token gives children the same cumulative score as their parent (log 1 = 0);
    the kept set must still contain every kept node's parent."""
    global PROBS
    saved = PROBS
    PROBS = torch.tensor([[1.0, 0, 0, 0, 0]] * V).clamp(min=1e-30)
    PROBS = PROBS / PROBS.sum(-1, keepdim=True)
    try:
        tree = build_dynamic_tree(FakeHead(), torch.tensor([0]), onehot(0), torch.tensor([0]), depth=4, top_k=3,
                                  total_tokens=7)
        for i, p in enumerate(tree.parent.tolist()[1:], start=1):
            assert 0 <= p < i
        assert tree.depth.max().item() == 4  # the chain of certain tokens is kept whole
    finally:
        PROBS = saved


def test_static_tree_takes_ranks():
    head = FakeHead()
    shape = StaticTreeShape.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])
    tree = build_static_tree(head, shape, torch.tensor([4]), onehot(0), torch.tensor([3]))
    # root dist (row 0): rank0 = 1, rank1 = 2; row 1: rank0 = 3, rank1 = 4; row 2: rank0 = 1
    assert tree.tokens.tolist() == [4, 1, 2, 3, 4, 1]
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 2]
    assert len(head.calls) == 1  # only level 1 is run through the head (level 2 is the last)
    tok, pos, mask = head.calls[0]
    assert tok.tolist() == [[1, 2]] and pos.tolist() == [[3, 3]]


def test_static_tree_copies_nothing_from_the_host_per_round(monkeypatch):
    """The shape's index tensors are made once per device; later rounds build no tensor from a Python list (on a
    GPU each would be a host-to-device copy)."""
    shape = StaticTreeShape.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    root, out, L = torch.tensor([4]), onehot(0), torch.tensor([3])
    first = build_static_tree(FakeHead(), shape, root, out, L)

    def no_tensor(*args, **kwargs):
        raise AssertionError("torch.tensor during a round")

    monkeypatch.setattr(torch, "tensor", no_tensor)
    again = build_static_tree(FakeHead(), shape, root, out, L)
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.mask, first.mask)


def test_accept_hand_worked():
    # tree: root(9); 1:a(5) 2:b(6) under root; 3:(7) under 1; 4:(8) under 2; 5:(3) under 4
    tree = make_tree(torch.tensor([9, 5, 6, 7, 8, 3]), torch.tensor([-1, 0, 0, 1, 2, 4]), 3)
    # target's choice after each node: root->6 (b), b->8, node4->3, node5->1 (bonus)
    choice = torch.tensor([6, 0, 8, 0, 3, 1])
    n, path, emitted = accept(tree, choice)
    assert n.item() == 3
    assert path.tolist() == [0, 2, 4, 5]
    assert emitted.tolist() == [6, 8, 3, 1]
    # no child matches at the root: emit the target's own token only
    n, path, emitted = accept(tree, torch.tensor([2, 0, 0, 0, 0, 0]))
    assert n.item() == 0 and path[0].item() == 0 and emitted[0].item() == 2
    # match at depth 1 and a mismatch below it
    n, path, emitted = accept(tree, torch.tensor([5, 4, 0, 0, 0, 0]))
    assert n.item() == 1 and emitted[:2].tolist() == [5, 4]
