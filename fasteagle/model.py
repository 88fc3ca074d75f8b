"""A LLaMA-family transformer with a static KV cache (Llama-2/3/3.1, Vicuna, Mistral, Mixtral, Qwen2/3, SmolLM2).

One forward serves prefill, decode, tree verification and batched data generation:

    hidden = model(tokens[B, T], positions[B, T], cache_len[B], attn_mask[T, W] or [B, T, W], kv_len=None)  (W >= T)

The key block is the W cache slots [cache_len[b], cache_len[b] + W); the new K/V of the T query tokens are written
to its last T slots (W == T except for the draft head's tree steps, whose queries also see earlier tree levels).
Query i of row b sees every slot j < cache_len[b] plus the block slots where attn_mask[i, j - cache_len[b]] is
true: a causal mask for prefill/decode, the tree's ancestor mask for verification. Positions (for RoPE) are independent of slots,
so a tree node at depth d sits at position cache_len + d while occupying slot cache_len + its index. With a sliding
window (Mistral) a query at position p also sees only keys at positions > p - window; the committed context sits
in slot order, so below cache_len a key's position is its slot (visible_keys).
Per family: Qwen3 normalises each head's q and k (qk_norm), Mixtral's feed-forward is a mixture of experts (moe.py).

The cache: every layer owns two buffers, k and v [B, n_kv_heads, max_seq_len, head_dim], written with index_put_,
which inductor lowers in place. (A scatter_, or any write into views of one shared [n_layers, ...] buffer whose
base is mutated elsewhere in the graph, makes compiled forwards clone and copy back whole cache slices.)
kv_len (a Python int, fixed per compiled graph) bounds the keys the sdpa backend reads to slots [0, kv_len): the
caller passes a bucket >= cache_len + W, so attention costs grow with the live context, not with max_seq_len
(default: the whole cache). The triton backend reads only [0, cache_len + W) by itself and ignores kv_len.
`forward` returns the final-normed hidden state (exactly the LM head's input, the feature EAGLE-1/2 heads consume);
`logits(hidden)` applies the LM head. Rotary embeddings use the Hugging Face (rotate-half) layout.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasteagle.linear import (PACKED_MIN_ROWS, FusedInput, Linear, measure_packed_rows, pack_linears, pack_weight,
                              packed_linear)
from fasteagle.moe import MoEFeedForward


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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    sliding_window: int | None = None  # Mistral: query at position p sees keys at positions > p - sliding_window
    n_experts: int = 0  # Mixtral: a mixture-of-experts feed-forward (moe.py) with this many experts
    n_experts_per_tok: int = 2
    arch: str = "llama"  # llama | mistral | qwen2 | qwen3 | mixtral (informational: all share this code path)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def draft_layer(self) -> "ModelArgs":
        """The args of a draft head's one decoder layer for this target: the same shapes, but a plain dense LLaMA
        layer (no experts, no q/k norm, full attention), as the EAGLE heads of these targets are."""
        return ModelArgs.from_dict({**self.to_dict(), "n_layers": 1, "qk_norm": False, "sliding_window": None,
                                    "n_experts": 0})


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
    """One layer's static cache: buffers k, v [B, n_kv_heads, max_seq_len, head_dim] of its own."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """slots: [B, T], row b's new entries go to slots[b]; k, v: [B, Hkv, T, D]. index_put_, not scatter_:
        inductor writes it in place (a scatter_ clones the whole buffer and copies it back)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, slots] = k.transpose(1, 2)
        self.v[rows, :, slots] = v.transpose(1, 2)


