"""Temperature / top-k / top-p warping and sampling, on device, without host syncs.

The same `choose_tokens` serves plain AR decoding and tree verification, so both sample from exactly the same
warped target distribution. Sampling is an exponential race (argmax of p / E with E ~ Exp(1), equivalent to the
Gumbel-max trick) drawn from a seeded torch.Generator: reproducible for a given seed on a given device.
"""
from dataclasses import dataclass

import torch

from fasteagle.errors import FastEagleError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if not (self.temperature >= 0) or self.temperature == float("inf"):
            raise FastEagleError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise FastEagleError(f"top-k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise FastEagleError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> fp32 logits with the tokens outside top-k / top-p set to -inf (temperature, then top-k,
    then top-p on the renormalised distribution; ties at the top-k boundary are all kept)."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution every sampled token is drawn from: softmax of the warped logits (fp32)."""
    return torch.softmax(warp_logits(logits, params), dim=-1)


def exponential_race(rows: int, vocab: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Noise for `choose_tokens`, drawn outside compiled graphs (a torch.Generator does not trace)."""
    race = torch.empty(rows, vocab, device=device).exponential_(generator=generator)
    # an exact 0 would turn p / E into inf (or nan for p = 0)
    return race.clamp_(min=torch.finfo(torch.float32).tiny)


def choose_tokens(logits: torch.Tensor, params: SamplingParams, race: torch.Tensor | None = None):
    """One token per row of logits [rows, V]: the argmax when greedy, else a sample of target_probs using the
    exponential race noise [rows, V] (argmax of p / E, E ~ Exp(1), picks token i with probability p_i)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return (target_probs(logits, params) / race).argmax(dim=-1)
