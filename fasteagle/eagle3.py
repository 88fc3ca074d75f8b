"""The EAGLE-3 draft head (arXiv 2503.01840; layout of the SafeAILab/EAGLE reference, `eagle/model/cnets.py`).

    feature[t] = fc([h_low[t]; h_mid[t]; h_high[t]])      the target's residual stream entering three layers
                                                            (2, n_layers // 2, n_layers - 3: Eagle3Head.taps)
    out[t]     = Layer(embed(token[t+1]), feature[t])      one decoder layer, below
    draft_logits[t] = lm_head(norm(out[t]))               the head's own LM head over its draft vocabulary

    Layer(e, x):  h = x + attn([input_norm(e); hidden_norm(x)])     q, k, v read 2 * dim
                  out = h + mlp(mlp_norm(h))

Deeper tree levels feed the head its own output (dim wide, no fc) as the feature, as the reference does; the
engine passes the target's tapped features (3 * dim wide) after a target forward, so `forward` applies fc by the
input's width. The draft vocabulary (V_d ids) maps draft row i to target id `draft_vocab[i]` (the reference's
`i + d2t[i]`); verification sees target ids only, so decoding stays lossless. The embedding is the target's
(shared, never copied); the head has no embed_tokens of its own.

The head offers the interface the engine, tree and autotune use with an EAGLE-1/2 DraftHead: forward, topk,
setup_cache, pack / quantize (CPU fast paths), vocab_ids, args.
"""
import torch
import torch.nn as nn

from fasteagle.errors import FastEagleError
from fasteagle.linear import (QUANTIZE_MIN_NUMEL, Linear, can_pack, can_quantize, dequantize_linears, pack_linears,
                              quantize_linears, skinny_usable)
from fasteagle.model import Attention, FeedForward, ModelArgs, RMSNorm, run_layers, setup_static_cache

ARCH = "eagle3"


def default_taps(n_layers: int) -> tuple[int, int, int]:
    """The reference's feature layers: the inputs of layers 2, n_layers // 2 and n_layers - 3 (low, mid, high)."""
    return 2, n_layers // 2, n_layers - 3


