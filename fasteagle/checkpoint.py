"""The one on-disk format every converter writes and every loader reads.

A checkpoint directory holds:
  config.json        {"format": "fasteagle-v1", "kind": "target" | "draft", "model": {...ModelArgs or DraftArgs...},
                      "tokenizer": {...}, "bos_token_id", "eos_token_ids", "add_bos", "chat_template_jinja", "bos_token",
                      "eos_token" (targets: see fasteagle/tokenizer), "source",
                      "quantization": {"mode": "int8" | "int4", "group_size"} (quantized targets: fasteagle/quant.py)}
  model.safetensors  weights under this package's module names (e.g. layers.0.attn.wq.weight; quantized:
                     layers.0.attn.wq.weight_int8 + .weight_scale, or .weight_int4 + .weight_scales_zeros)
  tokenizer files    whatever `tokenizer.json`'s "tokenizer" entry names (targets only)
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from fasteagle.errors import FastEagleError

FORMAT = "fasteagle-v1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def read_config(ckpt_dir, kind: str) -> dict:
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / CONFIG
    if not ckpt_dir.is_dir():
        raise FastEagleError(f"{ckpt_dir}: not a directory")
    if not cfg_path.is_file() or not (ckpt_dir / WEIGHTS).is_file():
        raise FastEagleError(
            f"{ckpt_dir}: not a fasteagle checkpoint (expected {CONFIG} and {WEIGHTS}; "
            f"convert a model first with `python -m fasteagle.convert`)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastEagleError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise FastEagleError(f"{cfg_path}: unknown format {cfg.get('format')!r} (expected {FORMAT!r})")
    if cfg.get("kind") != kind:
        raise FastEagleError(f"{ckpt_dir}: is a {cfg.get('kind')!r} checkpoint, expected a {kind!r} checkpoint")
    return cfg


def load_weights(module: torch.nn.Module, ckpt_dir, device="cpu", dtype=torch.float32, skip=(), shard=None):
    """Load model.safetensors into `module`, checking that names and shapes match exactly.
    shard(name) -> (dim, rank, world) or None: read only that rank's 1/world slice of the tensor along dim (tensor
    parallelism, fasteagle.tp: nothing else of it is read into memory)."""
    path = Path(ckpt_dir) / WEIGHTS
    expected = module.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys()) - set(skip)
            missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or extra:
                raise FastEagleError(f"{path}: weights do not match the config: missing {missing[:5]}, "
                                     f"unexpected {extra[:5]}")
            state = {name: _read(f, name, tuple(expected[name].shape), shard and shard(name), path) for name in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise FastEagleError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    module.load_state_dict(state, strict=True)
    return module.to(device=device, dtype=dtype)


def _read(f, name: str, want: tuple, shard, path) -> torch.Tensor:
    """One tensor of an open safetensors file, whole or this rank's slice, after checking its full shape."""
    sl = f.get_slice(name)
    full = tuple(sl.get_shape())
    if shard is None:
        if full != want:
            raise FastEagleError(f"{path}: {name} has shape {full} but the config implies {want}")
        return f.get_tensor(name)
    dim, rank, world = shard
    if full[dim] % world or full[:dim] + (full[dim] // world,) + full[dim + 1:] != want:
        raise FastEagleError(f"{path}: {name} has shape {full}, which does not split into {world} parts of {want}")
    n = full[dim] // world
    return sl[rank * n:(rank + 1) * n] if dim == 0 else sl[:, rank * n:(rank + 1) * n]


@contextmanager
def atomic_output_dir(out_dir):
    """Yield a temporary directory beside `out_dir`; rename it into place only if the body succeeds,
    so a failed conversion never leaves a half-written checkpoint."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FastEagleError(f"{out_dir}: output directory exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _default_permissions(ckpt_dir: Path):
    """mkdtemp makes the directory 0700 and safetensors writes 0600; give the checkpoint the permissions of any
    other file the user creates (umask applied), so that it can be shared like one."""
    umask = os.umask(0)
    os.umask(umask)
    ckpt_dir.chmod(0o777 & ~umask)
    for f in ckpt_dir.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def write_checkpoint(out_dir, config: dict, state_dict: dict):
    """Write config + weights into an (already created, e.g. by atomic_output_dir) directory."""
    out_dir = Path(out_dir)
    config = {"format": FORMAT, **config}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(out_dir / WEIGHTS))
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_target(ckpt_dir, device="cpu", dtype=torch.float32, max_seq_len: int | None = None,
                attn_backend: str | None = None, quantize: str | None = None, group_size: int | None = None,
                tp=None):
    """Load a converted target model. Returns (Transformer with its cache set up, config dict).
    tp (fasteagle.tp.TP): load this rank's shard only (tensor parallelism; the ranks are checked to agree).
    attn_backend: "triton" (the Triton kernels; the default on CUDA) or "sdpa" (PyTorch; the default elsewhere).
    A quantized checkpoint (config "quantization", fasteagle.quantize) loads as such; quantize ("int8" / "int4",
    group_size for int4) quantizes a fp checkpoint on load (fasteagle.quant)."""
    from fasteagle import quant
    from fasteagle.model import ModelArgs, Transformer

    cfg = read_config(ckpt_dir, "target")
    try:
        args = ModelArgs.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise FastEagleError(f"{ckpt_dir}/{CONFIG}: bad model config: {e}") from None
    stored = cfg.get("quantization")
    if quantize and stored:
        raise FastEagleError(f"{ckpt_dir}: already quantized ({stored}); load it without quantizing")
    if tp is not None and (stored or quantize):
        raise FastEagleError("tensor parallelism of quantized targets is not supported yet")
    with torch.device("meta"):
        model = Transformer(args)
        if stored:
            quant.quantized_skeleton(model, stored, f"{ckpt_dir}/{CONFIG}")
        if tp is not None:
            from fasteagle import tp as tensor_parallel

            tensor_parallel.check_same("checkpoint", tensor_parallel.fingerprint(ckpt_dir), tp)
            tensor_parallel.shard(model, tp)
    model = model.to_empty(device="cpu")
    if quantize:  # from the fp32 weights, on the CPU; then onto the device
        group_size = quant.check_settings(model, quantize, group_size)  # before reading the weights
        model = quant.quantize_model(load_weights(model, ckpt_dir), quantize, group_size).to(device, dtype)
    else:
        shard = None if tp is None else (lambda name: tensor_parallel.shard_of(name, tp))
        model = load_weights(model, ckpt_dir, device=device, dtype=dtype, shard=shard)
    if model.quantization:
        quant.prepare_model(model)
    if attn_backend is None:
        attn_backend = "triton" if torch.device(device).type == "cuda" else "sdpa"
    model.setup_cache(max_seq_len or args.max_position_embeddings, attn_backend=attn_backend)
    return model.eval(), cfg
