"""GGUF (llama.cpp) -> fasteagle checkpoint, for the architectures whose tensors map one to one onto model.py:
llama (Llama, Mistral, and Mixtral with its stacked experts), qwen2 (q/k/v biases), qwen3 (q/k norms).

Tensors are dequantized to float with gguf-py's reference dequantizers. For the llama architecture llama.cpp's
converter permutes the rows of attn_q / attn_k into the interleaved rope layout; we undo that per head (n_heads for
Q, n_kv_heads for K) to get the rotate-half layout model.py uses (without it the model still produces plausible
text, but worse logits). qwen2/qwen3 keep the rotate-half ("neox") layout and are not permuted."""
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fasteagle.convert.common import (
    check_args, check_out_dir, interleaved_to_half, parse_dtype, progress, write_target,
)
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs, rope_inv_freq

_RENAMES = [
    (r"token_embd\.weight", "embed.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "output.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.attn_norm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"layers.\1.attn.wq.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"layers.\1.attn.wk.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"layers.\1.attn.wv.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"layers.\1.attn.wo.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"layers.\1.mlp.w1.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"layers.\1.mlp.w3.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"layers.\1.mlp.w2.weight"),
    (r"blk\.(\d+)\.attn_([qkv])\.bias", r"layers.\1.attn.w\2.bias"),  # qwen2
    (r"blk\.(\d+)\.attn_([qk])_norm\.weight", r"layers.\1.attn.\2_norm.weight"),  # qwen3
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", r"layers.\1.mlp.gate.weight"),  # Mixtral: the router,
    (r"blk\.(\d+)\.ffn_gate_exps\.weight", r"layers.\1.mlp.w1"),  # and the experts, stacked [E, ...] as in moe.py
    (r"blk\.(\d+)\.ffn_up_exps\.weight", r"layers.\1.mlp.w3"),
    (r"blk\.(\d+)\.ffn_down_exps\.weight", r"layers.\1.mlp.w2"),
]
ARCHITECTURES = ("llama", "qwen2", "qwen3")
_RENAMES = [(re.compile(p + "$"), r) for p, r in _RENAMES]
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1 rope scaling, stored by llama.cpp as per-frequency divisors


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FastEagleError("converting GGUF files needs the `gguf` package: pip install 'gguf>=0.10'") from None
    return gguf


def open_gguf(path: Path):
    """GGUFReader with truncation/corruption turned into FastEagleError."""
    gguf = _gguf()
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise FastEagleError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader fails in many ways (ValueError, IndexError, ...) on damaged files
        raise FastEagleError(f"{path}: cannot read GGUF file (truncated or corrupt?): {e}") from None
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise FastEagleError(f"{path}: truncated GGUF file: tensor data needs {end} bytes, the file has {size}")
    return reader


