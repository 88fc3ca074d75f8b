"""Published EAGLE-1/2 draft heads (SafeAILab/EAGLE layout) -> fasteagle draft checkpoint.

A head directory holds a LLaMA-style config.json (num_hidden_layers 1, optional "bias" for the fc layer, default
true) and pytorch_model.bin or model.safetensors with
    fc.weight [dim, 2*dim], fc.bias [dim]
    layers.0.self_attn.{q,k,v,o}_proj.weight, layers.0.mlp.{gate,up,down}_proj.weight,
    layers.0.post_attention_layernorm.weight
    embed_tokens.weight (a copy of the target's; only its shape is checked: the engine uses the target's)
    layers.0.input_layernorm.weight (some exports carry it; the reference never applies it to the first layer)
EAGLE-3 heads (midlayer.*, d2t/t2d reduced vocabulary) are a different architecture and are rejected.
"""
import json
from pathlib import Path

import torch

from fasteagle.checkpoint import read_config
from fasteagle.convert.common import parse_dtype, progress
from fasteagle.convert.hf import _iter_safetensors, _iter_torch_bin, hf_name_to_ours, model_args_from_hf, weight_files
from fasteagle.draft import DraftHead, save_draft
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs

IGNORED = {"embed_tokens.weight", "layers.0.input_layernorm.weight"}


def read_head(src: Path):
    where = str(src)
    cfg_path = src / "config.json"
    if not src.is_dir() or not cfg_path.is_file():
        raise FastEagleError(f"{src}: not an EAGLE head directory (expected config.json and weights)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastEagleError(f"{cfg_path}: not valid JSON ({e})") from None
    if not cfg.get("architectures") and "model_type" not in cfg:
        cfg = {**cfg, "model_type": "llama"}
    args, _ = model_args_from_hf(cfg, where)
    if args.n_layers != 1:
        raise FastEagleError(f"{where}: an EAGLE-1/2 head has one decoder layer, config says {args.n_layers}")
    tensors = {}
    for path in weight_files(src):
        reader = _iter_safetensors(path) if path.suffix == ".safetensors" else _iter_torch_bin(path)
        tensors.update(progress(reader, desc=f"reading {path.name}"))
    if any(k.startswith("midlayer.") for k in tensors) or "d2t" in tensors:
        raise FastEagleError(f"{where}: this is an EAGLE-3 head; only EAGLE-1/2 heads are supported")
    return cfg, args, tensors


def convert_eagle(src, out_dir, target, dtype: str | None = None) -> Path:
    """Convert the head at `src` for the converted target checkpoint at `target`, checking they fit."""
    src, out_dir = Path(src), Path(out_dir)
    cfg, args, tensors = read_head(src)
    tcfg = read_config(target, "target")
    t_dim, t_vocab = tcfg["model"]["dim"], tcfg["model"]["vocab_size"]
    if args.dim != t_dim:
        raise FastEagleError(f"{src}: head hidden size {args.dim} does not match the target's {t_dim}")
    if args.vocab_size != t_vocab:
        raise FastEagleError(f"{src}: head vocabulary {args.vocab_size} does not match the target's {t_vocab}")
    emb = tensors.get("embed_tokens.weight")
    if emb is not None and tuple(emb.shape) != (t_vocab, t_dim):
        raise FastEagleError(f"{src}: embed_tokens.weight is {tuple(emb.shape)}, the target's is {(t_vocab, t_dim)}")
    fc_bias = bool(cfg.get("bias", True))
    state = {}
    for name, t in tensors.items():
        if name in IGNORED:
            continue
        ours = name if name.startswith("fc.") else hf_name_to_ours("model." + name)
        if ours is None:
            raise FastEagleError(f"{src}: unexpected tensor {name!r} in an EAGLE-1/2 head")
        state[ours] = t
    if "fc.bias" in state and not fc_bias:
        raise FastEagleError(f"{src}: config.json says bias=false but the weights have fc.bias")
    # the head's own target-side geometry: vocabulary and tied-ness come from the target
    args = ModelArgs(**{**args.to_dict(), "tie_embeddings": False})
    head = DraftHead(args, fc_bias=fc_bias)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise FastEagleError(f"{src}: head weights missing: {', '.join(missing[:6])}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise FastEagleError(f"{src}: {name} has shape {tuple(t.shape)}, the config implies "
                                 f"{tuple(expected[name].shape)}")
    head.load_state_dict(state)
    head = head.to(parse_dtype(dtype, next(iter(tensors.values())).dtype if tensors else torch.float32))
    save_draft(head, out_dir, {"source": {"converter": "eagle", "path": str(src.resolve()),
                                          "target": str(Path(target).resolve())}})
    return out_dir


def add_eagle(sub):
    p = sub.add_parser("eagle", help="EAGLE-1/2 draft head (SafeAILab/EAGLE layout) for a converted target",
                       description="EAGLE-1/2 draft head (SafeAILab/EAGLE layout) for a converted target")
    p.add_argument("src", metavar="SRC", help="head directory: config.json + pytorch_model.bin or model.safetensors")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output draft checkpoint directory")
    p.add_argument("--target", required=True, metavar="DIR", help="the converted target checkpoint it drafts for")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the head's own")
    p.set_defaults(run=lambda a: convert_eagle(a.src, a.out_dir, a.target, a.dtype))
