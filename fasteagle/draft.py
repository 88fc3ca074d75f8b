"""The EAGLE-1/2 draft head.

    out[t] = Layer(fc([embed(token[t+1]) ; feature[t]]))      feature = the target's final-normed last hidden state
    draft_logits[t] = target_lm_head(out[t])                  (no extra norm)

`out[t]` is the head's guess of the target's feature at t+1, so it both predicts token t+2 and stands in for the
missing target feature when the head drafts one level deeper. Layer is one LLaMA decoder layer without the input
norm, with its own static KV cache; the embedding and the LM head are the target's own (shared, never copied).

A head may carry a draft vocabulary (`draft_vocab`: V_d target ids, most frequent first; see train/vocab.py): it
then ranks candidates over those rows of the LM head only, [m, V_d] instead of [m, V] per draft level. The tree
still holds target ids and verification is unchanged, so the output stays lossless.
"""
from pathlib import Path

import torch
import torch.nn as nn

from fasteagle import eagle3
from fasteagle.checkpoint import atomic_output_dir, load_weights, read_config, write_checkpoint
from fasteagle.errors import FastEagleError
from fasteagle.linear import (QUANTIZE_MIN_NUMEL, Linear, can_pack, can_quantize, dequantize_linears, is_weight_only,
                              pack_linears, pack_weight, packed_linear, quantize_linears, quantize_weight,
                              quantized_linear, skinny_available, skinny_usable)
from fasteagle.model import ModelArgs, TransformerBlock, run_layers, setup_static_cache