def field(reader, key: str, default=None):
    """A scalar or string metadata value (own decoding so it works across gguf-py versions)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    gguf = _gguf()
    main = f.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        raise FastEagleError(f"GGUF metadata {key} is an array (per-layer values are not supported)")
    part = f.parts[f.data[0]]
    if main == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def array_len(reader, key: str) -> int | None:
    f = reader.fields.get(key)
    return None if f is None else len(f.data)


def _llama3_scaling(factors: np.ndarray, base: ModelArgs, orig_ctx, where: str) -> dict | None:
    """Recover Llama-3.1 rope_scaling from llama.cpp's rope_freqs tensor (the per-frequency divisors f_i).

    Between the two wavelength cut-offs, 1/f = (1 - s)/factor + s with s = (orig_ctx/wavelen - low)/(high - low),
    i.e. s is affine in 1/wavelen; factor is max(f). Fitting that line over the in-between frequencies (Llama-3.x
    models have ~7) determines the curve; writing it with low_freq_factor = 1 gives back the published parameters.
    With fewer than two in-between frequencies, fall back to Llama-3's low 1 / high 4 / original context 8192.
    Either way, the result must reproduce every stored factor."""
    f = factors.astype(np.float64)
    if np.allclose(f, 1.0):
        return None
    factor = float(np.float32(f.max()))
    plain = ModelArgs(**{**base.to_dict(), "rope_scaling": None})
    inv_wavelen = rope_inv_freq(plain).double().numpy() / (2 * np.pi)
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    low, high, orig = 1.0, 4.0, float(orig_ctx or 8192)
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv_wavelen[mid], s, 1)  # s = a / wavelen + b, a = orig/(high-low), b = -low/(high-low)
        if b < 0:
            high, orig = 1 - 1 / b, -a / b
    # The fit is float; published values are round numbers (4, 8192).
    high = float(round(high)) if abs(high - round(high)) < 1e-3 else float(high)
    orig = int(round(orig)) if abs(orig - round(orig)) < 1e-3 * orig else float(orig)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": orig}
    scaled = rope_inv_freq(ModelArgs(**{**base.to_dict(), "rope_scaling": scaling})).double().numpy()
    implied = inv_wavelen * 2 * np.pi / scaled
    if implied.shape != f.shape or not np.allclose(implied, f, rtol=1e-4):
        raise FastEagleError(f"{where}: {ROPE_FREQS} is not a Llama-3.1 rope scaling curve; this rope variant is "
                             f"not supported")
    return scaling


def model_args_from_gguf(reader, where: str) -> ModelArgs:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise FastEagleError(f"{where}: unsupported GGUF architecture {arch!r} (supported: "
                             f"{', '.join(map(repr, ARCHITECTURES))})")

    def get(key, default=None):
        return field(reader, f"{arch}.{key}", default)

    def need(key):
        v = get(key)
        if v is None:
            raise FastEagleError(f"{where}: GGUF metadata lacks {arch}.{key}")
        return v

    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(get("attention.key_length", dim // n_heads if n_heads else 0))
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise FastEagleError(f"{where}: partial rotary embeddings (rope.dimension_count {rope_dims} != head_dim "
                             f"{head_dim}) are not supported")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "llama3"):
        raise FastEagleError(f"{where}: rope scaling type {scaling_type!r} is not supported (supported: none, llama3)")
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = array_len(reader, "tokenizer.ggml.tokens") or get("vocab_size") or (
        int(embd.shape[1]) if embd is not None else 0)
    n_experts = int(get("expert_count", 0) or 0)
    args = ModelArgs(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        intermediate_size=int(get("expert_feed_forward_length", 0) or need("feed_forward_length")),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_embeddings="output.weight" not in names,
        qkv_bias=any(n.endswith("attn_q.bias") for n in names),
        qk_norm=any(n.endswith("attn_q_norm.weight") for n in names),
        n_experts=n_experts,
        n_experts_per_tok=int(get("expert_used_count", 2)) if n_experts else 2,
        arch={"llama": "mixtral" if n_experts else "llama"}.get(arch, arch),
    )
    check_args(args, where)
    if ROPE_FREQS in names:
        t = next(t for t in reader.tensors if t.name == ROPE_FREQS)
        factors = _gguf().quants.dequantize(t.data, t.tensor_type).reshape(-1)
        orig = get("rope.scaling.original_context_length")
        args.rope_scaling = _llama3_scaling(factors, args, orig, where)
    return args


_PROJECTION = re.compile(r"layers\.\d+\.(attn\.w[qkvo]|mlp\.w[123])\.weight$")


def _lm_head_name(args: ModelArgs) -> str:
    return "embed.weight" if args.tie_embeddings else "output.weight"


def kept_quantization(reader, args: ModelArgs, where: str) -> dict:
    """The quantization entry of a --keep-quantized conversion: the projections' one GGUF type (Q4_0 / Q4_1 -> int4,
    Q8_0 -> int8, groups of 32), the LM head's own (another type: int8 per channel, requantized)."""
    from fasteagle.convert.gguf_quant import BLOCK, KEPT

    types, head = {}, None
    for t in reader.tensors:
        ours = next((p.sub(r, t.name) for p, r in _RENAMES if p.match(t.name)), None)
        if ours and _PROJECTION.match(ours):
            types.setdefault(t.tensor_type.name, t.name)
        elif ours == _lm_head_name(args):
            head = t.tensor_type.name
    if len(types) != 1 or next(iter(types)) not in KEPT:
        found = ", ".join(f"{k} ({v})" for k, v in types.items())
        raise FastEagleError(f"{where}: --keep-quantized needs every layer projection in one of "
                             f"{', '.join(KEPT)}; found {found} (convert without --keep-quantized to dequantize)")
    mode = KEPT[next(iter(types))][0]
    lm_head = {"mode": KEPT[head][0], "group_size": BLOCK} if head in KEPT else {"mode": "int8", "group_size": None}
    return {"mode": mode, "group_size": BLOCK, "lm_head": lm_head}


def _kept_tensor(t, ours: str, args: ModelArgs, permute: bool, where: str) -> dict | None:
    """A projection or LM-head tensor's quantized stores (Q/K rows un-permuted like the dense weights: the scales
    and codes of a row move with it), or None for tensors that are dequantized."""
    from fasteagle.convert.gguf_quant import KEPT, kept

    if not (_PROJECTION.match(ours) or ours == _lm_head_name(args)) or t.tensor_type.name not in KEPT:
        return None
    stores = kept(t.data, t.tensor_type.name, tuple(int(n) for n in t.shape[::-1]), f"{where}: {t.name}")
    if permute and ours.endswith(("attn.wq.weight", "attn.wk.weight")):
        heads = args.n_heads if ours.endswith("wq.weight") else args.n_kv_heads
        stores = {k: interleaved_to_half(v.transpose(0, 1), heads).transpose(0, 1).contiguous()
                  if k == "weight_scales_zeros" else interleaved_to_half(v, heads) for k, v in stores.items()}
    name = "output" if ours == _lm_head_name(args) else ours.removesuffix(".weight")
    return {f"{name}.{k}": v for k, v in stores.items()}


