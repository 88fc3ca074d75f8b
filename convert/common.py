"""Helpers every converter shares: the rope-layout permutation, shape checks against ModelArgs, and the one
function that writes a target checkpoint atomically."""
import sys
import warnings
from pathlib import Path

import torch

from fasteagle.checkpoint import atomic_output_dir, write_checkpoint
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs, Transformer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConversionWarning(UserWarning):
    """Something the user should know about a converted model (e.g. a feature the engine does not implement)."""


def warn(msg: str):
    warnings.warn(msg, ConversionWarning, stacklevel=2)


def parse_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name not in DTYPES:
        raise FastEagleError(f"unsupported --dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection from the interleaved rope layout (rotation pairs (2i, 2i+1) in each
    head: Meta, llama2.c, llama.cpp/GGUF) to the rotate-half layout (pairs (i, i + head_dim/2)) that model.py uses.
    w: [n_heads * head_dim, ...] (weight or bias). Inverse of llama.cpp's convert_hf_to_gguf `permute`."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise FastEagleError(f"cannot un-permute a Q/K projection with {rows} rows into {n_heads} heads")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half (what llama.cpp's converter does to HF weights)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_args(args: ModelArgs, where: str):
    """Reject hyperparameters the model cannot be built from, before any weight is read."""
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size"):
        v = getattr(args, name)
        if not isinstance(v, int) or v <= 0:
            raise FastEagleError(f"{where}: {name} must be a positive integer, got {v!r}")
    if args.n_heads % args.n_kv_heads:
        raise FastEagleError(f"{where}: n_heads ({args.n_heads}) is not a multiple of n_kv_heads ({args.n_kv_heads})")
    if args.head_dim % 2:
        raise FastEagleError(f"{where}: head_dim ({args.head_dim}) must be even for rotary embeddings")


def expected_tensors(args: ModelArgs, quantization: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict (meta tensors: names, shapes, dtypes) a checkpoint of args (and quantization) holds."""
    from fasteagle.quant import quantized_skeleton

    with torch.device("meta"):
        model = Transformer(args)
        if quantization:
            quantized_skeleton(model, quantization)
    return model.state_dict()


QUANTIZED_STORES = ("weight_int8", "weight_int4", "weight_scale", "weight_scales_zeros")  # kept as they are


def check_state(state: dict, args: ModelArgs, where: str, origin: dict | None = None,
                quantization: dict | None = None):
    """Names and shapes of converted weights must match what ModelArgs (and the quantization entry) implies.
    origin maps our names to the source's tensor names, for error messages."""
    origin = origin or {}
    tensors = expected_tensors(args, quantization)
    expected = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = [k for k in expected if k not in state]
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise FastEagleError(f"{where}: missing tensors: {', '.join(missing[:8])}{more}")
    extra = [k for k in state if k not in expected]
    if extra:
        names = [origin.get(k, k) for k in extra]
        raise FastEagleError(f"{where}: unexpected tensors for this architecture: {', '.join(names[:8])}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise FastEagleError(
                f"{where}: tensor {origin.get(k, k)} has shape {tuple(state[k].shape)} but the config implies {shape}"
            )
        if not tensors[k].is_floating_point() and state[k].dtype != tensors[k].dtype:
            raise FastEagleError(f"{where}: tensor {origin.get(k, k)} is {state[k].dtype}, not {tensors[k].dtype}")


def check_out_dir(out_dir):
    """Fail before any expensive work if the output would be refused at the end anyway."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FastEagleError(f"{out_dir}: output directory exists and is not empty")


def progress(items, desc: str):
    """tqdm over tensors on a terminal (big models take minutes); silent when stderr is not a TTY."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="tensor", disable=None, leave=False, file=sys.stderr)


def write_target(out_dir, args: ModelArgs, state: dict, dtype: torch.dtype, export_tokenizer, source: dict,
                 origin: dict | None = None, quantization: dict | None = None) -> Path:
    """Validate `state` against `args`, then write config.json + model.safetensors + tokenizer files into
    OUT_DIR atomically. export_tokenizer(dir) writes the tokenizer files and returns the config entries.
    quantization: the checkpoint's quantization entry (fasteagle/quant.py) when state holds quantized weights; those
    are written as they are, every other tensor in dtype."""
    where = source.get("path", "source")
    check_state(state, args, where, origin, quantization)
    state = {k: v if k.endswith(QUANTIZED_STORES) else v.to(dtype) for k, v in state.items()}
    with atomic_output_dir(out_dir) as tmp:
        tok = export_tokenizer(tmp)
        config = {"kind": "target", "model": args.to_dict(), **tok, "source": {**source, "dtype": dtype_name(dtype)}}
        if quantization:
            config["quantization"] = quantization
        write_checkpoint(tmp, config, state)
    return Path(out_dir)
