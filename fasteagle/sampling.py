"""Temperature / top-k / top-p warping and sampling, on device, without host syncs.

The same `choose_tokens` serves plain AR decoding and tree verification, so both sample from exactly the same
warped target distribution. Sampling inverts the cumulative distribution at one uniform number per row, drawn from a seeded torch.Generator:
reproducible for a given seed on a given device.

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
        logits = top_p_mask(logits, top_p)
    return logits


TOP_P_CANDIDATES = 256  # top-p looks for the nucleus among this many of the largest logits first


def top_p_mask(logits: torch.Tensor, top_p, candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """logits with every token outside the nucleus set to -inf: a token is dropped when the tokens ranked above it
    already reach top_p (the first token always stays).

    The nucleus is usually a few dozen tokens of a vocabulary of tens of thousands, and sorting the whole vocabulary
    costs more than the rest of a CPU sampling step (~4 ms per row at 49,152 tokens on 2 cores). So on a CPU, outside
    compiled graphs (which cannot branch on the data; on a GPU the check would add a host sync, and the sort is
    cheap there), the `candidates` largest logits are taken first: when their
    probability mass reaches top_p in every row, every token beyond them has at least that mass ranked above it and
    is dropped, and the nucleus is decided within them, exactly as by the full sort. Otherwise the full sort."""
    V = logits.shape[-1]
    if candidates < V and logits.device.type == "cpu" and not torch.compiler.is_compiling():
        top, order = torch.topk(logits, candidates, dim=-1)  # sorted descending
        probs = torch.exp(top - torch.logsumexp(logits, dim=-1, keepdim=True))
        if bool((probs.sum(-1) >= top_p).all()):
            return _drop_outside(logits, probs, order, top_p, fill=True)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    return _drop_outside(logits, torch.softmax(sorted_logits, dim=-1), order, top_p, fill=False)


def _drop_outside(logits, probs, order, top_p, fill: bool):
    """probs: the probabilities of the tokens `order` lists, in descending order (all of them, or the leading ones
    when fill: the tokens not listed are dropped)."""
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    drop = torch.full_like(logits, fill, dtype=torch.bool).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def target_probs(logits: torch.Tensor, params: SamplingParams | DeviceParams) -> torch.Tensor:
    """The distribution every sampled token is drawn from: softmax of the warped logits (fp32)."""
    return torch.softmax(warp_logits(logits, params), dim=-1)


def sampling_noise(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """The randomness of `choose_tokens`: one uniform number in [0, 1) per row (fp64), drawn outside compiled graphs
    (a torch.Generator does not trace)."""
    return torch.rand(rows, generator=generator, device=device, dtype=torch.float64)


def choose_tokens(logits: torch.Tensor, params: SamplingParams | DeviceParams, noise: torch.Tensor | None = None):
    """One token per row of logits [rows, V]: the argmax when greedy, else a sample of target_probs by inverting its
    cumulative distribution at noise [rows] (sampling_noise): the first token whose cumulative probability exceeds
    u * total is token i with probability p_i / total (fp64 sums; a token of probability 0 is never picked). One
    random number per row, not one per vocabulary entry as for an exponential race (which cost ~1 ms a row at
    49,152 tokens on 2 CPU cores)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    cdf = torch.cumsum(target_probs(logits, params), dim=-1, dtype=torch.float64)
    u = (noise * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