def visible_keys(cache_len: torch.Tensor, attn_mask: torch.Tensor, n_keys: int, positions: torch.Tensor | None = None,
                 window: int = 0) -> torch.Tensor:
    """Which of the cache slots [0, n_keys) each query may attend to: [B, 1, T, n_keys] bool.

    cache_len: [B] int64. attn_mask: [T, W] or [B, T, W] bool over the key block [cache_len, cache_len + W)
    (row = query, col = key); every slot below cache_len is visible, every slot past the block is not.
    window (sliding-window attention; needs W == T and positions [B, T]): a query at position p also sees only keys
    at positions > p - window. A key's position is its slot below cache_len (the committed context sits in order)
    and the position of the new token written there inside the block."""
    T, W = attn_mask.shape[-2:]
    B = cache_len.shape[0]
    if attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0).expand(B, T, W)
    slot = torch.arange(n_keys, device=cache_len.device)
    rel = slot[None, :] - cache_len[:, None]  # [B, S]: slot index relative to the key block
    in_block = (rel >= 0) & (rel < W)
    block = torch.gather(attn_mask, 2, rel.clamp(0, W - 1)[:, None, :].expand(-1, T, -1))  # [B, T, S]
    visible = (rel < 0)[:, None, :] | (in_block[:, None, :] & block)
    if window:
        if W != T or positions is None:
            raise ValueError("a sliding window needs the query positions and a key block of the new tokens (W == T)")
        positions = positions.expand(B, T)
        key_pos = torch.where(rel < 0, slot[None, :], torch.gather(positions, 1, rel.clamp(0, T - 1)))  # [B, S]
        visible = visible & (positions[:, :, None] - key_pos[:, None, :] < window)
    return visible.unsqueeze(1)


class Attention(FusedInput):
    def __init__(self, args: ModelArgs, in_dim: int | None = None):
        """in_dim: the width q, k and v read (default args.dim; EAGLE-3's draft layer reads 2 * dim)."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        in_dim = in_dim or args.dim
        self.wq = Linear(in_dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = Linear(in_dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = Linear(in_dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qk_norm = args.qk_norm
        if args.qk_norm:  # Qwen3: per-head RMSNorm of q and k (weights [head_dim]), before RoPE
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.window = args.sliding_window or 0
        self.kv_cache: KVCache | None = None
        self.backend = "sdpa"

    def forward(self, x, cos_sin, slots, cache_len, attn_mask, visible, positions=None):
        """visible: the sdpa mask (model.visible_keys, the sliding window applied); positions [B, T]: the triton
        kernel's window needs them."""
        B, T, _ = x.shape
        q, k, v = self.group_outputs(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        dtype = self.kv_cache.dtype or q.dtype  # fp64: CPU-quantized, fallback kernel (Transformer.kv_dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        self.kv_cache.write(slots, k, v)
        if self.backend == "triton":
            from fasteagle.kernels.tree_attention import tree_attention

            out = tree_attention(q, self.kv_cache.k, self.kv_cache.v, cache_len, attn_mask,
                                 positions=positions if self.window else None, window=self.window)
        else:
            S = visible.shape[-1]  # the key window [0, S)
            out = F.scaled_dot_product_attention(
                q, self.kv_cache.k[:, :, :S], self.kv_cache.v[:, :, :S], attn_mask=visible,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1).to(x.dtype))

    def group(self):
        return [self.wq, self.wk, self.wv]


