"""llama-architecture GGUF (llama.cpp) -> fasteagle checkpoint.

Tensors are dequantized to float with gguf-py's reference dequantizers. llama.cpp's converter permutes the rows of
attn_q / attn_k into the interleaved rope layout; we undo that per head (n_heads for Q, n_kv_heads for K) to get the
rotate-half layout model.py uses. Without it the model still produces plausible text, but worse logits."""
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
]
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
    if arch != "llama":
        raise FastEagleError(f"{where}: unsupported GGUF architecture {arch!r} (supported: 'llama')")

    def need(key):
        v = field(reader, f"llama.{key}")
        if v is None:
            raise FastEagleError(f"{where}: GGUF metadata lacks llama.{key}")
        return v

    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(field(reader, "llama.attention.key_length", dim // n_heads if n_heads else 0))
    rope_dims = field(reader, "llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise FastEagleError(f"{where}: partial rotary embeddings (rope.dimension_count {rope_dims} != head_dim "
                             f"{head_dim}) are not supported")
    scaling_type = field(reader, "llama.rope.scaling.type", "none")
    if scaling_type not in ("none", "llama3"):
        raise FastEagleError(f"{where}: rope scaling type {scaling_type!r} is not supported (supported: none, llama3)")
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = array_len(reader, "tokenizer.ggml.tokens") or field(reader, "llama.vocab_size") or (
        int(embd.shape[1]) if embd is not None else 0)
    args = ModelArgs(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        intermediate_size=int(need("feed_forward_length")),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field(reader, "llama.context_length", 4096)),
        tie_embeddings="output.weight" not in names,
        arch="llama",
    )
    check_args(args, where)
    if ROPE_FREQS in names:
        t = next(t for t in reader.tensors if t.name == ROPE_FREQS)
        factors = _gguf().quants.dequantize(t.data, t.tensor_type).reshape(-1)
        orig = field(reader, "llama.rope.scaling.original_context_length")
        args.rope_scaling = _llama3_scaling(factors, args, orig, where)
    return args


def read_gguf_state(reader, args: ModelArgs, dtype: torch.dtype, where: str) -> tuple[dict, dict, Counter]:
    """Dequantized, renamed, Q/K-un-permuted tensors. Returns (state, our name -> GGUF name, tensor type counts)."""
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
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise FastEagleError(f"{where}: tensor {t.name} has type {t.tensor_type.name}, which gguf-py cannot "
                                 f"dequantize") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # copy: the reader's arrays map the file read-only
        if ours.endswith("attn.wq.weight"):
            w = interleaved_to_half(w, args.n_heads)
        elif ours.endswith("attn.wk.weight"):
            w = interleaved_to_half(w, args.n_kv_heads)
        state[ours], origin[ours] = w.to(dtype), t.name
        types[t.tensor_type.name] += 1
    if unknown:
        raise FastEagleError(f"{where}: unexpected tensors for the llama architecture: {', '.join(unknown[:8])}")
    return state, origin, types


def convert_gguf(src, out_dir, dtype: str | None = None, tokenizer=None, source: dict | None = None) -> Path:
    """Convert a llama-architecture GGUF file. dtype default float32 (dequantized values are exact in fp32).
    tokenizer: an HF tokenizer directory to use instead of the tokenizer in the GGUF metadata.
    source: extra entries for config.json's "source" (e.g. where the file was downloaded from)."""
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
    state, origin, types = read_gguf_state(reader, args, torch_dtype, where)
    if tokenizer:
        export = lambda d: tok.export_tokenizer_hf(Path(tokenizer), d)  # noqa: E731
    else:
        export = lambda d: tok.export_tokenizer_gguf(src, d)  # noqa: E731
    source = {"type": "gguf", "path": str(src.resolve()), "name": field(reader, "general.name"),
              "tensor_types": dict(types), **(source or {})}
    return write_target(out_dir, args, state, torch_dtype, export, source, origin)
