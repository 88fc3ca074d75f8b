"""Temperature / top-k / top-p warping and sampling, on device, without host syncs.

The same `choose_tokens` serves plain AR decoding and tree verification, so both sample from exactly the same
warped target distribution. Sampling is an exponential race (argmax of p / E with E ~ Exp(1), equivalent to the
Gumbel-max trick) drawn from a seeded torch.Generator: reproducible for a given seed on a given device.

Compiled graphs take `DeviceParams`: the numbers (temperature, top-k, top-p) as a device tensor, and only which
warps are on as Python values, so one graph serves every temperature / top-p, and every top-k of one power-of-two
bucket. Both forms warp identically (the top-k threshold is the k-th largest logit either way).
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


@dataclass(frozen=True)
class DeviceParams:
    """SamplingParams as compiled graphs take them: they specialise on greedy, top_k_max and top_p_on only, while
    temperature, top_k and top_p are data (`values`). So a session compiles 1 greedy variant plus at most 2 (top-p
    on / off) per top-k bucket it uses (off, 1, 2, 4, ...), whatever the numbers."""

    greedy: bool
    top_k_max: int  # 0: top-k off; else the power of two >= top_k, the k torch.topk runs with
    top_p_on: bool
    values: torch.Tensor | None  # [3] fp32: temperature, top_k, top_p (None when greedy)

    @classmethod
    def of(cls, params: SamplingParams, vocab: int, device) -> "DeviceParams":
        if params.greedy:
            return cls(True, 0, False, None)
        values = torch.tensor([params.temperature, params.top_k, params.top_p], dtype=torch.float32, device=device)
        k_max = 1 << (params.top_k - 1).bit_length() if 0 < params.top_k < vocab else 0
        return cls(False, k_max, params.top_p < 1, values)

    @staticmethod
    def kinds(vocab: int) -> int:
        """How many distinct (greedy, top_k_max, top_p_on) exist for a vocabulary: the graphs' variants."""
        buckets = (vocab - 2).bit_length() + 1 if vocab > 1 else 0  # top_k_max in 1, 2, 4, ... for top_k < vocab
        return 1 + 2 * (1 + buckets)


def warp_logits(logits: torch.Tensor, params: SamplingParams | DeviceParams) -> torch.Tensor:
    """logits [..., V] -> fp32 logits with the tokens outside top-k / top-p set to -inf (temperature, then top-k,
    then top-p on the renormalised distribution; ties at the top-k boundary are all kept)."""
    V = logits.shape[-1]
    if isinstance(params, DeviceParams):  # numbers on the device, shapes static
        temperature, top_k, top_p = params.values.unbind()
        k_max, top_p_on = params.top_k_max, params.top_p_on
    else:
        temperature, top_k, top_p = params.temperature, params.top_k, params.top_p
        k_max, top_p_on = (top_k if top_k < V else 0), top_p < 1
    logits = logits.float() / temperature
    if k_max:
        top = torch.topk(logits, min(k_max, V), dim=-1).values  # sorted descending
        if isinstance(top_k, int):  # top holds exactly the k largest
            kth = top[..., -1:]
        else:  # the k-th largest (k >= V: the smallest, so nothing is dropped)
            kth = top.gather(-1, (top_k.long().clamp(max=top.shape[-1]) - 1).expand(*top.shape[:-1], 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p_on:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def target_probs(logits: torch.Tensor, params: SamplingParams | DeviceParams) -> torch.Tensor:
    """The distribution every sampled token is drawn from: softmax of the warped logits (fp32)."""
    return torch.softmax(warp_logits(logits, params), dim=-1)


def exponential_race(rows: int, vocab: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Noise for `choose_tokens`, drawn outside compiled graphs (a torch.Generator does not trace)."""
    race = torch.empty(rows, vocab, device=device).exponential_(generator=generator)
    # an exact 0 would turn p / E into inf (or nan for p = 0)
    return race.clamp_(min=torch.finfo(torch.float32).tiny)


def choose_tokens(logits: torch.Tensor, params: SamplingParams | DeviceParams, race: torch.Tensor | None = None):
    """One token per row of logits [rows, V]: the argmax when greedy, else a sample of target_probs using the
    exponential race noise [rows, V] (argmax of p / E, E ~ Exp(1), picks token i with probability p_i)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return (target_probs(logits, params) / race).argmax(dim=-1)
