"""A LLaMA-family transformer with a static KV cache (Llama-2/3/3.1, Vicuna, Mistral, Qwen2, SmolLM2).

One forward serves prefill, decode, tree verification and batched data generation:

    hidden = model(tokens[B, T], positions[B, T], cache_len[B], attn_mask[T, W] or [B, T, W], kv_len=None)  (W >= T)

The key block is the W cache slots [cache_len[b], cache_len[b] + W); the new K/V of the T query tokens are written
to its last T slots (W == T except for the draft head's tree steps, whose queries also see earlier tree levels).
Query i of row b sees every slot j < cache_len[b] plus the block slots where attn_mask[i, j - cache_len[b]] is
true: a causal mask for prefill/decode, the tree's ancestor mask for verification. Positions (for RoPE) are independent of slots,
so a tree node at depth d sits at position cache_len + d while occupying slot cache_len + its index.

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
import warnings
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


class Linear(nn.Linear):
    """nn.Linear, plus optional CPU fast paths (both opt-in, set by the engine on CPU):

    - packed: at batch 1 a CPU step streams every weight from memory; MKL's GEMM for a few rows repacks each weight
      on every call and costs about twice its GEMV (measured on 2 AVX2 cores: 8 rows ~2.6x one row over SmolLM2's
      weights). `pack_linears` gives each layer a oneDNN copy of its weight, packed once: multi-row inputs (tree
      verification) then cost ~1.2x one row, and one row is ~10% faster too with 2 threads (packed_linear).
      Doubles the weights' memory.
    - qpacked: an int8 copy (quantize_linears), for the draft head only (quantize_weight)."""

    packed = None  # oneDNN-packed weight (plain attribute: not saved, not moved)
    qpacked = None  # int8 copy for torch's dynamic quantized linear (quantize_linears): used for every input

    def forward(self, x):
        if self.qpacked is not None:
            return quantized_linear(x, self.qpacked)
        return packed_linear(x, self.weight, self.packed, self.bias)


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """The oneDNN-packed copy of a [out, in] fp32 CPU weight, tuned for inputs of `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def pack_linears(model: nn.Module, rows: int = 8) -> bool:
    """Give every `Linear` of model a packed weight (see Linear), the projections that read the same input (an
    attention's wq, wk, wv; a feed-forward's gate and up) one packed weight per group (FusedInput); False (nothing
    done) off CPU / fp32 / oneDNN."""
    mods = [m for m in model.modules() if isinstance(m, Linear)]
    if not mods or not can_pack(mods[0].weight):
        return False
    grouped = set()
    for m in model.modules():
        if isinstance(m, FusedInput):
            m.pack_group(rows)
            grouped.update(m.group())
    for m in mods:
        if m.packed is None and m not in grouped:
            m.packed = pack_weight(m.weight, rows)
    return True


PACKED_ONE_ROW_MIN_THREADS = 2


def use_packed(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    """Whether an eager CPU linear on x takes its packed weight: for multi-row inputs always, for one row with
    PACKED_ONE_ROW_MIN_THREADS threads or more (measured on 2 AVX2 cores: oneDNN's packed GEMV beats MKL's sgemv
    with 2 threads, loses to it with 1). Never while compiling (inductor: the plain linear)."""
    return (packed is not None and not torch.compiler.is_compiling()
            and (x.numel() > x.shape[-1] or torch.get_num_threads() >= PACKED_ONE_ROW_MIN_THREADS))


def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the packed copy when use_packed says so."""
    if use_packed(x, packed):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class FusedInput(nn.Module):
    """A module whose `group()` of Linears all read the same input. On CPU the group gets one packed weight
    (pack_linears) or one int8 copy (quantize_linears), their rows stacked: one call instead of three (q, k, v) or
    two (gate, up). Each call has a fixed cost (~50-80 us on 2 cores) that dominates SmolLM2's small GEMMs, more so
    for the few-row inputs of tree verification (measured on SmolLM2-135M, 2 threads: verify(3) 1.21x -> 1.13x the
    one-token step). The members keep their own weights: checkpoints, GPU and compiled forwards are unchanged."""

    group_packed = None  # [sum of the group's out features, in], oneDNN-packed (pack_group); plain attribute
    group_qpacked = None  # the same rows as int8 (quantize_group)
    group_bias = None
    group_linear = None  # a quantized target's stacked projection (quant.prepare_model), used on every device

    def group(self) -> list[Linear]:
        raise NotImplementedError

    def _stacked(self):
        mods = self.group()
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        return torch.cat([m.weight.detach() for m in mods]), bias

    def pack_group(self, rows: int):
        if self.group_packed is None:
            w, self.group_bias = self._stacked()
            self.group_packed = pack_weight(w, rows)

    def quantize_group(self, min_numel: int):
        w, bias = self._stacked()
        if self.group_qpacked is None and w.numel() >= min_numel:
            self.group_qpacked = quantize_weight(w, bias)

    def group_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[m(x) for m in group()], in one call when there is a stacked copy to take (int8 first)."""
        mods = self.group()
        if self.group_linear is not None:
            y = self.group_linear(x)
        elif self.group_qpacked is not None:
            y = quantized_linear(x, self.group_qpacked)
        elif use_packed(x, self.group_packed):
            y = torch.ops.mkldnn._linear_pointwise(x, self.group_packed, self.group_bias, "none", [], "")
        else:
            return [m(x) for m in mods]
        return y.split([m.out_features for m in mods], dim=-1)


def can_quantize(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.quantized.engine in ("x86", "fbgemm"))


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """An int8 copy of a [out, in] fp32 CPU weight (one scale per output row), prepacked for torch's dynamic
    quantized linear: activations are quantized per call, products accumulate in int32. A quarter of the fp32
    weight's bytes, so a memory-bound CPU GEMV runs ~2-5x faster, at ~1-2% relative error: for the draft head
    only, whose output just proposes tokens (verification by the fp32 target keeps generation lossless)."""
    w = weight.detach()
    scale = (w.abs().amax(1).double() / 127).clamp(min=1e-12)
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the op itself is the supported
        warnings.simplefilter("ignore")  # path to fbgemm's int8 GEMM
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach())


def quantized_linear(x: torch.Tensor, qpacked) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, qpacked, True)


QUANTIZE_MIN_NUMEL = 1 << 16


def quantize_linears(model: nn.Module, min_numel: int = QUANTIZE_MIN_NUMEL) -> bool:
    """Give every `Linear` of model with at least min_numel weights an int8 copy (quantize_weight), used for all
    its inputs from then on; a FusedInput's group gets one stacked copy instead. Smaller weights stay fp32: the
    dynamic op's per-call quantization costs more than the bytes it saves there (measured: a 64 x 32 weight takes
    44 us in int8 vs 8 us in fp32). Returns whether any weight was quantized. dequantize_linears undoes it."""
    mods = [m for m in model.modules() if isinstance(m, Linear)]
    if not mods or not can_quantize(mods[0].weight):
        return False
    grouped = set()
    for m in model.modules():
        if isinstance(m, FusedInput):
            m.quantize_group(min_numel)
            grouped.update(m.group())
    for m in mods:
        if m.qpacked is None and m not in grouped and m.weight.numel() >= min_numel:
            m.qpacked = quantize_weight(m.weight, m.bias)
    return any(m.qpacked is not None for m in mods) or any(
        isinstance(m, FusedInput) and m.group_qpacked is not None for m in model.modules())


def dequantize_linears(model: nn.Module):
    """Drop the int8 copies quantize_linears made."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.qpacked = None
        if isinstance(m, FusedInput):
            m.group_qpacked = None


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

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """slots: [B, T], row b's new entries go to slots[b]; k, v: [B, Hkv, T, D]. index_put_, not scatter_:
        inductor writes it in place (a scatter_ clones the whole buffer and copies it back)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, slots] = k.transpose(1, 2)
        self.v[rows, :, slots] = v.transpose(1, 2)


def visible_keys(cache_len: torch.Tensor, attn_mask: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Which of the cache slots [0, n_keys) each query may attend to: [B, 1, T, n_keys] bool.

    cache_len: [B] int64. attn_mask: [T, W] or [B, T, W] bool over the key block [cache_len, cache_len + W)
    (row = query, col = key); every slot below cache_len is visible, every slot past the block is not."""
    T, W = attn_mask.shape[-2:]
    if attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0).expand(cache_len.shape[0], T, W)
    slot = torch.arange(n_keys, device=cache_len.device)
    rel = slot[None, :] - cache_len[:, None]  # [B, S]: slot index relative to the key block
    in_block = (rel >= 0) & (rel < W)
    block = torch.gather(attn_mask, 2, rel.clamp(0, W - 1)[:, None, :].expand(-1, T, -1))  # [B, T, S]
    visible = (rel < 0)[:, None, :] | (in_block[:, None, :] & block)
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
        self.kv_cache: KVCache | None = None
        self.backend = "sdpa"

    def forward(self, x, cos_sin, slots, cache_len, attn_mask, visible):
        B, T, _ = x.shape
        q, k, v = self.group_outputs(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        self.kv_cache.write(slots, k, v)
        if self.backend == "triton":
            from fasteagle.kernels.tree_attention import tree_attention

            out = tree_attention(q, self.kv_cache.k, self.kv_cache.v, cache_len, attn_mask)
        else:
            S = visible.shape[-1]  # the key window [0, S)
            out = F.scaled_dot_product_attention(
                q, self.kv_cache.k[:, :, :S], self.kv_cache.v[:, :, :S], attn_mask=visible,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

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

    def forward(self, tokens, positions, cache_len, attn_mask, kv_len: int | None = None, taps: tuple = ()):
        """tokens, positions: [B, T] int64; cache_len: [B] int64; attn_mask: [T, W] or [B, T, W] bool, W >= T;
        kv_len: attend over slots [0, kv_len) only (>= cache_len + W; None: the whole cache).
        Returns the final-normed hidden state [B, T, dim]; with taps (layer indices, EAGLE-3's features) also the
        residual stream entering those layers, concatenated in order: (hidden, [B, T, len(taps) * dim])."""
        x = run_layers(self, self.embed(tokens), positions, cache_len, attn_mask, kv_len, taps)
        return (self.norm(x[0]), x[1]) if taps else self.norm(x)

    quantization = None  # {"mode", "group_size"} when the projections and LM head are quantized (fasteagle.quant)

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's [vocab, dim] weight, dense (a quantized target's: dequantized; tied: the embedding)."""
        return self.embed.weight if self.args.tie_embeddings else self.output.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantization is not None:
            return self.output(hidden).float()
        return packed_linear(hidden, self.lm_head_weight(), self.lm_head_packed).float()

    lm_head_packed = None

    def pack(self, rows: int = 8) -> bool:
        """CPU: pack the layers' and the LM head's weights for multi-row inputs (see Linear). Idempotent."""
        if not pack_linears(self, rows):
            return False
        if self.lm_head_packed is None:
            self.lm_head_packed = pack_weight(self.lm_head_weight(), rows)
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
    for layer in model.layers:
        layer.attn.kv_cache = KVCache((batch, a.n_kv_heads, max_seq_len, a.head_dim), p.dtype, p.device)
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
    visible = None if model.attn_backend == "triton" else visible_keys(cache_len, attn_mask, S)
    if visible is not None and x.device.type == "cpu":  # CPU SDPA runs faster on an additive mask (same result)
        visible = torch.zeros(visible.shape, dtype=x.dtype).masked_fill_(~visible, float("-inf"))
    cos_sin = model.rope[positions]
    tapped = []
    for i, layer in enumerate(model.layers):
        if i in taps:
            tapped.append(x)
        x = layer(x, cos_sin, slots, cache_len, attn_mask, visible)
    if len(model.layers) in taps:  # the stream after the last layer (before any final norm)
        tapped.append(x)
    return (x, torch.cat(tapped, -1)) if taps else x


def causal_mask(T: int, device=None) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()
