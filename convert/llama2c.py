"""llama2.c `.bin` checkpoint (legacy v0 or version-1 export) -> fasteagle checkpoint.

Legacy: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative: unshared classifier),
seq_len), then fp32 tensors in run.c order: embedding, attn norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm,
freq_cis_real/imag [seq_len, head_dim/2] (unused), classifier (if unshared).
Version 1: uint32 magic "ak42", int32 version, the same 7 ints, uint8 shared_classifier, zero padding to 256 bytes,
then fp32: attn norms, ffn norms, final norm, embedding, wq, wk, wv, wo, w1, w2, w3, classifier (if unshared).
Every matrix is stored [out, in] like nn.Linear. llama2.c's rope rotates interleaved pairs (2i, 2i+1), so wq/wk
rows are permuted per head to the rotate-half layout."""
import struct
from pathlib import Path

import numpy as np
import torch

from fasteagle.convert.common import check_args, check_out_dir, interleaved_to_half, parse_dtype, write_target
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs

MAGIC = 0x616B3432  # "ak42"
V1_HEADER = 256


def read_header(path: Path) -> tuple[dict, int]:
    """Returns (params, byte offset of the first weight). params: dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size (positive), seq_len, shared (bool), version (0 = legacy)."""
    with open(path, "rb") as f:
        head = f.read(V1_HEADER)
    if len(head) < 28:
        raise FastEagleError(f"{path}: truncated llama2.c checkpoint ({len(head)} bytes, header needs 28)")
    magic, version = struct.unpack_from("<Ii", head, 0)
    if magic == MAGIC:
        if version != 1:
            raise FastEagleError(f"{path}: llama2.c export version {version} is not supported (only fp32 version 1 "
                                 f"and the legacy format)")
        if len(head) < 37:
            raise FastEagleError(f"{path}: truncated llama2.c version-1 header")
        vals = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        offset = V1_HEADER
    else:
        vals = struct.unpack_from("<7i", head, 0)
        version, shared, offset = 0, vals[5] > 0, 28
    p = dict(zip(("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"), vals))
    p["vocab_size"] = abs(p["vocab_size"])
    p.update(shared=shared, version=version)
    bad = [k for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len") if p[k] <= 0]
    if bad or p["dim"] % p["n_heads"]:
        raise FastEagleError(f"{path}: not a llama2.c checkpoint (implausible header {vals})")
    return p, offset


def tensor_layout(p: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(our name or None to skip, shape) in file order."""
    d, h, L, hd = p["dim"], p["hidden_dim"], p["n_layers"], p["dim"] // p["n_heads"]
    kv = p["n_kv_heads"] * hd
    per_layer = lambda name, shape: [(f"layers.{i}.{name}", shape) for i in range(L)]  # noqa: E731
    attn = (per_layer("attn.wq.weight", (d, d)) + per_layer("attn.wk.weight", (kv, d))
            + per_layer("attn.wv.weight", (kv, d)) + per_layer("attn.wo.weight", (d, d)))
    ffn = per_layer("mlp.w1.weight", (h, d)) + per_layer("mlp.w2.weight", (d, h)) + per_layer("mlp.w3.weight", (h, d))
    embed = [("embed.weight", (p["vocab_size"], d))]
    if p["version"] == 0:
        freqs = [(None, (p["seq_len"], hd // 2)), (None, (p["seq_len"], hd // 2))]
        layout = (embed + per_layer("attn_norm.weight", (d,)) + attn + per_layer("mlp_norm.weight", (d,)) + ffn
                  + [("norm.weight", (d,))] + freqs)
    else:
        layout = (per_layer("attn_norm.weight", (d,)) + per_layer("mlp_norm.weight", (d,)) + [("norm.weight", (d,))]
                  + embed + attn + ffn)
    if not p["shared"]:
        layout.append(("output.weight", (p["vocab_size"], d)))
    return layout


def read_llama2c(path: Path) -> tuple[ModelArgs, dict, dict]:
    """(ModelArgs, fp32 state dict in our layout, header params)."""
    p, offset = read_header(path)
    layout = tensor_layout(p)
    need = offset + 4 * sum(int(np.prod(s)) for _, s in layout)
    size = path.stat().st_size
    if size != need:
        what = "truncated" if size < need else "has trailing data"
        raise FastEagleError(
            f"{path}: llama2.c checkpoint {what}: the header (dim={p['dim']}, hidden_dim={p['hidden_dim']}, "
            f"n_layers={p['n_layers']}, n_heads={p['n_heads']}, n_kv_heads={p['n_kv_heads']}, "
            f"vocab_size={p['vocab_size']}, seq_len={p['seq_len']}) implies {need} bytes, the file has {size}"
        )
    args = ModelArgs(
        vocab_size=p["vocab_size"], dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"], head_dim=p["dim"] // p["n_heads"], intermediate_size=p["hidden_dim"],
        norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=p["seq_len"], tie_embeddings=p["shared"],
        arch="llama",
    )
    check_args(args, str(path))
    data = np.memmap(path, dtype="<f4", mode="r", offset=offset)  # big models: read tensor by tensor
    state, pos = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        if name is not None:
            state[name] = torch.from_numpy(data[pos:pos + n].reshape(shape).copy())
        pos += n
    for i in range(args.n_layers):
        state[f"layers.{i}.attn.wq.weight"] = interleaved_to_half(state[f"layers.{i}.attn.wq.weight"], args.n_heads)
        state[f"layers.{i}.attn.wk.weight"] = interleaved_to_half(state[f"layers.{i}.attn.wk.weight"], args.n_kv_heads)
    return args, state, p


def convert_llama2c(src, out_dir, dtype: str | None = None, tokenizer=None) -> Path:
    """Convert a llama2.c .bin. tokenizer: a llama2.c tokenizer.bin (default: tokenizer.bin beside SRC)."""
    from fasteagle.tokenizer import export_tokenizer_llama2c

    src = Path(src)
    if not src.exists():
        raise FastEagleError(f"{src}: no such file or directory")
    if not src.is_file():
        raise FastEagleError(f"{src}: not a llama2.c checkpoint file (it is a directory)")
    tok = Path(tokenizer) if tokenizer else src.parent / "tokenizer.bin"
    if not tok.is_file():
        raise FastEagleError(f"{tok}: tokenizer file not found (pass --tokenizer PATH to a llama2.c tokenizer.bin)")
    check_out_dir(out_dir)
    args, state, p = read_llama2c(src)
    torch_dtype = parse_dtype(dtype, torch.float32)
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    source = {"type": "llama2c", "path": str(src.resolve()), "version": p["version"], "tokenizer": str(tok.resolve())}
    return write_target(out_dir, args, state, torch_dtype, lambda d: export_tokenizer_llama2c(tok, d), source)
