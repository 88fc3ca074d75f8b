"""Tiny models for the decoding tests: random targets, random draft heads, and a draft head that knows the target.

`predictable_pair(alpha)`: a target whose next token is mostly a fixed function of the current token (a bigram
map through its untied LM head), plus alpha-scaled random attention/MLP weights so that context sometimes
changes the answer; and a draft head constructed to compute exactly that bigram map (fc passes the next token's
embedding through, its layer adds nothing). alpha = 0: the head always agrees with the target; larger alpha:
it agrees often but not always, so accepted lengths spread over 1..depth+1.
"""
import torch

from fasteagle.draft import DraftHead
from fasteagle.model import ModelArgs, Transformer


def tiny_args(vocab=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, **kw) -> ModelArgs:
    return ModelArgs(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=dim // n_heads, intermediate_size=2 * dim, max_position_embeddings=512, **kw)


def random_target(seed=0, max_seq_len=256, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**kw)).eval()
    model.setup_cache(max_seq_len)
    return model


def random_head(target, seed=1) -> DraftHead:
    torch.manual_seed(seed)
    return DraftHead(target.args.draft_layer()).eval().bind(target)


def predictable_pair(alpha: float, seed=0, max_seq_len=256, vocab=32, dim=32, **kw):
    """kw: more ModelArgs of the target (n_experts, sliding_window, qk_norm: the other families' features)."""
    torch.manual_seed(seed)
    target = Transformer(tiny_args(vocab=vocab, dim=dim, **kw)).eval()
    with torch.no_grad():
        target.embed.weight.normal_()
        target.output.weight.normal_()
        for layer in target.layers:
            layer.attn.wo.weight.mul_(alpha)
            down = layer.mlp.w2  # a Linear, or the experts' stacked [E, D, I] down projections
            (down if isinstance(down, torch.nn.Parameter) else down.weight).mul_(alpha)
    target.setup_cache(max_seq_len)
    head = random_head(target, seed + 1)
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, :dim] = torch.eye(dim)  # out = embedding of the next token
        head.fc.bias.zero_()
        head.layers[0].attn.wo.weight.zero_()
        head.layers[0].mlp.w2.weight.zero_()
    return target, head


def with_draft_vocab(head, target, ids) -> DraftHead:
    """A copy of `head` that drafts only among the target ids `ids` (its draft vocabulary, most frequent first)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    copy = DraftHead(head.args, fc_bias=head.fc.bias is not None, draft_vocab_size=len(ids)).eval()
    copy.load_state_dict({**head.state_dict(), "draft_vocab": ids})
    return copy.bind(target)