class DraftHead(nn.Module):
    arch = "eagle"  # EAGLE-1/2 (eagle3.Eagle3Head: "eagle3")
    taps = ()  # target layers whose inputs the head reads (EAGLE-3); none: the target's final-normed hidden state

    def __init__(self, args: ModelArgs, fc_bias: bool = True, draft_vocab_size: int = 0):
        super().__init__()
        self.args = args
        self.fc = Linear(2 * args.dim, args.dim, bias=fc_bias)
        self.layers = nn.ModuleList([TransformerBlock(args, input_norm=False)])
        if draft_vocab_size:  # target ids of the draft vocabulary, most frequent first (saved with the head)
            self.register_buffer("draft_vocab", torch.zeros(draft_vocab_size, dtype=torch.long))
        else:
            self.draft_vocab = None
        self.max_seq_len = 0
        self.attn_backend = "sdpa"
        self.embed_weight = None  # the target's, set by bind()
        self.lm_head_weight = None
        self.vocab_ids, self.vocab_weight = None, None  # the draft vocabulary in use and its LM-head rows

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
        self.use_draft_vocab(None if self.draft_vocab is None else self.draft_vocab.shape[0])
        return self

    def use_draft_vocab(self, size: int | None):
        """Rank draft candidates over the first `size` ids of the stored draft vocabulary (its `size` most frequent
        tokens), or over the whole target vocabulary (None). Copies those LM-head rows once ([size, dim])."""
        if size is None:
            self.vocab_ids, self.vocab_weight = None, None
            self._repack(self.lm_head_weight)
            return self
        if self.draft_vocab is None or not 1 <= size <= self.draft_vocab.shape[0]:
            have = 0 if self.draft_vocab is None else self.draft_vocab.shape[0]
            raise FastEagleError(f"draft vocabulary size {size}: this head stores {have} draft-vocabulary ids")
        ids = self.draft_vocab[:size].to(self.lm_head_weight.device)
        self.vocab_ids, self.vocab_weight = ids, self.lm_head_weight[ids].contiguous()
        self._repack(self.vocab_weight)
        return self

    def _repack(self, w):
        """Redo the ranking weight's packed / int8 copies after the ranking rows changed."""
        if self.head_packed is not None:
            self.head_packed = pack_weight(w)
        if self.head_qpacked is not None:
            self.head_qpacked = quantize_weight(w, weight_only=is_weight_only(self.head_qpacked))

    head_packed = None  # the ranking weight (draft vocabulary rows or the LM head), packed (linear.Linear)

    def pack(self, rows: int = 8) -> bool:
        """CPU: pack the layer's, fc's and the ranking LM-head rows' weights for multi-row inputs (linear.Linear)."""
        w = self.lm_head_weight if self.vocab_weight is None else self.vocab_weight
        if not can_pack(w) or not pack_linears(self, rows):
            return False
        if self.head_packed is None:
            self.head_packed = pack_weight(w, rows)
        return True

    head_qpacked = None  # the ranking weight as int8 (quantize)

    def quantize(self, on: bool = True, min_numel: int = QUANTIZE_MIN_NUMEL, weight_only: bool = False) -> bool:
        """CPU: rank with, and run the layer through, int8 copies of their weights (linear.quantize_weight; eager:
        fbgemm's dynamic op, weight_only: the skinny kernel's int8 variant, which compiled graphs call): each draft
        level then streams a quarter of the bytes. Lossless all the same: only the proposals change.
        Weights under min_numel elements stay fp32 (linear.quantize_linears), and so does fc: its input puts the
        token embedding (SmolLM2: RMS 0.12) beside the target's feature (channels up to ~18), and the dynamic op's
        one activation scale per call (7 bits) rounds much of the embedding half to 0: the head partly loses the
        token. Measured on the bundled SmolLM2 head, MT-bench: real runs at 2/4/8, tau 1.80 int8 fc vs 1.86 fp32
        fc (16 questions); replayed rounds (train/calibrate.py, whose one call over a whole answer takes its scale
        from rows up to ~50) 2.08 vs 2.56 at 6/10/60 (40 questions; all fp32 2.57). quantize(False) drops the
        copies. Returns whether the head now runs (partly) int8."""
        if not on:
            dequantize_linears(self)
            self.head_qpacked = None
            return False
        w = self.lm_head_weight if self.vocab_weight is None else self.vocab_weight
        if not (skinny_usable(w) if weight_only else can_quantize(w)):
            return False
        if self.head_qpacked is not None and is_weight_only(self.head_qpacked) != weight_only:
            self.head_qpacked = None  # the other kind: replaced
        if self.head_qpacked is None and w.numel() >= min_numel:
            self.head_qpacked = quantize_weight(w, weight_only=weight_only)
        return (quantize_linears(self, min_numel, keep_fp32=(self.fc,), weight_only=weight_only)
                or self.head_qpacked is not None)

    def setup_cache(self, max_seq_len: int, attn_backend: str = "sdpa"):
        setup_static_cache(self, max_seq_len, 1, attn_backend)

    def forward(self, tokens, features, positions, cache_len, attn_mask, kv_len: int | None = None):
        """tokens, positions: [B, T]; features: [B, T, dim]; cache_len: [B]; attn_mask: [T, W]; kv_len: the key
        window (see model.py). Returns out [B, T, dim]."""
        if self.attn_backend == "triton":  # one kernel: gather + concat + fc, the concat never materialised
            from fasteagle.kernels.draft_ops import fused_embed_fc

            features = features.to(self.fc.weight.dtype)
            x = fused_embed_fc(tokens, features, self.embed_weight, self.fc.weight, self.fc.bias)
        else:
            x = self.layer_input(tokens, features)
        return run_layers(self, x, positions, cache_len, attn_mask, kv_len)

    def layer_input(self, tokens, features):
        """The decoder layer's input for (token, feature) pairs: fc([embedding; feature]) [B, T, dim]."""
        features = features.to(self.fc.weight.dtype)
        return self.fc(torch.cat([nn.functional.embedding(tokens, self.embed_weight), features], -1))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(out, self.lm_head_weight).float()

    def topk(self, out: torch.Tensor, k: int, temperature: float = 1.0):
        """Top-k draft log-probabilities (of softmax(logits / temperature)) and token ids of out [m, dim], sorted
        descending. On the Triton backend the LM-head GEMV is fused with the top-k: no [m, vocab] logits.
        With a draft vocabulary the distribution is the softmax over its rows only, and the ids are target ids."""
        w = self.lm_head_weight if self.vocab_weight is None else self.vocab_weight
        if self.attn_backend == "triton":
            from fasteagle.kernels.draft_ops import lm_head_topk

            logp, ids = lm_head_topk(out, w, k, temperature)
        else:
            logits = (quantized_linear(out, self.head_qpacked) if self.head_qpacked is not None
                      else packed_linear(out, w, self.head_packed)).float()
            logits = logits if temperature == 1.0 else logits / temperature
            if k == 1:  # a chain's level: max and logsumexp cost a fraction of log_softmax + topk over V_d rows
                top, ids = logits.max(-1, keepdim=True)
                logp = top - torch.logsumexp(logits, -1, keepdim=True)
            else:
                logp, ids = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
        return (logp, ids) if self.vocab_ids is None else (logp, self.vocab_ids[ids])