class FeedForward(FusedInput):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x):
        gate, up = self.group_outputs(x)
        return self.w2(F.silu(gate) * up)

    def group(self):
        return [self.w1, self.w3]


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, input_norm: bool = True):
        super().__init__()
        self.attn = Attention(args)
        self.mlp = MoEFeedForward(args) if args.n_experts else FeedForward(args)
        # The EAGLE-1/2 draft layer has no input norm: its input is the fc projection.
        self.attn_norm = RMSNorm(args.dim, args.norm_eps) if input_norm else nn.Identity()
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos_sin, slots, cache_len, attn_mask, visible, positions=None):
        h = x + self.attn(self.attn_norm(x), cos_sin, slots, cache_len, attn_mask, visible, positions)
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

    def forward(self, tokens, positions, cache_len, attn_mask, kv_len: int | None = None, taps: tuple = ()):
        """tokens, positions: [B, T] int64; cache_len: [B] int64; attn_mask: [T, W] or [B, T, W] bool, W >= T;
        kv_len: attend over slots [0, kv_len) only (>= cache_len + W; None: the whole cache).
        Returns the final-normed hidden state [B, T, dim]; with taps (layer indices, EAGLE-3's features) also the
        residual stream entering those layers, concatenated in order: (hidden, [B, T, len(taps) * dim])."""
        x = run_layers(self, self.embed(tokens), positions, cache_len, attn_mask, kv_len, taps)
        return (self.norm(x[0]), x[1]) if taps else self.norm(x)

    quantization = None  # {"mode", "group_size"} when the projections and LM head are quantized (fasteagle.quant)
    kv_dtype = None  # the KV cache's and attention's dtype when not the weights' (fasteagle.quant.prepare_model)
    tp = None  # fasteagle.tp.TP when this is one rank's shard (tensor parallelism)

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's [vocab, dim] weight, dense (a quantized target's: dequantized; tied: the embedding)."""
        return self.embed.weight if self.args.tie_embeddings else self.output.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantization is not None:
            return self.output(hidden).float()
        return packed_linear(hidden, self.lm_head_weight(), self.lm_head_packed).float()

    lm_head_packed = None

    def pack(self, rows: int = 8) -> bool:
        """CPU: pack the layers' and the LM head's weights for multi-row inputs (see Linear), and measure from how many
        rows the packed weights are faster on this machine (linear.measure_packed_rows, once). Idempotent."""
        if not pack_linears(self, rows):
            return False
        if self.lm_head_packed is None:
            self.lm_head_packed = pack_weight(self.lm_head_weight(), rows)
        if torch.get_num_threads() not in PACKED_MIN_ROWS:  # once per process and thread count
            measure_packed_rows(self)
        return True


def setup_static_cache(model: nn.Module, max_seq_len: int, batch: int = 1, attn_backend: str = "sdpa"):
    """Preallocate `model`'s KV cache (its dtype and device) and RoPE table; `model` has .args, .layers, .embed
    (the target) or an embedding-sized weight to copy dtype/device from (the draft head).
    attn_backend: "sdpa" (PyTorch, dense mask over the key window [0, kv_len); any device) or "triton"
    (the tree-attention kernel, which reads only slots [0, cache_len + W); CUDA).
    Each layer gets a KVCache of its own (layer.attn.kv_cache; all of them: kv_caches(model))."""
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be positive")
    if attn_backend not in ("sdpa", "triton"):
        raise ValueError(f"unknown attention backend {attn_backend!r}")
    a = model.args
    p = next(model.layers.parameters())
    dtype = getattr(model, "kv_dtype", None) or p.dtype
    for layer in model.layers:  # the layer's own KV heads (fewer than the model's under tensor parallelism)
        layer.attn.kv_cache = KVCache((batch, layer.attn.n_kv_heads, max_seq_len, a.head_dim), dtype, p.device)
        layer.attn.backend = attn_backend
    model.register_buffer("rope", rope_cache(a, max_seq_len).to(p.device), persistent=False)
    model.max_seq_len = max_seq_len
    model.attn_backend = attn_backend


def kv_caches(model: nn.Module) -> list[KVCache]:
    return [layer.attn.kv_cache for layer in model.layers]


def run_layers(model: nn.Module, x, positions, cache_len, attn_mask, kv_len: int | None = None, taps: tuple = ()):
    """Run `model.layers` over x [B, T, dim] with the static cache; see the module docstring for the mask and kv_len
    (clamped to the cache size, so that one window serves the target and the draft head's larger cache).
    taps: also return the inputs of those layers (index n_layers: the last layer's output), concatenated in layer
    order: (x, [B, T, len(taps) * dim])."""
    T, W = x.shape[1], attn_mask.shape[-1]
    # The T new tokens occupy the last T slots of the key block [cache_len, cache_len + W).
    slots = cache_len[:, None] + (W - T) + torch.arange(T, device=x.device)[None, :]
    S = model.max_seq_len if kv_len is None else min(kv_len, model.max_seq_len)
    window = model.args.sliding_window or 0
    visible = None if model.attn_backend == "triton" else visible_keys(cache_len, attn_mask, S, positions, window)
    if visible is not None and x.device.type == "cpu":  # CPU SDPA runs faster on an additive mask (same result)
        dtype = getattr(model, "kv_dtype", None) or x.dtype
        visible = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    cos_sin = model.rope[positions]
    tapped = []
    for i, layer in enumerate(model.layers):
        if i in taps:
            tapped.append(x)
        x = layer(x, cos_sin, slots, cache_len, attn_mask, visible, positions)
    if len(model.layers) in taps:  # the stream after the last layer (before any final norm)
        tapped.append(x)
    return (x, torch.cat(tapped, -1)) if taps else x


MIN_WINDOW = 128  # the smallest key window (kv_len) the engine gives a step


def buckets(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... below hi, then hi: the fixed lengths (prompt buckets, key windows) compiled graphs are
    specialised to."""
    out = []
    while lo < hi:
        out.append(lo)
        lo *= 2
    return out + [hi]


def causal_mask(T: int, device=None) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()