def read_gguf_state(reader, args: ModelArgs, dtype: torch.dtype, where: str,
                    quantization: dict | None = None) -> tuple[dict, dict, Counter]:
    """Dequantized, renamed, Q/K-un-permuted (llama architecture) tensors. Returns (state, our name -> GGUF name,
    tensor type counts). quantization (kept_quantization's): the projections and the LM head stay quantized where
    their type maps; an LM head of another type is requantized per channel to int8 (fasteagle.quant)."""
    from fasteagle.quant import quantize_int8

    permute = field(reader, "general.architecture") == "llama"
    quants = _gguf().quants
    state, origin, types = {}, {}, Counter()
    unknown = []
    for t in progress(reader.tensors, desc="dequantizing"):
        if t.name == ROPE_FREQS:
            continue
        ours = next((p.sub(r, t.name) for p, r in _RENAMES if p.match(t.name)), None)
        if ours is None:
            unknown.append(t.name)
            continue
        stores = _kept_tensor(t, ours, args, permute, where) if quantization else None
        if stores:
            state.update(stores)
            origin.update({k: t.name for k in stores})
            types[t.tensor_type.name] += 1
            continue
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise FastEagleError(f"{where}: tensor {t.name} has type {t.tensor_type.name}, which gguf-py cannot "
                                 f"dequantize") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # copy: the reader's arrays map the file read-only
        if permute and ours.endswith("attn.wq.weight"):
            w = interleaved_to_half(w, args.n_heads)
        elif permute and ours.endswith("attn.wk.weight"):
            w = interleaved_to_half(w, args.n_kv_heads)
        if quantization and ours == _lm_head_name(args):  # a type without a kept layout: int8 per channel
            state["output.weight_int8"], state["output.weight_scale"] = quantize_int8(w)
            origin.update({"output.weight_int8": t.name, "output.weight_scale": t.name})
            types[t.tensor_type.name] += 1
            continue  # (tied: the embedding is the LM head's dequantized table, not stored)
        state[ours], origin[ours] = w.to(dtype), t.name
        types[t.tensor_type.name] += 1
    if unknown:
        raise FastEagleError(f"{where}: unexpected tensors for the {field(reader, 'general.architecture')} "
                             f"architecture: {', '.join(unknown[:8])}")
    return state, origin, types


def convert_gguf(src, out_dir, dtype: str | None = None, tokenizer=None, source: dict | None = None,
                 keep_quantized: bool = False) -> Path:
    """Convert a GGUF file (llama, qwen2 or qwen3 architecture). dtype default float32 (dequantized values are exact
    in fp32). tokenizer: an HF tokenizer directory to use instead of the tokenizer in the GGUF metadata.
    source: extra entries for config.json's "source" (e.g. where the file was downloaded from).
    keep_quantized: Q4_0 / Q4_1 / Q8_0 projections and LM head stay quantized (gguf_quant.py): a quantized
    fasteagle checkpoint (fasteagle/quant.py) instead of a dense one."""
    from fasteagle import tokenizer as tok

    src = Path(src)
    if not src.exists():
        raise FastEagleError(f"{src}: no such file or directory")
    if not src.is_file():
        raise FastEagleError(f"{src}: not a GGUF file (it is a directory)")
    check_out_dir(out_dir)
    where = str(src)
    reader = open_gguf(src)
    args = model_args_from_gguf(reader, where)
    torch_dtype = parse_dtype(dtype, torch.float32)
    if keep_quantized and args.n_experts:
        raise FastEagleError(f"{where}: --keep-quantized does not support mixture-of-experts models")
    quantization = kept_quantization(reader, args, where) if keep_quantized else None
    state, origin, types = read_gguf_state(reader, args, torch_dtype, where, quantization)
    if tokenizer:
        export = lambda d: tok.export_tokenizer_hf(Path(tokenizer), d)  # noqa: E731
    else:
        export = lambda d: tok.export_tokenizer_gguf(src, d)  # noqa: E731
    source = {"type": "gguf", "path": str(src.resolve()), "name": field(reader, "general.name"),
              "tensor_types": dict(types), **(source or {})}
    return write_target(out_dir, args, state, torch_dtype, export, source, origin, quantization)