class Eagle3Layer(nn.Module):
    """The head's decoder layer. Its input x is [embedding; feature] (2 * dim), so that model.run_layers drives it
    like any other layer; the residual stream is the feature."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn = Attention(args, in_dim=2 * args.dim)
        self.mlp = FeedForward(args)
        self.input_norm = RMSNorm(args.dim, args.norm_eps)
        self.hidden_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos_sin, slots, cache_len, attn_mask, visible, positions=None):
        emb, feat = x.chunk(2, dim=-1)
        a = torch.cat([self.input_norm(emb), self.hidden_norm(feat)], -1)
        h = feat + self.attn(a, cos_sin, slots, cache_len, attn_mask, visible, positions)
        return h + self.mlp(self.mlp_norm(h))


class Eagle3Head(nn.Module):
    arch = ARCH

    def __init__(self, args: ModelArgs, draft_vocab_size: int, taps: tuple[int, ...]):
        super().__init__()
        if len(taps) < 2 or list(taps) != sorted(set(taps)):  # forward tells target features from its own
            # outputs by their width; the target concatenates its tapped layers in layer order
            raise FastEagleError(f"an EAGLE-3 head reads two or more distinct target layers in increasing order, "
                                 f"not {list(taps)}")
        self.args, self.taps = args, tuple(int(t) for t in taps)
        self.fc = Linear(len(self.taps) * args.dim, args.dim, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(args)])
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = Linear(args.dim, draft_vocab_size, bias=False)
        self.register_buffer("draft_vocab", torch.zeros(draft_vocab_size, dtype=torch.long))  # target ids
        self.max_seq_len = 0
        self.attn_backend = "sdpa"
        self.embed_weight = None  # the target's, set by bind()

    @property
    def vocab_ids(self) -> torch.Tensor:
        return self.draft_vocab

    def bind(self, target):
        """Share the target's embedding (a plain attribute: neither saved with nor moved by the head) and check the
        fit: hidden size, vocabulary, feature layers and draft-vocabulary ids."""
        a, t = self.args, target.args
        if a.dim != t.dim or a.vocab_size != t.vocab_size:
            raise FastEagleError(f"EAGLE-3 head (hidden {a.dim}, vocab {a.vocab_size}) does not fit the target "
                                 f"(hidden {t.dim}, vocab {t.vocab_size})")
        if not all(0 <= i <= t.n_layers for i in self.taps):  # n_layers: the stream after the last layer
            raise FastEagleError(f"EAGLE-3 head reads target layers {list(self.taps)}; the target has {t.n_layers}")
        object.__setattr__(self, "embed_weight", target.embed.weight)
        return self

    def check_vocab(self, where: str = "EAGLE-3 head"):
        ids = self.draft_vocab
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.args.vocab_size):
            raise FastEagleError(f"{where}: draft vocabulary maps to ids outside the target's {self.args.vocab_size}")
        if torch.unique(ids).numel() != ids.numel():
            raise FastEagleError(f"{where}: draft vocabulary maps two draft ids to the same target id")

    def setup_cache(self, max_seq_len: int, attn_backend: str = "sdpa"):
        setup_static_cache(self, max_seq_len, 1, attn_backend)

    def forward(self, tokens, features, positions, cache_len, attn_mask, kv_len: int | None = None):
        """tokens, positions: [B, T]; features: [B, T, len(taps) * dim] (the target's tapped residual streams) or
        [B, T, dim] (the head's own outputs, deeper tree levels); cache_len: [B]; attn_mask: [T, W]; kv_len: the
        key window (model.py). Returns out [B, T, dim] (before the head's final norm)."""
        return run_layers(self, self.layer_input(tokens, features), positions, cache_len, attn_mask, kv_len)

    def layer_input(self, tokens, features):
        """The decoder layer's input [embedding; feature] [B, T, 2 * dim]; target features pass through fc first."""
        features = features.to(self.fc.weight.dtype)
        if features.shape[-1] != self.args.dim:
            features = self.fc(features)
        emb = nn.functional.embedding(tokens, self.embed_weight).to(features.dtype)
        return torch.cat([emb, features], -1)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [m, V_d] of out [m, dim] (linear.Linear: int8 / packed on CPU when set up)."""
        return self.lm_head(self.norm(out)).float()

    def topk(self, out: torch.Tensor, k: int, temperature: float = 1.0):
        """Top-k draft log-probabilities (of softmax(logits / temperature) over the draft vocabulary) and their
        target ids, of out [m, dim], sorted descending."""
        logits = self.logits(out)
        logits = logits if temperature == 1.0 else logits / temperature
        if k == 1:
            top, ids = logits.max(-1, keepdim=True)
            logp = top - torch.logsumexp(logits, -1, keepdim=True)
        else:
            logp, ids = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
        return logp, self.draft_vocab[ids]

    def pack(self, rows: int = 8) -> bool:
        """CPU: packed fp32 weights for multi-row inputs (linear.Linear), the LM head's included."""
        return can_pack(self.fc.weight) and pack_linears(self, rows)

    def quantize(self, on: bool = True, min_numel: int = QUANTIZE_MIN_NUMEL, weight_only: bool = False) -> bool:
        """CPU: int8 copies of the head's weights (linear.quantize_linears; weight_only: the skinny kernel's kind,
        which compiled graphs call), the LM head's included; off: drop them. Lossless all the same: only the
        proposals change."""
        if not on:
            dequantize_linears(self)
            return False
        # fc stays fp32: it reads the target's raw residual streams, whose few huge channels leave the dynamic op's
        # per-tensor int8 activations no resolution for the rest (measured on the SmolLM2 EAGLE-3 head: replayed
        # MT-bench tau 1.42 with an int8 fc vs 2.19 fp32). Every other input of the head is normed.
        can = skinny_usable if weight_only else can_quantize
        return can(self.fc.weight) and quantize_linears(self, min_numel, keep_fp32=(self.fc,), weight_only=weight_only)

    def config(self) -> dict:
        """The checkpoint config entries that rebuild this head (draft.save_draft / load_draft)."""
        return {"head_arch": ARCH, "model": self.args.to_dict(), "draft_vocab_size": self.draft_vocab.shape[0],
                "taps": list(self.taps)}


def head_from_config(cfg: dict, where: str) -> Eagle3Head:
    try:
        args = ModelArgs.from_dict(cfg["model"])
        return Eagle3Head(args, int(cfg["draft_vocab_size"]), tuple(cfg["taps"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FastEagleError(f"{where}: bad EAGLE-3 draft config: {e}") from None

