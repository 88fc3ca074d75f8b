"""Model shapes for random-weight benchmarks, memory-bandwidth peaks by GPU name, and the byte accounting that turns
a measured time into a fraction of the bandwidth roofline.

Batch-1 decoding is memory bound: one target forward reads every weight once (the LM head included, the input
embedding only a row per token) plus the live part of the KV cache. bytes / time / peak says how close a step gets
to the roofline; it is computed only on CUDA, where the peak is known.
"""
import json
import re

import torch

from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

# Real model sizes (from each model's config.json); weights are random in the benchmark.
SHAPES = {
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                       intermediate_size=11008, rope_theta=10000.0, max_position_embeddings=4096),
    "vicuna-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, head_dim=128,
                       intermediate_size=13824, rope_theta=10000.0, max_position_embeddings=4096),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                       intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         intermediate_size=14336, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                         max_position_embeddings=131072),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                         intermediate_size=8192, rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling={**_LLAMA31_ROPE, "factor": 32.0}, max_position_embeddings=131072),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                         intermediate_size=1536, rope_theta=100000.0, tie_embeddings=True,
                         max_position_embeddings=8192),
    "mistral-7b-v0.1": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                            intermediate_size=14336, rope_theta=10000.0, max_position_embeddings=32768,
                            sliding_window=4096, arch="mistral"),
    "mixtral-8x7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         intermediate_size=14336, rope_theta=1e6, max_position_embeddings=32768, n_experts=8,
                         n_experts_per_tok=2, arch="mixtral"),
    # Mixtral's expert layout (8 experts, top-2, GQA 4) at 1/4 of its width and 1/4 of its depth: fits a CPU
    "mixtral-8x7b-quarter": dict(vocab_size=32000, dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=128,
                                 intermediate_size=3584, rope_theta=1e6, max_position_embeddings=32768, n_experts=8,
                                 n_experts_per_tok=2, arch="mixtral"),
    "qwen3-8b": dict(vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     intermediate_size=12288, rope_theta=1e6, max_position_embeddings=40960, qk_norm=True,
                     arch="qwen3"),
    "smollm2-1.7b": dict(vocab_size=49152, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, head_dim=64,
                         intermediate_size=8192, rope_theta=130000.0, tie_embeddings=True,
                         max_position_embeddings=8192),
    # the 70B targets of EAGLE's tensor-parallel results (one rank's share: "llama-2-70b/tp8", shape_args)
    "llama-2-70b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                        intermediate_size=28672, rope_theta=10000.0, max_position_embeddings=4096),
    "llama-3.1-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                          intermediate_size=28672, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                          max_position_embeddings=131072),
    # for tests and a quick look on CPU
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                 max_position_embeddings=2048),
}
SHAPES["vicuna-7b"] = SHAPES["llama-2-7b"]  # EAGLE's main benchmark model: Llama-2-7B's shape

# Peak DRAM bandwidth (bytes/s, vendor spec sheets) by CUDA device name; first match wins, so specific names
# (PCIe / NVL variants, GH200) come before the generic ones.
PEAK_BANDWIDTH = [
    (r"GH200", 4.0e12),
    (r"H200", 4.8e12),
    (r"H100.*PCIe", 2.0e12),
    (r"H100.*NVL", 3.9e12),
    (r"H100", 3.35e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H800.*PCIe", 2.0e12),
    (r"H800", 3.35e12),
    (r"A100.*80GB.*PCIe|A100.*PCIe.*80GB", 1.935e12),
    (r"A100.*80GB", 2.039e12),
    (r"A100", 1.555e12),  # 40GB
    (r"A800.*80GB", 2.039e12),
    (r"L40S", 0.864e12),
    (r"L40", 0.864e12),
    (r"\bL4\b", 0.300e12),
    (r"A10G", 0.600e12),
    (r"\bA10\b", 0.600e12),
    (r"RTX 4090", 1.008e12),
    (r"RTX 3090", 0.936e12),
    (r"RTX A6000", 0.768e12),
    (r"RTX 6000 Ada", 0.960e12),
    (r"V100", 0.900e12),
    (r"\bT4\b", 0.320e12),
]


def peak_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth in bytes/s for a CUDA device name, or None when the device is not in the table."""
    for pattern, bw in PEAK_BANDWIDTH:
        if re.search(pattern, device_name, re.IGNORECASE):
            return bw
    return None


def rank_share(args: ModelArgs, world: int) -> ModelArgs:
    """The layers one rank of `world`-way tensor parallelism computes (fasteagle.tp), as a model of its own: 1/world
    of the heads, KV heads and feed-forward features, the whole embedding and LM head. Timing it on one GPU gives a
    rank's step without the all-reduces (2 per layer)."""
    from fasteagle.tp import check

    check(args, world)
    return ModelArgs.from_dict({**args.to_dict(), "n_heads": args.n_heads // world,
                                "n_kv_heads": args.n_kv_heads // world,
                                "intermediate_size": args.intermediate_size // world})


def shape_args(shape: str) -> tuple[str, ModelArgs]:
    """A preset name (SHAPES), one rank's share of it under N-way tensor parallelism ("NAME/tpN", rank_share), or a
    JSON object of ModelArgs fields (e.g. '{"dim": 64, "n_layers": 2, ...}'; missing fields take ModelArgs'
    defaults, i.e. Llama-2-7B's). Returns (name, ModelArgs)."""
    if shape in SHAPES:
        return shape, ModelArgs(**SHAPES[shape])
    name, _, tp = shape.partition("/tp")
    if name in SHAPES and tp.isdigit() and int(tp) >= 1:
        return shape, rank_share(ModelArgs(**SHAPES[name]), int(tp))
    if shape.lstrip().startswith("{"):
        try:
            d = json.loads(shape)
            args = ModelArgs.from_dict(d)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise FastEagleError(f"--shape: not a valid JSON model shape ({e})") from None
        if args.n_heads % args.n_kv_heads:
            raise FastEagleError("--shape: n_heads must be a multiple of n_kv_heads")
        return "custom", args
    raise FastEagleError(f"--shape: unknown shape {shape!r} (known: {', '.join(SHAPES)}, or a JSON object)")


def weight_bytes_per_forward(model: torch.nn.Module, tokens: int = 1) -> int:
    """Bytes of weights one batch-1 forward of `tokens` tokens of the target reads: every stored weight (a quantized
    target's: its int8 / int4 tensors and scales), except an untied input embedding (only one row per token is
    gathered; a tied one is read whole by the LM head), and of a mixture of experts' stacked expert weights the
    min(tokens x k, E) expert slices it evaluates (moe.py)."""
    a = model.args
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if not a.tie_embeddings:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    if a.n_experts:
        experts = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                      if k.endswith((".mlp.w1", ".mlp.w2", ".mlp.w3")))
        total -= experts - experts * min(tokens * a.n_experts_per_tok, a.n_experts) // a.n_experts
    return total


def kv_bytes_per_forward(args: ModelArgs, element_size: int, live_len: float) -> float:
    """Bytes of K and V one forward reads when attending over live_len cache slots."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * live_len * element_size