def cpu_fast_paths(target, head=None, int8: bool = True, compiled: bool = False) -> bool:
    """CPU forwards as the engine runs them: packed fp32 weights for few-row inputs (linear.Linear) in the target
    and the head, and the head's int8 copies when int8 (DraftHead.quantize): eager, fbgemm's (faster from 4 rows
    on, its VNNI integer dot products); compiled, the skinny kernel's weight-only int8 (a custom op, which compiled
    graphs call; fbgemm's op does not trace). Compiled graphs only take the skinny kernel's packing, so compiled,
    nothing is packed or quantized without it. Returns whether the head runs int8. No-op elsewhere (GPU, other
    dtypes)."""
    if compiled and not skinny_available():
        return False
    target.pack()
    if head is None:
        return False
    head.pack()
    return head.quantize(int8, weight_only=compiled)


def load_draft(ckpt_dir, target, device="cpu", dtype=torch.float32):
    """Load a converted draft head (EAGLE-1/2: DraftHead; EAGLE-3: eagle3.Eagle3Head, by the config's "head_arch")
    and bind it to `target` (checking hidden size and vocabulary)."""
    cfg = read_config(ckpt_dir, "draft")
    if cfg.get("head_arch", "eagle") == eagle3.ARCH:
        head = eagle3.head_from_config(cfg, str(Path(ckpt_dir) / "config.json")).bind(target)
        head = load_weights(head, ckpt_dir, device=device, dtype=dtype).bind(target).eval()
        head.check_vocab(str(ckpt_dir))
        return head
    if cfg.get("head_arch", "eagle") != "eagle":
        raise FastEagleError(f"{Path(ckpt_dir) / 'config.json'}: unknown draft head_arch {cfg['head_arch']!r}")
    try:
        args = ModelArgs.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise FastEagleError(f"{Path(ckpt_dir) / 'config.json'}: bad draft config: {e}") from None
    head = DraftHead(args, fc_bias=cfg.get("fc_bias", True), draft_vocab_size=cfg.get("draft_vocab_size", 0))
    head.bind(target)  # check the fit before reading weights
    head = load_weights(head, ckpt_dir, device=device, dtype=dtype)
    return head.bind(target).eval()


def save_draft(head, out_dir, extra: dict | None = None):
    """Write a draft checkpoint that `load_draft` (and `generate --draft`) reads. `extra` goes into config.json
    (e.g. {"source": ..., "training": ...})."""
    if head.arch == eagle3.ARCH:
        config = {"kind": "draft", **head.config(), **(extra or {})}
    else:
        n_vocab = 0 if head.draft_vocab is None else head.draft_vocab.shape[0]
        config = {"kind": "draft", "head_arch": head.arch, "model": head.args.to_dict(),
                  "fc_bias": head.fc.bias is not None, "draft_vocab_size": n_vocab, **(extra or {})}
    with atomic_output_dir(out_dir) as tmp:
        write_checkpoint(tmp, config, head.state_dict())
