"""Mixtral's mixture-of-experts feed-forward: a router picks the top-k of E SwiGLU experts for every token.

    weights, experts = topk(softmax(router(x)), k);  weights /= sum(weights)
    out = sum_j weights[j] * w2[experts[j]] @ (silu(w1[experts[j]] @ x) * (w3[experts[j]] @ x))

The experts' weights are stacked ([E, I, D] for the gate and up projections, [E, D, I] for down). Eager on a CPU,
where reading the routing on the host costs nothing, each expert some token picked runs once over its tokens
(grouped: every needed expert's weights read once, nothing copied). Elsewhere a forward has fixed shapes and never
reads routing decisions on the host (compiles, CUDA-graphs), with one of two evaluations chosen by shape alone
(static under torch.compile), whichever reads fewer expert weights:
- gathered (N tokens x k < E, a decode step or a tiny tree): each token's k experts' weights are gathered and
  applied to that token only: N * k expert reads;
- dense (N * k >= E: verification of a tree, prefill): every expert runs over every token once and the outputs are
  summed with the routing weights, zero for the experts a token did not pick: E expert reads, E / k times the
  arithmetic. At batch 1 the forward is bound by reading weights, so this is the cheaper one from N * k = E tokens
  on; it also means a tree of N >= E / k tokens reads every expert, E / k times the weights of a decode step.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fasteagle.linear import Linear


class MoEFeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        E, I, D = args.n_experts, args.intermediate_size, args.dim
        if not 1 <= args.n_experts_per_tok <= E:
            raise ValueError(f"n_experts_per_tok must be in [1, {E}], got {args.n_experts_per_tok}")
        self.top_k = args.n_experts_per_tok
        self.gate = Linear(D, E, bias=False)  # the router
        self.w1 = nn.Parameter(torch.empty(E, I, D))  # gate projections
        self.w3 = nn.Parameter(torch.empty(E, I, D))  # up projections
        self.w2 = nn.Parameter(torch.empty(E, D, I))  # down projections
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] in x's dtype, expert ids [N, k]); softmax in fp32, as transformers does."""
        probs = self.gate(x).float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return (weights / weights.sum(-1, keepdim=True)).to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            out = self._grouped(x, weights, experts)
        elif x.shape[0] * self.top_k < self.w1.shape[0]:
            out = self._gathered(x, weights, experts)
        else:
            out = self._dense(x, weights, experts)
        return out.reshape(shape)

    def _grouped(self, x, weights, experts):
        out = torch.zeros_like(x)
        for e in sorted(set(experts.flatten().tolist())):  # host ids: free on a CPU
            rows, slot = (experts == e).nonzero(as_tuple=True)
            xe = x[rows]
            h = F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e])
            out.index_add_(0, rows, F.linear(h, self.w2[e]) * weights[rows, slot, None])
        return out

    def _gathered(self, x, weights, experts):
        h = F.silu(torch.einsum("nd,nkid->nki", x, self.w1[experts])) * torch.einsum("nd,nkid->nki", x, self.w3[experts])
        y = torch.einsum("nki,nkdi->nkd", h, self.w2[experts])
        return torch.einsum("nk,nkd->nd", weights, y)

    def _dense(self, x, weights, experts):
        route = torch.zeros(x.shape[0], self.w1.shape[0], dtype=x.dtype, device=x.device).scatter_(1, experts, weights)
        h = F.silu(torch.einsum("nd,eid->nei", x, self.w1)) * torch.einsum("nd,eid->nei", x, self.w3)
        y = torch.einsum("nei,edi->ned", h, self.w2)
        return torch.einsum("ne,ned->nd", route, y)
