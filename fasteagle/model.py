"""A LLaMA-family transformer with a static KV cache (Llama-2/3/3.1, Vicuna, Mistral, Qwen2, SmolLM2).

One forward serves prefill, decode, tree verification and batched data generation:

    hidden = model(tokens[B, T], positions[B, T], cache_len[B], attn_mask[T, W] or [B, T, W])   (W >= T)

The key block is the W cache slots [cache_len[b], cache_len[b] + W); the new K/V of the T query tokens are written
to its last T slots (W == T except for the draft head's tree steps, whose queries also see earlier tree levels).
Query i of row b sees every slot j < cache_len[b] plus the block slots where attn_mask[i, j - cache_len[b]] is
true: a causal mask for prefill/decode, the tree's ancestor mask for verification. Positions (for RoPE) are independent of slots,
so a tree node at depth d sits at position cache_len + d while occupying slot cache_len + its index.
`forward` returns the final-normed hidden state (exactly the LM head's input, the feature EAGLE-1/2 heads consume);
`logits(hidden)` applies the LM head. Rotary embeddings use the Hugging Face (rotate-half) layout.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = False  # SmolLM2, Qwen2-0.5B/1.5B
    arch: str = "llama"  # llama | mistral | qwen2 (informational: all share this code path)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with the Llama-3.1 frequency-dependent scaling when configured."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    rs = args.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv_freq.float()
    if rs.get("rope_type", rs.get("type")) != "llama3":
        raise ValueError(f"unsupported rope_scaling {rs}")
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return scaled.float()


def rope_cache(args: ModelArgs, max_seq_len: int) -> torch.Tensor:
    """[max_seq_len, head_dim // 2, 2] (cos, sin) in fp32."""
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rope_inv_freq(args))
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos_sin: [B, T, D/2, 2]. Rotate-half layout: pairs are (i, i + D/2).
    cos = torch.cat([cos_sin[..., 0]] * 2, dim=-1).unsqueeze(1)
    sin = torch.cat([cos_sin[..., 1]] * 2, dim=-1).unsqueeze(1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


class KVCache(nn.Module):
    """One layer's view into the model's static cache. The model owns a single buffer per K and V,
    [n_layers, B, n_kv_heads, max_seq_len, head_dim], so that committing an accepted path is one kernel launch."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.k, self.v = k, v  # views [B, n_kv_heads, max_seq_len, head_dim]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # slots: [B, T]; k, v: [B, Hkv, T, D]
        idx = slots[:, None, :, None].expand(k.shape)
        self.k.scatter_(2, idx, k)
        self.v.scatter_(2, idx, v)


def visible_keys(cache_len: torch.Tensor, attn_mask: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Which cache slots each query may attend to: [B, 1, T, max_seq_len] bool.

    cache_len: [B] int64. attn_mask: [T, W] or [B, T, W] bool over the key block [cache_len, cache_len + W)
    (row = query, col = key); every slot below cache_len is visible, every slot past the block is not."""
    T, W = attn_mask.shape[-2:]
    if attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0).expand(cache_len.shape[0], T, W)
    slot = torch.arange(max_seq_len, device=cache_len.device)
    rel = slot[None, :] - cache_len[:, None]  # [B, S]: slot index relative to the key block
    in_block = (rel >= 0) & (rel < W)
    block = torch.gather(attn_mask, 2, rel.clamp(0, W - 1)[:, None, :].expand(-1, T, -1))  # [B, T, S]
    visible = (rel < 0)[:, None, :] | (in_block[:, None, :] & block)
    return visible.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.backend = "sdpa"

    def forward(self, x, cos_sin, slots, cache_len, attn_mask, visible):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        self.kv_cache.write(slots, k, v)
        if self.backend == "triton":
            from fasteagle.kernels.tree_attention import tree_attention

            out = tree_attention(q, self.kv_cache.k, self.kv_cache.v, cache_len, attn_mask)
        else:
            out = F.scaled_dot_product_attention(
                q, self.kv_cache.k, self.kv_cache.v, attn_mask=visible, enable_gqa=self.n_heads != self.n_kv_heads
            )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, input_norm: bool = True):
        super().__init__()
        self.attn = Attention(args)
        self.mlp = FeedForward(args)
        # The EAGLE-1/2 draft layer has no input norm: its input is the fc projection.
        self.attn_norm = RMSNorm(args.dim, args.norm_eps) if input_norm else nn.Identity()
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos_sin, slots, cache_len, attn_mask, visible):
        h = x + self.attn(self.attn_norm(x), cos_sin, slots, cache_len, attn_mask, visible)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_seq_len = 0
        self.attn_backend = "sdpa"

    def setup_cache(self, max_seq_len: int, batch: int = 1, attn_backend: str = "sdpa"):
        setup_static_cache(self, max_seq_len, batch, attn_backend)

    def forward(self, tokens, positions, cache_len, attn_mask):
        """tokens, positions: [B, T] int64; cache_len: [B] int64; attn_mask: [T, W] or [B, T, W] bool, W >= T.
        Returns the final-normed hidden state [B, T, dim]."""
        return self.norm(run_layers(self, self.embed(tokens), positions, cache_len, attn_mask))

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.output is None else self.output.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight()).float()


def setup_static_cache(model: nn.Module, max_seq_len: int, batch: int = 1, attn_backend: str = "sdpa"):
    """Preallocate `model`'s KV cache (its dtype and device) and RoPE table; `model` has .args, .layers, .embed
    (the target) or an embedding-sized weight to copy dtype/device from (the draft head).
    attn_backend: "sdpa" (PyTorch, dense mask over the whole cache; any device) or "triton"
    (the tree-attention kernel, which reads only slots [0, cache_len + W); CUDA)."""
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be positive")
    if attn_backend not in ("sdpa", "triton"):
        raise ValueError(f"unknown attention backend {attn_backend!r}")
    a = model.args
    p = next(model.layers.parameters())
    shape = (len(model.layers), batch, a.n_kv_heads, max_seq_len, a.head_dim)
    model.register_buffer("k_cache", torch.zeros(shape, dtype=p.dtype, device=p.device), persistent=False)
    model.register_buffer("v_cache", torch.zeros(shape, dtype=p.dtype, device=p.device), persistent=False)
    for i, layer in enumerate(model.layers):
        layer.attn.kv_cache = KVCache(model.k_cache[i], model.v_cache[i])
        layer.attn.backend = attn_backend
    model.register_buffer("rope", rope_cache(a, max_seq_len).to(p.device), persistent=False)
    model.max_seq_len = max_seq_len
    model.attn_backend = attn_backend


def run_layers(model: nn.Module, x, positions, cache_len, attn_mask):
    """Run `model.layers` over x [B, T, dim] with the static cache; see the module docstring for the mask."""
    T, W = x.shape[1], attn_mask.shape[-1]
    # The T new tokens occupy the last T slots of the key block [cache_len, cache_len + W).
    slots = cache_len[:, None] + (W - T) + torch.arange(T, device=x.device)[None, :]
    visible = None if model.attn_backend == "triton" else visible_keys(cache_len, attn_mask, model.max_seq_len)
    cos_sin = model.rope[positions]
    for layer in model.layers:
        x = layer(x, cos_sin, slots, cache_len, attn_mask, visible)
    return x


def causal_mask(T: int, device=None) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()
