"""The draft head's training forward: its own decoder layer over whole sequences, drafting steps unrolled.

The head's layer (model.Attention, its MLP and norms; an EAGLE-3 head's Eagle3Layer) runs exactly as at inference;
only its KV cache is swapped for StepKeys, which keeps each drafting step's keys and values as autograd tensors
(the static cache's in-place writes would break backward) and lets attention see every step's keys under a mask.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class StepKeys(nn.Module):
    """Stands in for a layer's KVCache during training: `write` keeps the step's k, v [B, Hkv, T, D]; k and v are
    those of every step so far, concatenated along the key axis ([B, Hkv, steps * T, D])."""

    dtype = None  # attention runs in the step's own dtype

    def __init__(self):
        super().__init__()
        self.ks, self.vs = [], []

    def write(self, slots, k, v):
        self.ks.append(k)
        self.vs.append(v)

    @property
    def k(self):
        return torch.cat(self.ks, 2)

    @property
    def v(self):
        return torch.cat(self.vs, 2)


@contextmanager
def step_keys(layer):
    """Run `layer`'s attention over StepKeys (plain SDPA) for the duration of the block; its cache is restored."""
    attn = layer.attn
    saved = attn.kv_cache, attn.backend
    attn.kv_cache, attn.backend = StepKeys(), "sdpa"
    try:
        yield
    finally:
        attn.kv_cache, attn.backend = saved


def step_mask(T: int, k: int, device=None) -> torch.Tensor:
    """Drafting step k's attention mask [T, k * T] over the keys of steps 1..k: pair t sees the step-1 keys of
    pairs 0..t-k+1 (the accepted context, real features) and the step-i key of pair t-k+i for i = 2..k (its drafted
    ancestors and itself). Step 1 is the causal mask."""
    t = torch.arange(T, device=device)
    blocks = [t[None, :] <= t[:, None] - k + 1] + [t[None, :] == t[:, None] - k + i for i in range(2, k + 1)]
    return torch.cat(blocks, 1)


def train_forward(head, tokens, features, rope, steps: int = 1) -> list:
    """Cache-free head forward over whole sequences: tokens [B, T], features [B, T, feature width] -> [out
    [B, T, dim]] per drafting step. rope: rope_cache(head.args, >= T) on the head's device; position t of every
    row is t. Works for any head with `layer_input(tokens, features)` and one decoder layer (EAGLE-1/2, EAGLE-3).

    Pair t = (feature of token t, token t+1); the head's output at pair t predicts token t+2 (and, EAGLE-1/2, the
    feature of token t+1). Step 1 is the head on the target's features, as in the plain EAGLE objective. Step
    k > 1 simulates drafting k levels deep (training-time test, as in HASS / EAGLE-3): pair t's feature is the
    head's own step k-1 output at pair t-1, and its attention sees what it would see in the tree at depth k
    (step_mask). Row t < k-1 of step k has no such past and is meaningless (the loss masks it)."""
    B, T = tokens.shape
    layer = head.layers[0]
    cos_sin = rope[:T][None].expand(B, T, *rope.shape[1:])
    outs = []
    with step_keys(layer):
        for k in range(1, steps + 1):
            if k > 1:  # pair t takes the output at pair t-1; row 0 gets a zero feature (masked)
                features = F.pad(outs[-1][:, :-1], (0, 0, 1, 0))
            mask = step_mask(T, k, tokens.device)
            outs.append(layer(head.layer_input(tokens, features), cos_sin, None, None, None, mask))
    return outs
