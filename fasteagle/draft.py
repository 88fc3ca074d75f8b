"""The EAGLE-1/2 draft head.

    out[t] = Layer(fc([embed(token[t+1]) ; feature[t]]))      feature = the target's final-normed last hidden state
    draft_logits[t] = target_lm_head(out[t])                  (no extra norm)

`out[t]` is the head's guess of the target's feature at t+1, so it both predicts token t+2 and stands in for the
missing target feature when the head drafts one level deeper. Layer is one LLaMA decoder layer without the input
norm, with its own static KV cache; the embedding and the LM head are the target's own (shared, never copied).
"""
from pathlib import Path

import torch
import torch.nn as nn

from fasteagle.checkpoint import atomic_output_dir, load_weights, read_config, write_checkpoint
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs, TransformerBlock, run_layers, setup_static_cache


class DraftHead(nn.Module):
    def __init__(self, args: ModelArgs, fc_bias: bool = True):
        super().__init__()
        self.args = args
        self.fc = nn.Linear(2 * args.dim, args.dim, bias=fc_bias)
        self.layers = nn.ModuleList([TransformerBlock(args, input_norm=False)])
        self.max_seq_len = 0
        self.attn_backend = "sdpa"
        self.embed_weight = None  # the target's, set by bind()
        self.lm_head_weight = None

    def bind(self, target):
        """Share the target's embedding and LM head (plain attributes: not parameters of the head)."""
        if target.args.dim != self.args.dim or target.args.vocab_size != self.args.vocab_size:
            raise FastEagleError(
                f"draft head (hidden {self.args.dim}, vocab {self.args.vocab_size}) does not fit the target "
                f"(hidden {target.args.dim}, vocab {target.args.vocab_size})"
            )
        # object.__setattr__: keep them plain attributes, so they are neither saved with nor moved by the head
        object.__setattr__(self, "embed_weight", target.embed.weight)
        object.__setattr__(self, "lm_head_weight", target.lm_head_weight())
        return self

    def setup_cache(self, max_seq_len: int, attn_backend: str = "sdpa"):
        setup_static_cache(self, max_seq_len, 1, attn_backend)

    def forward(self, tokens, features, positions, cache_len, attn_mask):
        """tokens, positions: [B, T]; features: [B, T, dim]; cache_len: [B]; attn_mask: [T, W] (see model.py).
        Returns out [B, T, dim]."""
        features = features.to(self.fc.weight.dtype)
        if self.attn_backend == "triton":  # one kernel: gather + concat + fc, the concat never materialised
            from fasteagle.kernels.draft_ops import fused_embed_fc

            x = fused_embed_fc(tokens, features, self.embed_weight, self.fc.weight, self.fc.bias)
        else:
            x = self.fc(torch.cat([nn.functional.embedding(tokens, self.embed_weight), features], -1))
        return run_layers(self, x, positions, cache_len, attn_mask)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(out, self.lm_head_weight).float()

    def topk(self, out: torch.Tensor, k: int, temperature: float = 1.0):
        """Top-k draft log-probabilities (of softmax(logits / temperature)) and token ids of out [m, dim], sorted
        descending. On the Triton backend the LM-head GEMV is fused with the top-k: no [m, vocab] logits."""
        if self.attn_backend == "triton":
            from fasteagle.kernels.draft_ops import lm_head_topk

            return lm_head_topk(out, self.lm_head_weight, k, temperature)
        return torch.topk(torch.log_softmax(self.logits(out) / temperature, dim=-1), k, dim=-1)


def load_draft(ckpt_dir, target, device="cpu", dtype=torch.float32) -> DraftHead:
    """Load a converted draft head and bind it to `target` (checking hidden size and vocabulary)."""
    cfg = read_config(ckpt_dir, "draft")
    try:
        args = ModelArgs.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise FastEagleError(f"{Path(ckpt_dir) / 'config.json'}: bad draft config: {e}") from None
    head = DraftHead(args, fc_bias=cfg.get("fc_bias", True))
    head.bind(target)  # check the fit before reading weights
    head = load_weights(head, ckpt_dir, device=device, dtype=dtype)
    return head.bind(target).eval()


def save_draft(head: DraftHead, out_dir, extra: dict | None = None):
    """Write a draft checkpoint that `load_draft` (and `generate --draft`) reads. `extra` goes into config.json
    (e.g. {"source": ..., "training": ...})."""
    config = {"kind": "draft", "model": head.args.to_dict(), "fc_bias": head.fc.bias is not None, **(extra or {})}
    with atomic_output_dir(out_dir) as tmp:
        write_checkpoint(tmp, config, head.state_dict())
